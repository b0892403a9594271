"""Distillation: fine-tune an ONNX student against an ONNX teacher and write the weights back into the student's own
graph (also the accuracy recovery after pruning and quantization-aware fine-tuning of QDQ models).

Importing this package is cheap; torch is imported by the modules that train (``trainer``, ``losses``, ``qat``,
``pass_``), which the registry loads only when the ``distill`` pass runs.
"""

from __future__ import annotations

from typing import Any


def distill(*args: Any, **kwargs: Any) -> Any:
    """See :func:`onnxopt.passes.distill.api.distill`."""
    from onnxopt.passes.distill.api import distill as run

    return run(*args, **kwargs)


__all__ = ["distill"]
