"""scikit-learn's digits as 32x32 three-channel images: the data the shipped example and the example zoo train and
evaluate on (``examples/build_default_model.py``, ``examples/build_zoo.py``).

The 1797 8x8 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download) are split with a
seeded stratified shuffle into train (1097) / calib (300) / eval (400). Each image is upsampled to 32x32 with bilinear
interpolation (half-pixel centres, edge clamped: what ``torch.nn.functional.interpolate(..., mode="bilinear",
align_corners=False)`` and ONNX ``Resize`` with ``half_pixel`` do), scaled to [0, 1], normalized with the training
set's mean and standard deviation (rounded to 4 decimals) and the grey channel repeated three times.

The interpolation weights are multiples of 1/8, so upsampling the integer pixels is exact in float64: the arrays are
bit-identical on every machine. Needs only numpy and scikit-learn (imported when called).
"""

from __future__ import annotations

import numpy as np

from onnxopt.datasets.grey_splits import (  # noqa: F401 - CHANNELS and blank_value re-exported
    CHANNELS, Split, blank_value, normalized_splits)

SEED = 0
CALIB_SIZE = 300
EVAL_SIZE = 400
SOURCE_SIZE = 8
IMAGE_SIZE = 32
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16


def bilinear_matrix(src: int = SOURCE_SIZE, dst: int = IMAGE_SIZE) -> np.ndarray:
    """``[dst, src]`` weights of 1-D bilinear resampling with half-pixel centres and clamped edges.

    Every weight is a multiple of ``src / dst / 2`` (1/8 for 8 -> 32), so applying it to integers is exact.
    """
    scale = src / dst
    weights = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        position = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(np.floor(position)), src - 1)
        high = min(low + 1, src - 1)
        frac = position - low
        weights[i, low] += 1.0 - frac
        weights[i, high] += frac
    return weights


def upsample(images: np.ndarray) -> np.ndarray:
    """``[N, 8, 8]`` pixel values -> ``[N, 32, 32]`` float64 (exact: dyadic weights, small integer pixels)."""
    rows = bilinear_matrix(images.shape[1])
    cols = bilinear_matrix(images.shape[2])
    return np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols, optimize=False)


def split_indices(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded, stratified, disjoint train / calib / eval indices (each sorted, so the files do not depend on the
    order the splitter returns)."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, eval_idx = train_test_split(everything, test_size=EVAL_SIZE, stratify=labels, random_state=seed)
    train_idx, calib_idx = train_test_split(rest, test_size=CALIB_SIZE, stratify=labels[rest], random_state=seed + 1)
    return {"train": np.sort(train_idx), "calib": np.sort(calib_idx), "eval": np.sort(eval_idx)}


def build_splits(seed: int = SEED) -> tuple[dict[str, Split], dict[str, float]]:
    """``{"train"|"calib"|"eval": (input float32 [N, 3, 32, 32], y int64 [N])}`` and the normalization constants
    (``{"mean", "std"}`` of the training images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = upsample(digits.images) / PIXEL_MAX  # [0, 1], float64
    return normalized_splits(images, labels, split_indices(labels, seed))


def digits_splits(seed: int = SEED) -> dict[str, Split]:
    """``{"train"|"calib"|"eval": (x, y)}``: :func:`build_splits` without the normalization constants."""
    return build_splits(seed)[0]
