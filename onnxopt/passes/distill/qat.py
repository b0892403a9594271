"""Quantization-aware fine-tuning of a QDQ model (the quantize pass's output) through the torch bridge.

The bridge turns each integer weight read by a DequantizeLinear into a float parameter that is fake-quantized in
forward with a straight-through estimator, and re-quantizes it on write-back with its scale and zero point
(trainable scales: LSQ gradient). Stochastic rounding (Gupta et al. 2015) rounds up with probability equal to the
fractional part during training, which keeps small updates alive in expectation at low precision.
"""

from __future__ import annotations

import onnx

from onnxopt.errors import BadInputError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "MatMulInteger",
                 "ConvInteger", "QGemm"}


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when the graph holds QuantizeLinear/DequantizeLinear nodes."""
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def refuse_qoperator(model: onnx.ModelProto) -> None:
    """QOperator graphs (QLinearConv, ...) have integer arithmetic the bridge cannot differentiate: say so."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QOPERATOR_OPS or n.domain == "com.microsoft"})
    if found:
        raise BadInputError(f"distill cannot train a QOperator model ({', '.join(found)}): quantize with "
                            "--format qdq for quantization-aware fine-tuning")


def prepare(model: onnx.ModelProto, *, qat: bool, stochastic_rounding: bool = False,
            train_scales: bool = False) -> "object":
    """The trainable torch module for ``model``: float weights, or fake-quantized ones for a QDQ model."""
    from onnxopt.bridge import to_torch

    if qat:
        refuse_qoperator(model)
    module = to_torch(model, train_quantized_weights=qat, train_quant_scales=qat and train_scales)
    if qat:
        module.stochastic_rounding = stochastic_rounding
    return module
