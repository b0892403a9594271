"""Built-in passes. Light passes register on import; torch-based passes register lazily by name."""

from onnxopt.passes.normalize import NormalizePass

__all__ = ["NormalizePass"]
