"""Rendered printed text lines, upright or turned 180 degrees, for PaddleOCR's text orientation classifier.

Why: ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (shipped by ``rapidocr-onnxruntime``) is a real model with a real
task, and measuring what optimisation does to its accuracy needs labelled text-line crops. No such data ships with
any installed package, so this module draws them with Pillow from the DejaVu fonts: Latin words, numbers and
punctuation (DejaVu has no CJK glyphs), each line cropped the way a text detector crops a line (a few pixels of
margin, slight tilt), printed in dark ink on paper-like backgrounds, softened by blur, low resolution and noise.
Half of the lines are turned 180 degrees (label 1, class ``"180"``), the rest are upright (label 0, class ``"0"``).

Preprocessing is RapidOCR's ``TextClassifier.resize_norm_img``: resize to height 48 keeping the aspect ratio
(width ``ceil(48 * w / h)`` capped at 192), ``(pixels / 255 - 0.5) / 0.5``, NCHW, right-pad with 0 to width 192.
RapidOCR decodes images with OpenCV conventions, so the channels reach the model in **BGR** order
(``LoadImage`` converts PIL's RGB to BGR). It resizes with ``cv2.resize`` (bilinear without antialiasing); here the
project's image-folder loader (:class:`onnxopt.calib_data.images.ImagePreprocess`) does the resize with Pillow's
bilinear filter, so arrays from :func:`render_textlines` equal what that loader makes of the folder written by
:func:`write_textline_folder`, bit for bit. Both give the model the same accuracy on these lines.

Everything is deterministic: the same seed and fonts give byte-identical arrays (on one Pillow/FreeType build).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.calib_data.images import ImagePreprocess
from onnxopt.errors import BadInputError

#: Class folder names in label order: label 0 is upright text, label 1 text turned 180 degrees (Paddle's labels).
CLASS_NAMES: tuple[str, str] = ("0", "180")

#: The classifier's preprocessing in :class:`ImagePreprocess` keys (what ``preprocess.yaml`` holds).
TEXTLINE_PREPROCESS: dict[str, Any] = {
    "resize_height": 48,
    "pad_width": 192,
    "pad_value": 0.0,
    "interpolation": "bilinear",
    "scale": 1.0 / 255.0,
    "mean": [0.5],
    "std": [0.5],
    "channels": 3,
    "channel_order": "BGR",
    "layout": "NCHW",
    "dtype": "float32",
}

FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",
    "/usr/local/share/fonts",
    "/Library/Fonts",
)

_WORDS = (
    "the of and to in is for on that with as by at from this be are was it or an not have which one all "
    "new more will can has but page about time name date total price order number report table data "
    "value city street road house office service account invoice receipt amount balance tax due paid "
    "customer address phone email note section chapter figure results method system model water power "
    "market school people world group public health history family research student company during "
    "between under after before other first second third last year month week day hour minute daily "
    "open closed north south east west left right center main green black white light small large "
    "quality energy product project member contact center support total payment credit delivery free "
    "store hotel station airport ticket room floor level stock share level index review version "
    "Monday Friday January March June October London Paris Berlin Madrid Street Avenue Road Hall "
    "General Manager Director Limited Company Group Bank Hospital University National Central"
).split()
_PUNCT_AFTER = (",", ".", ":", ";", "!", "?", ")")


def find_fonts(fonts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None) -> list[Path]:
    """Font files to draw with: the given file(s)/folder(s), else the DejaVu fonts found on this machine.

    Looks in the usual system font folders, then in matplotlib's bundled fonts (which include DejaVu Sans and
    Serif). Raises :class:`BadInputError` naming where it looked when nothing usable is found.
    """
    if fonts is not None:
        entries = [fonts] if isinstance(fonts, (str, os.PathLike)) else list(fonts)
        found: list[Path] = []
        for entry in entries:
            path = Path(entry)
            if path.is_dir():
                inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
                if not inside:
                    raise BadInputError(f"font folder '{path}' holds no .ttf/.otf files")
                found += inside
            elif path.is_file():
                found.append(path)
            else:
                raise BadInputError(f"font '{path}' does not exist")
        return found
    searched = list(FONT_DIRS)
    for folder in FONT_DIRS:
        candidates = sorted(Path(folder).glob("DejaVu*.ttf")) if Path(folder).is_dir() else []
        candidates = [p for p in candidates if "Math" not in p.name]
        if candidates:
            return candidates
    try:
        import matplotlib

        bundled = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
        searched.append(str(bundled))
        candidates = sorted(p for p in bundled.glob("DejaVu*.ttf") if "Display" not in p.name)
        if candidates:
            return candidates
    except ImportError:
        pass
    raise BadInputError("no DejaVu fonts found to render text lines (looked in " + ", ".join(searched) + "); "
                        "install them (Debian/Ubuntu: apt-get install fonts-dejavu-core) or pass a font "
                        "file or folder (fonts=... / --fonts)")


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(path, size)
    except OSError as exc:
        raise BadInputError(f"font '{path}' cannot be loaded by Pillow ({exc})") from None


def _random_text(rng: np.random.Generator) -> str:
    """A 3-25 character line of words, numbers and punctuation, like a line cut from a printed page."""
    target = int(rng.integers(3, 26))
    style = rng.random()
    tokens: list[str] = []
    length = -1
    while True:
        kind = rng.random()
        if kind < 0.72:
            token = _WORDS[int(rng.integers(len(_WORDS)))]
            if style < 0.10:
                token = token.upper()
            elif style < 0.45 or (not tokens and style < 0.8):
                token = token[:1].upper() + token[1:]
        elif kind < 0.84:
            digits = int(rng.integers(1, 6))
            token = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
            if rng.random() < 0.3:
                token = f"{token}.{int(rng.integers(100)):02d}"
        elif kind < 0.90:
            token = f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2030))}"
        elif kind < 0.95:
            token = ("$", "EUR ", "No. ", "#", "(")[int(rng.integers(5))] + str(int(rng.integers(1, 999)))
        else:
            token = ("-", "&", "/", "+", "%")[int(rng.integers(5))]
        if tokens and rng.random() < 0.15:
            tokens[-1] += _PUNCT_AFTER[int(rng.integers(len(_PUNCT_AFTER)))]
            length += 1
        if length + 1 + len(token) > target:
            break
        tokens.append(token)
        length += 1 + len(token)
    text = " ".join(tokens)
    if len(text) < 3:  # the first token alone was too long: cut a word to the target length
        word = _WORDS[int(rng.integers(len(_WORDS)))] * 3
        text = (word[:1].upper() + word[1:])[: max(3, target)]
    return text[:25]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ink, paper) RGB: dark ink on light paper, a slight tint, contrast from faded to crisp."""
    paper = float(rng.uniform(175, 255))
    ink = float(rng.uniform(0, min(110.0, paper - 80)))
    tint = rng.uniform(-12, 12, size=3)
    ink_tint = rng.uniform(-20, 20, size=3) if rng.random() < 0.3 else np.zeros(3)

    def to_rgb(level: float, shift: np.ndarray) -> tuple[int, int, int]:
        red, green, blue = (int(np.clip(round(level + s), 0, 255)) for s in shift)
        return red, green, blue

    return to_rgb(ink, ink_tint), to_rgb(paper, tint)


def _render_one(rng: np.random.Generator, fonts: Sequence[Path], upside_down: bool) -> Any:
    from PIL import Image, ImageDraw, ImageFilter

    font_path = fonts[int(rng.integers(len(fonts)))]
    size = int(rng.integers(20, 60))
    font = _font(str(font_path), size)
    text = _random_text(rng)
    ink, paper = _colours(rng)

    left, top, right, bottom = font.getbbox(text, anchor="ls")
    ascent, descent = font.getmetrics()
    # A detector's box hugs the line's ink; a mix of tight and loose boxes, measured from the cap height band
    top = min(top, -int(round(ascent * 0.72)))
    bottom = max(bottom, int(round(descent * 0.25)))
    height = bottom - top
    pads = rng.uniform([0.06, 0.06, 0.05, 0.05], [0.45, 0.45, 0.35, 0.35]) * height  # left, right, top, bottom
    width = int(math.ceil(right - left + pads[0] + pads[1]))
    canvas_h = int(math.ceil(height + pads[2] + pads[3]))
    image = Image.new("RGB", (width, canvas_h), paper)
    if rng.random() < 0.4:  # uneven lighting across the scan
        shade = np.linspace(0.0, rng.uniform(-25, 25), width, dtype=np.float32)
        array = np.asarray(image, dtype=np.float32) + shade[np.newaxis, :, np.newaxis]
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).text((pads[0] - left, pads[2] - top), text, font=font, fill=ink, anchor="ls")

    angle = float(rng.uniform(-3.0, 3.0))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=paper)
    if rng.random() < 0.35:  # a low-resolution scan or photo, scaled back up by the cropper
        factor = float(rng.uniform(0.45, 0.8))
        small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.1)) * size / 32))
    sigma = float(rng.uniform(0.0, 8.0))
    if sigma > 1.0:
        array = np.asarray(image, dtype=np.float32)
        array = array + rng.normal(0.0, sigma, size=array.shape[:2])[:, :, np.newaxis].astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    if upside_down:
        image = image.transpose(Image.Transpose.ROTATE_180)
    return image


def _labels(n: int, seed: int) -> np.ndarray:
    """Balanced (counts differ by at most one) and shuffled by the seed."""
    labels = np.arange(n, dtype=np.int64) % 2
    return np.random.default_rng([seed, 0x7E47]).permutation(labels)


def textline_images(n: int, seed: int = 0, *,
                    fonts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
                    ) -> tuple[list[Any], np.ndarray]:
    """``n`` RGB PIL images of printed text lines and their labels (int64: 0 upright, 1 turned 180 degrees).

    Line ``i`` depends only on ``seed``, ``i``, its label and the fonts, so runs are reproducible.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BadInputError(f"number of text lines must be a positive integer, got {n!r}")
    font_paths = find_fonts(fonts)
    labels = _labels(int(n), int(seed))
    images = [_render_one(np.random.default_rng([int(seed), index]), font_paths, bool(label))
              for index, label in enumerate(labels)]
    return images, labels


def textline_preprocess(preprocess: ImagePreprocess | Mapping[str, Any] | None = None) -> ImagePreprocess:
    """The classifier's preprocessing (:data:`TEXTLINE_PREPROCESS`), or the given spec."""
    return ImagePreprocess.coerce(dict(TEXTLINE_PREPROCESS) if preprocess is None else preprocess)


def render_textlines(n: int, seed: int = 0, *,
                     fonts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
                     preprocess: ImagePreprocess | Mapping[str, Any] | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``x`` float32 ``[n, 3, 48, 192]`` in [-1, 1] (padding 0), ``y`` int64 ``[n]`` labels.

    ``x`` is what RapidOCR feeds the classifier for these lines (see the module docstring); ``preprocess``
    replaces that spec, e.g. for another input size.
    """
    images, labels = textline_images(n, seed, fonts=fonts)
    spec = textline_preprocess(preprocess)
    x = np.stack([spec.apply(image, name=f"text line {index}") for index, image in enumerate(images)])
    return x, labels


def preprocess_yaml(spec: Mapping[str, Any] | None = None) -> str:
    """``preprocess.yaml`` text for the image-folder loader, with a comment saying where it comes from."""
    import yaml

    body = yaml.safe_dump(dict(TEXTLINE_PREPROCESS if spec is None else spec), sort_keys=False)
    return ("# RapidOCR's preprocessing for ch_ppocr_mobile_v2.0_cls (TextClassifier.resize_norm_img):\n"
            "# height 48 keeping aspect ratio (width capped at 192), (x/255 - 0.5)/0.5, BGR (OpenCV decoding),\n"
            "# NCHW, right-padded with 0 to width 192. Keys: onnxopt.calib_data.images.ImagePreprocess.\n" + body)


def write_textline_folder(folder: str | os.PathLike[str], n: int, seed: int = 0, *,
                          fonts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
                          ) -> Path:
    """Write ``n`` lines as PNGs, one subfolder per class (``0/``, ``180/``), plus ``preprocess.yaml``.

    File ``{i}.png`` is line ``i`` of ``textline_images(n, seed)``; the loader numbers the classes in sorted folder
    order, so ``0/`` is label 0 and ``180/`` label 1, and it reproduces ``render_textlines(n, seed)`` exactly.
    Refuses a folder whose class subfolders already hold PNGs, so two runs never mix.
    """
    root = Path(folder)
    for name in CLASS_NAMES:
        if any((root / name).glob("*.png")):
            raise BadInputError(f"'{root / name}' already holds images; write text lines into an empty folder")
    images, labels = textline_images(n, seed, fonts=fonts)
    digits = max(5, len(str(len(images) - 1)))
    try:
        for name in CLASS_NAMES:
            (root / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            image.save(root / CLASS_NAMES[int(label)] / f"{index:0{digits}d}.png")
        (root / "preprocess.yaml").write_text(preprocess_yaml(), encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot write text lines to '{root}' ({exc})") from None
    return root


__all__ = [
    "CLASS_NAMES",
    "TEXTLINE_PREPROCESS",
    "find_fonts",
    "preprocess_yaml",
    "render_textlines",
    "textline_images",
    "textline_preprocess",
    "write_textline_folder",
]
