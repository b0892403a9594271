"""Shrink ONNX Runtime's quantized model without changing what it computes.

ORT's QDQ output of the digits example was 0.41x its FP32 file although int8 weights alone are 0.24x: it keeps the
inferred ``value_info``, an all-zero int8/int32 zero-point tensor per channel for every weight and bias (the spec's
default zero point is already 0), one scalar scale/zero-point initializer per tensor even when the values repeat, and
long names derived from the tensor names (``/features/features.0/features.0.2/Clip_output_0_zero_point``) on every
Q/DQ node, initializer and tensor. :func:`compact` removes all four; graph inputs/outputs and the names of the
original (non Q/DQ) nodes stay, so ``exclude_nodes`` and reports still refer to the user's nodes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Consumers whose ORT QDQ fusion accepts a DequantizeLinear without zero point (checked: QLinearConv still forms).
_ZP_OPTIONAL_FOR = {"Conv"}
_BIAS_FLOAT_FOR = {"Conv", "Gemm"}
_SIGNED = (onnx.TensorProto.INT8, onnx.TensorProto.INT32, onnx.TensorProto.INT16)


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in place without value_info, zero default zero points, duplicate constants and long Q/DQ names."""
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
           for attr in n.attribute):
        return model  # subgraphs may read outer names: leave such models as ORT wrote them
    del graph.value_info[:]
    _float_biases(graph)
    _drop_zero_zero_points(graph)
    _share_duplicates(graph)
    _short_names(graph)
    return model


def _drop_zero_zero_points(graph: onnx.GraphProto) -> None:
    """DequantizeLinear of a signed constant with an all-zero zero point: the zero point input is optional."""
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        if consumers.get(node.output[0], set()) - _ZP_OPTIONAL_FOR:
            continue  # ORT's Gemm fusion (QGemm) wants explicit zero points; Conv's does not
        x, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if x is None or zp is None or zp.data_type != x.data_type or x.data_type not in _SIGNED:
            continue
        if not np.any(numpy_helper.to_array(zp)):
            del node.input[2]
    _drop_unused(graph)


def _float_biases(graph: onnx.GraphProto) -> None:
    """An int32 bias behind DequantizeLinear stores the bias plus a per-channel scale (8 bytes a channel); a float bias
    stores 4, and ORT's QDQ fusion still forms QLinearConv/QGemm from it (it quantizes the bias itself, with the same
    scale: input scale x weight scale), checked on the digits example."""
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    kept = []
    for node in graph.node:
        x = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        scale = inits.get(node.input[1]) if x is not None and len(node.input) > 1 else None
        if (x is None or scale is None or x.data_type != onnx.TensorProto.INT32
                or not consumers.get(node.output[0]) or consumers[node.output[0]] - _BIAS_FLOAT_FOR):
            kept.append(node)
            continue
        zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else 0
        value = (numpy_helper.to_array(x).astype(np.float64) - zero) * numpy_helper.to_array(scale)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused(graph)


def _share_duplicates(graph: onnx.GraphProto) -> None:
    """Initializers with equal dtype, shape and bytes become one (scales and zero points repeat a lot)."""
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha1(numpy_helper.to_array(init).tobytes()).digest())
        if key in first:
            alias[init.name] = first[key]
        else:
            first[key] = init.name
    if not alias:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    _drop_unused(graph)


def _short_names(graph: onnx.GraphProto) -> None:
    """Initializers, Q/DQ nodes and every intermediate tensor get short names; graph inputs/outputs and the names of
    the original nodes stay. Torch export names such as ``/stages/stages.0/left/left.1/left.1.1/Relu_output_0``
    appear twice per tensor (producer and consumer): 200 bytes a node on the int8 ShuffleNetV2."""
    keep = {v.name for v in [*graph.input, *graph.output]}
    rename: dict[str, str] = {}
    counter = 0

    def fresh() -> str:
        nonlocal counter
        counter += 1
        return f"q{counter:x}"

    for init in graph.initializer:
        if init.name not in keep:
            rename[init.name] = fresh()
            init.name = rename[init.name]
    for node in graph.node:
        if node.op_type in _QDQ:
            node.name = fresh()
        for i, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = fresh()
                node.output[i] = rename[name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


__all__ = ["compact"]
