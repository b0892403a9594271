"""Shrink ONNX Runtime's quantized model without changing what it computes.

ORT's QDQ output of the digits example was 0.41x its FP32 file although int8 weights alone are 0.24x: it keeps the
inferred ``value_info``, an all-zero int8/int32 zero-point tensor per channel for every weight and bias (the spec's
default zero point is already 0), one scalar scale/zero-point initializer per tensor even when the values repeat, and
long names derived from the tensor names (``/features/features.0/features.0.2/Clip_output_0_zero_point``) on every
Q/DQ node, initializer and tensor. :func:`compact` removes all four; graph inputs/outputs and the names of the
original (non Q/DQ) nodes stay, so ``exclude_nodes`` and reports still refer to the user's nodes.

With ``half_constants`` it also stores the per-channel weight scales and the float biases in float16: on a
depthwise-heavy net they are a large share of the int8 file (Paddle cls: 26 KB of 177 KB, one scale and one bias per
channel of 3346 channels for 124k int8 weights). Vectors of one length are packed into one float16 tensor that a
``Cast -> Split`` turns back into the float32 originals; both read only constants, so ONNX Runtime's constant folding
(optimization level basic and above, the default) restores float32 initializers when it loads the model, before its
QDQ fusion, and the int8 kernels it builds are the same. The float16 rounding moves each value by at most 2^-11 of
itself (values outside float16's normal range stay float32): 1/16 of the int8 step of the weights they scale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Consumers whose ORT QDQ fusion accepts a DequantizeLinear without zero point (checked: QLinearConv still forms).
_ZP_OPTIONAL_FOR = {"Conv"}
_BIAS_FLOAT_FOR = {"Conv", "Gemm"}
_SIGNED = (onnx.TensorProto.INT8, onnx.TensorProto.INT32, onnx.TensorProto.INT16)


def compact(model: onnx.ModelProto, half_constants: bool = False) -> onnx.ModelProto:
    """``model`` in place without value_info, zero default zero points, duplicate constants and long Q/DQ names;
    with ``half_constants``, per-channel scales and biases stored as float16 (see the module docstring)."""
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
           for attr in n.attribute):
        return model  # subgraphs may read outer names: leave such models as ORT wrote them
    del graph.value_info[:]
    _float_biases(graph)
    _drop_zero_zero_points(graph)
    _share_duplicates(graph)
    if half_constants:
        pack_half_constants(model)
    _short_names(graph)
    return model


#: float16's smallest normal and largest finite value: only values inside keep 11 significant bits.
_HALF_NORMAL, _HALF_MAX = 2.0**-14, 65504.0


def pack_half_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in place with its per-channel DequantizeLinear scales and Conv/Gemm float biases stored as float16,
    one packed tensor per vector length, rebuilt as float32 by ``Cast -> Split`` (constant-folded by ORT at load)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    wanted: dict[str, None] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1:
            wanted[node.input[1]] = None
        elif node.op_type in _BIAS_FLOAT_FOR and len(node.input) > 2 and node.input[2]:
            wanted[node.input[2]] = None
    outputs = {o.name for o in graph.output}
    by_length: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name in wanted:
        init = inits.get(name)
        if init is None or name in outputs or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 1:
            continue
        values = numpy_helper.to_array(init)
        magnitude = np.abs(values)
        if values.size < 2 or not np.all((magnitude == 0) | ((magnitude >= _HALF_NORMAL) & (magnitude <= _HALF_MAX))):
            continue
        by_length.setdefault(values.size, []).append((name, values))
    if not by_length:
        return model
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {
        v.name for v in [*graph.input, *graph.output]}

    def unique(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    split_needs_count = _default_opset(model) >= 18  # Split-18 splits equally only with num_outputs
    packed = set()
    nodes = []
    for length, members in sorted(by_length.items()):
        blob = unique(f"half_{length}")
        graph.initializer.append(numpy_helper.from_array(
            np.concatenate([values for _, values in members]).astype(np.float16), blob))
        names = [name for name, _ in members]
        packed.update(names)
        if len(members) == 1:
            nodes.append(onnx.helper.make_node("Cast", [blob], names, to=onnx.TensorProto.FLOAT))
            continue
        unpacked = unique(blob + "_f")
        nodes.append(onnx.helper.make_node("Cast", [blob], [unpacked], to=onnx.TensorProto.FLOAT))
        extra = {"num_outputs": len(names)} if split_needs_count else {}
        nodes.append(onnx.helper.make_node("Split", [unpacked], names, axis=0, **extra))
    _delete_initializers(graph, lambda name: name in packed)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model


def unpack_half_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in place with the float16 packs of :func:`compact` turned back into float32 initializers (what ONNX
    Runtime's constant folding makes of them), for tools that read scales and biases as initializers."""
    graph = model.graph
    nodes = list(graph.node)
    inits = {init.name: init for init in graph.initializer}
    casts = {node.output[0]: i for i, node in enumerate(nodes) if node.op_type == "Cast" and node.input[0] in inits
             and inits[node.input[0]].data_type == onnx.TensorProto.FLOAT16}
    splits = {i: node for i, node in enumerate(nodes)
              if node.op_type == "Split" and len(node.input) == 1 and node.input[0] in casts}
    dropped: set[int] = set()
    for i, split in splits.items():
        cast = nodes[casts[split.input[0]]]
        parts = np.split(numpy_helper.to_array(inits[cast.input[0]]).astype(np.float32), len(split.output))
        graph.initializer.extend(numpy_helper.from_array(part, name) for part, name in zip(parts, split.output))
        dropped.update((i, casts[split.input[0]]))
    split_inputs = {split.input[0] for split in splits.values()}
    for output, i in casts.items():
        if output not in split_inputs:
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(inits[nodes[i].input[0]]).astype(np.float32), output))
            dropped.add(i)
    del graph.node[:]
    graph.node.extend(node for i, node in enumerate(nodes) if i not in dropped)
    _drop_unused(graph)
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


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


#: An int32 bias larger than this stays int32 (see :func:`_float_biases`).
_FLOAT_BIAS_LIMIT = 2**30


def _float_biases(graph: onnx.GraphProto) -> None:
    """An int32 bias behind DequantizeLinear stores the bias plus a per-channel scale (8 bytes a channel); a float bias
    stores 4, and ORT's QDQ fusion still forms QLinearConv/QGemm from it (it quantizes the bias itself, with the same
    scale: input scale x weight scale), checked on the digits example.

    Not where the int32 value is near the int32 limit: when the input scale is tiny, ORT's quantizer widens the weight
    scale just enough for the bias to fit, and ORT's own re-quantization at load (or float16 weight scales, a rounding
    of 2^-11) then overflows it - an untrained MnasNet export on random data fell from 51 to 2 dB SQNR that way."""
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
        quantized = numpy_helper.to_array(x).astype(np.float64) - zero
        if quantized.size and np.max(np.abs(quantized)) > _FLOAT_BIAS_LIMIT:
            kept.append(node)
            continue
        value = quantized * numpy_helper.to_array(scale)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused(graph)


def _share_duplicates(graph: onnx.GraphProto) -> None:
    """Initializers with equal dtype, shape and bytes become one (scales and zero points repeat a lot)."""
    # Only tensors whose dtype and shape another one shares are read and hashed: a big weight is usually unique, and
    # reading it copies it (two copies of every weight of a 2.4 GB model, seconds).
    by_shape: dict[tuple[int, tuple[int, ...]], list[onnx.TensorProto]] = {}
    for init in graph.initializer:
        by_shape.setdefault((init.data_type, tuple(init.dims)), []).append(init)
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        shape_key = (init.data_type, tuple(init.dims))
        if len(by_shape[shape_key]) < 2:
            continue
        key = (*shape_key, hashlib.sha1(numpy_helper.to_array(init).tobytes()).digest())
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
    """Initializers and every intermediate tensor get short names (base 36), the Q/DQ nodes none (a node's name is
    optional); graph inputs/outputs and the names of the original nodes stay. Torch export names such as
    ``/stages/stages.0/left/left.1/left.1.1/Relu_output_0`` appear twice per tensor (producer and consumer): 200 bytes
    a node on the int8 ShuffleNetV2."""
    keep = {v.name for v in [*graph.input, *graph.output]}
    rename: dict[str, str] = {}
    counter = 0

    def fresh() -> str:
        nonlocal counter
        while True:
            counter += 1
            name = np.base_repr(counter, 36).lower()
            if name not in keep:
                return name

    for init in graph.initializer:
        if init.name not in keep:
            rename[init.name] = fresh()
            init.name = rename[init.name]
    for node in graph.node:
        if node.op_type in _QDQ:  # ORT's (an input with Q/DQ nodes is refused); ours (Cast, Split) have none
            node.name = ""
        for i, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = fresh()
                node.output[i] = rename[name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers nothing reads."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    _delete_initializers(graph, lambda name: name not in used)


def _delete_initializers(graph: onnx.GraphProto, drop: Callable[[str], bool]) -> None:
    """Remove the initializers whose name ``drop`` accepts, in place: rebuilding the list copies every weight (two
    copies of a 2.4 GB model's weights, seconds)."""
    for index in reversed(range(len(graph.initializer))):
        if drop(graph.initializer[index].name):
            del graph.initializer[index]


__all__ = ["compact", "pack_half_constants", "unpack_half_constants"]
