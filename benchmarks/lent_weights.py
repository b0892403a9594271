"""normalize with and without lending weights to onnxsim (`lend_weights`): the same models, in how much time.

onnxsim serializes the model about ten times and creates two ORT sessions of it for its check, so its time grows
with the weights' bytes, which it cannot fold wherever a weight's consumers also read a computed value. The
normalize pass lends such weights to it as graph inputs (``onnxopt/passes/lent_weights.py``). This script runs the
pass both ways on the same models, alternately, and compares:

Lending is forced on every model here (``lend_weights_from_mb=0``); the pass's default lends only from 32 MB of
weights, because of what part 1 shows.

1. the reliability corpus (``benchmarks/corpus.py``'s models, Keras exports only with ``--tf-python``): the
   ``NormalizePass`` alone, in this process, the faster of ``--repeats`` runs per setting; whether the two
   normalized models serialize byte for byte alike, else whether their op types and their outputs on the case's
   first data sample agree;
2. the external-data MLPs of ``benchmarks/large_model.py`` (67 MB, 269 MB): ``onnxopt optimize --pass normalize``
   as a subprocess per setting (wall time and peak RSS), and whether the two output files are identical.

Usage: nice -n 5 python benchmarks/lent_weights.py [--repeats 3] [--out reports/lent_weights.md] [--tf-python PY]
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report_files import write_report  # noqa: E402 - beside this script

SETTINGS = {"lent": True, "not lent": False}
WIDTHS = (2048, 4096)


def normalize_both(case, repeats: int) -> dict:  # noqa: ANN001 - a corpus.Case
    """Both settings on one corpus model: fastest seconds each, and how the two results compare."""
    import onnx

    from onnxopt.modelio import load_model, to_proto
    from onnxopt.passes import NormalizePass
    from onnxopt.pipeline.context import PassContext

    shapes = {name: tuple(dims) for name, dims in case.input_shapes.items()}
    seconds: dict[str, list[float]] = {label: [] for label in SETTINGS}
    results: dict[str, onnx.ModelProto] = {}
    lent = 0
    for _ in range(repeats):
        for label, lend in SETTINGS.items():
            model = load_model(case.path)
            step = NormalizePass(lend_weights=lend, lend_weights_from_mb=0).bind(PassContext(input_shapes=shapes))
            started = time.perf_counter()
            step(model)
            seconds[label].append(time.perf_counter() - started)
            results[label] = to_proto(model)
            lent = max(lent, step.details.get("onnxsim_lent_weights", 0))
    first, second = results["lent"], results["not lent"]
    row = {"label": case.label, "lent_weights": lent,
           **{f"{label}_s": min(values) for label, values in seconds.items()}}
    row["identical"] = first.SerializeToString() == second.SerializeToString()
    if not row["identical"]:
        row["same_ops"] = Counter(n.op_type for n in first.graph.node) == Counter(n.op_type for n in second.graph.node)
        row["max_abs_diff"] = _output_difference(first, second, case)
    return row


def _output_difference(first, second, case) -> float | None:  # noqa: ANN001 - protos and a corpus.Case
    """The largest absolute difference between the two models' outputs on the case's first data sample."""
    import onnxruntime as ort

    if not case.data:
        return None
    data = np.load(case.data)
    outputs = []
    for proto in (first, second):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {spec.name: data[spec.name][:1] for spec in session.get_inputs() if spec.name in data.files}
        if len(feed) != len(session.get_inputs()):
            return None
        outputs.append(session.run(None, feed))
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0
               for a, b in zip(*outputs))


def mlp_rows(workdir: Path) -> list[dict]:
    """``onnxopt optimize --pass normalize`` on each MLP, per setting, as a subprocess (time and peak RSS)."""
    import large_model

    rows = []
    for width in WIDTHS:
        folder = workdir / f"w{width}"
        folder.mkdir()
        model, calib = large_model.build_mlp(folder, width)
        outputs = {}
        for label, lend in SETTINGS.items():
            out = folder / f"out_{lend}.onnx"
            command = [sys.executable, "-m", "onnxopt", "optimize", str(model), "-o", str(out), "--calib", str(calib),
                       "--pass", f"normalize:lend_weights={str(lend).lower()},lend_weights_from_mb=0", "--no-latency",
                       "--no-cache", "-q"]
            result = large_model.run(command)
            outputs[label] = out
            rows.append({"label": f"MLP W={width}", "setting": label, **result})
            print(f"  w{width} {label}: {result}", file=sys.stderr, flush=True)
        same = filecmp.cmp(outputs["lent"], outputs["not lent"], shallow=False)
        for row in rows[-2:]:
            row["identical_output"] = same
    return rows


def render(payload: dict) -> str:
    corpus_rows = payload["corpus"]
    lines = ["# normalize: weights lent to onnxsim as graph inputs, or not", "",
             f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min ({payload['date']}). Do not edit "
             "by hand.", "", f"Host: {payload['host']}.", "",
             f"## The reliability corpus ({len(corpus_rows)} models)", "",
             "Lending forced on every model (`lend_weights_from_mb=0`; the pass's default lends from 256 MB of "
             f"weights). `NormalizePass` alone, in one process, both settings alternated, the faster of "
             f"{payload['repeats']} runs each. identical = the two normalized models serialize to the same bytes; "
             "otherwise the op types and the outputs on one data sample are compared.", "",
             "| model | weights lent | lent (s) | not lent (s) | ratio | identical | op types | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in corpus_rows:
        ratio = row["lent_s"] / row["not lent_s"] if row["not lent_s"] else float("nan")
        diff = row.get("max_abs_diff")
        lines.append(f"| {row['label']} | {row['lent_weights']} | {row['lent_s']:.3f} | {row['not lent_s']:.3f} "
                     f"| {ratio:.2f}x | {'yes' if row['identical'] else 'no'} "
                     f"| {'-' if row['identical'] else ('same' if row['same_ops'] else 'DIFFERENT')} "
                     f"| {'-' if row['identical'] or diff is None else f'{diff:.3g}'} |")
    with_lent = [r for r in corpus_rows if r["lent_weights"]]
    total = {label: sum(r[f"{label}_s"] for r in corpus_rows) for label in SETTINGS}
    lines += ["", f"Models with a weight lent: {len(with_lent)} of {len(corpus_rows)}; identical results: "
              f"{sum(r['identical'] for r in corpus_rows)} of {len(corpus_rows)}; total time lent "
              f"{total['lent']:.2f} s, not lent {total['not lent']:.2f} s."]
    if payload["not_prepared"]:
        lines += ["", "Not run: " + "; ".join(f"{r['label']} ({r['reason']})" for r in payload["not_prepared"])]
    lines += ["", "## External-data MLPs (`onnxopt optimize --pass normalize`, a subprocess each)", "",
              "| model | setting | exit | wall | peak RSS | outputs identical |", "|---|---|---|---|---|---|"]
    for row in payload["mlps"]:
        lines.append(f"| {row['label']} | {row['setting']} | {row['exit']} | {row['seconds']:.1f} s "
                     f"| {row['peak_mb']} MB | {'yes' if row.get('identical_output') else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "reports" / "lent_weights.md"))
    parser.add_argument("--tf-python", default=None)
    args = parser.parse_args()
    import corpus

    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    rows, not_prepared = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases, _ = corpus.build_corpus(Path(tmp), "all", args.tf_python)
        for case in cases:
            try:
                rows.append(normalize_both(case, args.repeats))
            except Exception as exc:  # noqa: BLE001 - a model the pass refuses is listed, not fatal
                not_prepared.append({"label": case.label, "reason": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            print(f"{case.label}: {rows[-1]}", file=sys.stderr, flush=True)
        mlps = mlp_rows(Path(tmp))
    command = "nice -n 5 python benchmarks/lent_weights.py" + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
        f" --tf-python {args.tf_python}" if args.tf_python else "")
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host_info().describe(),
               "repeats": args.repeats, "corpus": rows, "not_prepared": not_prepared, "mlps": mlps}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
