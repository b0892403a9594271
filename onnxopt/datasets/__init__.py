"""Generators of real, labelled evaluation/calibration data for models the project measures itself on.

Each generator is deterministic (same seed, byte-identical arrays) and needs only Pillow and numpy, so benchmarks
and tests can build their data on any machine instead of downloading it.
"""

from __future__ import annotations

from onnxopt.datasets.textlines import (
    CLASS_NAMES,
    TEXTLINE_PREPROCESS,
    find_fonts,
    render_textlines,
    textline_images,
    textline_preprocess,
    write_textline_folder,
)

__all__ = [
    "CLASS_NAMES",
    "TEXTLINE_PREPROCESS",
    "find_fonts",
    "render_textlines",
    "textline_images",
    "textline_preprocess",
    "write_textline_folder",
]
