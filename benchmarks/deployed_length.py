"""How long a race of the placement search's check as deployed must be, and how many: the same verdicts from shorter
races?

The check as deployed (``placement.time_deployed``) times FP32 and a winner in alternating blocks of
``placement.DEPLOYED_BLOCK_MS``, as many as ``placement.DEPLOYED_MODEL_MS`` holds per model (within
``placement.DEPLOYED_BLOCKS``), and the
search's rule for the other settings (``placement.not_slower_elsewhere``) decides on such races. It is the search's
dearest check. This script records many races of the same candidates, twice the search's length by default, with
every block's median, in the order the blocks ran, and replays the rule, with two, three and four races that must
pass, on races cut to their first quarter, half, three quarters and all of the blocks: a race cut to its first k
blocks is exactly what a race of k blocks would have measured (the blocks alternate between the two models, so each
cut keeps them paired; a model too slow to fill the blocks is timed in at least six, so its cuts are shorter than the
search's own races). Each cut is scored against the reference of the full-length races (the median over the recorded races of FP32 time / candidate
time, by median block and by fastest block), as benchmarks/elsewhere_rules.py scores its rules: a candidate >=
``MIN_SPEEDUP`` by both should pass (a rejection is a miss), one below ``MIN_RATIO_OTHER`` by either should be
rejected (a pass is a false pass).

Models: those of benchmarks/elsewhere_rules.py (the digits example, the zoo's MnasNet and ResNet; whole-model int8
QDQ and QOperator and the profile-guided split), ORT's default threads, batch 1.

Usage: nice -n 5 python benchmarks/deployed_length.py [--races 30] [--nets example,mnasnet,resnet]
       [--model-ms MS] [--max-blocks N] [--out reports/deployed_length.md] [--rescore PREVIOUS.json (score its recorded races again, measure nothing)]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from elsewhere_rules import decided, expectation, record_nets, replay  # noqa: E402 - beside this script
from profiled_split import input_shapes  # noqa: E402 - beside this script
from report_files import command_line, write_report  # noqa: E402 - beside this script

from onnxopt.passes.quantize import placement as pl  # noqa: E402 - after the path set-up

REPO = Path(__file__).resolve().parents[1]
CUTS = (0.25, 0.5, 0.75, 1.0)
#: The rules replayed on every cut: placement.not_slower_elsewhere with this many races that must pass (one
#: inconclusive race run again, one race >= ELSEWHERE_AT_ONCE passing at once).
RACES = (2, 3, 4)

Blocks = dict[str, list[float]]  # "fp32" / "candidate" -> block medians (ms) in the order they ran


def record(fp32: Any, models: dict[str, Any], races: int, model_ms: float, max_blocks: int
           ) -> dict[str, list[dict[str, Any]]]:
    """label -> ``races`` races as deployed against FP32 (the candidates taking turns race by race) of ``model_ms``
    per model and at most ``max_blocks`` blocks (the search's ``DEPLOYED_MODEL_MS`` and ``DEPLOYED_BLOCKS`` set so
    for the recording), each with its blocks and its wall time."""
    shapes = input_shapes(fp32, 1)
    out: dict[str, list[dict[str, Any]]] = {label: [] for label in models}
    search_length = pl.DEPLOYED_MODEL_MS, pl.DEPLOYED_BLOCKS
    pl.DEPLOYED_MODEL_MS, pl.DEPLOYED_BLOCKS = model_ms, (pl.DEPLOYED_BLOCKS[0], max_blocks)
    try:
        for _ in range(races):
            for label, model in models.items():
                out[label].append(_race(fp32, label, model, shapes))
    finally:
        pl.DEPLOYED_MODEL_MS, pl.DEPLOYED_BLOCKS = search_length
    return out


def _race(fp32: Any, label: str, model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    blocks: Blocks = {}
    began = time.perf_counter()
    pl.time_deployed({pl.FP32: fp32, label: model}, None, shapes, blocks=blocks)
    return {"seconds": time.perf_counter() - began, "blocks": {"fp32": blocks[pl.FP32], "candidate": blocks[label]}}


def cut(race: dict[str, Any], fraction: float) -> tuple[float, float]:
    """The (median, fastest) ratios FP32 / candidate of the race's first ``fraction`` of blocks."""
    fp32, cand = race["blocks"]["fp32"], race["blocks"]["candidate"]
    k = max(1, math.ceil(len(fp32) * fraction))
    return statistics.median(fp32[:k]) / statistics.median(cand[:k]), min(fp32[:k]) / min(cand[:k])


def score(races: list[dict[str, Any]]) -> dict[str, Any]:
    reference, expect = expectation([cut(race, 1.0) for race in races])
    cuts: dict[str, dict[str, Any]] = {}
    for fraction in CUTS:
        ratios = [cut(race, fraction) for race in races]
        cuts[str(fraction)] = {"range": (min(min(r) for r in ratios), max(min(r) for r in ratios)), "rules": {}}
        for count in RACES:
            verdicts, used = replay(lambda next_race: pl.not_slower_elsewhere(next_race, races=count)[0], ratios)
            cuts[str(fraction)]["rules"][str(count)] = {
                **decided(verdicts, used, expect),
                "seconds": fraction * statistics.fmean(race["seconds"] for race in races[:used] or races)}
    return {"reference": reference, "expect": expect, "blocks": statistics.median(
        len(race["blocks"]["fp32"]) for race in races), "cuts": cuts}


def render(payload: dict) -> str:
    model_ms, max_blocks = payload.get("model_ms", 500.0), payload.get("max_blocks", 48)  # the first recording's
    lines = ["# Placement search: how long a race as deployed must be, and how many", "",
             (f"Races recorded by `{payload['recorded_by']}` in {payload['minutes']:.1f} min, scored by "
              f"`{payload['command']}`" if "recorded_by" in payload else
              f"Generated by `{payload['command']}` in {payload['minutes']:.1f} min") + ". Do not edit by hand.", "",
             f"Host: {payload['host']}.", "",
             f"Each candidate raced against FP32 {payload['races']} times as deployed (placement.time_deployed: "
             "alternating 10 ms blocks of spinning sessions, ORT's default threads, batch 1), every block recorded; "
             f"each race {model_ms:g} ms per model, at most {max_blocks} blocks. Each cut replays the search's rule "
             "(placement.not_slower_elsewhere: the races that must each find the candidate not slower, one "
             f"inconclusive race run again, one >= {pl.ELSEWHERE_AT_ONCE:.2f}x by both ratios passing at once) with "
             f"{', '.join(map(str, RACES))} races on the races cut to their first fraction of blocks; reference = "
             "the median over the full-length races of FP32 time / candidate time, by median block; by fastest "
             f"block. 'pass' = both >= {pl.MIN_SPEEDUP}: a rejection is a miss; 'reject' = either < "
             f"{pl.MIN_RATIO_OTHER}: a pass is a false pass; 'either' = a near-tie, no error counted. Seconds per "
             "decision: the races a decision used times the mean wall time of a full race times the cut (the cut "
             "scales the sessions' creation too: a little low for short cuts). The search's own: "
             f"{pl.DEPLOYED_MODEL_MS:g} ms per model and race, {pl.DEPLOYED_RACES} races. See the script's "
             "docstring.", "",
             "## Summary", "", "| ms per model (cut) | races | races per decision | seconds per decision | misses "
             "(candidate not slower, rejected) | false passes (candidate slower, passed) |", "|---|---|---|---|---|---|"]
    rows = ["| net | candidate | blocks per model | reference | expect | "
            + " | ".join(f"{fraction:g} of the blocks: passes with {', '.join(map(str, RACES))} races; smaller ratio "
                         "range" for fraction in CUTS) + " |", "|---|---|---|---|---|" + "---|" * len(CUTS)]
    totals = {(f, str(n)): {"misses": 0, "pass": 0, "false": 0, "reject": 0, "races": 0, "decisions": 0,
                            "seconds": 0.0} for f in map(str, CUTS) for n in RACES}
    for net in payload["nets"]:
        for label, cell in net["scores"].items():
            ref = cell["reference"]
            rows.append(f"| {net['name']} | {label} | {cell['blocks']:g} | {ref[0]:.2f}x; {ref[1]:.2f}x | "
                        f"{cell['expect']} | " + " | ".join(
                            ", ".join(f"{r['passes']}/{r['decisions']}" for r in c["rules"].values())
                            + f"; {c['range'][0]:.2f}-{c['range'][1]:.2f}x" for c in cell["cuts"].values()) + " |")
            for fraction, c in cell["cuts"].items():
                for count, r in c["rules"].items():
                    t = totals[fraction, count]
                    t["races"] += r["races_used"]
                    t["decisions"] += r["decisions"]
                    t["seconds"] += r["seconds"] * r["races_used"]
                    if cell["expect"] == "pass":
                        t["misses"] += r["errors"]
                        t["pass"] += r["decisions"]
                    elif cell["expect"] == "reject":
                        t["false"] += r["errors"]
                        t["reject"] += r["decisions"]
    for (fraction, count), t in totals.items():
        decisions = max(t["decisions"], 1)
        ms = float(fraction) * model_ms
        search = " (the search's)" if ms == pl.DEPLOYED_MODEL_MS and int(count) == pl.DEPLOYED_RACES else ""
        lines.append(f"| {ms:g} ({float(fraction):g}) | {count}{search} | {t['races'] / decisions:.2f} | "
                     f"{t['seconds'] / decisions:.2f} | {t['misses']}/{t['pass']} | {t['false']}/{t['reject']} |")
    return "\n".join(lines + ["", "## Every candidate", ""] + rows) + "\n"


def rescored(payload: dict, source: Path) -> dict:
    for net in payload["nets"]:
        net["scores"] = {label: score(races) for label, races in net["recorded"].items()}
    payload["recorded_by"] = payload.get("recorded_by", payload["command"])
    payload["command"] = f"python benchmarks/deployed_length.py --rescore {source}"
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--races", type=int, default=30)
    parser.add_argument("--nets", default="example,mnasnet,resnet")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "deployed_length.md")
    parser.add_argument("--model-ms", type=float, default=2 * pl.DEPLOYED_MODEL_MS,
                        help="ms per model and race recorded (default: twice the search's, whose races are the 0.5 cut)")
    parser.add_argument("--max-blocks", type=int, default=2 * pl.DEPLOYED_BLOCKS[1])
    parser.add_argument("--rescore", type=Path, help="a previous run's JSON: score its recorded races again, "
                                                    "measuring nothing")
    args = parser.parse_args()
    if args.rescore:
        write_report(args.out, rescored(json.loads(args.rescore.read_text()), args.rescore), render)
        return
    from onnxopt.hostinfo import host_info

    started = time.perf_counter()
    nets = record_nets(args.nets, lambda fp32, models: record(fp32, models, args.races, args.model_ms,
                                                              args.max_blocks),
                       lambda recorded: {label: score(races) for label, races in recorded.items()})
    payload = {"command": command_line("deployed_length.py", parser, args,
                                       ("races", "nets", "model_ms", "max_blocks")),
               "minutes": (time.perf_counter() - started) / 60, "host": host_info().describe(),
               "races": args.races, "model_ms": args.model_ms, "max_blocks": args.max_blocks, "nets": nets}
    write_report(args.out, payload, render)


if __name__ == "__main__":
    main()
