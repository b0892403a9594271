"""``open_data``: one entry point from whatever the user gave (``--calib``/``--eval`` or a Python object)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.calib_data.arrays import ArraySource, NpyFileSource, NpzSource
from onnxopt.calib_data.base import DataSource
from onnxopt.calib_data.images import IMAGE_SUFFIXES, ImageFolderSource
from onnxopt.calib_data.iterable import IterableSource, ReaderSource
from onnxopt.calib_data.npy_folder import NpyFolderSource
from onnxopt.calib_data.synthetic import DEFAULT_SAMPLES, RandomSource
from onnxopt.errors import DataError

_RANDOM = re.compile(r"^random(?::(\d+))?$", re.IGNORECASE)
_EXPECTED = ("a .npz or .npy file, a folder of .npy files or images, 'random' or 'random:N', numpy arrays, a dict of "
             "arrays, an iterable of samples, or a reader with get_next()")


def open_data(
    spec: Any,
    *,
    preprocess: Any = None,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> DataSource:
    """A :class:`DataSource` for ``spec``.

    ``spec`` is a DataSource (returned as is); a path to a ``.npz``/``.npy`` file, a folder of ``.npy`` files or a
    folder of images; ``"random"``/``"random:N"`` (``seed`` and ``input_shapes`` shape the random data); a numpy
    array (or tensor) or a dict of arrays; a reader with ``get_next()``; an iterable of samples or a zero-argument
    callable returning one. ``preprocess`` (an :class:`ImagePreprocess`, a mapping or a YAML/JSON path) applies to
    image folders only; without it a ``preprocess.yaml|json`` inside the folder is used.
    """
    if isinstance(spec, DataSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        match = _RANDOM.match(text.strip()) if isinstance(text, str) else None
        if match and not Path(text).exists():
            count = int(match.group(1)) if match.group(1) else DEFAULT_SAMPLES
            return RandomSource(count, seed=seed, input_shapes=input_shapes)
        return _open_path(Path(text), preprocess)
    if isinstance(spec, np.ndarray) or (hasattr(spec, "__array__") and not isinstance(spec, Mapping)):
        return ArraySource(spec)
    if isinstance(spec, Mapping):
        return ArraySource(spec)
    if callable(getattr(spec, "get_next", None)):
        return ReaderSource(spec)
    if (isinstance(spec, Iterable) and not isinstance(spec, (bytes, bytearray))) or callable(spec):
        return IterableSource(spec)
    raise DataError(f"cannot use {_short_repr(spec)} ({type(spec).__name__}) as data; expected {_EXPECTED}")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_path(path: Path, preprocess: Any) -> DataSource:
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist (expected {_EXPECTED})")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return NpzSource(path)
        if suffix == ".npy":
            return NpyFileSource(path)
        raise DataError(f"data file '{path}' is not a .npz or .npy file; give {_EXPECTED}")
    has_npy = _any_with_suffix(path, {".npy"})
    has_images = _any_with_suffix(path, IMAGE_SUFFIXES)
    if has_npy and has_images:
        raise DataError(f"data folder '{path}' holds both .npy files and images; keep one kind per folder")
    if has_npy:
        return NpyFolderSource(path)
    if has_images:
        return ImageFolderSource(path, preprocess)
    state = "is empty" if not any(path.iterdir()) else "holds no .npy files or images"
    raise DataError(f"data folder '{path}' {state} (expected .npy files or images: "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))})")


def _any_with_suffix(folder: Path, suffixes: set[str] | frozenset[str]) -> bool:
    """Files with these suffixes at the top of ``folder`` or anywhere in its non-hidden subfolders."""
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in suffixes:
            return True
        if entry.is_dir() and any(p.suffix.lower() in suffixes and p.is_file() for p in entry.rglob("*")):
            return True
    return False


__all__ = ["open_data"]
