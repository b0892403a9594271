"""Keep ONNX Runtime's QOperator writer from dropping a Relu/Clip whose clipping nothing else does.

ORT's QOperator writer (``ONNXQuantizer``, ``QLinearActivation.QuantizeClipRelu``) removes every Relu and Clip
whose input is quantized, trusting that the input's quantization range is the activation's output range, so that
the producer's int8 saturation clips instead. It makes that so (``adjust_tensor_ranges``) only where the input is
read by the Relu/Clip alone, and the range it adjusts is that of the input tensor itself. Two patterns break it:

* the input is read elsewhere too (a pre-activation residual: ``y = Conv(x); Add(Conv(Relu(y)), y)``) or is a graph
  output: nothing is adjusted, the Relu goes anyway, and its consumers see negative values;
* the input comes through an op that reuses its own input's scale and zero point (Reshape, Transpose, Squeeze,
  Unsqueeze, Flatten, MaxPool: ``Direct8BitOp``), as in torch's legacy export of a transformer's feed-forward block,
  ``Gemm -> Reshape -> Relu``: the adjusted range is never used, the Gemm's own (negative) range is.

Measured on a 4-layer torch TransformerEncoder the second leaves the QOperator model at 2.6 dB output SQNR against
FP32 (37 dB in QDQ, whose writer checks both conditions before it removes an activation;
``benchmarks/qoperator_activations.py``). :func:`guard_activation_removal` fixes the ranges or the node list ORT
gets so that what it writes computes the same function: through a chain of such ops, each read once, the
activation's output range moves up to the chain's head (clipping commutes with reshaping, transposing and max
pooling); where a tensor on the way is read twice or is a graph output, the activation is left float (excluded).
QDQ needs none of this.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

#: Ops whose QOperator form reuses its input's scale and zero point, and that commute with an elementwise
#: nondecreasing clip (Relu, Clip): moving the clip before them computes the same values.
PASS_THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool"})
CLIPS = frozenset({"Relu", "Clip"})


@dataclass
class Guard:
    """What :func:`guard_activation_removal` changed: ``ranges`` (a new mapping, or the one given when nothing moved),
    the activations to leave float, and the activations whose range moved up a chain."""

    ranges: Mapping[str, Any]
    exclude: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the pass's notes ('' when nothing changed)."""
        parts = []
        if self.moved:
            parts.append(f"{len(self.moved)} Relu/Clip range(s) moved up through Reshape-like ops to their producer")
        if self.exclude:
            parts.append(f"{len(self.exclude)} Relu/Clip kept float (their input is read elsewhere too): "
                         + ", ".join(self.exclude[:5]) + (" ..." if len(self.exclude) > 5 else ""))
        return ("QOperator: " + "; ".join(parts) + " - ORT's QOperator writer would drop them without their clipping"
                if parts else "")


def guard_activation_removal(model: onnx.ModelProto, ranges: Mapping[str, Any], op_types: Collection[str],
                             exclude: Collection[str], symmetric_activations: bool = False) -> Guard:
    """The ranges and extra exclusions under which ORT's QOperator writer keeps every Relu/Clip's clipping.

    ``ranges``: tensor name -> calibrated range (the values are moved, never read); ``op_types``/``exclude``: what
    ORT is asked to quantize. With symmetric activations ORT keeps every Relu/Clip, and nothing changes."""
    guard = Guard(ranges)
    if symmetric_activations:
        return guard
    graph = model.graph
    skip = set(exclude)
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    moved: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type not in CLIPS or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        if node.name in skip:  # float: ORT keeps it
            continue
        chain, name = [], node.input[0]
        while readers.get(name, 0) == 1 and name not in outputs:
            chain.append(name)
            source = producer.get(name)
            if source is None or source.op_type not in PASS_THROUGH or source.domain not in ("", "ai.onnx"):
                break
            name = source.input[0]
        else:  # a tensor on the way is read twice or is a graph output: only a float activation stays right
            if node.name:
                guard.exclude.append(node.name)
            continue
        if node.output[0] not in ranges:  # no range of its own to clip with: leave it float
            if node.name:
                guard.exclude.append(node.name)
            continue
        if len(chain) > 1:  # [input, ..., the chain's head]; a lone input is adjusted by ORT itself
            for tensor in chain:
                moved[tensor] = ranges[node.output[0]]
            guard.moved.append(node.name or node.output[0])
    if moved:
        guard.ranges = {**ranges, **moved}
    return guard


__all__ = ["CLIPS", "PASS_THROUGH", "Guard", "guard_activation_removal"]
