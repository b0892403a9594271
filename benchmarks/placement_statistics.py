"""Which statistic of a short round-robin race tells the placement search the truth most often on this host.

The ``quantize`` pass keeps int8 only where it measured it faster than FP32: a 30-round round-robin race
(``placement.race``), then a second race of the winner alone against FP32 (the confirmation). On this shared 2-core
host a race at ORT's default thread count (2) is bimodal: a run either gets both cores or waits for a descheduled
worker thread, and a race's median can land in either mode. The quantization benchmark saw the search keep the
digits example in FP32 in one run of three (its confirmations measured 0.95x and 0.99x) where int8 was 1.3x-1.7x
faster in the benchmark's own timing. The search took the median alone then; it now takes the larger of the median
and minimum ratios (a burst of load inflates a median, never a fastest run), the last row of each table here.

This script records many races of the same models, exactly as the search runs them (its sessions, its random
inputs, 3 warm-up runs, 30 rounds, no early stop), quiet and beside each ``--busy`` count of competing busy-loop
processes. It scores each statistic of a race against the reference of the same condition, FP32 time / int8 time
pooled over every race of that condition, by median and by minimum (a ratio can change with the load itself; a
candidate whose two references disagree is 'either': no error counted). For a candidate clearly faster (reference
>= ``FASTER``) a race that does not show >= 1.02x is a miss; for one clearly not faster (reference <=
``NOT_FASTER``) a race that shows >= 1.02x is a false pick. 'race + confirmation' pairs each race with the next one
(both must show >= 1.02x), as the search does. It also replays each race with two early-stop rules, to see how many
rounds each would save and whether a decision would change, and replays the search's confirmation
(``placement.confirmation``) with and without an inconclusive confirmation run again, as the search consumes races.

Models: the digits example and the zoo nets of the quantization benchmark, each as FP32 (normalized) and as
onnxopt's whole-model int8 QDQ and QOperator (``placement=all``, MinMax, per-channel).

Usage: nice -n 5 python benchmarks/placement_statistics.py [--races 60] [--busy 3,6]
       [--out reports/placement_statistics.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from elsewhere_rules import replay  # noqa: E402 - beside this script
from profiled_split import digits_calib  # noqa: E402 - beside this script
from report_files import write_report  # noqa: E402 - beside this script

CANDIDATES = {"int8 QDQ": {"placement": "all"}, "int8 QOperator": {"placement": "all", "format": "qoperator"}}
ZOO = ("resnet", "shufflenetv2", "mnasnet")
THRESHOLD = 1.02  # placement.MIN_SPEEDUP
FASTER, NOT_FASTER = 1.05, 0.98
Ratios = tuple[float, float]  # one race's (median, minimum) ratio of FP32 time to the candidate's


def _paired(fp32: np.ndarray, other: np.ndarray) -> float:
    n = min(len(fp32), len(other))
    return float(np.median(fp32[:n] / other[:n]))


#: Each statistic: FP32 run times, candidate run times (ms, in round order) -> FP32 time / candidate time.
STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "median": lambda f, c: float(np.median(f) / np.median(c)),
    "minimum": lambda f, c: float(f.min() / c.min()),
    "lower quartile": lambda f, c: float(np.percentile(f, 25) / np.percentile(c, 25)),
    "median of per-round ratios": _paired,
    # the search's rule: faster by median or by fastest run (placement.Candidate.gain)
    "larger of median and minimum": lambda f, c: max(float(np.median(f) / np.median(c)), float(f.min() / c.min())),
}


SCREEN, MARGIN, ROUNDS = 6, 1.15, 30  # placement.SCREEN_ROUNDS, CLEARLY_SLOWER (the early-stop margin), REPEATS
NOT_SLOWER = 0.98  # placement.MIN_RATIO_OTHER

#: What the confirmation (the race's winner timed again) may ask, given its (median, minimum) ratios; the race itself
#: always takes the larger of the two >= THRESHOLD.
CONFIRMATIONS: dict[str, Callable[[float, float], bool]] = {
    "larger >= 1.02 (the race's rule; before)": lambda med, low: max(med, low) >= THRESHOLD,
    "larger >= 1.02 and smaller >= 0.98":
        lambda med, low: max(med, low) >= THRESHOLD and min(med, low) >= NOT_SLOWER,
    "larger >= 1.15, or larger >= 1.02 and smaller >= 0.98 (placement.confirmed)":
        lambda med, low: max(med, low) >= MARGIN or (max(med, low) >= THRESHOLD and min(med, low) >= NOT_SLOWER),
}


def _spread_rule(fp32: np.ndarray, cand: np.ndarray) -> bool:
    """placement.race's rule: every candidate run beats every FP32 run by MARGIN."""
    return bool(cand.max() * MARGIN <= fp32.min())


def _paired_rule(fp32: np.ndarray, cand: np.ndarray) -> bool:
    """At least 90% of the rounds so far have FP32 time / candidate time >= MARGIN (a sign test: at p = 0.5 per
    round, 6 of 6 happens with probability 1/64, 9 of 10 with 11/1024)."""
    return bool(np.mean(fp32 / cand >= MARGIN) >= 0.9)


#: Early-stop rules for a race of one candidate beside FP32: (FP32 times, candidate times) so far -> stop now.
EARLY_STOPS: dict[str, Callable[[np.ndarray, np.ndarray], bool]] = {
    "every run beats every FP32 run by 1.15x (placement.race)": _spread_rule,
    ">= 90% of rounds 1.15x faster than FP32 in the same round": _paired_rule,
}


def early_stop(fp32: np.ndarray, cand: np.ndarray, rule: Callable[[np.ndarray, np.ndarray], bool]) -> tuple[int, bool]:
    """(rounds timed, shows faster by median) when ``rule`` may end the race from round SCREEN on."""
    n = min(len(fp32), len(cand))
    for rounds in range(SCREEN, n + 1):
        if rule(fp32[:rounds], cand[:rounds]):
            break
    else:
        rounds = n
    return rounds, bool(np.median(fp32[:rounds]) / np.median(cand[:rounds]) >= THRESHOLD)


def build(folder: Path) -> list[tuple[str, dict[str, Path]]]:
    """(case name, {label: model path}) for the example and the zoo nets."""
    import onnxopt
    from onnxopt import examples, zoo

    calib = digits_calib(str(folder))
    sources = [("example", examples.default_model_path())]
    sources += [(name, zoo.model_path(name)) for name in ZOO if name in zoo.names()]
    cases = []
    for case, source in sources:
        paths = {"FP32": folder / f"{case}_fp32.onnx"}
        onnxopt.optimize(str(source), ["normalize"], measure_latency=False, output=paths["FP32"])
        for label, params in CANDIDATES.items():
            paths[label] = folder / f"{case}_{label.replace(' ', '_')}.onnx"
            onnxopt.optimize(str(source), ["normalize", {"name": "quantize", **params}], calib=calib,
                             measure_latency=False, output=paths[label])
        cases.append((case, paths))
    return cases


def record(paths: dict[str, Path], races: int) -> list[dict[str, np.ndarray]]:
    """``races`` races of every model, as the placement search times them (its sessions and inputs)."""
    import onnx

    from onnxopt.passes.quantize import placement as pl

    models = {("fp32" if label == "FP32" else label): onnx.load(str(path)) for label, path in paths.items()}
    out = []
    with pl.sharing_sessions():
        original = pl.race
        try:
            def keep(runners, **kwargs):  # noqa: ANN001, ANN202 - placement.race's own signature
                times = original(runners, **{**kwargs, "screen": 10**9})  # every round timed
                out.append({label: np.asarray(ms) for label, ms in times.items()})
                return times

            pl.race = keep
            for _ in range(races):
                pl.time_models(models, None, {})
        finally:
            pl.race = original
    return out


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def score(conditions: dict[str, list[dict[str, np.ndarray]]]) -> dict:
    """Per candidate and condition: the reference (every race of that condition pooled), what it expects, and each
    statistic's and early-stop rule's record. A speed ratio can change with the load itself (int8 kernels and FP32
    ones suffer unlike from a busy machine), so each condition is judged against its own reference."""
    result: dict = {}
    for label in CANDIDATES:
        row: dict = {}
        for condition, races in conditions.items():
            fp32 = np.concatenate([r["fp32"] for r in races])
            cand = np.concatenate([r[label] for r in races])
            reference = {"median": float(np.median(fp32) / np.median(cand)),
                         "minimum": float(fp32.min() / cand.min())}
            values = list(reference.values())
            expect = ("faster" if min(values) >= FASTER else "not faster" if max(values) <= NOT_FASTER else "either")
            stats = {}
            for name, statistic in STATISTICS.items():
                ratios = [statistic(r["fp32"], r[label]) for r in races]
                shows = [ratio >= THRESHOLD for ratio in ratios]
                pairs = [a and b for a, b in zip(shows[::2], shows[1::2])]
                stats[name] = {"ratios": [round(x, 4) for x in ratios], "shows_faster": sum(shows),
                               "pairs_faster": sum(pairs), "pairs": len(pairs),
                               "errors": _errors(expect, shows), "pair_errors": _errors(expect, pairs)}
            full = [float(np.median(r["fp32"]) / np.median(r[label])) >= THRESHOLD for r in races]
            stops = {}
            for name, rule in EARLY_STOPS.items():
                outcomes = [early_stop(r["fp32"], r[label], rule) for r in races]
                stops[name] = {"mean_rounds": float(np.mean([rounds for rounds, _ in outcomes])),
                               "differs": sum(shows != whole for (_, shows), whole in zip(outcomes, full))}
            row[condition] = {"reference": reference, "expect": expect, "statistics": stats, "early_stop": stops}
        result[label] = row
    return result


def _errors(expect: str, shows: list[bool]) -> int | None:
    if expect == "faster":
        return sum(not s for s in shows)
    if expect == "not faster":
        return sum(shows)
    return None


def render(payload: dict) -> str:
    results, races, n_busy = payload["results"], payload["races"], payload["busy"]
    lines = [
        "# Placement search: which race statistic tells int8 from FP32 on this host",
        "",
        f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min ({payload['date']}). Do not edit by "
        "hand.",
        "",
        f"Host: {payload['host']}; 1-minute load average after each case: "
        + ", ".join(f"{x:.1f}" for x in payload["loads"]) + ".",
        "",
        f"Each model set (FP32 normalized, onnxopt's int8 QDQ and QOperator with `placement=all`) raced {races} "
        f"times quiet and {races} times beside each count of busy-loop processes ({n_busy}), exactly as the "
        "placement search "
        "times (its sessions at ORT's default thread count, its seeded inputs at batch 1, 3 warm-up and 30 timed "
        "rounds, no early stop). Reference = FP32 / int8 pooled over every race of the same condition (by median; "
        "by minimum): a ratio can change with the load itself. "
        f"Expected: 'faster' when both references are >= {FASTER}x, 'not faster' when both are <= {NOT_FASTER}x, "
        f"else 'either' (no error counted). A race shows int8 faster when its ratio is >= {THRESHOLD}x; errors = "
        "races (or race + confirmation pairs, both needed) that contradict the expectation.",
        "",
        "| model | candidate | condition | reference (median; min) | expected | statistic | ratio range "
        "| races showing faster | errors (races) | errors (race + confirmation) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[tuple[str, str], dict[str, list[int]]] = {}
    for case, per_candidate in results.items():
        for label, row in per_candidate.items():
            for condition, record in row.items():
                ref, expect = record["reference"], record["expect"]
                for name, s in record["statistics"].items():
                    err = "-" if s["errors"] is None else f"{s['errors']}/{len(s['ratios'])}"
                    perr = "-" if s["pair_errors"] is None else f"{s['pair_errors']}/{s['pairs']}"
                    lines.append(f"| {case} | {label} | {condition} | {ref['median']:.2f}x; {ref['minimum']:.2f}x "
                                 f"| {expect} | {name} | {min(s['ratios']):.2f}-{max(s['ratios']):.2f}x "
                                 f"| {s['shows_faster']}/{len(s['ratios'])} | {err} | {perr} |")
                    if s["errors"] is not None:
                        kind = "misses" if expect == "faster" else "false picks"
                        for key in ((condition, name), ("all", name)):
                            total = totals.setdefault(key, {"misses": [0, 0], "false picks": [0, 0]})[kind]
                            total[0] += s["pair_errors"]
                            total[1] += s["pairs"]
    lines += ["", "## Early stop: a lone candidate beside FP32", "",
              "Each race replayed as a two-model race of FP32 and one candidate: from round "
              f"{SCREEN} on, an early-stop rule may end it; 'differs' = races whose median-based decision "
              f"(>= {THRESHOLD}x) at the stop differs from the decision after all {ROUNDS} rounds.", "",
              "| model | candidate | condition | rule | mean rounds | differs |", "|---|---|---|---|---|---|"]
    for case, per_candidate in results.items():
        for label, row in per_candidate.items():
            for condition, record in row.items():
                for name, stop in record["early_stop"].items():
                    lines.append(f"| {case} | {label} | {condition} | {name} | {stop['mean_rounds']:.1f} "
                                 f"| {stop['differs']}/{races} |")
    lines += _confirmation_lines(results)
    lines += ["", "## Totals: race + confirmation pairs against the candidates' expectations", "",
              "misses = pairs that do not show a clearly faster candidate faster; false picks = pairs that show a "
              "candidate that is not faster as faster.", "",
              "| condition | statistic | misses | false picks |", "|---|---|---|---|"]
    for (condition, name), total in sorted(totals.items(), key=lambda item: item[0][0] == "all"):
        (misses, faster), (picks, slower) = total["misses"], total["false picks"]
        lines.append(f"| {condition} | {name} | {misses}/{faster} | {picks}/{slower} |")
    return "\n".join(lines) + "\n"


def _confirmation_lines(results: dict) -> list[str]:
    """Each confirmation rule replayed on the recorded races: race i (the larger of its median and minimum ratios
    >= THRESHOLD) paired with race i + 1 as the confirmation, from the ratios the JSON keeps."""
    lines = ["", "## Confirmation rules, replayed on the recorded races", "",
             "Race 2k decides by the larger of its median and minimum ratios (>= "
             f"{THRESHOLD}x), race 2k+1 confirms by the rule; int8 is kept when both say so. misses = clearly faster "
             "candidates not kept; false picks = candidates not faster kept; 'either' = how often int8 is kept where "
             "the median and minimum references disagree (MnasNet: faster by median, slower by minimum). Computed "
             "from the ratios of the run's JSON (`--render`, so a run recorded before this table has it too).", "",
             "| condition | confirmation rule | misses | false picks | either: int8 kept |", "|---|---|---|---|---|"]

    def paired(rule: Callable[[float, float], bool]) -> Callable[[list[Ratios]], list[bool]]:
        def kept(ratios: list[Ratios]) -> list[bool]:
            raced = [max(ratio) >= THRESHOLD for ratio in ratios]
            return [a and rule(*b) for a, b in zip(raced[::2], ratios[1::2])]
        return kept

    return (lines + _kept_rows(results, {name: paired(rule) for name, rule in CONFIRMATIONS.items()})
            + _rerun_lines(results))


def search_rule(retries: int) -> Callable[[Callable[[], Ratios]], bool]:
    """The search's decision as it consumes races: a race decides (the larger of its ratios >= THRESHOLD), and one
    that shows int8 faster is confirmed by the next ones as ``placement.confirmation`` takes them (one, or with
    ``retries`` an inconclusive one run again). Replayed by ``elsewhere_rules.replay``."""
    from onnxopt.passes.quantize import placement as pl

    def decide(next_race: Callable[[], Ratios]) -> bool:
        return max(next_race()) >= THRESHOLD and pl.confirmation(next_race, retries)[0]
    return decide


def _rerun_lines(results: dict) -> list[str]:
    """placement.confirmation with and without its inconclusive confirmation run again, replayed as the search
    consumes races (:func:`search_rule`)."""
    from onnxopt.passes.quantize import placement as pl

    rules = {"placement.confirmed, no race run again": 0,
             f"placement.confirmation: {pl.CONFIRM_RETRIES} inconclusive confirmation run again":
                 pl.CONFIRM_RETRIES}
    lines = ["", "## An inconclusive confirmation run again, replayed as the search consumes races", "",
             f"Each candidate's recorded races in order: a race decides (larger of its ratios >= {THRESHOLD}x); one "
             "that shows int8 faster is confirmed by the next race (`placement.confirmed`), or, where that one is "
             "inconclusive (one ratio >= 1.02x, the other < 0.98x: `placement.race_verdict`) and a race may be run "
             "again, by the race after it; the next decision starts at the next unused race. Columns as above, per "
             "decision.", "",
             "| condition | rule | misses | false picks | either: int8 kept |", "|---|---|---|---|---|"]
    return lines + _kept_rows(results, {name: (lambda ratios, rule=search_rule(retries): replay(rule, ratios)[0])
                                        for name, retries in rules.items()})


def _kept_rows(results: dict, rules: dict[str, Callable[[list[Ratios]], list[bool]]]) -> list[str]:
    """One table row per condition and rule: each rule maps a candidate's recorded (median, minimum) ratios to its
    decisions (int8 kept or not), counted against the candidate's expectation and totalled over the conditions."""
    totals: dict[tuple[str, str], dict[str, list[int]]] = {}
    for per_candidate in results.values():
        for row in per_candidate.values():
            for condition, record in row.items():
                ratios = list(zip(record["statistics"]["median"]["ratios"],
                                  record["statistics"]["minimum"]["ratios"]))
                for name, decide in rules.items():
                    kept = decide(ratios)
                    for key in ((condition, name), ("all", name)):
                        total = totals.setdefault(key, {"faster": [0, 0], "not faster": [0, 0], "either": [0, 0]})
                        total[record["expect"]][0] += sum(kept)
                        total[record["expect"]][1] += len(kept)
    lines = []
    for (condition, name), total in sorted(totals.items(), key=lambda item: item[0][0] == "all"):
        kept_fast, fast = total["faster"]
        lines.append(f"| {condition} | {name} | {fast - kept_fast}/{fast} | {total['not faster'][0]}/"
                     f"{total['not faster'][1]} | {total['either'][0]}/{total['either'][1]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--races", type=int, default=60)
    parser.add_argument("--busy", default="3,6", help="counts of competing busy-loop processes, one loaded "
                        "condition each")
    parser.add_argument("--out", default=str(REPO / "reports" / "placement_statistics.md"))
    parser.add_argument("--render", metavar="JSON", help="rewrite --out from a previous run's JSON (its recorded "
                        "races), measuring nothing")
    args = parser.parse_args()
    if args.render is not None:
        import json

        payload = json.loads(Path(args.render).read_text())
        Path(args.out).write_text(render(payload))
        return
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    results, loads = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for case, paths in build(Path(tmp)):
            conditions = {"quiet": record(paths, args.races)}
            for count in (int(n) for n in args.busy.split(",")):
                hogs = busy(count)
                try:
                    time.sleep(0.5)
                    conditions[f"{count} busy"] = record(paths, args.races)
                finally:
                    for hog in hogs:
                        hog.kill()
                        hog.wait()
                time.sleep(0.5)
            loads.append(os.getloadavg()[0])
            results[case] = score(conditions)
            print(f"{case} done", file=sys.stderr, flush=True)
    command = f"nice -n 5 python benchmarks/placement_statistics.py --races {args.races} --busy {args.busy}"
    payload = {"command": command, "minutes": (time.perf_counter() - started) / 60,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": host_info().describe(),
               "races": args.races, "busy": args.busy, "loads": loads, "results": results}
    write_report(Path(args.out), payload, render)


if __name__ == "__main__":
    main()
