"""Latency-aware placement for the ``quantize`` pass: keep int8 only where it is measurably faster than FP32.

Int8 is not faster everywhere: on an x86 CPU without VNNI the Paddle cls model ran 0.73x (slower) fully quantized.
The pass builds a few candidates (every op, only Conv/Gemm/MatMul, per-tensor weights), times them against the FP32
input in one round-robin :func:`onnxopt.bench.benchmark` run, drops the ones whose top-1 agreement with FP32 on
calibration samples is too low, and keeps the fastest only when it beats FP32 by a margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.fidelity import top1

#: Op types of the "heavy" candidate: the ones int8 kernels speed up the most.
HEAVY_OPS = ("Conv", "Gemm", "MatMul")
#: The FP32 reference's label among the timed models.
FP32 = "fp32"
MIN_AGREEMENT = 0.98
MIN_SPEEDUP = 1.02
AGREEMENT_SAMPLES = 64
#: Second timing runs (the winner alone against FP32) before a winner is accepted; each failure tries the next.
CONFIRMATIONS = 2
WARMUP = 5
REPEATS = 30


@dataclass
class Candidate:
    label: str
    model: onnx.ModelProto | None  # None for FP32 (the input itself)
    median_ms: float | None = None
    speedup: float | None = None  # FP32 median / this median
    agreement: float | None = None
    rejected: str | None = None
    drop: float | None = None  # accuracy (or agreement) lost, when there is a budget

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "median_ms": self.median_ms, "speedup": self.speedup,
                                  "agreement": self.agreement, "rejected": self.rejected}
        if self.drop is not None:
            out["drop"] = self.drop
        return out


def time_models(models: Mapping[str, onnx.ModelProto], threads: int | None,
                input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Median ms of each model at batch 1, all timed in one interleaved run (tests monkeypatch this)."""
    from onnxopt.bench import BenchConfig, benchmark

    labels = list(models)
    config = BenchConfig(batch_sizes=(1,), threads=(threads,), warmup=WARMUP, repeats=REPEATS,
                         input_shapes=dict(input_shapes))
    report = benchmark([models[label] for label in labels], config, labels=labels)
    return {r.label: r.median_ms for r in report.results}


def regions(model: onnx.ModelProto, heavy: Sequence[str]) -> dict[str, list[str]]:
    """Node groups whose int8 version is often slower, each a candidate left in FP32: the first conv (3 input
    channels, little work), depthwise convs (int8 kernels barely help them), the classifier head (last heavy node)
    and convs feeding or fed by hard-swish (x * relu6(x + 3) / 6: its Mul/Div stay FP32 and force Q/DQ pairs)."""
    inits = {init.name: init for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in heavy and n.name]
    found: dict[str, list[str]] = {}
    if nodes:
        found["first"] = [nodes[0].name]
        found["head"] = [nodes[-1].name]
    depthwise = []
    for n in nodes:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if n.op_type == "Conv" and group > 1 and w is not None and len(w.dims) > 1 and w.dims[1] == 1:
            depthwise.append(n.name)
    found["depthwise"] = depthwise
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
        for name in n.output:
            producer[name] = n
    swish = []
    for n in nodes:
        near = [c.op_type for c in consumers.get(n.output[0], [])]
        source = producer.get(n.input[0])
        near += [source.op_type] if source is not None else []
        if "HardSwish" in near or ("Div" in near or "Mul" in near) and "Conv" == n.op_type:
            swish.append(n.name)
    found["hardswish"] = swish
    return found


def top1_agreement(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Share of samples whose first output has the same top-1 class as the reference; NaN outputs give 0."""
    if not reference:
        return 1.0
    agree = []
    for ref, out in zip(reference, outputs):
        if not np.all(np.isfinite(out)):
            return 0.0
        agree.append(float(np.mean(top1(np.atleast_2d(ref)) == top1(np.atleast_2d(out)))))
    return float(np.mean(agree))


def first_outputs(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], threads: int | None,
                  provider: str = "cpu") -> list[np.ndarray]:
    from onnxopt.runtime import make_session

    session = make_session(model, threads=threads, provider=provider)
    name = session.get_outputs()[0].name
    return [np.asarray(session.run([name], f)[0]) for f in feeds]


def choose(candidates: list[Candidate], fp32_ms: float) -> Candidate | None:
    """The fastest non-rejected candidate if it is at least ``MIN_SPEEDUP`` times faster than FP32, else None."""
    usable = [c for c in candidates if c.rejected is None and c.median_ms is not None]
    if not usable:
        return None
    best = min(usable, key=lambda c: c.median_ms or float("inf"))
    return best if (best.speedup or 0.0) >= MIN_SPEEDUP else None


__all__ = ["FP32", "HEAVY_OPS", "Candidate", "choose", "first_outputs", "regions", "time_models", "top1_agreement"]
