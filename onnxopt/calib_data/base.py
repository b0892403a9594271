"""The data-source contract shared by calibration, evaluation, fidelity checks and training."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.modelio import InputSpec


@dataclass
class Batch:
    """One batch: arrays keyed by graph input name (leading batch dim), optional integer labels ``[N]``.

    ``samples`` is set (to 1) for a whole feed of a stack of feeds (data one rank above the model's inputs, for a
    model without a batch axis: :func:`onnxopt.calib_data.validate.stacked_feeds`): its arrays are fed as they are,
    and their leading dims count no samples."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    samples: int | None = None

    @property
    def size(self) -> int:
        if self.samples is not None:
            return self.samples
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def is_feed(self) -> bool:
        """True for one whole feed of stacked feeds (no batch axis to cut or join along)."""
        return self.samples is not None


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

    def iter_samples(self, specs: Sequence[InputSpec], samples: int, batch_size: int = 1) -> Iterator[Batch]:
        """:meth:`iter_batches` up to ``samples`` samples in all, the last batch cut to fit; but a model that fixes
        its batch size gets whole batches (ORT refuses any other size), so those may pass ``samples``."""
        fixed = fixed_batch(specs) is not None
        seen = 0
        for batch in self.iter_batches(specs, batch_size=batch_size):
            if not fixed and batch.size > samples - seen:
                take = samples - seen
                batch = Batch({name: array[:take] for name, array in batch.inputs.items()},
                              None if batch.labels is None else batch.labels[:take])
            yield batch
            seen += batch.size
            if seen >= samples:
                return

    def sample_shapes(self, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
        """Shapes of one batch of size 1, used to fix dynamic input dims from the data."""
        batch = next(iter(self.iter_batches(specs, batch_size=1)))
        return {name: tuple(int(d) for d in array.shape) for name, array in batch.inputs.items()}


def static_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size (leading dim) that every input of the model fixes, 1 included, else None."""
    sizes = {spec.shape[0] for spec in specs if spec.shape}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    return size if isinstance(size, int) and size > 0 else None


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size every input of the model fixes above 1 (onnx's torch test models: 20), else None."""
    size = static_batch(specs)
    return size if size is not None and size > 1 else None
