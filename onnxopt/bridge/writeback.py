"""Write a module's current weights back into the ONNX model it was built from, leaving the graph untouched."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxopt.bridge.module import OnnxModule, Source, as_proto
from onnxopt.bridge.quant import requantize_array
from onnxopt.errors import BadInputError


def _current(module: OnnxModule, name: str, source: Source) -> np.ndarray:
    """The value to store for ``name``: the parameter (re-quantized for integer weights) or the running statistic."""
    if source.role == "stat":
        tensor = module.onnx_buffers()[name]
    else:
        tensor = module.onnx_parameters()[name]
    array = tensor.detach().to("cpu").numpy()
    if source.role == "qweight":
        assert source.quant is not None
        scale, zero_point, axis = source.quant
        return requantize_array(array, scale, zero_point, axis, source.array.dtype)
    return array.astype(source.array.dtype, copy=False)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _replace(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Overwrite a TensorProto's data in place (name, dims and type are kept)."""
    new = numpy_helper.from_array(array, tensor.name)
    tensor.ClearField("float_data")
    tensor.ClearField("int32_data")
    tensor.ClearField("int64_data")
    tensor.ClearField("double_data")
    tensor.ClearField("uint64_data")
    tensor.raw_data = new.raw_data


def write_back(module: OnnxModule, model: onnx.ModelProto | Any) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers (and weight-holding Constant nodes) carry the module's current
    parameters and BatchNormalization running statistics. Unchanged values keep their original bytes, so writing
    back an untouched module reproduces the model bit for bit."""
    if not isinstance(module, OnnxModule):
        raise BadInputError(f"write_back needs a module made by onnxopt.bridge.to_torch, got {type(module).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(as_proto(model))
    tensors: dict[str, onnx.TensorProto] = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors.setdefault(node.output[0], attribute.t)
    untied: list[str] = []
    with torch.no_grad():
        for name, source in module._sources.items():
            if source.kind == "identity":
                array = _current(module, name, source)
                if not _same(array, source.array):
                    _untie(out, name, np.ascontiguousarray(array))
                    untied.append(module._untied[name])
                continue
            tensor = tensors.get(name)
            if tensor is None:
                raise BadInputError(f"write_back: the model has no initializer or Constant '{name}'; "
                                    f"was the module built from another model?")
            if tuple(tensor.dims) != source.array.shape:
                raise BadInputError(f"write_back: '{name}' has shape {tuple(tensor.dims)} in the model, "
                                    f"{source.array.shape} in the module")
            array = _current(module, name, source)
            if array.shape != source.array.shape:
                raise BadInputError(f"write_back: parameter '{name}' changed shape to {array.shape}")
            if _same(array, source.array):
                continue
            _replace(tensor, np.ascontiguousarray(array))
    _drop_unused(out, set(untied))
    return out


def _untie(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Give the Identity node that produces ``name`` an initializer of its own (the value trained apart from the
    tensor it was tied to); the node itself stays."""
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    new_name, k = f"{name}__untied", 1
    while new_name in taken:
        k += 1
        new_name = f"{name}__untied{k}"
    for node in model.graph.node:
        if node.op_type == "Identity" and node.output and node.output[0] == name:
            model.graph.initializer.append(numpy_helper.from_array(array, new_name))
            node.input[0] = new_name
            return
    raise BadInputError(f"write_back: no Identity node produces '{name}'; was the module built from another model?")


def _drop_unused(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers that untying left without a reader."""
    if not candidates:
        return
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name not in candidates or t.name in read]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
