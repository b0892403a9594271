"""ORT's per-channel weight quantization in one numpy expression instead of a Python loop over channels.

ONNX Runtime's ``quantize_onnx_initializer`` quantizes a per-channel weight one channel at a time (a call to
``quantize_nparray`` per output channel: about a fifth of a MnasNet rewrite, paid again by every placement
candidate). Its per-tensor branch runs the same arithmetic (float32 divide by the scale, round, add the zero point,
clip, cast) on the whole array at once. Handing that branch the per-channel scales and zero points broadcast to the
weight's shape gives the same float32 operation on every element, so the initializer it returns is byte-identical
(tests/test_quantize_fast_paths.py compares whole models with and without it). Anything else (per-tensor,
block-wise, float8, int4) goes to ORT's own function untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx

#: Integer types whose per-tensor branch is plain numpy arithmetic (float8 runs a reference evaluator, int4 packs).
_VECTORIZABLE = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                           onnx.TensorProto.INT16, onnx.TensorProto.UINT16})
#: ORT modules that call quantize_onnx_initializer by its module-level name.
_CALLERS = ("onnxruntime.quantization.qdq_quantizer", "onnxruntime.quantization.onnx_quantizer")


def vectorize_per_channel(original: Callable[..., onnx.TensorProto]) -> Callable[..., onnx.TensorProto]:
    """Wrap ORT's ``quantize_onnx_initializer`` so per-channel integer weights take its per-tensor branch with
    broadcast scales and zero points."""

    @functools.wraps(original)
    def quantize(weight: onnx.TensorProto, quant_type: int, zero_point: Any, scale: Any, axis: int | None = None,
                 quant_weight_name: str | None = None, block_size: int = 0) -> onnx.TensorProto:
        rank = len(weight.dims)
        if axis is None or block_size or quant_type not in _VECTORIZABLE or not -rank <= axis < rank:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        shape = [1] * rank
        shape[axis] = -1
        dims = tuple(weight.dims)
        scale, zero_point = np.asarray(scale), np.asarray(zero_point)
        if scale.size != dims[axis] or zero_point.size != dims[axis]:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        full_scale = np.broadcast_to(scale.reshape(shape), dims).ravel()
        full_zero_point = np.broadcast_to(zero_point.reshape(shape), dims).ravel()
        return original(weight, quant_type, full_zero_point, full_scale, None, quant_weight_name, 0)

    quantize._onnxopt_vectorized = True  # type: ignore[attr-defined]
    return quantize


@contextlib.contextmanager
def vectorized_weight_quantization() -> Iterator[None]:
    """Within the block, ORT's quantizers quantize per-channel weights vectorized (restored on exit; re-entrant).

    The patch is module-wide: another thread quantizing meanwhile takes whichever path is installed at the time,
    and both give the same bytes."""
    import importlib

    patched: list[tuple[Any, Callable[..., onnx.TensorProto]]] = []
    try:
        for name in _CALLERS:
            module = importlib.import_module(name)
            current = getattr(module, "quantize_onnx_initializer", None)
            if current is None or getattr(current, "_onnxopt_vectorized", False):
                continue
            module.quantize_onnx_initializer = vectorize_per_channel(current)
            patched.append((module, current))
        yield
    finally:
        for module, current in patched:
            module.quantize_onnx_initializer = current


__all__ = ["vectorize_per_channel", "vectorized_weight_quantization"]
