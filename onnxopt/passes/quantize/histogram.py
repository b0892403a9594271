"""A streaming histogram with a fixed number of bins whose range grows as batches arrive.

Bins lie on a grid anchored at 0 whose width is a power of two: bin ``k`` covers ``[k * w, (k + 1) * w)``, and the
histogram keeps the ``bins`` consecutive grid cells starting at ``offset``. When a batch falls outside, the width
doubles (merging aligned pairs of cells, which is exact) and the window slides; no count is ever split or guessed.

The width is a function of the running min/max alone: the smallest power of two for which the whole range fits in
``bins`` cells (and no finer than 2**-24 of the largest magnitude, float32's resolution). Hence streaming over
batches, in any order, gives bit for bit the histogram of the concatenated data, and two histograms can be merged
exactly. The price is resolution: between ``bins / 2`` and ``bins`` cells are in use.
"""

from __future__ import annotations

import math

import numpy as np

#: Relative floor on the bin width: finer cells than float32's mantissa only count rounding noise.
_FINEST_BITS = 24
#: Below this width, ``1 / width`` leaves float32's range: such data is histogrammed in float64.
_FLOAT32_SAFE_WIDTH = 2.0**-100


def grid_width(lo: float, hi: float, bins: int) -> float | None:
    """The power-of-two bin width for data in ``[lo, hi]``; None while all data is exactly 0."""
    amax = max(abs(lo), abs(hi))
    if amax == 0.0:
        return None
    exponent = math.frexp(amax)[1] - _FINEST_BITS
    span = hi - lo
    if span > 0:
        # 2**(e-1) <= span / bins is a lower bound: narrower cells cannot hold the span.
        exponent = max(exponent, math.frexp(span / bins)[1] - 1)
    while True:
        width = math.ldexp(1.0, exponent)
        if math.floor(hi / width) - math.floor(lo / width) + 1 <= bins:
            return width
        exponent += 1


class GridHistogram:
    """Counts of values on a power-of-two grid; ``nonnegative`` histograms (of ``|x|``) keep their window at 0."""

    def __init__(self, bins: int = 2048, nonnegative: bool = False):
        if bins < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {bins}")
        self.bins = int(bins)
        self.nonnegative = nonnegative
        self.width: float | None = None
        self.offset = 0
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.lo = math.inf
        self.hi = -math.inf
        self._zeros = 0  # values seen while every value so far was exactly 0 (no grid yet)

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self._zeros

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (all zeros while there is no grid)."""
        width = self.width or 0.0
        return (self.offset + np.arange(self.bins + 1, dtype=np.float64)) * width

    @property
    def used(self) -> int:
        """Number of bins from the window's start up to the last non-empty one."""
        nonzero = np.flatnonzero(self.counts)
        return int(nonzero[-1]) + 1 if nonzero.size else 0

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Count finite ``values`` (any shape); ``lo``/``hi`` are their min/max when the caller already knows them.

        float32 values stay float32: scaling by a power of two is exact in float32 too, and every cell index fits
        its 24-bit mantissa (the width is never finer than 2**-24 of the largest magnitude), so the counts are those
        of float64 arithmetic at half the memory traffic.
        """
        values = np.asarray(values)
        if values.dtype != np.float32:
            values = values.astype(np.float64)
        values = values.reshape(-1)
        if values.size == 0:
            return
        lo = float(values.min()) if lo is None else float(lo)
        hi = float(values.max()) if hi is None else float(hi)
        if self.nonnegative and lo < 0:
            raise ValueError(f"a nonnegative histogram got a negative value {lo}")
        self._extend(min(self.lo, lo), max(self.hi, hi))
        if self.width is None:
            self._zeros += values.size
            return
        if values.dtype == np.float32 and self.width < _FLOAT32_SAFE_WIDTH:  # 1 / width would overflow float32
            values = values.astype(np.float64)
        scaled = values * values.dtype.type(1.0 / self.width)
        np.floor(scaled, out=scaled)
        scaled -= self.offset
        self.counts += np.bincount(scaled.astype(np.intp), minlength=self.bins)

    def merge(self, other: GridHistogram) -> None:
        """Add ``other``'s counts (same bin count and kind); exact, because both lie on power-of-two grids."""
        if other.bins != self.bins or other.nonnegative != self.nonnegative:
            raise ValueError("only histograms with the same bin count and kind can be merged")
        if other.total == 0:
            return
        self._extend(min(self.lo, other.lo), max(self.hi, other.hi))
        if self.width is None:
            self._zeros += other._zeros
            return
        self.counts += other._counts_on(self.width, self.offset)

    def _extend(self, lo: float, hi: float) -> None:
        """Widen the grid and slide the window so that ``[lo, hi]`` fits, re-binning the counts exactly."""
        width = grid_width(0.0 if self.nonnegative else lo, hi, self.bins)
        self.lo, self.hi = lo, hi
        if width is None:
            return
        offset = 0 if self.nonnegative else math.floor(lo / width)
        if width != self.width or offset != self.offset:
            self.counts = self._counts_on(width, offset)
            self._zeros = 0
            self.width, self.offset = width, offset

    def _counts_on(self, width: float, offset: int) -> np.ndarray:
        """This histogram's counts re-binned onto the coarser-or-equal grid ``(width, offset)``."""
        counts = np.zeros(self.bins, dtype=np.int64)
        if self._zeros:
            counts[-offset] += self._zeros
        if self.width is None:
            return counts
        shift = round(math.log2(width / self.width))
        if shift < 0:
            raise AssertionError("histogram grids only ever get coarser")
        cells = np.flatnonzero(self.counts)
        index = ((cells + self.offset) >> shift) - offset
        np.add.at(counts, index, self.counts[cells])
        return counts

    def cumulative(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares of the values below ``t`` (vectorized), values uniform within a bin."""
        t = np.asarray(t, dtype=np.float64)
        if self.width is None:
            below = (t > 0).astype(np.float64) * self._zeros
            return below, np.zeros_like(t), np.zeros_like(t)
        w = self.width
        counts = self.counts.astype(np.float64)
        left = self.edges[:-1]
        right = left + w
        zero_n = np.concatenate(([0.0], np.cumsum(counts)))
        zero_s1 = np.concatenate(([0.0], np.cumsum(counts * (left + right) / 2)))
        zero_s2 = np.concatenate(([0.0], np.cumsum(counts * (left * left + left * right + right * right) / 3)))
        grid = np.clip(t / w, self.offset - 1, self.offset + self.bins + 1)  # no int overflow for huge t
        cell = np.clip(np.floor(grid).astype(np.int64) - self.offset, 0, self.bins)
        inside = cell < self.bins
        safe = np.minimum(cell, self.bins - 1)
        start = left[safe]
        frac = np.where(inside, np.clip((t - start) / w, 0.0, 1.0), 0.0) * counts[safe]
        n = zero_n[cell] + frac
        s1 = zero_s1[cell] + frac * (start + t) / 2
        s2 = zero_s2[cell] + frac * (start * start + start * t + t * t) / 3
        return n, s1, s2

    def totals(self) -> tuple[float, float, float]:
        """Count, sum and sum of squares of all counted values (values uniform within a bin)."""
        if self.width is None:
            return float(self._zeros), 0.0, 0.0
        n, s1, s2 = self.cumulative(self.edges[-1])
        return float(n), float(s1), float(s2)

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the counts lies, interpolating linearly inside a bin."""
        total = self.total
        if total == 0 or self.width is None:
            return 0.0
        target = q * total
        cum = np.cumsum(self.counts)
        j = min(int(np.searchsorted(cum, target, side="left")), self.bins - 1)
        before = float(cum[j - 1]) if j > 0 else 0.0
        frac = (target - before) / self.counts[j] if self.counts[j] else 0.0
        return float((self.offset + j + min(max(frac, 0.0), 1.0)) * self.width)

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes)
