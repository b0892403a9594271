"""Clipping-range methods for activations, computed from a tensor's streaming statistics.

``minmax`` keeps every value. ``percentile`` drops a tail fraction. ``entropy`` is TensorRT's KL-divergence search
over thresholds of the ``|x|`` histogram. ``mse`` (alias ``sqnr``) picks the range minimizing the expected squared
quantization error, rounding noise ``step^2 / 12`` inside the range plus the exact clipping error outside (Lin et
al. 2015 choose the SQNR-optimal step per layer; for a given signal, maximal SQNR is minimal MSE).

Symmetric methods work on ``|x|`` and return ``[-T, T]``; asymmetric ones return ``[low, high]`` inside the data's
``[min, max]`` (quant_params later widens it to contain 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import DataError, RecipeError
from onnxopt.passes.quantize.histogram import GridHistogram
from onnxopt.passes.quantize.qparams import TensorRange, qrange, symmetric_zero_point
from onnxopt.passes.quantize.stats import TensorStats

#: Range methods for activations; ``sqnr`` is an alias of ``mse``.
METHODS = ("minmax", "percentile", "entropy", "mse", "sqnr")
DEFAULT_PERCENTILE = 99.99
#: Points per round of the coarse-to-fine MSE search, and rounds.
_GRID_POINTS = 129
_ZOOM_ROUNDS = 4


@dataclass(frozen=True, eq=False)
class EntropySearch:
    """The KL search's answer and its whole trace: every candidate threshold and its divergence."""

    threshold: float
    thresholds: np.ndarray
    divergences: np.ndarray
    num_quantized_bins: int

    @property
    def candidates(self) -> int:
        return int(self.thresholds.size)


def compute_range(
    stats: TensorStats,
    method: str = "minmax",
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    **opts: object,
) -> TensorRange:
    """The clipping range of one tensor by ``method`` (see METHODS); ``opts`` are the method's own options."""
    if method not in _DISPATCH:
        raise RecipeError(f"unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    func, allowed = _DISPATCH[method]
    unknown = sorted(set(opts) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise RecipeError(f"calibration method '{method}' has no option(s) {unknown}; its options: {known}")
    if stats.count == 0:
        raise DataError(f"tensor '{stats.name}' received no values during calibration")
    if method != "minmax" and not stats.has_histograms:
        raise RecipeError(f"method '{method}' needs histograms; tensor '{stats.name}' was collected without them")
    if stats.max_abs == 0.0:
        return TensorRange(0.0, 0.0)
    return func(stats, symmetric=symmetric, reduce_range=reduce_range, **opts)


def minmax_range(stats: TensorStats, *, symmetric: bool = False, reduce_range: bool = False) -> TensorRange:
    """The observed range: ``[-max|x|, max|x|]`` or ``[min, max]``."""
    if symmetric:
        return TensorRange(-stats.max_abs, stats.max_abs)
    return TensorRange(stats.min, stats.max)


def percentile_range(
    stats: TensorStats,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    percentile: float = DEFAULT_PERCENTILE,
) -> TensorRange:
    """Symmetric: the ``percentile`` of ``|x|``. Asymmetric: cut ``(100 - percentile) / 2`` % from each side."""
    percentile = float(percentile)
    if not 0.0 < percentile <= 100.0:
        raise RecipeError(f"percentile must be in (0, 100], got {percentile}")
    assert stats.abs_hist is not None and stats.signed_hist is not None
    if symmetric:
        t = min(stats.abs_hist.quantile(percentile / 100.0), stats.max_abs)
        return TensorRange(-t, t)
    tail = (100.0 - percentile) / 200.0
    low = min(max(stats.signed_hist.quantile(tail), stats.min), stats.max)
    high = max(min(stats.signed_hist.quantile(1.0 - tail), stats.max), low)
    return TensorRange(low, high)


def default_quantized_bins(stats: TensorStats, symmetric: bool, reduce_range: bool) -> int:
    """Integer levels available to ``|x|`` on one side of zero: 128 for int8 symmetric, 256 for uint8 on x >= 0."""
    if symmetric:
        return qrange("int8", True, reduce_range)[1] + 1
    qmin, qmax = qrange("uint8", False, reduce_range)
    levels = qmax - qmin + 1
    return levels if stats.min >= 0 else levels // 2


def entropy_range(
    stats: TensorStats,
    *,
    symmetric: bool = False,
    reduce_range: bool = False,
    num_quantized_bins: int | None = None,
    stride: int = 1,
) -> TensorRange:
    """TensorRT-style KL threshold ``T`` on ``|x|``: ``[-T, T]``, or ``[min, max]`` clipped to it when asymmetric."""
    assert stats.abs_hist is not None
    levels = num_quantized_bins or default_quantized_bins(stats, symmetric, reduce_range)
    t = min(entropy_search(stats.abs_hist, levels, stride, exact_zeros=stats.zeros).threshold, stats.max_abs)
    if symmetric:
        return TensorRange(-t, t)
    return TensorRange(max(stats.min, -t), min(stats.max, t))


def entropy_search(
    hist: GridHistogram, num_quantized_bins: int = 128, stride: int = 1, exact_zeros: int = 0
) -> EntropySearch:
    """Find the threshold whose clipped, ``num_quantized_bins``-level version of the histogram loses least (KL).

    For each candidate cut ``i`` (every bin edge from ``num_quantized_bins`` to the last non-empty bin, every
    ``stride``-th), the reference P is the first ``i`` bins with all counts beyond added to the last, and Q spreads
    each of ``num_quantized_bins`` equal groups of those ``i`` bins evenly over the group's non-empty bins. With the
    default 2048 bins more than 1024 are in use, so there are hundreds of candidates. ``exact_zeros`` values equal
    to 0 are left out of the first bin: every grid reproduces them exactly, and a spike of zeros spread over a
    group of Q would otherwise pull every threshold down to where that group is one bin wide.
    """
    if not hist.nonnegative:
        raise ValueError("the entropy search runs on a histogram of |x|")
    levels, stride = int(num_quantized_bins), int(stride)
    if levels < 2 or stride < 1:
        raise RecipeError(f"entropy needs num_quantized_bins >= 2 and stride >= 1, got {levels} and {stride}")
    used = hist.used
    if hist.width is None or used == 0:
        return EntropySearch(0.0, np.zeros(0), np.zeros(0), levels)
    counts = hist.counts[:used].astype(np.float64)
    counts[0] = max(counts[0] - exact_zeros, 0.0)
    if not counts.any():
        return EntropySearch(0.0, np.zeros(0), np.zeros(0), levels)
    used = int(np.flatnonzero(counts)[-1]) + 1
    counts = counts[:used]
    cum = np.concatenate(([0.0], np.cumsum(counts)))
    total = cum[-1]
    cuts = np.arange(min(levels, used), used + 1, stride)
    if cuts[-1] != used:
        cuts = np.append(cuts, used)
    divergences = np.array([_clipped_divergence(counts, cum, total, int(i), levels) for i in cuts])
    best = int(np.argmin(divergences))  # first minimum: ties go to the tighter threshold
    thresholds = cuts * hist.width
    return EntropySearch(float(thresholds[best]), thresholds.astype(np.float64), divergences, levels)


def _clipped_divergence(counts: np.ndarray, cum: np.ndarray, total: float, i: int, levels: int) -> float:
    """KL(P || Q) for the cut after ``i`` bins (see :func:`entropy_search`)."""
    p = counts[:i].copy()
    p[-1] += total - cum[i]
    present = p > 0
    if i <= levels:
        q = counts[:i].copy()
    else:
        bounds = (np.arange(levels + 1) * i) // levels
        group_sums = cum[bounds[1:]] - cum[bounds[:-1]]
        present_cum = np.concatenate(([0], np.cumsum(present)))
        group_present = present_cum[bounds[1:]] - present_cum[bounds[:-1]]
        per_bin = np.divide(group_sums, group_present, out=np.zeros(levels), where=group_present > 0)
        q = np.repeat(per_bin, np.diff(bounds)) * present
    return _kl(p, q)


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-7) -> float:
    """KL divergence of two count vectors; bins where P has mass but Q none get ``eps`` probability in Q."""
    p = p / p.sum()
    q_sum = q.sum()
    if q_sum <= 0:
        return float("inf")
    q = q / q_sum
    mask = p > 0
    q = np.where(mask & (q <= 0), eps, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def expected_mse_symmetric(
    hist: GridHistogram, thresholds: np.ndarray, steps: int, exact_zeros: int = 0
) -> np.ndarray:
    """Mean squared error of quantizing ``|x|`` (histogram) to ``steps`` levels over ``[0, T]`` for each ``T``.

    ``exact_zeros`` of the counted values are exactly 0 and carry no rounding noise.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    total = float(hist.total)
    n_in, s1_in, s2_in = hist.cumulative(t)
    _, total_s1, total_s2 = hist.totals()
    n_out, s1_out, s2_out = total - n_in, total_s1 - s1_in, total_s2 - s2_in
    step = t / steps
    clipping = s2_out - 2 * t * s1_out + t * t * n_out
    return (step * step / 12 * np.maximum(n_in - exact_zeros, 0.0) + np.maximum(clipping, 0.0)) / total


def expected_mse_asymmetric(
    hist: GridHistogram, low: np.ndarray, high: np.ndarray, steps: int, exact_zeros: int = 0
) -> np.ndarray:
    """Mean squared error of quantizing ``x`` to ``steps + 1`` levels over ``[low, high]`` (broadcast arrays).

    ``low <= 0 <= high`` is assumed (0 must be exact), so the ``exact_zeros`` zeros are inside and noiseless.
    """
    low, high = np.broadcast_arrays(np.asarray(low, np.float64), np.asarray(high, np.float64))
    total_n, total_s1, total_s2 = hist.totals()
    n_lo, s1_lo, s2_lo = hist.cumulative(low)
    n_hi, s1_hi, s2_hi = hist.cumulative(high)
    below = s2_lo - 2 * low * s1_lo + low * low * n_lo
    above = (total_s2 - s2_hi) - 2 * high * (total_s1 - s1_hi) + high * high * (total_n - n_hi)
    step = (high - low) / steps
    inside = np.maximum(n_hi - n_lo - exact_zeros, 0.0)
    return (step * step / 12 * inside + np.maximum(below, 0.0) + np.maximum(above, 0.0)) / total_n


def mse_range(stats: TensorStats, *, symmetric: bool = False, reduce_range: bool = False) -> TensorRange:
    """The range minimizing :func:`expected_mse_symmetric` / ``_asymmetric`` by a coarse-to-fine grid search."""
    assert stats.abs_hist is not None and stats.signed_hist is not None
    if symmetric:
        qmin, qmax = qrange("int8", True, reduce_range)
        steps = qmax - symmetric_zero_point("int8", reduce_range)
        abs_hist = stats.abs_hist
        t = _zoom_1d(lambda ts: expected_mse_symmetric(abs_hist, ts, steps, stats.zeros), 0.0, stats.max_abs)
        return TensorRange(-t, t)
    qmin, qmax = qrange("uint8", False, reduce_range)
    signed_hist = stats.signed_hist
    low, high = _zoom_2d(
        lambda lo, hi: expected_mse_asymmetric(signed_hist, lo, hi, qmax - qmin, stats.zeros),
        (min(stats.min, 0.0), 0.0),
        (0.0, max(stats.max, 0.0)),
    )
    low = max(low, stats.min)
    return TensorRange(low, max(min(high, stats.max), low))


def _zoom_1d(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """Minimize ``f`` over ``[lo, hi]``: a grid, then finer grids around the best point."""
    a, b = lo, hi
    best = hi
    for _ in range(_ZOOM_ROUNDS):
        xs = np.linspace(a, b, _GRID_POINTS)
        values = f(xs)
        k = int(np.argmin(values))
        best = float(xs[k])
        spacing = (b - a) / (_GRID_POINTS - 1)
        a, b = max(lo, best - spacing), min(hi, best + spacing)
    return best


def _zoom_2d(
    f: Callable[[np.ndarray, np.ndarray], np.ndarray], low_bounds: tuple[float, float], high_bounds: tuple[float, float]
) -> tuple[float, float]:
    """Minimize ``f(low, high)`` over a box by grids that zoom in on the best cell."""
    (a0, a1), (b0, b1) = low_bounds, high_bounds
    la, lb, ha, hb = a0, a1, b0, b1
    best = (a0, b1)
    for _ in range(_ZOOM_ROUNDS):
        lows = np.linspace(la, lb, _GRID_POINTS) if lb > la else np.array([la])
        highs = np.linspace(ha, hb, _GRID_POINTS) if hb > ha else np.array([ha])
        values = f(lows[:, None], highs[None, :])
        i, j = np.unravel_index(int(np.argmin(values)), values.shape)
        best = (float(lows[i]), float(highs[j]))
        dl = (lb - la) / (_GRID_POINTS - 1)
        dh = (hb - ha) / (_GRID_POINTS - 1)
        la, lb = max(a0, best[0] - dl), min(a1, best[0] + dl)
        ha, hb = max(b0, best[1] - dh), min(b1, best[1] + dh)
    return best


_DISPATCH: dict[str, tuple[Callable[..., TensorRange], set[str]]] = {
    "minmax": (minmax_range, set()),
    "percentile": (percentile_range, {"percentile"}),
    "entropy": (entropy_range, {"num_quantized_bins", "stride"}),
    "mse": (mse_range, set()),
    "sqnr": (mse_range, set()),
}
