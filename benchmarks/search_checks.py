"""The placement search's checks that stop once a candidate can no longer pass, against the code before them.

A candidate's check (top-1 agreement, or SQNR for an output without classes) is pooled over the check samples, and
the reference's outputs on all of them are known first: noise and disagreements only accumulate, so once even a
perfect rest cannot lift the result to its bar the check stops (``agreement.PrefixCheck``); and a staged search
whose whole-model candidates failed their checks checks the region candidates before timing them, racing only those
that pass. Neither changes a verdict; both matter where the models run one sample at a time (a fixed batch dim)
and their candidates fail checks: PaddleOCR's v4 detector and recognizer. The digits example (its checks run as one
batch) shows the change costs nothing where it cannot help.

For each model: the default ``normalize`` + ``quantize`` pipeline (``onnxopt.optimize``, as
``benchmarks/ocr_agreement.py`` runs it: 32 rendered calibration inputs for the OCR models, 200 digits images for the
example), with this commit's code and with the code of ``--before REF`` (a temporary git worktree first on
``PYTHONPATH``), each in its own process, the versions taking turns going first, ``--rounds`` times each. Reported:
wall time of ``optimize`` (imports excluded; the fastest run and every run), the search's and the mixed-precision
fallback's own seconds, the decision (the chosen candidate, every candidate's rejected-or-not, the fallback's
trials) and whether it is the same for both versions.

Usage: nice -n 5 python benchmarks/search_checks.py --before REF [--rounds 2] [--models example,det,rec]
       [--out reports/search_checks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script

#: Run in a fresh interpreter whose PYTHONPATH starts with the version's tree: imports onnxopt from there.
WORKER = """
import json, sys, time
spec = json.loads(sys.argv[1])
import onnxopt, onnxopt.passes.quantize, onnxruntime.quantization
started = time.perf_counter()
result = onnxopt.optimize(spec["model"], spec.get("recipe", ["normalize", "quantize"]), calib=spec["calib"],
                          eval=spec.get("eval"), input_shapes=spec["shapes"], measure_latency=False)
seconds = time.perf_counter() - started
details = result.report.to_dict()["steps"][-1].get("details", {})
print(json.dumps({"seconds": seconds, "onnxopt": onnxopt.__file__, "placement": details.get("placement", {}),
                  "details": details}))
"""


def _cases(workdir: Path) -> list[dict[str, Any]]:
    from onnxopt import examples

    digits = np.load(examples.default_calib_path())
    np.savez(workdir / "example.npz", **{key: digits[key][:200] for key in digits.files})
    cases = [{"key": "example", "title": "example digits_cnn (200 calibration images)",
              "model": str(examples.default_model_path()), "calib": str(workdir / "example.npz"), "shapes": {}}]
    try:
        from ocr_agreement import MODELS, model_path, render_inputs
    except ImportError as exc:  # rapidocr-onnxruntime missing
        print(f"PaddleOCR models left out: {exc}", file=sys.stderr)
        return cases
    text = render_inputs(32, seed=11)
    for key, title in (("det", "PaddleOCR v4 detector"), ("rec", "PaddleOCR v4 recognizer")):
        np.savez(workdir / f"{key}.npz", x=text[key])
        cases.append({"key": key, "title": f"{title} (32 rendered calibration inputs)", "model": str(model_path(key)),
                      "calib": str(workdir / f"{key}.npz"), "shapes": {"x": list(MODELS[key][1])}})
    return cases


def run_version(spec: dict[str, Any], tree: Path) -> dict[str, Any]:
    """``spec``'s pipeline run with the code of ``tree``, in a fresh process: wall time and the last step's
    details."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"{spec['key']} with {tree}: exit {done.returncode}: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["onnxopt"].startswith(str(tree)):
        raise RuntimeError(f"imported {out['onnxopt']}, not the code of {tree}")
    return out


#: How a rejection by a check (not by timing) begins: the SQNR or agreement check, or an accuracy budget.
CHECK_FAILURES = ("SQNR", "top-1", "accuracy drop")


def _decision(placement: dict[str, Any]) -> dict[str, Any]:
    """What the checks decided: each checked candidate's verdict, and the fallback's trials (the candidate finally
    chosen also depends on timing, which differs from run to run whatever the code)."""
    fallback = placement.get("mixed_fallback", {})
    checks = {c["label"]: not str(c.get("rejected") or "").startswith(CHECK_FAILURES)
              for c in placement.get("candidates", []) if c.get("sqnr_db") is not None}
    return {"checks": checks, "fallback_trials": [[t["fp32_layers"], t["passed"]] for t in fallback.get("trials", [])],
            "fallback_layers": fallback.get("fp32_layers"), "chosen": placement.get("chosen")}


def same_checks(one: dict[str, Any], other: dict[str, Any]) -> tuple[bool, int]:
    """Whether two runs' checks agree (every candidate checked in both, and the fallback's trials), and how many
    candidates both checked."""
    both = set(one["checks"]) & set(other["checks"])
    same = all(one["checks"][label] == other["checks"][label] for label in both)
    same = same and one["fallback_trials"] == other["fallback_trials"] and (
        one["fallback_layers"] == other["fallback_layers"])
    return same, len(both)


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    placement = out["placement"]
    stopped = [c["checked_samples"] for c in placement.get("candidates", []) if c.get("checked_samples")]
    return {"seconds": out["seconds"], "search_seconds": sum(placement.get("seconds", {}).values()),
            "fallback_seconds": placement.get("mixed_fallback", {}).get("seconds"),
            "checks_stopped": stopped, "check_samples": placement.get("agreement_samples"),
            "decision": _decision(placement)}


def side_by_side(cases: Callable[[Path], list[dict[str, Any]]], before: str, rounds: int,
                 summary: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of ``cases(workdir)`` run with this commit's code and with ``before``'s (a temporary git worktree), the
    versions taking turns going first, ``rounds`` times each: per case {"model": title, "runs": {version:
    [summary(run), ...]}}."""
    from large_model import worktree

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-side-by-side-") as tmp:
        workdir = Path(tmp)
        old = worktree(before, workdir / "before")
        versions = {"this commit": REPO, f"before ({before})": old}
        try:
            for spec in cases(workdir):
                runs: dict[str, list[dict[str, Any]]] = {label: [] for label in versions}
                for round_ in range(rounds):
                    for label in (list(versions) if round_ % 2 == 0 else list(versions)[::-1]):
                        result = summary(run_version(spec, versions[label]))
                        runs[label].append(result)
                        print(f"  {spec['key']} {label}: {result}", file=sys.stderr, flush=True)
                rows.append({"model": spec["title"], "runs": runs})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
    return rows


def side_by_side_parser(doc: str | None, report: str) -> argparse.ArgumentParser:
    """The options every this-code-vs-before benchmark takes: --before, --rounds, --out (default reports/REPORT)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, metavar="REF", help="git ref of the code to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "reports" / report))
    return parser


def run_facts() -> dict[str, str]:
    """When, on what host and at what load a side-by-side run was made (for its report's header)."""
    from onnxopt.hostinfo import host_info

    info = host_info()
    return {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": f"{info.cpu_model or info.machine}, {info.logical_cores} logical cores; onnxruntime "
                    f"{info.onnxruntime_version}",
            "load": ", ".join(f"{v:.1f}" for v in os.getloadavg())}


def report_header(title: str, script: str, payload: dict[str, Any]) -> list[str]:
    """The first lines of a this-code-vs-before report: its title, the command that made it, the host and load
    (:func:`run_facts`)."""
    return [f"# {title} (this code vs before)", "",
            f"Generated by `nice -n 5 python benchmarks/{script} --before {payload['before']} --rounds "
            f"{payload['rounds']}` on {payload['when']} (see the script's docstring). Do not edit by hand.", "",
            f"Host: {payload['host']}; load average {payload['load']}.", ""]


def render(payload: dict[str, Any]) -> str:
    lines = [
        *report_header("The placement search's checks: stop once failed, regions checked before timing",
                       "search_checks.py", payload),
        "Each model: the default `normalize` + `quantize` pipeline, each version in its own process, the versions "
        f"taking turns going first, {payload['rounds']} runs each. Wall time: the fastest run (all runs in "
        "brackets). Search / fallback: the placement search's own seconds and, within them, the mixed-precision "
        "fallback's (fastest run's). Checks stopped: candidates whose check ended before the last of the check "
        "samples, and after how many. Chosen: the candidate kept, in each run (among candidates that pass their "
        "checks the fastest wins: a timing, which can differ from run to run whatever the code). Checks as before: "
        "every candidate checked by both versions got the same verdict, and the fallback's trials (the number of "
        "layers kept FP32 and whether the candidate passed) were the same, comparing every run with every run of "
        "the code before.", "",
        "| model | code | wall time | search | fallback | checks stopped early | chosen | checks as before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        labels = list(row["runs"])
        before_runs = row["runs"][labels[-1]]
        for label in labels:
            runs = row["runs"][label]
            best = min(runs, key=lambda r: r["seconds"])
            all_runs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
            stopped = best["checks_stopped"]
            early = (f"{len(stopped)} (after {min(stopped)}-{max(stopped)} of {best['check_samples']} samples)"
                     if stopped else "none")
            fallback = f"{best['fallback_seconds']:.1f} s" if best["fallback_seconds"] is not None else "-"
            compared = [same_checks(r["decision"], b["decision"]) for r in runs for b in before_runs]
            counts = sorted({n for _, n in compared})
            verdict = (f"{'yes' if all(same for same, _ in compared) else 'NO'} (candidates checked by both: "
                       f"{'-'.join(str(n) for n in dict.fromkeys([counts[0], counts[-1]]))})")
            chosen = ", ".join(dict.fromkeys(r["decision"]["chosen"] for r in runs))
            lines.append(f"| {row['model']} | {label} | {best['seconds']:.1f} s ({all_runs}) | "
                         f"{best['search_seconds']:.1f} s | {fallback} | {early} | {chosen} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = side_by_side_parser(__doc__, "search_checks.md")
    parser.add_argument("--models", help="comma-separated subset of example,det,rec (default: all)")
    parser.add_argument("--render", metavar="JSON", help="only render the Markdown of an earlier run's JSON")
    args = parser.parse_args()
    if args.render:
        write_report(Path(args.out), json.loads(Path(args.render).read_text()), render)
        return
    wanted = set(args.models.split(",")) if args.models else None
    rows = side_by_side(lambda workdir: [case for case in _cases(workdir) if wanted is None or case["key"] in wanted],
                        args.before, args.rounds, _summary)
    write_report(Path(args.out), {"before": args.before, "rounds": args.rounds, "rows": rows, **run_facts()}, render)


if __name__ == "__main__":
    main()
