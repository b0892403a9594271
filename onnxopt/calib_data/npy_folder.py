"""A folder of ``.npy`` files, read one file at a time (memory-mapped).

Layout::

    calib/                      single-input model
        0001.npy  0002.npy ...  one sample ([3,224,224]) or a batch ([16,3,224,224]) per file
        y.npy                   optional: integer labels, one per sample, in file order

    calib/                      multi-input model: one subfolder per graph input, named like the input
        input_ids/0001.npy ...
        attention_mask/0001.npy ...
        y.npy                   optional labels

Files are taken in natural order of their names (``2.npy`` before ``10.npy``); in the multi-input layout the k-th
file of every subfolder belongs to the same sample(s), so every subfolder must hold the same number of files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.calib_data.validate import LABEL_KEY
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec

LABEL_FILE = f"{LABEL_KEY}.npy"


def natural_key(path: Path) -> list[object]:
    """Sort key that orders embedded numbers by value: ``img2`` before ``img10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def npy_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() == ".npy" and p.is_file()
                   and not p.name.startswith(".") and p.name != LABEL_FILE), key=natural_key)


class NpyFolderSource(ChunkedSource):
    """Samples from a folder of ``.npy`` files; see the module docstring for the layout."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.where = f"npy folder '{self.folder}'"
        if not self.folder.is_dir():
            raise DataError(f"data folder '{self.folder}' does not exist")
        top = npy_files(self.folder)
        subfolders = sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_input = {p.name: npy_files(p) for p in subfolders}
        per_input = {name: files for name, files in per_input.items() if files}
        if top and per_input:
            raise DataError(f"{self.where} has .npy files both at the top and in subfolders "
                            f"({', '.join(per_input)}); use one layout: files at the top for a single-input model, "
                            f"one subfolder per input name for several inputs")
        if not top and not per_input:
            raise DataError(f"{self.where} holds no .npy files")
        if per_input:
            counts = {name: len(files) for name, files in per_input.items()}
            if len(set(counts.values())) > 1:
                listed = ", ".join(f"'{n}' has {c}" for n, c in counts.items())
                raise DataError(f"{self.where}: input subfolders hold different numbers of files ({listed})")
        self._top = top
        self._per_input = per_input
        self._labels = self._read_labels()

    @property
    def num_files(self) -> int:
        return len(self._top) if self._top else len(next(iter(self._per_input.values())))

    def _read_labels(self) -> np.ndarray | None:
        path = self.folder / LABEL_FILE
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.where}: cannot read labels '{path.name}' ({exc})") from None

    def has_labels(self) -> bool:
        return self._labels is not None

    def _estimate_samples(self) -> int | None:
        # A file may hold one sample or a batch, which only the model's rank tells apart: exact after one pass.
        return int(self._labels.shape[0]) if self._labels is not None and self._labels.ndim == 1 else None

    def _extra(self) -> str:
        return f", {self.num_files} file{'s' if self.num_files != 1 else ''}"

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        by_name = {spec.name: spec for spec in specs}
        offset = 0
        for index in range(self.num_files):
            if self._top:
                path = self._top[index]
                inputs: dict[str, np.ndarray] | list[np.ndarray] = [self._load(path)]
                origin = f"file '{path.name}'"
            else:
                paths = {name: files[index] for name, files in self._per_input.items()}
                inputs = {name: self._load(path) for name, path in paths.items()}
                origin = "files " + ", ".join(f"'{p.parent.name}/{p.name}'" for p in paths.values())
            count = _count(inputs, by_name)
            labels = None
            if self._labels is not None:
                labels = self._labels[offset:offset + count]
                if len(labels) != count:
                    raise DataError(f"{self.where}: '{LABEL_FILE}' holds {len(self._labels)} labels, fewer than "
                                    f"the samples in the folder")
            offset += count
            yield Chunk(inputs, labels, origin)
        if self._labels is not None and offset != len(self._labels):
            raise DataError(f"{self.where}: '{LABEL_FILE}' holds {len(self._labels)} labels but the folder holds "
                            f"{offset} samples")

    def _load(self, path: Path) -> np.ndarray:
        try:
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # arrays that cannot be mapped (empty, scalars): read them
                return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.where}: cannot read '{path.name}' ({exc})") from None


def _count(inputs: dict[str, np.ndarray] | list[np.ndarray], by_name: dict[str, InputSpec]) -> int:
    """Samples in one file: 1 when the array is one rank short of the model input, else its leading dim."""
    if isinstance(inputs, list):
        spec = next(iter(by_name.values())) if len(by_name) == 1 else None
        array = inputs[0]
    else:
        name, array = next(iter(inputs.items()))
        spec = by_name.get(name)
    if spec is None or array.ndim == 0:
        return 1
    if spec.shape and array.ndim == len(spec.shape) - 1:
        return 1
    return int(array.shape[0])


__all__ = ["NpyFolderSource", "natural_key", "npy_files"]
