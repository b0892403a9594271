"""Scales for int8 weights, per tensor or per output channel.

Weights are known in full, so no histogram is needed: ``minmax`` (the default, and what runtimes expect) takes the
exact extremes, ``percentile`` exact quantiles, and ``mse`` (alias ``sqnr``) shrinks each channel's range by the
factor whose actual fake-quantized weights are closest to the originals in squared error.
"""

from __future__ import annotations

import numpy as np

from onnxopt.errors import DataError, RecipeError
from onnxopt.passes.quantize.qparams import QuantParams, TensorRange, fake_quantize, quant_params

WEIGHT_METHODS = ("minmax", "percentile", "mse", "sqnr")
#: Shrink factors tried by the MSE search (a grid, then a finer grid around the best one).
_MSE_RATIOS = np.linspace(0.2, 1.0, 81)
_MSE_FINE_POINTS = 21


def weight_range(
    weight: np.ndarray,
    *,
    axis: int | None = None,
    method: str = "minmax",
    dtype: str | np.dtype = "int8",
    symmetric: bool = True,
    reduce_range: bool = False,
    percentile: float = 99.99,
    name: str = "weight",
) -> TensorRange:
    """Clipping range of ``weight``: floats per tensor (``axis=None``) or arrays with one entry per channel."""
    if method not in WEIGHT_METHODS:
        hint = " (entropy needs activation histograms)" if method == "entropy" else ""
        raise RecipeError(f"unknown weight method '{method}'{hint}; use one of {', '.join(WEIGHT_METHODS)}")
    if method == "minmax":
        low, high = _extremes(weight, axis, name)
    else:
        rows = _channel_rows(weight, axis, name)
        low, high = rows.min(axis=1), rows.max(axis=1)
    if method == "percentile":
        percentile = float(percentile)
        if not 0.0 < percentile <= 100.0:
            raise RecipeError(f"percentile must be in (0, 100], got {percentile}")
        if symmetric:
            high = np.percentile(np.abs(rows), percentile, axis=1)
            low = -high
        else:
            tail = (100.0 - percentile) / 2
            low = np.percentile(rows, tail, axis=1)
            high = np.percentile(rows, 100.0 - tail, axis=1)
    elif method in ("mse", "sqnr"):
        low, high = _mse_range(rows, np.minimum(low, 0.0), np.maximum(high, 0.0), dtype, symmetric, reduce_range)
    elif symmetric:
        high = np.maximum(-low, high)
        low = -high
    if axis is None:
        return TensorRange(float(low[0]), float(high[0]))
    return TensorRange(low, high)


def weight_quant_params(
    weight: np.ndarray,
    *,
    axis: int | None = None,
    method: str = "minmax",
    dtype: str | np.dtype = "int8",
    symmetric: bool = True,
    reduce_range: bool = False,
    percentile: float = 99.99,
    name: str = "weight",
) -> QuantParams:
    """Quantization parameters of ``weight`` (int8 symmetric by default); per channel along ``axis`` if given."""
    rng = weight_range(
        weight,
        axis=axis,
        method=method,
        dtype=dtype,
        symmetric=symmetric,
        reduce_range=reduce_range,
        percentile=percentile,
        name=name,
    )
    ndim = np.ndim(weight)
    return quant_params(rng, dtype, symmetric, reduce_range, axis=None if axis is None else axis % ndim)


def _channel_rows(weight: np.ndarray, axis: int | None, name: str) -> np.ndarray:
    """``weight`` as a float32 matrix with one row per channel (a single row per tensor)."""
    w = _numeric(weight, axis, name)
    if not np.all(np.isfinite(w)):
        raise DataError(f"weight '{name}' of shape {tuple(w.shape)} has NaN/Inf values")
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _extremes(weight: np.ndarray, axis: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (one entry per tensor) min and max, reduced in place over the other axes: the same numbers as
    the rows of :func:`_channel_rows`, without its transposed copy and its NaN/Inf mask of the whole weight (a NaN
    makes the min NaN, an infinity shows in the min or the max)."""
    w = _numeric(weight, axis, name)
    others = tuple(range(w.ndim)) if axis is None else tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    low = np.atleast_1d(w.min(axis=others)) if others else w.copy()
    high = np.atleast_1d(w.max(axis=others)) if others else w.copy()
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise DataError(f"weight '{name}' of shape {tuple(w.shape)} has NaN/Inf values")
    return low, high


def _numeric(weight: np.ndarray, axis: int | None, name: str) -> np.ndarray:
    """``weight`` as a non-empty float32 array, ``axis`` checked against it."""
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise DataError(f"weight '{name}' has dtype {w.dtype}; only numeric weights can be quantized")
    if w.size == 0:
        raise DataError(f"weight '{name}' of shape {tuple(w.shape)} is empty")
    if axis is not None and not -w.ndim <= axis < w.ndim:
        raise DataError(f"axis {axis} is out of range for weight '{name}' of shape {tuple(w.shape)}")
    return w.astype(np.float32, copy=False)


def _mse_range(
    rows: np.ndarray, low: np.ndarray, high: np.ndarray, dtype: str | np.dtype, symmetric: bool, reduce_range: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the shrink factor ``r`` of ``[low, high]`` whose fake-quantized row has the least squared error."""
    if symmetric:
        high = np.maximum(-low, high)
        low = -high

    def errors(ratio: np.ndarray) -> np.ndarray:
        params = quant_params(TensorRange(low * ratio, high * ratio), dtype, symmetric, reduce_range, axis=0)
        return np.sum(np.square(rows - fake_quantize(rows, params, axis=0)), axis=1, dtype=np.float64)

    channels = rows.shape[0]
    best_ratio = np.ones(channels)
    best_error = errors(best_ratio)
    for grid in (_MSE_RATIOS, None):
        if grid is None:  # refine around each row's best coarse ratio
            spacing = _MSE_RATIOS[1] - _MSE_RATIOS[0]
            grid_rows = best_ratio[:, None] + np.linspace(-spacing, spacing, _MSE_FINE_POINTS)[None, :]
            grid_rows = np.clip(grid_rows, _MSE_RATIOS[0], 1.0)
        else:
            grid_rows = np.broadcast_to(grid[None, :], (channels, grid.size))
        for k in range(grid_rows.shape[1]):
            ratio = grid_rows[:, k]
            err = errors(ratio)
            better = err < best_error
            best_error = np.where(better, err, best_error)
            best_ratio = np.where(better, ratio, best_ratio)
    return low * best_ratio, high * best_ratio
