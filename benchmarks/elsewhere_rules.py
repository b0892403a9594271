"""Which rule for the placement search's checks at its other settings tells an int8 model that is not slower than FP32
from one that is, on this host.

A winner of the search's race (batch 1) is also timed against FP32 at batch 8 and on one thread
(``placement.other_settings``), in pair races (``placement.not_slower_elsewhere``: two must find it not slower, >=
``placement.MIN_RATIO_OTHER`` by its median and by its fastest run; one race whose two ratios disagree is run again).
This script records many such pair races of the same models, exactly as the search runs them
(``placement.time_models``), and scores each rule against the reference of the same model and setting: the median
over every recorded race of FP32 time / int8 time, by median run and by fastest run, the way the quantization
benchmark reads its runs. A candidate whose reference is >= ``CLEARLY_NOT_SLOWER`` by both is one the rule should
pass (a rejection is a miss); one below ``MIN_RATIO_OTHER`` by either is one it should reject (a pass is a false
pass); the rest are near-ties, where no error is counted. Each rule is replayed on consecutive, disjoint runs of the
recorded races, each decision taking the races it needs.

Models: the digits example and the zoo's MnasNet and ResNet, each as FP32 (normalized), onnxopt's whole-model int8
QDQ and QOperator (``placement=all``, MinMax, per-channel) and the profile-guided split (``node_profile``: the heavy
nodes its profile keeps FP32, the rest QDQ int8), when the profile keeps some node FP32.

Usage: nice -n 5 python benchmarks/elsewhere_rules.py [--races 30] [--nets example,mnasnet,resnet] [--deployed]
       [--out reports/elsewhere_rules.md] [--rescore PREVIOUS.json (score its recorded races again, measure nothing)]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiled_split import digits_calib, input_shapes, net_path, quantize_all  # noqa: E402 - beside this script
from report_files import command_line, write_report  # noqa: E402 - beside this script

from onnxopt.passes.quantize.placement import ELSEWHERE_AT_ONCE  # noqa: E402 - after the path set-up

REPO = Path(__file__).resolve().parents[1]
NOT_SLOWER = 0.98  # placement.MIN_RATIO_OTHER
CLEARLY_NOT_SLOWER = 1.02  # placement.MIN_SPEEDUP

Race = tuple[float, float]  # (ratio by median run, ratio by fastest run) of one pair race


def _each(group: Sequence[Race]) -> bool:
    return all(min(race) >= NOT_SLOWER for race in group)


def _means(group: Sequence[Race]) -> bool:
    return min(statistics.fmean(r[0] for r in group), statistics.fmean(r[1] for r in group)) >= NOT_SLOWER


def _fixed(size: int, rule: Callable[[Sequence[Race]], bool]) -> Callable[[Callable[[], Race]], bool]:
    """A rule on ``size`` races, all run before it decides."""
    return lambda next_race: rule([next_race() for _ in range(size)])


def _placement_rule(next_race: Callable[[], Race]) -> bool:
    from onnxopt.passes.quantize import placement as pl

    return pl.not_slower_elsewhere(next_race)[0]


def _without_at_once(next_race: Callable[[], Race]) -> bool:
    from onnxopt.passes.quantize import placement as pl

    return pl.not_slower_elsewhere(next_race, at_once=None)[0]


def _then_one_more(next_race: Callable[[], Race]) -> bool:
    """The search's rule, then one more race that must not find the winner slower (``placement.race_verdict``):
    the race of FP32 and both finalists at every setting that picks between the split and the whole model."""
    from onnxopt.passes.quantize import placement as pl

    return pl.not_slower_elsewhere(next_race)[0] and pl.race_verdict(*next_race()) != "slower"


#: name -> rule: takes races one at a time (``next_race()`` -> (median ratio, fastest-run ratio)) until it decides
RULES: dict[str, Callable[[Callable[[], Race]], bool]] = {
    "1 race, median and fastest run >= 0.98": _fixed(1, _each),
    "2 races, each median and fastest run >= 0.98 (the search's rule before ELSEWHERE_RETRIES)": _fixed(2, _each),
    "2 races, each median and fastest run >= 0.98, one inconclusive race run again "
    "(placement.not_slower_elsewhere before ELSEWHERE_AT_ONCE)": _without_at_once,
    f"the same, but one race >= {ELSEWHERE_AT_ONCE:.2f} by both passes at once (placement.not_slower_elsewhere)":
    _placement_rule,
    "the same, then one more race not slower (both ratios < 0.98, or one and the other < 1.02, reject)":
    _then_one_more,
    "2 races, their mean median and mean fastest-run ratios >= 0.98": _fixed(2, _means),
    "3 races, each median and fastest run >= 0.98": _fixed(3, _each),
    "3 races, their mean median and mean fastest-run ratios >= 0.98": _fixed(3, _means),
}


def build(name: str, calib: str) -> tuple[Any, dict[str, Any], list[str], int]:
    """FP32 (normalized), the candidates (label -> proto), the split's FP32 nodes and the number of heavy nodes."""
    import onnxopt
    from onnxopt.passes.quantize import node_profile
    from onnxopt.passes.quantize import placement as pl

    fp32 = onnxopt.optimize(str(net_path(name)), ["normalize"], measure_latency=False).model
    models = {"int8 QDQ": quantize_all(fp32, calib), "int8 QOperator": quantize_all(fp32, calib, format="qoperator")}
    order = [n.name for n in fp32.graph.node if n.op_type in pl.HEAVY_OPS]
    settings = pl.search_settings(fp32, input_shapes(fp32, 1), None)
    keep, _ = node_profile.fp32_nodes_by_profile(fp32, models["int8 QDQ"], order, settings)
    if keep and len(keep) < len(order):
        models["profiled split"] = quantize_all(fp32, calib, exclude_nodes=keep)
    return fp32, models, keep, len(order)


def record(fp32: Any, models: dict[str, Any], races: int, deployed: bool = False) -> dict[str, dict[str, list[Race]]]:
    """setting -> label -> ``races`` pair races against FP32, the candidates taking turns race by race; with
    ``deployed``, also the check as deployed (``placement.time_deployed`` at batch 1, ORT's default threads)."""
    from onnxopt.passes.quantize import placement as pl

    settings = {"batch 8": (input_shapes(fp32, 8), None, pl.time_models),
                "1 thread": (input_shapes(fp32, 1), 1, pl.time_models)}
    if deployed:
        settings[pl.DEPLOYED] = (input_shapes(fp32, 1), None, pl.time_deployed)
    out: dict[str, dict[str, list[Race]]] = {setting: {label: [] for label in models} for setting in settings}
    for _ in range(races):
        for setting, (shapes, threads, timer) in settings.items():
            for label, model in models.items():
                timings = timer({pl.FP32: fp32, label: model}, threads, shapes)
                out[setting][label].append(pl.ratios(timings.get(pl.FP32), timings.get(label)))
    return out


def replay(rule: Callable[[Callable[[], Race]], bool], recorded: Sequence[Race]) -> tuple[list[bool], int]:
    """The rule's decisions on consecutive, disjoint runs of the recorded races (each takes what it needs; the last,
    cut short by the end of the record, is dropped), and the races those decisions used."""
    position, verdicts = 0, []

    def next_race() -> Race:
        nonlocal position
        if position == len(recorded):
            raise EOFError
        position += 1
        return recorded[position - 1]

    while True:
        start = position
        try:
            verdicts.append(rule(next_race))
        except EOFError:
            return verdicts, start


def expectation(recorded: Sequence[Race]) -> tuple[Race, str]:
    """The reference of a candidate's recorded races (the median ratio by median run, by fastest run) and what a rule
    should do with it: "pass" (both >= ``CLEARLY_NOT_SLOWER``), "reject" (either < ``NOT_SLOWER``) or "either"."""
    reference = (statistics.median(r[0] for r in recorded), statistics.median(r[1] for r in recorded))
    return reference, ("pass" if min(reference) >= CLEARLY_NOT_SLOWER else "reject" if min(reference) < NOT_SLOWER
                       else "either")


def decided(verdicts: Sequence[bool], used: int, expect: str) -> dict[str, Any]:
    """A rule's decisions on one candidate: passes, decisions, errors (misses where it should pass, false passes
    where it should reject, None on a near-tie) and the races they used."""
    passes = sum(verdicts)
    return {"passes": passes, "decisions": len(verdicts), "races_used": used,
            "errors": len(verdicts) - passes if expect == "pass" else passes if expect == "reject" else None}


def score(recorded: list[Race]) -> dict[str, Any]:
    reference, expect = expectation(recorded)
    rules = {name: decided(*replay(rule, recorded), expect) for name, rule in RULES.items()}
    return {"reference": reference, "expect": expect, "range": (min(min(r) for r in recorded),
                                                                 max(min(r) for r in recorded)), "rules": rules}


def render(payload: dict) -> str:
    deployed = any(len(net["recorded"]) > 2 for net in payload["nets"])
    lines = ["# Placement search: which rule for the checks at batch 8 and on one thread"
             + (", and as deployed" if deployed else ""), "",
             (f"Races recorded by `{payload['recorded_by']}` in {payload['minutes']:.1f} min, scored by "
              f"`{payload['command']}`" if "recorded_by" in payload else
              f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min") + ". Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             f"Each candidate raced against FP32 {payload['races']} times per setting, as the search's checks time "
             "it (pair races of 30 rounds, ORT's default threads at batch 8, one thread at batch 1"
             + ("; as deployed: alternating 10 ms blocks of spinning sessions, ORT's default threads, batch 1, "
                "placement.time_deployed" if deployed else "")
             + "); reference = the "
             "median over those races of FP32 time / candidate time, by median run; by fastest run. 'pass' = both "
             f">= {CLEARLY_NOT_SLOWER}: a rejection is a miss; 'reject' = either < {NOT_SLOWER}: a pass is a false "
             "pass; 'either' = a near-tie, no error counted. Each rule decides on consecutive, disjoint runs of "
             "the recorded races, taking as many as it needs (races per decision: the mean). See the script's "
             "docstring.", ""]
    def tally() -> dict[str, dict[str, int]]:
        return {name: {"misses": 0, "false": 0, "decisions_pass": 0, "decisions_reject": 0, "races": 0,
                       "decisions": 0} for name in RULES}

    totals = tally()
    by_setting: dict[str, dict[str, dict[str, int]]] = {}
    rows = ["| net | candidate | setting | reference | expect | smaller ratio, range over races | "
            + " | ".join(f"{name}: passes" for name in RULES) + " |", "|---|---|---|---|---|---|"
            + "---|" * len(RULES)]
    for net in payload["nets"]:
        for setting, by_label in net["scores"].items():
            for label, cell in by_label.items():
                ref = cell["reference"]
                rows.append(f"| {net['name']} | {label} | {setting} | {ref[0]:.2f}x; {ref[1]:.2f}x | {cell['expect']} "
                            f"| {cell['range'][0]:.2f}-{cell['range'][1]:.2f}x | "
                            + " | ".join(f"{r['passes']}/{r['decisions']}" for r in cell["rules"].values()) + " |")
                for name, r in cell["rules"].items():
                    for counts in (totals[name], by_setting.setdefault(setting, tally())[name]):
                        counts["races"] += r["races_used"]
                        counts["decisions"] += r["decisions"]
                        if cell["expect"] == "pass":
                            counts["misses"] += r["errors"]
                            counts["decisions_pass"] += r["decisions"]
                        elif cell["expect"] == "reject":
                            counts["false"] += r["errors"]
                            counts["decisions_reject"] += r["decisions"]
    summary = ["## Summary", "", "| rule | races per decision | misses (candidate not slower, rejected) | false "
               "passes (candidate slower, passed) |", "|---|---|---|---|"]
    for name, t in totals.items():
        summary.append(f"| {name} | {t['races'] / max(t['decisions'], 1):.2f} | {t['misses']}/{t['decisions_pass']} | "
                       f"{t['false']}/{t['decisions_reject']} |")
    summary += ["", "By setting:", "", "| setting | rule | misses | false passes |", "|---|---|---|---|"]
    for setting, counts in by_setting.items():
        summary += [f"| {setting} | {name} | {t['misses']}/{t['decisions_pass']} | "
                    f"{t['false']}/{t['decisions_reject']} |" for name, t in counts.items()]
    splits = [f"{net['name']}: {len(net['split_fp32'])} of {net['heavy']} heavy nodes FP32" for net in payload["nets"]]
    return "\n".join(lines + summary + ["", "Profile-guided split: " + "; ".join(splits) + ".", "",
                                        "## Every candidate and setting", ""] + rows) + "\n"


def rescored(payload: dict, source: Path) -> dict:
    """``payload`` (a previous run's JSON) with every recorded race scored again by the current :data:`RULES`."""
    for net in payload["nets"]:
        net["scores"] = {setting: {label: score([tuple(race) for race in races]) for label, races in by_label.items()}
                         for setting, by_label in net["recorded"].items()}
    payload["recorded_by"] = payload.get("recorded_by", payload["command"])
    payload["command"] = f"python benchmarks/elsewhere_rules.py --rescore {source}"
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--races", type=int, default=30)
    parser.add_argument("--nets", default="example,mnasnet,resnet")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "elsewhere_rules.md")
    parser.add_argument("--deployed", action="store_true",
                        help="also record the check as deployed (placement.time_deployed: spinning sessions)")
    parser.add_argument("--rescore", type=Path, help="a previous run's JSON: score its recorded races with the "
                                                    "current rules, measuring nothing")
    args = parser.parse_args()
    if args.rescore:
        write_report(args.out, rescored(json.loads(args.rescore.read_text()), args.rescore), render)
        return
    started = time.perf_counter()
    nets = record_nets(args.nets, lambda fp32, models: record(fp32, models, args.races, args.deployed),
                       lambda recorded: {setting: {label: score(races) for label, races in by_label.items()}
                                         for setting, by_label in recorded.items()})
    from onnxopt.hostinfo import host_info

    payload = {"command": command_line("elsewhere_rules.py", parser, args, ("races", "nets", "deployed")),
               "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "races": args.races, "nets": nets}
    write_report(args.out, payload, render)


def record_nets(names: str, record_races: Callable[[Any, dict[str, Any]], dict],
                score_all: Callable[[dict], dict]) -> list[dict[str, Any]]:
    """For each net of ``names`` (comma list): its candidates (:func:`build`), the races ``record_races(fp32,
    models)`` records of them, and ``score_all`` of those; shared with benchmarks/deployed_length.py."""
    import tempfile

    nets = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = digits_calib(tmp)
        for name in names.split(","):
            print(f"{name}: building", flush=True)
            fp32, models, keep, heavy = build(name, calib)
            print(f"{name}: recording the races of {len(models)} candidates", flush=True)
            recorded = record_races(fp32, models)
            nets.append({"name": name, "split_fp32": keep, "heavy": heavy, "recorded": recorded,
                         "scores": score_all(recorded)})
    return nets


if __name__ == "__main__":
    main()
