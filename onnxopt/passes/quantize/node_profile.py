"""Per-node kernel times from ONNX Runtime's profiler, and the FP32/int8 split they suggest.

A whole-model int8 candidate can be faster than FP32 at batch 1 and slower at batch 8 (MnasNet on the digits data:
the 1x1 convs ran ~2x faster in int8 while the first conv and the early depthwise convs, with 16-120 channels, ran
0.3-0.6x), and the heuristic regions of the placement search (first conv, head, every depthwise conv) keep the wrong
nodes FP32 or pay for too many precision boundaries. Here both models are profiled together at each setting (their
runs interleaved, :func:`profile_together`), each heavy node (Conv/Gemm/MatMul) gets its kernel time in each
precision, and a two-state dynamic program over the heavy nodes in graph order picks which to keep FP32: the int8 gain
of the nodes kept int8 minus a cost per precision switch (a boundary costs a QuantizeLinear/DequantizeLinear pair
and, for convs, ORT's NHWC<->NCHW transposes). The result is only a candidate: the search times it against FP32 like
any other before keeping it.

ORT renames nodes when it optimizes a graph: the NCHWc transformer names a conv after its output tensor plus
``_nchwc`` (the output of the activation or Add it fused), the layout transformer appends ``_token_N`` and the
QOperator writer ``_quant``. :func:`attribute_events` maps each kernel event back to the heavy node of the input
graph it belongs to (events it cannot map, such as reorders and Q/DQ nodes, are left out).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence

import onnx

from onnxopt.passes.quantize.placement import HEAVY_OPS

#: Runs per profiled session; the first WARMUP are left out (allocation, prepacking). After MIN_PROFILED of the
#: others, a session stops once its runs took PROFILE_SECONDS: the PaddleOCR v4 models (320x320 inputs) spent
#: 3-4 s of their search in 15 runs a session (reports/ocr_agreement.md, the run before this cap).
PROFILE_RUNS = 15
WARMUP = 3
MIN_PROFILED = 5
PROFILE_SECONDS = 0.1
#: Ops that ORT fuses into the conv/gemm before them (the fused kernel carries their output's name).
_FUSED_AFTER = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum", "Mul",
                "BatchNormalization", "Identity"}
_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_quant)$")
#: A precision switch costs this fraction of the median heavy node's FP32 time (a Q/DQ pair and, for convs, a layout
#: transpose). A chosen value, not a measured one: the split is only a candidate, timed before it is kept.
SWITCH_FRACTION = 0.5


def profile_kernels(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], threads: int | None,
                    runs: int = PROFILE_RUNS) -> dict[str, float]:
    """Median kernel time (microseconds) of each node ORT ran in ``model`` (:func:`profile_together` alone)."""
    return profile_together([model], input_shapes, threads, runs)[0]


def profile_together(models: Sequence[onnx.ModelProto], input_shapes: Mapping[str, tuple[int, ...]],
                     threads: int | None, runs: int = PROFILE_RUNS) -> list[dict[str, float]]:
    """Per model, the median kernel time (microseconds) of each node ORT ran, keyed by ORT's node name, over up to
    ``runs`` runs (see :data:`PROFILE_SECONDS`, per model) on the placement search's seeded timing inputs (shapes from
    ``input_shapes``, else the static dims at batch 1).

    The models run in turn, one run each per round: a burst of load on a shared machine then slows them alike. Profiled
    one after the other, a whole session could land in a loaded spell, and every node of one model looked slower:
    five profiles of MnasNet's FP32 and int8 models kept 11, 15, 2, 15 and 15 of 26 convs FP32 one after the other,
    15 each time interleaved (reports/profiled_split.md)."""
    import onnxruntime as ort

    from onnxopt.passes.quantize.placement import timing_feeds
    from onnxopt.runtime import session_options

    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as folder:
        sessions, feeds = [], []
        for index, model in enumerate(models):
            options = session_options(threads, spinning=False)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(folder, f"profile{index}")
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            sessions.append(session)
            feeds.append(timing_feeds(session, input_shapes))
        started = None
        for index in range(runs):
            if index == WARMUP:
                started = time.perf_counter()
            elif started is not None and index >= WARMUP + MIN_PROFILED and (
                    time.perf_counter() - started > PROFILE_SECONDS * len(models)):
                break
            for session, feed in zip(sessions, feeds):
                session.run(None, feed)
        return [_kernel_medians(session.end_profiling()) for session in sessions]


def _kernel_medians(profile_path: str) -> dict[str, float]:
    with open(profile_path, encoding="utf-8") as handle:
        events = json.load(handle)
    times: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            times.setdefault(name[: -len("_kernel_time")], []).append(float(event.get("dur", 0.0)))
    return {name: statistics.median(durs[WARMUP:] or durs) for name, durs in times.items()}


def fp32_nodes_by_profile(fp32: onnx.ModelProto, int8: onnx.ModelProto, order: Sequence[str],
                          settings: Sequence[tuple[Mapping[str, tuple[int, ...]], int | None]]
                          ) -> tuple[list[str], dict[str, float]]:
    """The heavy nodes of ``order`` to keep FP32 (:func:`keep_fp32`) from profiles of ``fp32`` and ``int8`` (the
    same graph quantized) at each (input shapes, threads) setting, and the gains behind the choice. A setting where
    fewer than half the heavy nodes could be mapped in either profile is left out (nothing to go on)."""
    fp32_times, int8_times = [], []
    for shapes, threads in settings:
        f, i = (attribute_events(fp32, times) for times in profile_together([fp32, int8], shapes, threads))
        if min(len(set(f) & set(order)), len(set(i) & set(order))) * 2 >= len(order):
            fp32_times.append(f)
            int8_times.append(i)
    if not fp32_times:
        return [], {}
    gains, switch = split_gains(order, fp32_times, int8_times)
    return keep_fp32(order, gains, switch), gains


def attribute_events(model: onnx.ModelProto, kernel_times: Mapping[str, float]) -> dict[str, float]:
    """Heavy node of ``model`` -> the summed time of the kernels that map to it (see the module docstring)."""
    nodes = {node.name: node for node in model.graph.node if node.name}
    producer = {out: node for node in model.graph.node for out in node.output if out}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    order = {node.name: index for index, node in enumerate(model.graph.node)}
    out: dict[str, float] = {}
    for event, micros in kernel_times.items():
        node = _node_for(event, nodes, producer)
        heavy = _heavy_source(node, producer, consumers, order) if node is not None else None
        if heavy is not None:
            out[heavy.name] = out.get(heavy.name, 0.0) + micros
    return out


def _node_for(event: str, nodes: Mapping[str, onnx.NodeProto],
              producer: Mapping[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    name = event
    while True:
        if name in nodes:
            return nodes[name]
        if name in producer:
            return producer[name]
        stripped = _SUFFIX.sub("", name)
        if stripped == name:
            return None
        name = stripped


def _heavy_source(node: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto], consumers: Mapping[str, int],
                  order: Mapping[str, int]) -> onnx.NodeProto | None:
    """``node`` if heavy, else the heavy node it was fused into: walking back through fusable ops, to the input
    produced by a heavy node read by nothing else (the latest in graph order when several are)."""
    for _ in range(4):
        if node.op_type in HEAVY_OPS:
            return node
        if node.op_type not in _FUSED_AFTER:
            return None
        sources = [producer[name] for name in node.input if name in producer]
        sole = [src for src in sources if consumers.get(src.output[0], 0) == 1] or sources
        if not sole:
            return None
        node = max(sole, key=lambda src: order.get(src.name, -1))
    return None


def keep_fp32(order: Sequence[str], gains: Mapping[str, float], switch: float) -> list[str]:
    """The heavy nodes (of ``order``, graph order) to keep FP32: a two-state dynamic program maximizing the time
    int8 saves (``gains``: FP32 time - int8 time; a node not in it counts 0) on the nodes left int8 minus ``switch``
    per change of precision between consecutive heavy nodes. The graph's input is float for every candidate (the
    whole int8 model quantizes it too), so starting in int8 is no switch."""
    if not order:
        return []
    # best[state] = (score, states so far) of the best assignment ending in that state: 0 int8, 1 FP32
    best = [(gains.get(order[0], 0.0), [0]), (0.0, [1])]
    for name in order[1:]:
        step = []
        for state, gain in ((0, gains.get(name, 0.0)), (1, 0.0)):
            stay, switched = best[state], best[1 - state]
            score, path = (stay[0], stay[1]) if stay[0] >= switched[0] - switch else (switched[0] - switch, switched[1])
            step.append((score + gain, path + [state]))
        best = step
    path = max(best, key=lambda item: item[0])[1]
    return [name for name, state in zip(order, path) if state == 1]


def split_gains(order: Sequence[str], fp32_times: Sequence[Mapping[str, float]],
                int8_times: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], float]:
    """Per heavy node, its int8 gain (FP32 time - int8 time) relative to the FP32 model's total time, summed over
    the profiled settings (so batch 1 and batch 8 weigh alike), and the switch cost on the same scale
    (:data:`SWITCH_FRACTION` of the median heavy node's FP32 time, summed likewise). A node missing from a setting's
    profile gains 0 there.

    Why a sum and not the worst setting per node: a batch-1 kernel takes a few microseconds, and taking each node's
    worst setting made the split follow that noise (on the example net, three profiles of the same models kept 3,
    19 and 22 of 29 convs FP32; the sum kept the same 3 each time)."""
    gains = {name: 0.0 for name in order}
    switch = 0.0
    for fp32, int8 in zip(fp32_times, int8_times):
        total = sum(fp32.values())
        if total <= 0:
            continue
        for name in order:
            if name in fp32 and name in int8:
                gains[name] += (fp32[name] - int8[name]) / total
        known = [fp32[name] for name in order if name in fp32]
        switch += SWITCH_FRACTION * statistics.median(known) / total if known else 0.0
    return gains, switch
