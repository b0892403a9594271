"""The data-source contract shared by calibration, evaluation, fidelity checks and training."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.modelio import InputSpec


@dataclass
class Batch:
    """One batch: arrays keyed by graph input name (leading batch dim), optional integer labels ``[N]``."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


class DataSource(abc.ABC):
    """A re-iterable, deterministic stream of samples.

    Sources never hold more than one batch in memory unless the user handed them in-memory arrays. Iterating twice
    yields the same samples in the same order (random data is seeded), so a model and its optimized version can be
    compared sample by sample.
    """

    #: Human-readable origin for reports, e.g. "npz 'calib.npz' (500 samples, labelled)".
    description: str = "data"
    #: True for generated data: good for structural checks only; reports flag it.
    synthetic: bool = False

    @abc.abstractmethod
    def num_samples(self) -> int | None:
        """Number of samples, or None when unknown (an iterable that can only be counted by consuming it)."""

    @abc.abstractmethod
    def has_labels(self) -> bool:
        """Whether batches carry integer labels."""

    @abc.abstractmethod
    def iter_batches(self, specs: Sequence[InputSpec], batch_size: int = 1) -> Iterator[Batch]:
        """Yield validated batches for a model whose inputs are ``specs``.

        Raises :class:`onnxopt.errors.DataError` naming the input and both shapes on a shape/dtype mismatch, on
        NaN/Inf, and when the source is empty. A model whose batch dimension is fixed gets batches of that size.
        """

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Shapes of one batch of size 1, used to fix dynamic input dims from the data."""
        batch = next(iter(self.iter_batches(specs, batch_size=1)))
        return {name: tuple(int(d) for d in array.shape) for name, array in batch.inputs.items()}
