"""Small facts and moves on onnx-ir models shared by several passes and by ``inspect``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: Ops that only appear in a model that is already quantized (QDQ, QOperator or integer-kernel form).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                           "MatMulInteger", "QGemm", "QAttention"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


def is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OPS or op_type.startswith("QLinear")


def adopt(model: ir.Model, new: ir.Model) -> None:
    """Move ``new``'s graph, opsets and functions into ``model``, so an in-place pass can use a tool that returns a
    fresh model (onnxsim, the version converter, ORT's quantizer); ``model``'s own metadata is kept."""
    imports = dict(new.opset_imports)  # an ir.Model's opset imports live on its graph
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.opset_imports.clear()
    model.opset_imports.update(imports)
    model.functions.clear()
    model.functions.update(new.functions)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is an initializer the caller cannot override at run time (not a graph input)."""
    if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value.numpy()


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` called ``name`` (typed and shaped) and return its value."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
