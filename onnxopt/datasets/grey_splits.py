"""Seeded splits of grey images as the example zoo's nets read them, shared by the digits and MNIST datasets."""

from __future__ import annotations

import numpy as np

CHANNELS = 3

Split = tuple[np.ndarray, np.ndarray]


def normalized_splits(images: np.ndarray, labels: np.ndarray, indices: dict[str, np.ndarray]
                      ) -> tuple[dict[str, Split], dict[str, float]]:
    """``images`` ([N, H, W] float64 in [0, 1]) split by ``indices``: each split float32 ``[n, 3, H, W]``,
    normalized with the training split's mean and standard deviation (rounded to 4 decimals, returned as
    ``{"mean", "std"}``), the grey channel repeated three times; labels alongside."""
    train = images[indices["train"]]
    norm = {"mean": round(float(train.mean()), 4), "std": round(float(train.std()), 4)}
    splits = {}
    for name, idx in indices.items():
        x = ((images[idx] - norm["mean"]) / norm["std"]).astype(np.float32)
        splits[name] = (np.ascontiguousarray(np.repeat(x[:, None], CHANNELS, axis=1)), labels[idx])
    return splits, norm


def blank_value(norm: dict[str, float]) -> float:
    """A blank (zero-ink) pixel after normalization: the fill of shifted-in borders during training."""
    return (0.0 - norm["mean"]) / norm["std"]
