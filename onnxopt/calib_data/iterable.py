"""Python iterables and ONNX Runtime ``CalibrationDataReader``-style objects as data sources.

Items may be:

- a dict keyed by input name (a ``y`` entry holds the label(s) unless an input is named ``y``),
- an array (or torch tensor) for a single-input model,
- a 2-tuple/list ``(inputs, label)`` where ``inputs`` is a dict, an array, or a list of arrays in graph input order
  and ``label`` an int, an integer array, or None (a torch ``DataLoader`` yielding ``[x, y]`` fits this).

Each item is one sample (arrays one rank short of the model input) or a batch. The pipeline reads its data several
times, so:

- a re-iterable object (list, tuple, ``DataLoader``, anything whose ``iter()`` starts over) is iterated again each
  time; it must yield the same items in the same order (no shuffling) for comparisons to be meaningful;
- a zero-argument callable is called for a fresh iterable each time;
- a one-shot iterator (generator, ``map``, ...) and a reader with ``get_next()`` are consumed once, when the source
  is created, into a temporary uncompressed ``.npz`` that is replayed (memory-mapped) on every iteration and deleted
  with the source. They must be finite.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.calib_data.npzio import NpzArchive, NpzWriter
from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.calib_data.validate import LABEL_KEY, to_numpy
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.modelio import InputSpec


def split_item(item: Any, index: int, where: str) -> Chunk:
    """One item of an iterable as a :class:`Chunk` (see the module docstring for the accepted forms)."""
    origin = f"item {index}"
    try:
        if isinstance(item, Mapping):
            return Chunk({str(k): to_numpy(v) for k, v in item.items()}, None, origin)
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise DataError(f"{where}: {origin} is a {type(item).__name__} of {len(item)} elements; an item is a "
                                f"dict, an array, or an (inputs, label) pair")
            inputs, label = item
            raw: dict[str, np.ndarray] | list[np.ndarray]
            if isinstance(inputs, Mapping):
                raw = {str(k): to_numpy(v) for k, v in inputs.items()}
            elif isinstance(inputs, (tuple, list)):
                raw = [to_numpy(v) for v in inputs]
            else:
                raw = [to_numpy(inputs)]
            return Chunk(raw, None if label is None else to_numpy(label), origin)
        return Chunk([to_numpy(item)], None, origin)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {origin} cannot be turned into arrays ({exc})") from None


class _Spool:
    """Chunks of a one-shot stream kept in a temporary ``.npz`` (deleted with this object), replayed in order."""

    def __init__(self, chunks: Iterator[Chunk], where: str):
        folder = tempfile.mkdtemp(prefix="onnxopt-data-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
        self.path = Path(folder) / "items.npz"
        #: Per item: input names (or the number of positional arrays), and whether it has labels.
        self.index: list[tuple[list[str] | int, bool]] = []
        self.leading: list[int] = []
        with NpzWriter(self.path) as writer:
            for position, chunk in enumerate(chunks):
                names = list(chunk.inputs) if isinstance(chunk.inputs, Mapping) else len(chunk.inputs)
                arrays = list(chunk.inputs.values()) if isinstance(chunk.inputs, Mapping) else list(chunk.inputs)
                try:
                    for slot, array in enumerate(arrays):
                        writer.add(f"{position}.{slot}", array)
                    if chunk.labels is not None:
                        writer.add(f"{position}.label", to_numpy(chunk.labels))
                except ValueError as exc:
                    raise DataError(f"{where}: {chunk.origin} cannot be buffered ({exc})") from None
                self.index.append((names, chunk.labels is not None))
                self.leading.append(int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1)

    def __iter__(self) -> Iterator[Chunk]:
        archive = NpzArchive(self.path)
        for position, (names, labelled) in enumerate(self.index):
            count = names if isinstance(names, int) else len(names)
            arrays = [archive.array(f"{position}.{slot}") for slot in range(count)]
            inputs = arrays if isinstance(names, int) else dict(zip(names, arrays))
            labels = archive.array(f"{position}.label") if labelled else None
            yield Chunk(inputs, labels, f"item {position}")

    def close(self) -> None:
        self._cleanup()


class IterableSource(ChunkedSource):
    """Samples from a Python iterable, a callable returning one, or a one-shot iterator (buffered on disk)."""

    def __init__(self, data: Iterable[Any] | Callable[[], Iterable[Any]], *, where: str | None = None):
        self._factory: Callable[[], Iterable[Any]] | None = None
        self._iterable: Iterable[Any] | None = None
        self._spool: _Spool | None = None
        self._labelled: bool | None = None
        if isinstance(data, Iterator):
            self.where = where or f"Python iterator ({type(data).__name__}, buffered on disk)"
            self._spool = _Spool(self._split(data), self.where)
            self._labelled = any(labelled for _, labelled in self._spool.index) or any(
                isinstance(names, list) and LABEL_KEY in names for names, _ in self._spool.index)
        elif isinstance(data, Iterable):
            self._iterable = data
            size = f", {len(data)} items" if isinstance(data, Sized) else ""
            self.where = where or f"Python {type(data).__name__}{size}"
        elif callable(data):
            self._factory = data
            self.where = where or f"items of {getattr(data, '__name__', type(data).__name__)}()"
        else:
            raise DataError(f"cannot read data from a {type(data).__name__}: expected an iterable, a callable "
                            f"returning one, or a reader with get_next()")

    def _split(self, items: Iterable[Any]) -> Iterator[Chunk]:
        iterator = iter(items)
        position = 0
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except OnnxoptError:
                raise
            except Exception as exc:  # the user's iterable failed: say so instead of a bare traceback
                raise DataError(f"{self.where}: reading item {position} failed: {type(exc).__name__}: {exc}") from exc
            yield split_item(item, position, self.where)
            position += 1

    def _items(self) -> Iterator[Chunk]:
        if self._spool is not None:
            return iter(self._spool)
        if self._factory is not None:
            try:
                produced = self._factory()
            except Exception as exc:
                raise DataError(f"{self.where}: the data callable failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(produced, Iterable):
                raise DataError(f"{self.where}: the data callable returned a {type(produced).__name__}, "
                                f"not an iterable")
            return self._split(produced)
        assert self._iterable is not None
        return self._split(self._iterable)

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        return self._items()

    def has_labels(self) -> bool:
        if self._labelled is None:
            first = next(iter(self._items()), None)
            self._labelled = first is not None and (
                first.labels is not None or (isinstance(first.inputs, Mapping) and LABEL_KEY in first.inputs))
        return self._labelled

    def close(self) -> None:
        """Delete the on-disk buffer now (it is also deleted when the source is garbage collected)."""
        if self._spool is not None:
            self._spool.close()


class ReaderSource(IterableSource):
    """An ONNX Runtime ``CalibrationDataReader``-like object: ``get_next()`` returns a feed dict or None.

    Such readers can be consumed only once, so all feeds are read when the source is created and buffered on disk.
    Feeds are full model feeds (with the batch axis), which gives the sample count up front.
    """

    def __init__(self, reader: Any):
        if not callable(getattr(reader, "get_next", None)):
            raise DataError(f"{type(reader).__name__} has no get_next() method")
        super().__init__(_feeds(reader), where=f"data reader {type(reader).__name__} (buffered on disk)")

    def _estimate_samples(self) -> int | None:
        return sum(self._spool.leading) if self._spool is not None else None


def _feeds(reader: Any) -> Iterator[Any]:
    while True:
        feed = reader.get_next()
        if feed is None:
            return
        yield feed


__all__ = ["IterableSource", "ReaderSource", "split_item"]
