"""Find the channel ratio that meets a MACs or a measured-latency target.

MACs are counted (:func:`onnxopt.stats.model_stats`) and bisected. Latency is *measured*, as NetAdapt and MnasNet
do, because MAC counts do not predict ONNX Runtime's speed (memory-bound depthwise convs, kernel widths): each
candidate is timed round-robin against the unpruned model in one :func:`onnxopt.bench.benchmark` run (so load from
other processes hits both alike), and the next candidate comes from a secant step on the measured points. A handful
of measurements suffices; the smallest cut that meets the target wins, else the candidate closest to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from onnxopt.stats import model_stats


@dataclass
class SearchResult:
    ratio: float
    model: onnx.ModelProto
    achieved: float  # fraction of MACs or latency removed
    met: bool
    trials: list[dict[str, float]] = field(default_factory=list)


def macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> int:
    return model_stats(model, input_shapes=input_shapes).macs


def search_macs(build: Callable[[float], onnx.ModelProto], base_macs: int, target: float,
                input_shapes: Mapping[str, Sequence[int]], max_ratio: float, steps: int = 12) -> SearchResult:
    """Smallest channel ratio whose model has at most (1 - target) of the MACs (bisection; MACs grow monotonically
    as the ratio falls, up to the rounding of channel counts)."""
    trials: list[dict[str, float]] = []

    def removed(r: float) -> tuple[float, onnx.ModelProto]:
        model = build(r)
        got = 1.0 - macs(model, input_shapes) / base_macs
        trials.append({"ratio": r, "macs_removed": got})
        return got, model

    top, top_model = removed(max_ratio)
    if top < target:
        return SearchResult(max_ratio, top_model, top, False, trials)
    lo, hi, best = 0.0, max_ratio, (max_ratio, top_model, top)
    for _ in range(steps):
        mid = (lo + hi) / 2
        got, model = removed(mid)
        if got >= target:
            hi, best = mid, (mid, model, got)
        else:
            lo = mid
        if abs(got - target) < 0.005 and got >= target:
            break
    return SearchResult(best[0], best[1], best[2], True, trials)


def measure_ratio(original: onnx.ModelProto, candidate: onnx.ModelProto, threads: int | None,
                  input_shapes: Mapping[str, Sequence[int]], repeats: int = 40) -> float:
    """Median latency of ``candidate`` over ``original`` at batch 1, timed round-robin in one run."""
    from onnxopt.bench import BenchConfig, benchmark

    config = BenchConfig(batch_sizes=(1,), threads=(threads,), warmup=5, repeats=repeats,
                         input_shapes={k: tuple(v) for k, v in input_shapes.items()})
    report = benchmark([original, candidate], config, labels=["original", "candidate"])
    base = report.result("original", 1, threads)
    cand = report.result("candidate", 1, threads)
    if base is None or cand is None:
        raise RuntimeError("latency measurement failed: " + "; ".join(s.reason for s in report.skipped))
    return cand.median_ms / base.median_ms


def search_latency(build: Callable[[float], onnx.ModelProto], original: onnx.ModelProto, target: float,
                   start: float, max_ratio: float, threads: int | None,
                   input_shapes: Mapping[str, Sequence[int]], measurements: int = 6) -> SearchResult:
    """Channel ratio whose model removes at least ``target`` of the measured latency (NetAdapt-like search)."""
    trials: list[dict[str, float]] = []
    points: list[tuple[float, float, onnx.ModelProto]] = []  # (ratio, latency removed, model)
    r = min(max(start, 0.02), max_ratio)
    for _ in range(measurements):
        model = build(r)
        got = 1.0 - measure_ratio(original, model, threads, input_shapes)
        trials.append({"ratio": r, "latency_removed": got})
        points.append((r, got, model))
        meeting = [p for p in points if p[1] >= target]
        missing = [p for p in points if p[1] < target]
        if meeting and abs(min(meeting, key=lambda p: p[0])[1] - target) < 0.03:
            break
        if not meeting and r >= max_ratio:
            break
        below = max(missing, key=lambda p: p[0]) if missing else (0.0, 0.0, None)
        above = min(meeting, key=lambda p: p[0]) if meeting else None
        if above is None:
            slope = below[1] / below[0] if below[0] > 0 else 1.0
            nxt = below[0] + (target - below[1]) / max(slope, 0.1)
        else:
            span = above[1] - below[1]
            frac = (target - below[1]) / span if span > 1e-6 else 0.5
            nxt = below[0] + min(max(frac, 0.2), 0.8) * (above[0] - below[0])
        nxt = min(max(nxt, 0.01), max_ratio)
        if any(abs(nxt - p[0]) < 0.01 for p in points):
            break
        r = nxt
    meeting = [p for p in points if p[1] >= target]
    if meeting:
        best = min(meeting, key=lambda p: p[0])
        return SearchResult(best[0], best[2], best[1], True, trials)
    best = max(points, key=lambda p: p[1])
    return SearchResult(best[0], best[2], best[1], False, trials)
