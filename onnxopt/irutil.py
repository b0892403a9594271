"""Small facts and moves on onnx-ir models shared by several passes and by ``inspect``."""

from __future__ import annotations

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
