"""Keep ONNX Runtime's quantizer from dropping a Relu/Clip's clipping, or rounding what a comparison decides on.

Both of ORT's writers remove a Relu or Clip behind a quantized tensor and let int8 saturation clip instead: the
tensor is quantized with the activation's output range. Three cases break that trade:

* **a Clip whose interval excludes zero** (``clamp(x, 0.5, 2)``, ``clamp(x, min=eps)`` on a conv's output): every
  int8 range ORT makes includes zero, so values between zero and the bound pass unclipped. Both formats (the QDQ
  writer removes it whenever the input is read once; measured on a Conv -> Pad -> Clip(0.5, 2) net: 3.6 dB output
  SQNR in QDQ, -1.4 dB in QOperator).
* **QOperator: the input is read elsewhere too** (a pre-activation residual, ``x + Conv(Relu(x))``) or is a graph
  output. ``QLinearActivation.QuantizeClipRelu`` drops the activation whenever its input is quantized, while
  ``adjust_tensor_ranges`` gives that input the activation's range only where the activation is its one reader:
  the other readers' values would be clipped, so nothing is adjusted, and the clipping is simply lost.
* **QOperator: the input comes through an op that reuses its own input's scale and zero point** (Reshape,
  Transpose, Squeeze, Unsqueeze, Flatten, MaxPool, Split, Pad, Resize, Gather), as in torch's TransformerEncoder
  normalized to ``Gemm -> Reshape -> Relu``: the adjusted range is never used, the producer's own range is.

The QDQ writer checks the second and third itself (``try_replacing_upstream_output``: one reader, not a graph
output). :func:`guard_activation_removal` fixes the ranges or the node list ORT gets so that what it writes computes
the same function: through a chain of Reshape-like ops that commute with clipping (:data:`PASS_THROUGH`), each
tensor read once, the activation's range moves up to the chain's head; elsewhere the activation stays float
(excluded from quantization, so ORT keeps it).

Apart from activations: the node that would round a comparison's input (Less, Greater, Equal...: a padding mask
computed in the graph, a score threshold) stays float, since a step of int8 rounding turns into flipped decisions
(:func:`_float_before_comparisons`). ``benchmarks/activation_guard.py`` measures all of it. And in QOperator form a
Concat whose inputs' ranges differ over :data:`CONCAT_RANGE_RATIO` times stays float (:func:`_float_wide_concats`:
a detector's scores beside its boxes in pixels, ``benchmarks/detector_head.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: Ops whose QOperator form reuses its input's scale and zero point and that commute with an elementwise
#: nondecreasing clip: clipping before them computes the same values.
PASS_THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool"})
#: Ops whose QOperator form also reuses its input's scale but where a clip cannot move up (several outputs, a pad
#: value, interpolation, a gather of one input among others): an activation behind them stays float.
REUSES_INPUT_SCALE = frozenset({"Split", "Pad", "Resize", "Gather"})
CLIPS = frozenset({"Relu", "Clip"})
#: Ops whose output is a yes/no of their inputs' values: rounding an input near the threshold flips the answer.
COMPARISONS = frozenset({"Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Equal"})
#: Ops that only move values (int8 in, the same int8 out): rounding before them is rounding after them.
SHAPE_ONLY = PASS_THROUGH | {"Slice", "Gather", "Split", "Expand", "Identity", "Tile"}
#: How far up a comparison's input the producer that rounds it is looked for.
MAX_COMPARISON_WALK = 8
#: A Concat whose inputs' ranges differ more than this many times stays float: one int8 scale for all of them
#: leaves the narrowest input log2(ratio) bits fewer (a detector's boxes decoded in pixels beside its [0, 1] scores).
CONCAT_RANGE_RATIO = 16.0
_DROPPED = " (ORT's quantizer would drop its clipping)"
_DROPPED_QOPERATOR = " (ORT's QOperator writer would drop its clipping)"


@dataclass
class Guard:
    """What :func:`guard_activation_removal` changed: ``ranges`` (a new mapping, or the one given when nothing
    moved), the nodes to leave float with the reason for each, and the activations whose range moved up a chain."""

    ranges: Mapping[str, Any]
    excluded: dict[str, str] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)

    #: Activations that need leaving float but have no name to exclude them by (normalize names every node).
    unnamed: int = 0

    @property
    def exclude(self) -> list[str]:
        return list(self.excluded)

    def keep_float(self, node: onnx.NodeProto, reason: str) -> None:
        if node.name:
            self.excluded[node.name] = reason
        else:
            self.unnamed += 1

    def describe(self) -> str:
        """One line for the pass's notes ('' when nothing changed)."""
        parts = []
        if self.moved:
            parts.append(f"{len(self.moved)} Relu/Clip range(s) moved up through Reshape-like ops to their producer "
                         "(ORT's QOperator writer would otherwise lose their clipping)")
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.excluded.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            parts.append(f"{len(names)} node(s) kept float, {reason}: " + ", ".join(names[:5])
                         + (" ..." if len(names) > 5 else ""))
        if self.unnamed:
            parts.append(f"{self.unnamed} unnamed node(s) left to ORT, which may drop a Relu/Clip's clipping or round "
                         "a comparison's input (run normalize first: it names every node)")
        return "; ".join(parts)


def guard_activation_removal(model: onnx.ModelProto, ranges: Mapping[str, Any], op_types: Collection[str],
                             exclude: Collection[str], fmt: str = "qoperator",
                             symmetric_activations: bool = False) -> Guard:
    """The ranges and extra exclusions under which ORT's ``fmt`` writer ("qdq" or "qoperator") keeps every
    Relu/Clip's clipping and every comparison's input unrounded.

    ``ranges``: tensor name -> calibrated range (values are moved, never read); ``op_types``/``exclude``: what ORT is
    asked to quantize. With symmetric activations ORT keeps every Relu/Clip: only the comparisons are guarded."""
    guard = Guard(ranges)
    graph = model.graph
    skip = set(exclude)
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    _float_before_comparisons(graph, producer, inits, op_types, skip, guard)
    if fmt == "qoperator":
        _float_wide_concats(graph, ranges, inits, op_types, skip, guard)
    if symmetric_activations:
        return guard
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    moved: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type not in CLIPS or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        if node.name in skip:  # float already: ORT keeps it
            continue
        if node.op_type == "Clip":
            bounds = clip_bounds(node, inits)
            if bounds is None:
                guard.keep_float(node, f"a Clip whose bounds are computed{_DROPPED}")
                continue
            if bounds[0] > 0 or bounds[1] < 0:
                guard.keep_float(node, "a Clip whose interval excludes zero, which every int8 range includes"
                                 + _DROPPED)
                continue
        if fmt != "qoperator":
            continue
        reason = _qoperator_chain(node, readers, outputs, producer)
        if isinstance(reason, str):
            guard.keep_float(node, f"a {node.op_type} {reason}{_DROPPED_QOPERATOR}")
        elif node.output[0] not in ranges:
            guard.keep_float(node, f"a {node.op_type} without a calibrated range of its own{_DROPPED_QOPERATOR}")
        elif len(reason) > 1:  # [input, ..., the chain's head]; a lone input is adjusted by ORT itself
            for tensor in reason:
                moved[tensor] = ranges[node.output[0]]
            guard.moved.append(node.name)
    if moved:
        guard.ranges = {**ranges, **moved}
    return guard


def _float_before_comparisons(graph: onnx.GraphProto, producer: Mapping[str, onnx.NodeProto],
                              inits: Mapping[str, onnx.TensorProto], op_types: Collection[str], skip: set[str],
                              guard: Guard) -> None:
    """Leave float the node that would round a comparison's input (a mask computed in the graph, ``mean(|x - bg|)
    < 1e-3``; a score threshold): up the input through ops with one activation input, the first quantizable node
    that computes values, and the value-moving ones on the way. A step of int8 rounding turns into flipped
    decisions, which no later layer undoes; the rest of the upstream graph stays int8."""
    for node in graph.node:
        if node.op_type not in COMPARISONS or node.domain not in ("", "ai.onnx"):
            continue
        for name in node.input:
            source, steps = producer.get(name), 0
            while source is not None and steps < MAX_COMPARISON_WALK and source.name not in skip:
                steps += 1
                quantizable = source.op_type in op_types and source.domain in ("", "ai.onnx")
                if quantizable:
                    guard.keep_float(source, f"feeding a {node.op_type} (int8 rounding would flip its decisions)")
                    if source.op_type not in SHAPE_ONLY:
                        break
                activations = [i for i in source.input if i and i not in inits]
                if len(activations) != 1:
                    break
                source = producer.get(activations[0])


def _float_wide_concats(graph: onnx.GraphProto, ranges: Mapping[str, Any], inits: Mapping[str, onnx.TensorProto],
                        op_types: Collection[str], skip: set[str], guard: Guard) -> None:
    """QOperator: leave float each Concat whose inputs' ranges differ over :data:`CONCAT_RANGE_RATIO` times.
    QLinearConcat requantizes every input to its output's one scale, that of the widest input, so the narrow input
    keeps 255/ratio levels: a YOLO-style head that concatenates boxes decoded in pixels with scores in [0, 1] gets its
    scores on a coarse grid, while the output's SQNR, dominated by the boxes, still looks fine. (The QDQ form the
    pass writes keeps the scores: ``benchmarks/detector_head.py``.)"""
    if "Concat" not in op_types:
        return
    for node in graph.node:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or node.name in skip:
            continue
        spans = [span for name in node.input if (span := _span(name, ranges, inits)) is not None and span > 0]
        if len(spans) > 1 and max(spans) > CONCAT_RANGE_RATIO * min(spans):
            guard.keep_float(node, f"a Concat whose inputs' ranges differ over {CONCAT_RANGE_RATIO:g}x (one int8 "
                             "scale would leave the narrowest input a few levels)")


def _span(name: str, ranges: Mapping[str, Any], inits: Mapping[str, onnx.TensorProto]) -> float | None:
    """The width of a tensor's int8 range: calibrated, or a small constant's own; None when unknown."""
    if name in ranges:
        rng = ranges[name]
        return float(np.max(rng.high) - np.min(rng.low))
    init = inits.get(name)
    if init is None or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        return None
    values = numpy_helper.to_array(init)
    return float(values.max() - values.min()) if 0 < values.size <= 1 << 20 else None


def _qoperator_chain(node: onnx.NodeProto, readers: Mapping[str, int], outputs: Collection[str],
                     producer: Mapping[str, onnx.NodeProto]) -> list[str] | str:
    """The tensors from the activation's input up to the first producer with a scale of its own, or why its range
    cannot move there."""
    chain, name = [], node.input[0]
    while True:
        if readers.get(name, 0) != 1 or name in outputs:
            return "whose input is read elsewhere too" if chain == [] else "with a tensor before it read elsewhere too"
        chain.append(name)
        source = producer.get(name)
        if source is None or source.domain not in ("", "ai.onnx"):
            return chain
        if source.op_type in REUSES_INPUT_SCALE:
            return f"behind a {source.op_type}, whose int8 form keeps its input's scale"
        if source.op_type not in PASS_THROUGH:
            return chain
        name = source.input[0]


def clip_bounds(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> tuple[float, float] | None:
    """A Clip's (min, max), from its attributes (opset < 11) or constant inputs; None when an input is computed."""
    low, high = -np.inf, np.inf
    for attr in node.attribute:
        if attr.name == "min":
            low = attr.f
        elif attr.name == "max":
            high = attr.f
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in inits:
                return None
            value = float(numpy_helper.to_array(inits[node.input[index]]).reshape(-1)[0])
            low, high = (value, high) if index == 1 else (low, value)
    return float(low), float(high)


__all__ = ["CLIPS", "COMPARISONS", "CONCAT_RANGE_RATIO", "PASS_THROUGH", "REUSES_INPUT_SCALE", "SHAPE_ONLY", "Guard",
           "clip_bounds", "guard_activation_removal"]
