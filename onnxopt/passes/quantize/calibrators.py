"""Calibration of many tensors over many batches, in memory bounded by (number of tensors) x (bins).

A future quantization pass runs the model on calibration batches, hands every tensor it wants to quantize to
:meth:`Calibrator.update`, and finally asks :meth:`Calibrator.compute` for clipping ranges (or
:meth:`Calibrator.quant_params` for scales and zero points) by one of the range methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from onnxopt.errors import DataError, RecipeError
from onnxopt.passes.quantize.qparams import QuantParams, TensorRange, quant_params
from onnxopt.passes.quantize.range_methods import compute_range
from onnxopt.passes.quantize.stats import InfiniteValuesError, NotFiniteError, TensorStats

DEFAULT_BINS = 2048
_MIN_BINS = 16


class Calibrator:
    """Streaming per-tensor statistics (min/max and histograms of ``x`` and ``|x|``), and ranges from them.

    ``histograms=False`` keeps only min/max (constant memory per tensor), enough for ``minmax``. Results do not
    depend on how the data was split into batches, nor on the batch order.
    """

    def __init__(self, bins: int = DEFAULT_BINS, *, histograms: bool = True):
        if not isinstance(bins, (int, np.integer)) or bins < _MIN_BINS:
            raise RecipeError(f"calibration needs an integer bin count >= {_MIN_BINS}, got {bins!r}")
        self.bins = int(bins)
        self.histograms = histograms
        self._stats: dict[str, TensorStats] = {}
        #: Activations that held +-inf (name -> infinite values in the first batch that had them): no range.
        self.infinite: dict[str, int] = {}

    def update(self, name: str, array: np.ndarray) -> None:
        """Fold one batch of tensor ``name`` into its statistics (DataError on NaN/Inf)."""
        stats = self._stats.get(name)
        if stats is None:
            stats = TensorStats(self.bins, self.histograms, name)
            stats.update(array)  # registered only once a batch was accepted
            self._stats[name] = stats
        else:
            stats.update(array)

    def update_many(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Fold one batch of several tensors, e.g. all outputs of one inference."""
        for name, array in arrays.items():
            self.update(name, array)

    def update_activations(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Like :meth:`update_many` for a model's intermediate activations: one that holds +-inf (an attention mask's
        -inf, log(0)) has no int8 range; it is listed in :attr:`infinite` and left out from then on (NaN still
        raises: the model computes NaN on the calibration data)."""
        for name, array in arrays.items():
            if name in self.infinite:
                continue
            try:
                self.update(name, array)
            except InfiniteValuesError as exc:
                self.infinite[name] = exc.count
                self._stats.pop(name, None)
            except NotFiniteError as exc:
                raise DataError(f"the model computes NaN on the calibration data: {exc} (a log or sqrt of a "
                                "negative value? check the data's range and preprocessing)") from None

    def merge(self, other: Calibrator) -> None:
        """Add the statistics of another calibrator with the same settings (exact)."""
        if (other.bins, other.histograms) != (self.bins, self.histograms):
            raise RecipeError("only calibrators with the same bin count and histogram setting can be merged")
        for name, count in other.infinite.items():
            self.infinite.setdefault(name, count)
            self._stats.pop(name, None)
        for name, stats in other._stats.items():
            if name in self.infinite:
                continue
            mine = self._stats.setdefault(name, TensorStats(self.bins, self.histograms, name))
            mine.merge(stats)

    @property
    def names(self) -> list[str]:
        return list(self._stats)

    def __contains__(self, name: object) -> bool:
        return name in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    def stats(self, name: str) -> TensorStats:
        try:
            return self._stats[name]
        except KeyError:
            raise DataError(f"tensor '{name}' was never seen during calibration") from None

    @property
    def nbytes(self) -> int:
        """Memory held by the histograms: 2 x bins x 8 bytes per tensor."""
        return sum(stats.nbytes for stats in self._stats.values())

    def compute(
        self,
        method: str = "minmax",
        *,
        symmetric: bool = False,
        reduce_range: bool = False,
        names: Iterable[str] | None = None,
        **opts: object,
    ) -> dict[str, TensorRange]:
        """Clipping range of every tensor (or of ``names``) by ``method``: minmax, percentile, entropy, mse, sqnr.

        ``symmetric``/``reduce_range`` describe the target grid (they set the number of levels the entropy and
        mse searches assume); ``opts`` are method options (``percentile``; ``num_quantized_bins``, ``stride``).
        """
        selected = self.names if names is None else list(names)
        return {
            name: compute_range(self.stats(name), method, symmetric=symmetric, reduce_range=reduce_range, **opts)
            for name in selected
        }

    def quant_params(
        self,
        method: str = "minmax",
        *,
        dtype: str | np.dtype = "uint8",
        symmetric: bool = False,
        reduce_range: bool = False,
        names: Iterable[str] | None = None,
        **opts: object,
    ) -> dict[str, QuantParams]:
        """Scale and zero point of every tensor, from :meth:`compute`'s ranges (uint8 asymmetric by default)."""
        ranges = self.compute(method, symmetric=symmetric, reduce_range=reduce_range, names=names, **opts)
        return {name: quant_params(rng, dtype, symmetric, reduce_range) for name, rng in ranges.items()}
