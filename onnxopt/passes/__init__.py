"""Built-in passes. Light passes register on import; torch-based passes register lazily by name."""

from onnxopt.passes.compress import CompressPass
from onnxopt.passes.normalize import NormalizePass
from onnxopt.pipeline.registry import register_lazy

register_lazy("quantize", "onnxopt.passes.quantize.pass_:QuantizePass")  # loads onnxruntime.quantization on use
register_lazy("distill", "onnxopt.passes.distill.pass_:DistillPass")  # imports torch on use
register_lazy("prune", "onnxopt.passes.prune.pass_:PrunePass")  # torch only for criterion=taylor

__all__ = ["CompressPass", "NormalizePass"]
