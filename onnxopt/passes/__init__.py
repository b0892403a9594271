"""Built-in passes. Light passes register on import; torch-based passes register lazily by name."""

from onnxopt.passes.normalize import NormalizePass
from onnxopt.pipeline.registry import register_lazy

register_lazy("quantize", "onnxopt.passes.quantize.pass_:QuantizePass")  # loads onnxruntime.quantization on use

__all__ = ["NormalizePass"]
