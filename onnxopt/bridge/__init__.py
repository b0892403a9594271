"""Torch bridge: run an ONNX graph as a ``torch.nn.Module`` whose weights are ``nn.Parameter``s named after their
ONNX initializers, train it, and write the weights back into the same graph.

This package imports torch; nothing in onnxopt imports it eagerly (``import onnxopt`` and the CLI stay torch-free).
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxopt.bridge.module import OnnxModule, as_proto
from onnxopt.bridge.ops import BUILDERS, UnsupportedOpError
from onnxopt.bridge.writeback import write_back


def to_torch(model: onnx.ModelProto | Any, *, train_quantized_weights: bool = False,
             train_quant_scales: bool = False) -> OnnxModule:
    """An :class:`OnnxModule` for ``model`` (an onnx.ModelProto; an onnx_ir.Model or a path is loaded first), in eval
    mode.

    ``train_quantized_weights``: integer initializers read only by a DequantizeLinear become float parameters
    (keyed by the integer initializer's name) that are fake-quantized in forward and re-quantized by write_back with
    the original scale and zero point. ``train_quant_scales``: float scales read only by Quantize/DequantizeLinear
    become parameters (LSQ-style gradient through the fake-quant).
    """
    model = as_proto(model)
    module = OnnxModule(model, train_quantized_weights=train_quantized_weights,
                        train_quant_scales=train_quant_scales)
    return module.eval()


def supported_ops() -> list[str]:
    """The ONNX operator types the bridge implements."""
    return sorted(set(BUILDERS) | {"Constant"})


__all__ = ["OnnxModule", "UnsupportedOpError", "supported_ops", "to_torch", "write_back"]
