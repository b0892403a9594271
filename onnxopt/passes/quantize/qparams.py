"""Clipping ranges, integer grids and the affine map ``x ~ scale * (q - zero_point)`` between them.

Conventions follow ONNX ``QuantizeLinear``: round half to even, saturate to ``[qmin, qmax]``, float32 scales.
Symmetric grids are narrowed by one level (int8 ``-127..127``) so that ``+T`` and ``-T`` are both representable and
the zero point is exactly the middle of the type; ``reduce_range`` uses 7 bits (``uint8 0..127``, ``int8 -64..63``)
so that AVX2's ``u8 x s8`` pair sums cannot saturate int16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import DataError, RecipeError

#: Integer types a quantized tensor can use, with their full ranges.
INT_TYPES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}
#: 7-bit ranges for ``reduce_range``.
REDUCED_TYPES: dict[str, tuple[int, int]] = {"int8": (-64, 63), "uint8": (0, 127)}


@dataclass(frozen=True, eq=False)
class TensorRange:
    """A clipping range ``[low, high]``: floats for one tensor, or 1-D arrays for per-channel weights."""

    low: float | np.ndarray
    high: float | np.ndarray

    def __post_init__(self) -> None:
        low, high = np.asarray(self.low, dtype=np.float64), np.asarray(self.high, dtype=np.float64)
        if low.shape != high.shape:
            raise DataError(f"range bounds differ in shape: low {low.shape} vs high {high.shape}")
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise DataError(f"range is not finite: [{self.low}, {self.high}]")
        if np.any(low > high):
            raise DataError(f"range is empty: low {self.low} > high {self.high}")
        if low.ndim == 0:
            object.__setattr__(self, "low", float(low))
            object.__setattr__(self, "high", float(high))
        else:
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.low, np.ndarray)

    @property
    def absmax(self) -> float | np.ndarray:
        """The symmetric threshold ``max(|low|, |high|)`` this range implies."""
        result = np.maximum(np.abs(self.low), np.abs(self.high))
        return result if self.per_channel else float(result)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorRange):
            return NotImplemented
        return bool(np.array_equal(self.low, other.low) and np.array_equal(self.high, other.high))

    def __hash__(self) -> int:
        return hash((np.asarray(self.low).tobytes(), np.asarray(self.high).tobytes()))


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale and zero point of one tensor (0-d arrays) or one per channel along ``axis`` (1-D arrays).

    ``qmin``/``qmax`` are the saturation bounds actually used, already narrowed for symmetric or reduced grids.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantParams):
            return NotImplemented
        return (
            np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
            and self.dtype == other.dtype
            and (self.qmin, self.qmax, self.axis) == (other.qmin, other.qmax, other.axis)
        )

    def __hash__(self) -> int:
        return hash((self.scale.tobytes(), self.zero_point.tobytes(), str(self.dtype), self.qmin, self.qmax))

    def to_dict(self) -> dict:
        """JSON-friendly form for reports."""
        return {
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "dtype": str(self.dtype),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
        }


def _dtype_name(dtype: str | np.dtype | type) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError as exc:
        raise RecipeError(f"unknown quantization dtype {dtype!r}; use one of {sorted(INT_TYPES)}") from exc
    if name not in INT_TYPES:
        raise RecipeError(f"unsupported quantization dtype '{name}'; use one of {sorted(INT_TYPES)}")
    return name


def qrange(dtype: str | np.dtype = "int8", symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Saturation bounds ``(qmin, qmax)`` of the integer grid.

    Symmetric grids keep ``zero_point +- n`` with ``n`` the largest step count that fits on both sides:
    int8 ``-127..127``, uint8 ``1..255`` (zero point 128), uint8 reduced ``1..127`` (zero point 64). Reduced int8 is
    ``-64..64``, as ONNX Runtime's quantizer stores it (``get_qmin_qmax_for_qType``): 64 still keeps the AVX2
    ``u8 x s8`` pair sums (2 x 255 x 64) inside int16, and a mirror of ORT's grid must match the weights it writes.
    """
    name = _dtype_name(dtype)
    if symmetric and reduce_range and name == "int8":
        return -64, 64
    qmin, qmax = (REDUCED_TYPES if reduce_range else INT_TYPES)[name]
    if symmetric:
        zero = symmetric_zero_point(name, reduce_range)
        half = min(qmax - zero, zero - qmin)
        return zero - half, zero + half
    return qmin, qmax


def symmetric_zero_point(dtype: str | np.dtype = "int8", reduce_range: bool = False) -> int:
    """The middle of the type's (possibly reduced) range: 0 for int8, 128 for uint8, 64 for reduced uint8."""
    name = _dtype_name(dtype)
    qmin, qmax = (REDUCED_TYPES if reduce_range else INT_TYPES)[name]
    return math.ceil((qmin + qmax) / 2)


def quant_params(
    rng: TensorRange,
    dtype: str | np.dtype = "int8",
    symmetric: bool = True,
    reduce_range: bool = False,
    axis: int | None = None,
) -> QuantParams:
    """Scale and zero point that map ``rng`` (widened to contain 0, so that 0 is exact) onto the integer grid.

    Symmetric: ``scale = max(|low|, |high|) / n`` with the grid ``zero_point +- n``. Asymmetric:
    ``scale = (high - low) / (qmax - qmin)`` and ``zero_point = round(qmin - low / scale)``. A range of width 0
    gets scale 1 (every value is 0 anyway). Per-channel ranges give per-channel parameters along ``axis``.
    """
    name = _dtype_name(dtype)
    qmin, qmax = qrange(name, symmetric, reduce_range)
    low = np.minimum(np.asarray(rng.low, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(rng.high, dtype=np.float64), 0.0)
    tiny = float(np.finfo(np.float32).tiny)
    if symmetric:
        zero = symmetric_zero_point(name, reduce_range)
        scale = (np.maximum(-low, high) / (qmax - zero)).astype(np.float32)
        degenerate = ~(scale >= tiny)
        scale = np.where(degenerate, np.float32(1.0), scale).astype(np.float32)
        zero_point = np.full(scale.shape, zero, dtype=np.int64)
    else:
        scale = ((high - low) / (qmax - qmin)).astype(np.float32)
        degenerate = ~(scale >= tiny)
        scale = np.where(degenerate, np.float32(1.0), scale).astype(np.float32)
        zero_point = np.round(qmin - low / scale.astype(np.float64))
        zero_point = np.where(degenerate, 0, zero_point)
        zero_point = np.clip(zero_point, qmin, qmax).astype(np.int64)
    if scale.ndim == 0:
        axis = None
    return QuantParams(
        scale=np.asarray(scale, dtype=np.float32),
        zero_point=np.asarray(zero_point).astype(name),
        dtype=np.dtype(name),
        qmin=int(qmin),
        qmax=int(qmax),
        axis=axis,
    )


def _broadcast(params: QuantParams, ndim: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point shaped to broadcast against an ``ndim``-d tensor along ``axis``."""
    scale = params.scale
    zero = params.zero_point.astype(np.float32)
    if not params.per_channel:
        return scale, zero
    axis = params.axis if axis is None else axis
    if axis is None:
        raise RecipeError(f"per-channel parameters ({params.scale.size} channels) need an axis")
    if not -ndim <= axis < ndim:
        raise DataError(f"axis {axis} is out of range for a {ndim}-d tensor")
    shape = [1] * ndim
    shape[axis] = scale.size
    return scale.reshape(shape), zero.reshape(shape)


def _check_channels(x: np.ndarray, params: QuantParams, axis: int | None) -> None:
    if params.per_channel:
        axis = params.axis if axis is None else axis
        if axis is not None and -x.ndim <= axis < x.ndim and x.shape[axis] != params.scale.size:
            raise DataError(
                f"tensor of shape {tuple(x.shape)} has {x.shape[axis]} channels on axis {axis} "
                f"but the parameters have {params.scale.size}"
            )


def quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``clip(round(x / scale) + zero_point, qmin, qmax)`` in the parameters' integer dtype (like QuantizeLinear)."""
    x = np.asarray(x, dtype=np.float32)
    _check_channels(x, params, axis)
    scale, zero = _broadcast(params, x.ndim, axis)
    q = np.clip(np.round(x / scale) + zero, params.qmin, params.qmax)
    return q.astype(params.dtype)


def dequantize(q: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32 (like DequantizeLinear)."""
    q = np.asarray(q)
    _check_channels(q, params, axis)
    scale, zero = _broadcast(params, q.ndim, axis)
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams, axis: int | None = None) -> np.ndarray:
    """Quantize then dequantize: what the network computes with after QDQ, as float32."""
    return dequantize(quantize(x, params, axis), params, axis)
