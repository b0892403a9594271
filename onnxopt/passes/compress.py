"""The ``compress`` pass: a small file that still runs at FP32 speed.

Int8 inference is not faster everywhere (on x86 without VNNI, ONNX Runtime's int8 kernels lose to FP32 on most of
our benchmark nets), yet a small file is still worth having. Like the storage half of Deep Compression (Han et al.
2015), this pass stores each large Conv / ConvTranspose / Gemm / MatMul weight as int8 with one float scale per
output channel (symmetric, ``max |w| / 127``), and rebuilds the float weight in the graph with ``Cast -> Mul``. Both
nodes read only constants, so ONNX Runtime's constant folding (graph optimization level ``basic`` and above, the
default) turns them back into one FP32 initializer when it loads the model: the run time is the FP32 model's, the
file about 4x smaller in its weights. With graph optimizations disabled the two nodes run at every inference.

The stored weights differ from the float ones by the int8 rounding (per-channel relative error <= 1/254 of the
channel's largest weight), so the pass is lossy and judged by budgets like ``quantize``. The float weight keeps its
name (it becomes the ``Mul`` output). :func:`expand_weights` folds the pair back, for passes that need the weights
as initializers (``quantize`` calls it; ``normalize`` folds them through onnxsim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxopt.errors import RecipeError
from onnxopt.irutil import constant_array, new_initializer
from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.registry import register

#: Op type -> index of the weight input and its output-channel axis (None: the last axis).
_WEIGHTS: dict[str, tuple[int, int | None]] = {"Conv": (1, 0), "ConvTranspose": (1, 1), "Gemm": (1, None),
                                               "MatMul": (1, None)}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_INT8_SUFFIX, _SCALE_SUFFIX = "_int8", "_scale"


@register
@dataclass
class CompressPass(OnnxoptPass):
    """Store large float weights as int8 + per-channel scale, rebuilt by Cast -> Mul that ORT folds at load.

    Parameters:
        op_types: ops whose weight input is stored compressed.
        min_elements: weights smaller than this stay float (their scales would cost as much as they save).
        exclude_nodes: node names whose weights stay float.
    """

    name: ClassVar[str] = "compress"
    exact: ClassVar[bool] = False

    op_types: list[str] = field(default_factory=lambda: list(_WEIGHTS))
    min_elements: int = 256
    exclude_nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.op_types) - set(_WEIGHTS))
        if unknown:
            raise ValueError(f"op_types must be among {', '.join(_WEIGHTS)}, got {', '.join(unknown)}")
        if self.min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {self.min_elements}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        skipped = set(self.exclude_nodes)
        unknown = sorted(skipped - {node.name for node in graph})
        if unknown:
            raise RecipeError(f"compress.exclude_nodes names node(s) not in the model: {', '.join(unknown)}")
        done: dict[str, tuple[int, int]] = {}  # weight name -> (float bytes, int8 + scale bytes)
        worst = 0.0
        for node in list(graph):
            if node.op_type not in self.op_types or node.domain not in _DEFAULT_DOMAINS or node.name in skipped:
                continue
            index, axis = _WEIGHTS[node.op_type]
            if node.op_type == "Gemm":
                axis = 0 if node.attributes.get_int("transB", 0) else 1
            value = node.inputs[index] if len(node.inputs) > index else None
            array = _float_constant(value)
            if value is None or array is None or array.size < self.min_elements or array.ndim < 2:
                continue
            if value.name in done or any(use.domain not in _DEFAULT_DOMAINS for use, _ in value.uses()):
                continue
            stored, error = _compress(graph, value, array, array.ndim - 1 if axis is None else axis)
            done[value.name or ""] = (array.nbytes, stored)
            worst = max(worst, error)
        self.details["compressed_weights"] = len(done)
        if not done:
            self.note("nothing to compress: no float weight of "
                      f"{', '.join(self.op_types)} with at least {self.min_elements} elements")
            return ir.passes.PassResult(model, modified=False)
        before = sum(b for b, _ in done.values())
        after = sum(a for _, a in done.values())
        self.details.update(weight_bytes_before=before, weight_bytes_after=after,
                            max_relative_error=round(worst, 6))
        self.note(f"stored {len(done)} weights as int8 + one scale per output channel ({before / 1024:.1f} KB -> "
                  f"{after / 1024:.1f} KB; largest error {worst:.2%} of a channel's largest weight)")
        self.note("ONNX Runtime folds each Cast -> Mul back into an FP32 weight when it loads the model (graph "
                  "optimization level basic or higher), so inference runs at FP32 speed")
        return ir.passes.PassResult(model, modified=True)


def _compress(graph: ir.Graph, value: ir.Value, array: np.ndarray, axis: int) -> tuple[int, float]:
    """Replace initializer ``value`` by Cast(int8) * scale; the bytes now stored and the largest relative error."""
    reduce = tuple(i for i in range(array.ndim) if i != axis)
    peak = np.max(np.abs(array.astype(np.float64)), axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(array / scale), -127, 127).astype(np.int8)
    error = float(np.max(np.abs(q * scale.astype(np.float64) - array) / np.where(peak > 0, peak, 1.0)))
    name = value.name or "weight"
    q_value = new_initializer(graph, f"{name}{_INT8_SUFFIX}", q)
    s_value = new_initializer(graph, f"{name}{_SCALE_SUFFIX}", scale)
    cast = ir.node("Cast", [q_value], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_cast")
    mul = ir.node("Mul", [cast.outputs[0], s_value], name=f"{name}_rescale")
    cast.outputs[0].name = f"{name}_float"
    for out in (cast.outputs[0], mul.outputs[0]):
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
    graph.insert_before(next(iter(graph)), [cast, mul])
    value.replace_all_uses_with(mul.outputs[0])
    graph.initializers.pop(name)
    mul.outputs[0].name = name
    return q.nbytes + scale.nbytes, error


def has_stored_weights(graph: ir.Graph) -> bool:
    """True when ``graph`` holds a weight stored by this pass (``Cast`` of an int8 constant): a cheap test before
    cloning or expanding."""
    return any(node.op_type == "Cast" and node.domain in _DEFAULT_DOMAINS and node.inputs
               and (stored := constant_array(node.inputs[0])) is not None and stored.dtype == np.int8
               for node in graph)


def expand_weights(graph: ir.Graph) -> int:
    """Fold every ``Mul(Cast(int8 constant), float constant)`` back into a float initializer of the Mul output's
    name (what ONNX Runtime does at load); the number folded."""
    folded = 0
    sources: list[ir.Value] = []
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in _DEFAULT_DOMAINS or len(mul.inputs) != 2:
            continue
        cast = mul.inputs[0].producer() if mul.inputs[0] is not None else None
        scale = _float_constant(mul.inputs[1])
        if cast is None or cast.op_type != "Cast" or scale is None or len(mul.inputs[0].uses()) != 1:
            continue
        source = cast.inputs[0]
        stored = constant_array(source)
        if stored is None or stored.dtype != np.int8 or cast.attributes.get_int("to", 0) != ir.DataType.FLOAT:
            continue
        weight = (stored.astype(np.float32) * scale).astype(np.float32)
        sources += [source, mul.inputs[1]]
        out = mul.outputs[0]
        name = out.name
        out.name = None
        restored = new_initializer(graph, name or "weight", weight)
        out.replace_all_uses_with(restored, replace_graph_outputs=True)
        graph.remove([mul, cast], safe=True)
        folded += 1
    for value in sources:  # the int8 data and scales, unless something else still reads them
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
    return folded


def _float_constant(value: ir.Value | None) -> np.ndarray | None:
    array = constant_array(value)
    return array if array is not None and array.dtype == np.float32 else None


__all__ = ["CompressPass", "expand_weights", "has_stored_weights"]
