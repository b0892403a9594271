"""ORT's integer weight quantization, in cache-sized blocks instead of whole-array temporaries or a channel loop.

ONNX Runtime's ``quantize_onnx_initializer`` quantizes a per-channel weight one channel at a time (a call to
``quantize_nparray`` per output channel: about a fifth of a MnasNet rewrite, paid again by every placement
candidate), and a per-tensor weight in one numpy expression whose weight-sized float temporaries weigh on large
models (reports/weight_quantization.md: a 600 MB MatMul weight took 1.07 s per tensor and 3.07 s per channel in
ORT's function, 0.71 s and 0.73 s wrapped, the weight's read and the result's serialization included).
:func:`quantize_blocks` runs that same float32 arithmetic (divide by the scale, round, add the zero point, clip,
cast) block by block, each channel's scale and zero point broadcast over its elements, so every element gets the
same float32 operation and the initializer is byte-identical (tests/test_quantize_fast_paths.py compares single
weights and whole models with and without it). Anything else (block-wise, float8, int4, a mismatched scale) goes to
ORT's own function untouched.

ORT's QDQ writer also reads every weight in ``_calc_initializer_quant_params`` (a copy of its bytes: 0.3-0.6 s per
600 MB weight here), even where overrides fix its scale and zero point, when it then uses only the weight's type and
rank: :func:`shape_only_reads` hands it a zero-strided stand-in of the right shape and type for those weights.

The QOperator writer (``ONNXQuantizer``) has its own loop, ``BaseQuantizer.quantize_weight_per_channel_impl``:
there, when every channel's float32 scale and zero point are given as overrides (what the quantize pass always
hands it), :func:`vectorize_per_channel_impl` quantizes the weight with :func:`quantize_blocks` and writes the three
initializers as ORT does; any other case goes to ORT's loop.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx

#: Integer types whose per-tensor branch is plain numpy arithmetic (float8 runs a reference evaluator, int4 packs).
_VECTORIZABLE = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                           onnx.TensorProto.INT16, onnx.TensorProto.UINT16})
#: Serializes :func:`shape_only_reads`' swaps of ORT's module-level weight reader.
_READS_LOCK = threading.Lock()
#: ORT modules that call quantize_onnx_initializer by its module-level name.
_CALLERS = ("onnxruntime.quantization.qdq_quantizer", "onnxruntime.quantization.onnx_quantizer")


#: Elements per block of :func:`quantize_blocks`: its float32 temporaries stay in the CPU's cache.
BLOCK_ELEMENTS = 1 << 16


def quantize_blocks(values: np.ndarray, quant_type: int, scale: np.ndarray, zero_point: np.ndarray,
                    axis: int | None = None) -> np.ndarray:
    """ORT's ``quantize_nparray`` arithmetic on ``values``, block by block: one scale and zero point (``axis``
    None) or one per index of ``axis``; the result has ``values``' shape and the quantized type."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    shape = values.shape
    if values.size == 0:
        return np.empty(shape, dtype)
    if axis is None:
        view = values.reshape(-1, 1, 1)
        channels = 1
    else:
        channels = shape[axis]
        view = values.reshape(int(np.prod(shape[:axis], dtype=np.int64)), channels, -1)
    scales = np.asarray(scale).reshape(1, channels, 1)
    zero_points = np.asarray(zero_point).reshape(1, channels, 1)
    out = np.empty(view.shape, dtype)
    for rows, cols in _blocks(view.shape):
        block = (view[rows, cols].astype(np.float32) / scales[:, cols]).round() + zero_points[:, cols]
        np.clip(block, qmin, qmax, out=block)
        out[rows, cols] = block.astype(dtype)
    return out.reshape(shape)


def _blocks(shape: tuple[int, int, int]) -> Iterator[tuple[slice, slice]]:
    """(outer rows, channels) slices of an (outer, channels, inner) array, each about ``BLOCK_ELEMENTS`` elements
    (one channel's inner elements at least)."""
    outer, channels, inner = shape
    row = channels * inner
    if row <= BLOCK_ELEMENTS:
        step = BLOCK_ELEMENTS // max(row, 1)
        for start in range(0, outer, step):
            yield slice(start, start + step), slice(None)
        return
    step = max(1, BLOCK_ELEMENTS // max(inner, 1))
    for start in range(outer):
        for first in range(0, channels, step):
            yield slice(start, start + 1), slice(first, first + step)


def blockwise_initializer(original: Callable[..., onnx.TensorProto]) -> Callable[..., onnx.TensorProto]:
    """Wrap ORT's ``quantize_onnx_initializer`` so integer weights, per tensor or per channel, are quantized by
    :func:`quantize_blocks`."""

    @functools.wraps(original)
    def quantize(weight: onnx.TensorProto, quant_type: int, zero_point: Any, scale: Any, axis: int | None = None,
                 quant_weight_name: str | None = None, block_size: int = 0) -> onnx.TensorProto:
        rank = len(weight.dims)
        channels = 1 if axis is None else (weight.dims[axis] if -rank <= axis < rank else -1)
        # numpy arrays only: a Python float scale divides in float32 in ORT's code, a float64 array would not
        if (block_size or quant_type not in _VECTORIZABLE or channels < 1
                or not isinstance(scale, np.ndarray) or not isinstance(zero_point, np.ndarray)
                or scale.size != channels or zero_point.size != channels
                or weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)):
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, tensor_proto_to_array

        values = tensor_proto_to_array(weight)
        quantized = quantize_blocks(values, quant_type, scale, zero_point, None if axis is None else axis % rank)
        name = quant_weight_name if quant_weight_name else f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        return onnx.numpy_helper.from_array(quantized.reshape(tuple(weight.dims)), name)

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
        from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

        initializer, weights, axis, quant_type, scales, zero_points = plan
        values = quantize_blocks(weights, quant_type, scales, zero_points, axis)
        q_name, zp_name, scale_name = (weight_name + TENSOR_NAME_QUANT_SUFFIX, weight_name + "_zero_point",
                                       weight_name + "_scale")
        dims = [initializer.dims[axis]]
        self.model.initializer_extend([
            onnx.helper.make_tensor(scale_name, initializer.data_type, dims, scales.tolist()),
            onnx.helper.make_tensor(zp_name, quant_type, dims, zero_points.tolist()),
        ])
        if not keep_float_weight:
            quantized = values.reshape(tuple(initializer.dims))
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


def shape_only_reads(original: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """Wrap ``QDQQuantizer._calc_initializer_quant_params`` so that, while it runs, ORT's weight reader gives a
    weight whose scale and zero point the overrides fix a stand-in (``np.broadcast_to`` of a zero: no memory) of its
    shape and type, the only things that branch uses; every other tensor is read as before."""

    @functools.wraps(original)
    def calc(self: Any) -> dict[str, Any]:
        from onnxruntime.quantization import qdq_quantizer

        fixed = {name for name in self.tensors_to_quantize if self.tensor_quant_overrides.overrides_scale_zp(name)}

        def read(initializer: onnx.TensorProto) -> np.ndarray:
            if initializer.name in fixed and initializer.data_type in (onnx.TensorProto.FLOAT,
                                                                       onnx.TensorProto.FLOAT16):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
                return np.broadcast_to(np.zeros((), dtype), tuple(initializer.dims))
            return reader(initializer)  # bound below, before ORT calls this

        with _READS_LOCK:  # the reader is a module global: one swap at a time, restored in order
            reader = qdq_quantizer.tensor_proto_to_array
            qdq_quantizer.tensor_proto_to_array = read
            try:
                return original(self)
            finally:
                qdq_quantizer.tensor_proto_to_array = reader

    calc._onnxopt_vectorized = True  # type: ignore[attr-defined]
    return calc


@contextlib.contextmanager
def vectorized_weight_quantization() -> Iterator[None]:
    """Within the block, ORT's quantizers quantize weights in blocks (:func:`blockwise_initializer`,
    :func:`vectorize_per_channel_impl`) and skip the weight reads of :func:`shape_only_reads` (restored on exit;
    re-entrant).

    The patch is module-wide: another thread quantizing meanwhile takes whichever path is installed at the time,
    and both give the same bytes."""
    import importlib

    patched: list[tuple[Any, Callable[..., onnx.TensorProto]]] = []
    patched_loop: Callable[..., tuple[str, str, str]] | None = None
    patched_params: Callable[[Any], dict[str, Any]] | None = None
    try:
        for name in _CALLERS:
            module = importlib.import_module(name)
            current = getattr(module, "quantize_onnx_initializer", None)
            if current is None or getattr(current, "_onnxopt_vectorized", False):
                continue
            module.quantize_onnx_initializer = blockwise_initializer(current)
            patched.append((module, current))
        from onnxruntime.quantization.base_quantizer import BaseQuantizer
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

        loop = BaseQuantizer.quantize_weight_per_channel_impl
        if not getattr(loop, "_onnxopt_vectorized", False):
            BaseQuantizer.quantize_weight_per_channel_impl = vectorize_per_channel_impl(loop)
            patched_loop = loop
        else:
            patched_loop = None
        params = QDQQuantizer._calc_initializer_quant_params
        patched_params = None if getattr(params, "_onnxopt_vectorized", False) else params
        if patched_params is not None:
            QDQQuantizer._calc_initializer_quant_params = shape_only_reads(params)
        yield
    finally:
        for module, current in patched:
            module.quantize_onnx_initializer = current
        if patched_loop is not None:
            BaseQuantizer.quantize_weight_per_channel_impl = patched_loop
        if patched_params is not None:
            QDQQuantizer._calc_initializer_quant_params = patched_params


__all__ = ["blockwise_initializer", "quantize_blocks", "shape_only_reads", "vectorize_per_channel_impl",
           "vectorized_weight_quantization"]
