"""From a source's chunks of samples to validated batches of the size the model needs.

Each concrete source only yields :class:`Chunk` objects (one sample, a file's batch, a slice of an array) in a fixed
order; :class:`ChunkedSource` does what all sources share: key arrays by input name, check them against the model,
and cut or join chunks into batches. Only the samples of one batch (plus the chunk being cut) are held at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxopt.calib_data.base import Batch, DataSource
from onnxopt.calib_data.validate import (
    bind_inputs,
    conform,
    conform_feed,
    conform_labels,
    fixed_batch_size,
    format_shape,
    stacked_feeds,
)
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec


@dataclass
class Chunk:
    """Consecutive samples as a source read them.

    ``inputs`` is keyed by input name (a ``y`` key holds labels) or a sequence in graph input order; arrays may lack
    the batch axis (a single sample). ``origin`` names the file or item for error messages.
    """

    inputs: Mapping[str, Any] | Sequence[Any]
    labels: Any = None
    origin: str | None = None
    #: The arrays are the source's own (read from a file into fresh memory): a batch may be a view of them, where
    #: a user's arrays or a memory map are copied.
    owned: bool = False


class ChunkedSource(DataSource):
    """A :class:`DataSource` built from :meth:`_chunks`; validation and batching are shared.

    Batching rules: a model with a fixed batch dim gets batches of exactly that size and a short tail is dropped;
    otherwise batches have ``batch_size`` samples except the last. Samples whose shapes differ (dynamic dims, e.g.
    text lines of varying width) are never put in one batch: a shape change ends the batch early. Data one rank
    above every model input is a stack of whole feeds (a model without a batch axis): each is one batch of one
    sample, fed as it is.
    """

    #: Short origin used in error messages, e.g. ``npz 'calib.npz'``.
    where: str = "data"
    #: Appended to shape-mismatch messages (e.g. which preprocessing setting to change).
    shape_hint: str = ""

    _counted: int | None = None

    @abc.abstractmethod
    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        """Yield the samples in a fixed order; ``chunk_size`` is a hint for sources that slice big arrays."""

    def _estimate_samples(self) -> int | None:
        """Sample count known without reading the data (before the first full iteration)."""
        return None

    def num_samples(self) -> int | None:
        return self._counted if self._counted is not None else self._estimate_samples()

    @property
    def description(self) -> str:  # type: ignore[override]
        count = self.num_samples()
        samples = f"{count} sample{'s' if count != 1 else ''}" if count is not None else "sample count unknown"
        return f"{self.where} ({samples}, {'labelled' if self.has_labels() else 'unlabelled'}{self._extra()})"

    def _extra(self) -> str:
        return ""

    def iter_batches(self, specs: Sequence[InputSpec], batch_size: int = 1) -> Iterator[Batch]:
        if batch_size < 1:
            raise DataError(f"{self.where}: batch size must be at least 1, got {batch_size}")
        return self._batches(list(specs), int(batch_size))

    def _whole_feeds(self, feeds: dict[str, np.ndarray], labels: np.ndarray | None, by_name: dict[str, InputSpec],
                     where: str, seen: int) -> Iterator[Batch]:
        """Each of a chunk of stacked feeds as a batch of one sample, its arrays as the model takes them."""
        for i in range(_chunk_count(feeds, where)):
            inputs = {name: conform_feed(name, value[i], by_name[name], where, seen + i, self.shape_hint)
                      for name, value in feeds.items()}
            yield Batch(inputs, None if labels is None else labels[i:i + 1], samples=1)

    def _batches(self, specs: list[InputSpec], batch_size: int) -> Iterator[Batch]:
        fixed = fixed_batch_size(specs)
        size = fixed or batch_size
        by_name = {spec.name: spec for spec in specs}
        pending: list[tuple[dict[str, np.ndarray], np.ndarray | None]] = []
        pending_count = 0
        pending_owned = True
        labelled: bool | None = None
        seen = 0
        yielded = 0
        stacked: bool | None = None  # whether the data are stacks of whole feeds (one rank above the inputs)
        for chunk in self._chunks(specs, size):
            where = f"{self.where}, {chunk.origin}" if chunk.origin else self.where
            named, raw_labels = bind_inputs(chunk.inputs, specs, where, chunk.labels)
            feeds = stacked_feeds(named, by_name, where)
            if stacked is not None and (feeds is not None) != stacked:
                raise DataError(f"{where}: sample {seen} is {'' if feeds is not None else 'not '}a stack of feeds "
                                f"but earlier samples {'are not' if feeds is not None else 'are'}; give the data one "
                                "way")
            stacked = feeds is not None
            if feeds is not None:
                count = _chunk_count(feeds, where)
                labels = conform_labels(raw_labels, count, where, seen)
                labelled = _same_labelling(labelled, labels, where, seen) if count else labelled
                yield from self._whole_feeds(feeds, labels, by_name, where, seen)
                yielded += count
                seen += count
                continue
            arrays = {name: conform(name, value, by_name[name], where, seen, self.shape_hint)
                      for name, value in named.items()}
            count = _chunk_count(arrays, where)
            labels = conform_labels(raw_labels, count, where, seen)
            if count == 0:
                continue
            labelled = _same_labelling(labelled, labels, where, seen)
            if pending and _sample_shapes(arrays) != _sample_shapes(pending[0][0]):
                if fixed:
                    name = next(n for n in arrays if arrays[n].shape[1:] != pending[0][0][n].shape[1:])
                    raise DataError(
                        f"{where}: input '{name}': sample {seen} has shape {format_shape(arrays[name].shape[1:])}, "
                        f"earlier samples {format_shape(pending[0][0][name].shape[1:])}; a model with a fixed batch "
                        f"size of {fixed} needs samples of one shape per batch"
                    )
                yield _join(pending, pending_owned)
                yielded += 1
                pending, pending_count, pending_owned = [], 0, True
            start = 0
            while start < count:
                take = min(size - pending_count, count - start)
                pending.append(({n: a[start:start + take] for n, a in arrays.items()},
                                None if labels is None else labels[start:start + take]))
                pending_count += take
                pending_owned = pending_owned and chunk.owned
                start += take
                if pending_count == size:
                    yield _join(pending, pending_owned)
                    yielded += 1
                    pending, pending_count, pending_owned = [], 0, True
            seen += count
        self._counted = seen
        if seen == 0:
            raise DataError(f"{self.where} is empty: it holds no samples")
        if pending and not fixed:
            yield _join(pending, pending_owned)
        elif fixed and yielded == 0 and not stacked:
            raise DataError(f"{self.where} holds {seen} sample{'s' if seen != 1 else ''}, fewer than the model's "
                            f"fixed batch size of {fixed}")


def _same_labelling(labelled: bool | None, labels: np.ndarray | None, where: str, seen: int) -> bool:
    """Whether this chunk is labelled, refusing a change from what the chunks before were."""
    if labelled is not None and labelled != (labels is not None):
        state = "has labels" if labels is not None else "has no labels"
        raise DataError(f"{where}: sample {seen} {state} but earlier samples "
                        f"{'do not' if labels is not None else 'do'}; label all samples or none")
    return labels is not None


def _chunk_count(arrays: dict[str, np.ndarray], where: str) -> int:
    counts = {name: int(array.shape[0]) for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{n}' has {c}" for n, c in counts.items())
        raise DataError(f"{where}: inputs hold different numbers of samples ({listed})")
    return next(iter(counts.values()), 0)


def _sample_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape[1:]) for name, array in arrays.items()}


def _join(pieces: list[tuple[dict[str, np.ndarray], np.ndarray | None]], owned: bool = False) -> Batch:
    """One batch of plain C-contiguous arrays: memory-mapped slices and views of a user's arrays are copied into
    memory here; a piece of the source's own block (``owned``) is used as it is when it is contiguous."""
    names = list(pieces[0][0])
    if len(pieces) == 1:
        inputs = {n: np.ascontiguousarray(pieces[0][0][n]) if owned else np.array(pieces[0][0][n], order="C",
                                                                                 copy=True) for n in names}
    else:
        inputs = {n: np.concatenate([p[0][n] for p in pieces], axis=0) for n in names}
    labels = None
    if pieces[0][1] is not None:
        labels = np.concatenate([p[1] for p in pieces]).astype(np.int64, copy=False)  # type: ignore[misc]
    return Batch(inputs, labels)


__all__ = ["Chunk", "ChunkedSource"]
