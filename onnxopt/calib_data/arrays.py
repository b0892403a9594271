"""Arrays with a leading sample axis: in memory, in a ``.npz`` archive, or in one ``.npy`` file."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.calib_data.npzio import NpyFile, NpzArchive
from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.calib_data.validate import LABEL_KEY, add_batch_axis, bind_inputs, check_shape, stacked_feeds, to_numpy
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec


class ArraySource(ChunkedSource):
    """Samples from arrays held in memory.

    ``arrays`` is one array (for a single-input model), a sequence of arrays in graph input order, or a dict keyed by
    input name whose ``y`` entry (when no input is named ``y``) holds integer labels; ``labels`` gives them
    explicitly. Arrays carry a leading sample axis; an array one rank short of the model input is one sample; arrays
    one rank above the model inputs are stacks of whole feeds (a model without a batch axis), one sample each.
    """

    def __init__(self, arrays: Any, labels: Any = None, *, where: str = "in-memory arrays"):
        self.where = where
        if isinstance(arrays, Mapping):
            self._arrays: dict[str, np.ndarray] | list[np.ndarray] = {k: to_numpy(v) for k, v in arrays.items()}
        elif isinstance(arrays, (list, tuple)):
            self._arrays = [to_numpy(a) for a in arrays]
        else:
            self._arrays = [to_numpy(arrays)]
        self._labels = None if labels is None else to_numpy(labels)
        if not self._input_arrays():
            raise DataError(f"{where} holds no input arrays")

    # Subclasses backed by files override these two.
    def _load(self) -> tuple[dict[str, np.ndarray] | list[np.ndarray], np.ndarray | None]:
        return self._arrays, self._labels

    def _input_arrays(self) -> list[np.ndarray]:
        arrays, _ = self._load()
        if isinstance(arrays, dict):
            return [a for k, a in arrays.items() if k != LABEL_KEY]
        return list(arrays)

    def has_labels(self) -> bool:
        arrays, labels = self._load()
        return labels is not None or (isinstance(arrays, dict) and LABEL_KEY in arrays)

    def _estimate_samples(self) -> int | None:
        _, labels = self._load()
        if labels is not None and labels.ndim == 1:
            return int(labels.shape[0])
        arrays = self._input_arrays()
        counts = {int(a.shape[0]) if a.ndim else 1 for a in arrays}
        return counts.pop() if len(counts) == 1 else None

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        arrays, labels = self._load()
        return self._slices(arrays, labels, specs, chunk_size)

    def _slices(self, arrays: Mapping[str, Any] | Sequence[Any], labels: Any, specs: Sequence[InputSpec],
                chunk_size: int) -> Iterator[Chunk]:
        """Bind names and add the batch axis on the whole arrays (views), then cut them into chunks."""
        named, labels = bind_inputs(arrays, specs, self.where, labels)
        by_name = {spec.name: spec for spec in specs}
        feeds = stacked_feeds(named, by_name, self.where)
        if feeds is not None:  # whole feeds on a new first axis: each checked as it is cut
            batched = feeds
        else:
            batched = {name: add_batch_axis(to_numpy(value), by_name[name]) for name, value in named.items()}
            for name, array in batched.items():  # check the whole array, so messages show its real shape
                check_shape(name, array.shape, by_name[name], self.where, self.shape_hint)
        if any(a.ndim == 0 for a in batched.values()):
            yield Chunk(batched, labels)  # a scalar where the model wants more: the shape check explains
            return
        counts = {name: int(a.shape[0]) if a.ndim else 1 for name, a in batched.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"'{n}' has {c}" for n, c in counts.items())
            raise DataError(f"{self.where}: inputs hold different numbers of samples ({listed})")
        total = next(iter(counts.values()))
        if labels is not None:
            labels = to_numpy(labels)
            if labels.ndim == 1 and labels.shape[0] != total:
                raise DataError(f"{self.where}: {labels.shape[0]} labels for {total} samples; give one label per "
                                f"sample")
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            chunk_labels = None if labels is None else (labels[start:stop] if labels.ndim == 1 else labels)
            yield Chunk({n: a[start:stop] for n, a in batched.items()}, chunk_labels)


class NpzSource(ArraySource):
    """A ``.npz`` file: arrays keyed by input name, or one array for a single-input model; optional labels ``y``.

    Members are read a block of samples at a time, stored (``np.savez``) or compressed (``np.savez_compressed``), so
    a pass over a file of any size holds one block and one batch; the sample count comes from the headers.
    Fortran-order members, and data that is not along a sample axis, are memory-mapped (stored) or read whole
    (compressed). When the model has an input named ``y``, the ``y`` array feeds it and there are no labels
    (``has_labels()`` cannot know the model and says True).
    """

    #: Bytes of samples read at once from the largest member (at least one batch).
    block_bytes = 4 << 20

    #: The file kind, as messages name it.
    kind = "npz"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.where = f"{self.kind} '{self.path}'"
        if not self.path.is_file():
            raise DataError(f"data file '{self.path}' does not exist")
        self._archive = self._open()
        keys = self._archive.keys()
        self._input_keys = [k for k in keys if k != LABEL_KEY]
        if not self._input_keys:
            raise DataError(f"{self.where} holds no input arrays" + (" (only labels 'y')" if keys else ""))
        self._labels_cache: np.ndarray | None = None

    def _open(self) -> NpzArchive | NpyFile:
        return NpzArchive(self.path)

    def _load(self) -> tuple[dict[str, np.ndarray] | list[np.ndarray], np.ndarray | None]:
        arrays = {k: self._archive.array(k) for k in self._input_keys}
        labels = self._labels()
        if len(arrays) == 1:
            return list(arrays.values()), labels  # one array feeds a single-input model whatever its name
        return arrays, labels

    def _estimate_samples(self) -> int | None:
        if LABEL_KEY in self._archive:
            labels = self._archive.header(LABEL_KEY).shape
            if len(labels) == 1:
                return labels[0]
        counts = {shape[0] if shape else 1 for shape in (self._archive.header(k).shape for k in self._input_keys)}
        return counts.pop() if len(counts) == 1 else None

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        plan = self._stream_plan(specs)
        if plan is not None:
            return self._streamed_chunks(plan, specs, chunk_size)
        arrays, labels = self._load()
        if labels is not None and any(spec.name == LABEL_KEY for spec in specs):
            arrays = {**(arrays if isinstance(arrays, dict) else dict(zip(self._input_keys, arrays))),
                      LABEL_KEY: labels}  # the model has an input named 'y': it is data, not labels
            labels = None
        if isinstance(arrays, list) and len(specs) > 1:
            arrays = dict(zip(self._input_keys, arrays))  # let the name check list both sides
        return self._slices(arrays, labels, specs, chunk_size)

    def _stream_plan(self, specs: Sequence[InputSpec]) -> dict[str, InputSpec] | None:
        """Each member's input where the members can be read a block of samples at a time, else None.

        That needs samples along the first axis of every array (none is one sample, one rank short of its input),
        one count for all, and 1-D labels (or none). Anything else is read whole, where the checks that explain bad
        data see it as the user gave it."""
        if any(spec.name == LABEL_KEY for spec in specs):
            return None
        if not all(self._archive.can_stream(k) for k in self._input_keys):
            return None
        by_key = (dict(zip(self._input_keys, specs)) if len(self._input_keys) == 1 == len(specs)
                  else {spec.name: spec for spec in specs})
        if set(by_key) != set(self._input_keys):
            return None  # names that do not match: the whole-array path says which
        shapes = {k: self._archive.header(k).shape for k in self._input_keys}
        if any(not shape or (by_key[k].shape and len(shape) < len(by_key[k].shape)) for k, shape in shapes.items()):
            return None
        counts = {shape[0] for shape in shapes.values()}
        if LABEL_KEY in self._archive:
            labels = self._archive.header(LABEL_KEY).shape
            if len(labels) != 1:
                return None
            counts.add(labels[0])
        return by_key if len(counts) == 1 else None

    def _streamed_chunks(self, by_key: dict[str, InputSpec], specs: Sequence[InputSpec],
                         chunk_size: int) -> Iterator[Chunk]:
        headers = {k: self._archive.header(k) for k in self._input_keys}
        for key, header in headers.items():  # the whole array's shape in the message, not a block's
            if len(header.shape) == len(by_key[key].shape):
                check_shape(by_key[key].name, header.shape, by_key[key], self.where, self.shape_hint)
        total = next(iter(headers.values())).shape[0]
        row_bytes = max(h.dtype.itemsize * int(np.prod(h.shape[1:], dtype=np.int64)) for h in headers.values())
        # A whole number of batches per block: each batch is then a view of one block, never joined from two.
        rows = max(1, self.block_bytes // max(row_bytes, 1) // chunk_size) * chunk_size
        readers = {k: self._archive.row_blocks(k, rows) for k in self._input_keys}
        labels = self._labels()
        try:
            for start in range(0, total, rows):
                stop = min(start + rows, total)
                block = {k: next(readers[k]) for k in self._input_keys}
                arrays = list(block.values()) if len(block) == 1 else block  # one array: whatever its name
                for chunk in self._slices(arrays, None if labels is None else labels[start:stop], specs,
                                          chunk_size):
                    chunk.owned = True  # read into fresh memory: a batch may be a view of it, not a copy
                    yield chunk
        finally:
            for reader in readers.values():
                reader.close()

    def _labels(self) -> np.ndarray | None:
        if LABEL_KEY not in self._archive:
            return None
        if self._labels_cache is None:
            self._labels_cache = np.asarray(self._archive.array(LABEL_KEY))
        return self._labels_cache

    def has_labels(self) -> bool:
        return LABEL_KEY in self._archive


class NpyFileSource(NpzSource):
    """One ``.npy`` file: the samples of a single-input model, read a block of samples at a time like an ``.npz``
    member (memory-mapped where they are not along a sample axis); no labels."""

    kind = "npy"

    def _open(self) -> NpzArchive | NpyFile:
        return NpyFile(self.path)


__all__ = ["ArraySource", "NpyFileSource", "NpzSource"]
