"""ORT's per-channel weight quantization in one numpy expression instead of a Python loop over channels.

ONNX Runtime's ``quantize_onnx_initializer`` quantizes a per-channel weight one channel at a time (a call to
``quantize_nparray`` per output channel: about a fifth of a MnasNet rewrite, paid again by every placement
candidate). Its per-tensor branch runs the same arithmetic (float32 divide by the scale, round, add the zero point,
clip, cast) on the whole array at once. Handing that branch the per-channel scales and zero points broadcast to the
weight's shape gives the same float32 operation on every element, so the initializer it returns is byte-identical
(tests/test_quantize_fast_paths.py compares whole models with and without it). Anything else (per-tensor,
block-wise, float8, int4) goes to ORT's own function untouched.

The QOperator writer (``ONNXQuantizer``) has its own loop, ``BaseQuantizer.quantize_weight_per_channel_impl``:
there, when every channel's float32 scale and zero point are given as overrides (what the quantize pass always
hands it), :func:`vectorize_per_channel_impl` runs the same ``quantize_nparray`` arithmetic on the whole weight and
writes the three initializers as ORT does; any other case goes to ORT's loop.
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


def vectorize_per_channel_impl(original: Callable[..., tuple[str, str, str]]) -> Callable[..., tuple[str, str, str]]:
    """Wrap ``BaseQuantizer.quantize_weight_per_channel_impl`` (the QOperator writer's per-channel loop) so a weight
    whose every channel has a float32 scale and a zero point in the overrides is quantized in one expression."""

    @functools.wraps(original)
    def impl(self: Any, weight_name: str, weight_qType: int, channel_axis: int, reduce_range: bool = True,
             keep_float_weight: bool = False) -> tuple[str, str, str]:
        plan = _override_plan(self, weight_name, weight_qType, channel_axis)
        if plan is None:
            return original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, get_qmin_qmax_for_qType

        initializer, weights, axis, quant_type, scales, zero_points = plan
        shape = [1] * weights.ndim
        shape[axis] = -1
        # quantize_nparray's arithmetic, per element, with each channel's scale and zero point broadcast
        qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
        values = np.asarray((weights.astype(np.float32) / scales.reshape(shape)).round() + zero_points.reshape(shape))
        np.clip(values, qmin, qmax, out=values)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
        q_name, zp_name, scale_name = (weight_name + TENSOR_NAME_QUANT_SUFFIX, weight_name + "_zero_point",
                                       weight_name + "_scale")
        dims = [initializer.dims[axis]]
        self.model.initializer_extend([
            onnx.helper.make_tensor(scale_name, initializer.data_type, dims, scales.tolist()),
            onnx.helper.make_tensor(zp_name, quant_type, dims, zero_points.tolist()),
        ])
        if not keep_float_weight:
            quantized = np.asarray(values.astype(dtype), dtype=dtype).reshape(initializer.dims)
            self.model.initializer_extend([onnx.numpy_helper.from_array(quantized, q_name)])
        return q_name, zp_name, scale_name

    impl._onnxopt_vectorized = True  # type: ignore[attr-defined]
    return impl


def _override_plan(quantizer: Any, weight_name: str, quant_type: int, channel_axis: int) -> tuple[Any, ...] | None:
    """(initializer, weights, axis, type, scales, zero points) when the overrides fix every channel's float32 scale
    and zero point and nothing else; None for every other case (ORT's loop handles those)."""
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE, find_by_name, tensor_proto_to_array

    initializer = find_by_name(weight_name, quantizer.model.initializer())
    if initializer is None:
        return None
    weights = tensor_proto_to_array(initializer)
    rank = weights.ndim
    if weights.dtype != np.float32 or not -rank <= channel_axis < rank:
        return None
    axis = channel_axis % rank
    rows = quantizer.tensor_quant_overrides.get_per_channel_overrides(weight_name, default_val=[{"axis": axis}])
    if len(rows) != weights.shape[axis] or rows[0].get("axis", axis) % rank != axis:
        return None
    if "quant_type" in rows[0]:
        quant_type = rows[0]["quant_type"].tensor_type
    if quant_type not in _VECTORIZABLE or any(set(row) - {"scale", "zero_point", "axis"} for row in rows):
        return None
    if not all("scale" in row and "zero_point" in row for row in rows):
        return None
    scales = [np.array(row["scale"]) for row in rows]
    if any(scale.dtype != np.float32 or scale.size != 1 for scale in scales):
        return None  # float32 keeps the division float32 whatever numpy's promotion rules for 0-d arrays
    zero_points = np.array([np.array(row["zero_point"], dtype=ONNX_TYPE_TO_NP_TYPE[quant_type]).reshape(())
                            for row in rows])
    return initializer, weights, axis, quant_type, np.array([s.reshape(()) for s in scales]), zero_points


@contextlib.contextmanager
def vectorized_weight_quantization() -> Iterator[None]:
    """Within the block, ORT's quantizers quantize per-channel weights vectorized (restored on exit; re-entrant).

    The patch is module-wide: another thread quantizing meanwhile takes whichever path is installed at the time,
    and both give the same bytes."""
    import importlib

    patched: list[tuple[Any, Callable[..., onnx.TensorProto]]] = []
    patched_loop: Callable[..., tuple[str, str, str]] | None = None
    try:
        for name in _CALLERS:
            module = importlib.import_module(name)
            current = getattr(module, "quantize_onnx_initializer", None)
            if current is None or getattr(current, "_onnxopt_vectorized", False):
                continue
            module.quantize_onnx_initializer = vectorize_per_channel(current)
            patched.append((module, current))
        from onnxruntime.quantization.base_quantizer import BaseQuantizer

        loop = BaseQuantizer.quantize_weight_per_channel_impl
        if not getattr(loop, "_onnxopt_vectorized", False):
            BaseQuantizer.quantize_weight_per_channel_impl = vectorize_per_channel_impl(loop)
            patched_loop = loop
        else:
            patched_loop = None
        yield
    finally:
        for module, current in patched:
            module.quantize_onnx_initializer = current
        if patched_loop is not None:
            BaseQuantizer.quantize_weight_per_channel_impl = patched_loop


__all__ = ["vectorize_per_channel", "vectorize_per_channel_impl", "vectorized_weight_quantization"]
