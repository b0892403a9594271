"""Raising a model's default-domain opset with onnx's version converter.

Old exports (Caffe2-era opset 7-9, early PaddlePaddle and TensorFlow converters) use op versions that later tools
handle badly or not at all; converting once, up front, lets every later pass assume a modern opset.

The converter works on a ModelProto. Weights are not needed to convert ops, so large initializers are swapped out
for typed graph inputs while the converter runs and put back afterwards: conversion stays cheap and works for models
above protobuf's 2 GB limit.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxopt.errors import PassFailedError

DEFAULT_DOMAINS = ("", "ai.onnx")
# Initializers above this many bytes leave the proto during conversion (small ones such as shapes and axes stay:
# an adapter may read them).
_STRIP_BYTES = 1024
# The IR version written for a model that had an older one: initializers need not be graph inputs from IR 4 on.
_MIN_IR_VERSION = 4


def default_opset(model: ir.Model) -> int | None:
    """The opset of the default ONNX domain, or None when the model does not import it."""
    for domain in DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def raise_opset(model: ir.Model, target: int, pass_name: str = "normalize") -> ir.Model:
    """A new model converted to opset ``target`` of the default domain.

    Raises :class:`PassFailedError` naming the op (and a node of that op) the converter could not handle; call
    :func:`replace_image_scalers` first for Caffe2-era models.
    """
    source = default_opset(model)
    stripped = _strip_large_initializers(model)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        _restore_initializers(model, stripped)
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError with C++ assertion text
        op, node = _culprit(model, str(exc))
        what = f"op '{op}' " if op else ""
        raise PassFailedError(
            pass_name,
            f"cannot convert {what}from opset {source} to {target}: {_clean(str(exc))}",
            node=node,
        ) from None
    result = ir.serde.deserialize_model(converted)
    _reattach_initializers(result, stripped)
    result.ir_version = max(result.ir_version, minimum_ir_version(result))
    return result


#: The oldest default-domain opset ONNX Runtime runs (its documented range is opset 7 and later: it has no kernel
#: for BatchNormalization-6 or Gemm-6, for instance).
ORT_MIN_OPSET = 7
#: What a model below that range is converted to (normalize's own ``min_opset``).
ORT_RUNNABLE_OPSET = 13


def below_ort_range(model: ir.Model) -> bool:
    """True when the model's default-domain opset is below :data:`ORT_MIN_OPSET`."""
    current = default_opset(model)
    return current is not None and current < ORT_MIN_OPSET


def make_ort_runnable(model: ir.Model, source: str = "the input model") -> str | None:
    """Convert ``model`` in place to opset :data:`ORT_RUNNABLE_OPSET` when its default-domain opset is below ONNX
    Runtime's range, so that it can be run, validated and measured at all; a note saying so, or None when the model
    was in range. Raises :class:`BadInputError` when onnx's version converter cannot convert it."""
    from onnxopt.errors import BadInputError
    from onnxopt.irutil import adopt

    if not below_ort_range(model):
        return None
    current = default_opset(model)
    replace_image_scalers(model)
    try:
        adopt(model, raise_opset(model, ORT_RUNNABLE_OPSET, pass_name="input"))
    except PassFailedError as exc:  # "pass 'input' failed at node 'n': cannot convert op ..."
        where = f" (node '{exc.node}')" if exc.node else ""
        raise BadInputError(f"{source} uses opset {current}, below ONNX Runtime's range (7 and later), and onnx's "
                            f"version converter cannot raise it{where}: {str(exc).partition(': ')[2]}") from None
    return (f"the input's opset {current} is below ONNX Runtime's range (7 and later): it was converted to opset "
            f"{ORT_RUNNABLE_OPSET} by onnx's version converter before anything ran, and every comparison is against "
            "that conversion")


def replace_image_scalers(model: ir.Model) -> int:
    """Rewrite ImageScaler (an experimental op of Caffe2-era exports, gone after opset 9) as Mul + Add.

    ``y = scale * x + bias[c]``; the converter has no adapter for it. Returns how many were rewritten.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "ImageScaler" or node.domain not in DEFAULT_DOMAINS or not node.inputs:
            continue
        x, out = node.inputs[0], node.outputs[0]
        if x is None:
            continue
        dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
        base = out.name or node.name or "ImageScaler"
        scale = _new_initializer(graph, f"{base}_scale", np.array(node.attributes.get_float("scale", 1.0), dtype))
        new_nodes = [ir.node("Mul", [x, scale], name=f"{node.name or 'ImageScaler'}_mul")]
        bias = node.attributes.get_floats("bias", None)
        if bias:
            bias_value = _new_initializer(graph, f"{base}_bias", np.array(bias, dtype).reshape(1, -1, 1, 1))
            new_nodes.append(
                ir.node("Add", [new_nodes[-1].outputs[0], bias_value], name=f"{node.name or 'ImageScaler'}_add")
            )
        result = new_nodes[-1].outputs[0]
        if out.type is not None:
            result.type = out.type
        result.shape = out.shape
        graph.insert_before(node, new_nodes)
        out.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name = out.name
        count += 1
    return count


def _new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, index = base, 1
    while name in graph.initializers:
        name, index = f"{base}_{index}", index + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def minimum_ir_version(model: ir.Model) -> int:
    """The lowest IR version that can carry the model's opset imports (at least 4)."""
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    try:
        needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    except Exception:  # an opset newer than this onnx knows: keep what the model has
        needed = model.ir_version
    return max(needed, _MIN_IR_VERSION)


def _strip_large_initializers(model: ir.Model) -> dict[str, tuple[ir.Value, ir.TensorProtocol]]:
    """Turn large initializers into typed graph inputs (data kept aside); returns what was stripped."""
    stripped: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _STRIP_BYTES or value.is_graph_input():
            continue
        if value.shape is None:
            value.shape = ir.Shape(tensor.shape)
        if value.dtype is None:
            value.dtype = tensor.dtype
        stripped[name] = (value, tensor)
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    return stripped


def _restore_initializers(model: ir.Model, stripped: dict[str, tuple[ir.Value, ir.TensorProtocol]]) -> None:
    graph = model.graph
    for value, tensor in stripped.values():
        graph.inputs.remove(value)
        value.const_value = tensor
        graph.register_initializer(value)


def _reattach_initializers(model: ir.Model, stripped: dict[str, tuple[ir.Value, ir.TensorProtocol]]) -> None:
    graph = model.graph
    by_name = {value.name: value for value in graph.inputs}
    for name, (_, tensor) in stripped.items():
        value = by_name.get(name)
        if value is None:
            continue  # the converter dropped it (unused); nothing to put back
        graph.inputs.remove(value)
        value.const_value = tensor
        graph.register_initializer(value)


def _clean(message: str) -> str:
    """Drop the C++ file/assertion boilerplate from a converter message."""
    message = message.strip().splitlines()[0] if message.strip() else "version conversion failed"
    message = re.sub(r"^.*?Assertion `.*?` failed: ", "", message)
    message = re.sub(r"^/\S+:\d+: \w+: ", "", message)
    return message[:300]


def _culprit(model: ir.Model, message: str) -> tuple[str | None, str | None]:
    """The op type (and one node of it) that a converter message talks about, when it can be told."""
    op_types = sorted({node.op_type for node in model.graph}, key=len, reverse=True)
    for op in op_types:
        if re.search(rf"(?<![A-Za-z]){re.escape(op)}(?![a-z])", message):
            node = next(n for n in model.graph if n.op_type == op)
            return op, node.name or None
    return None, None
