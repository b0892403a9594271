"""Calibration and evaluation data: one re-iterable, validated stream of batches, whatever the user has.

``open_data(spec)`` accepts a ``.npz``/``.npy`` file, a folder of ``.npy`` files, a folder of images with an
:class:`ImagePreprocess` spec, ``"random[:N]"``, numpy arrays or a dict of them, an iterable of samples, or an ONNX
Runtime ``CalibrationDataReader``. Every source yields :class:`Batch` objects checked against the model's inputs
(names, rank, fixed dims, dtype, NaN/Inf) in the same order on every iteration.
"""

from __future__ import annotations

from onnxopt.calib_data.arrays import ArraySource, NpyFileSource, NpzSource
from onnxopt.calib_data.base import Batch, DataSource
from onnxopt.calib_data.images import ImageFolderSource, ImagePreprocess
from onnxopt.calib_data.iterable import IterableSource, ReaderSource
from onnxopt.calib_data.npy_folder import NpyFolderSource
from onnxopt.calib_data.resolve import open_data
from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.calib_data.synthetic import RandomSource, random_data
from onnxopt.calib_data.validate import check_labels

__all__ = [
    "ArraySource",
    "Batch",
    "Chunk",
    "ChunkedSource",
    "DataSource",
    "ImageFolderSource",
    "ImagePreprocess",
    "IterableSource",
    "NpyFileSource",
    "NpyFolderSource",
    "NpzSource",
    "RandomSource",
    "ReaderSource",
    "check_labels",
    "open_data",
    "random_data",
]
