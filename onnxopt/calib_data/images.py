"""Folders of images (Pillow) turned into model inputs by a declarative preprocessing spec.

Layout: images directly in the folder (unlabelled), or one subfolder per class (labelled: the class index is the
position of the subfolder name in plain sorted order, as torchvision's ``ImageFolder`` numbers them; every non-hidden
subfolder is a class, even an empty one, so indices do not shift). Images are read in natural order of their names.
A ``preprocess.yaml``/``preprocess.yml``/``preprocess.json`` in the folder is used when no spec is passed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.calib_data.npy_folder import natural_key
from onnxopt.calib_data.stream import Chunk, ChunkedSource
from onnxopt.errors import DataError
from onnxopt.modelio import InputSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
PREPROCESS_FILES = ("preprocess.yaml", "preprocess.yml", "preprocess.json")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass
class ImagePreprocess:
    """How an image becomes one sample: ``((pixels * scale) - mean) / std`` after resizing and cropping.

    Steps in order: decode (EXIF rotation applied) to RGB or grayscale (``channels``); resize - ``resize`` as an int
    sets the shorter side keeping the aspect ratio, as ``[H, W]`` the exact size, and ``resize_height`` sets the
    height keeping the aspect ratio (width rounded up, capped at ``pad_width`` when given, as text recognisers do);
    center ``crop`` to ``[H, W]`` (or a square); ``channel_order`` ``BGR`` reverses the channels; scale and normalize
    (``mean``/``std`` are listed in the order the model receives the channels, one value or one per channel); pad
    on the right with ``pad_value`` to ``pad_width`` (after normalizing, so 0 stays 0); ``layout`` ``NCHW`` or
    ``NHWC``; cast to ``dtype`` (integer dtypes are rounded and clipped: use ``dtype: uint8, scale: 1`` for models
    that take raw pixels). ``input`` names the graph input the images feed (default: the model's only input).
    """

    resize: int | tuple[int, int] | None = None
    resize_height: int | None = None
    crop: int | tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    channel_order: str = "RGB"
    channels: int = 3
    pad_width: int | None = None
    pad_value: float = 0.0
    interpolation: str = "bilinear"
    dtype: str = "float32"
    input: str | None = None

    def __post_init__(self) -> None:
        where = "preprocessing spec"
        if self.resize is not None and self.resize_height is not None:
            raise DataError(f"{where}: give either 'resize' or 'resize_height', not both")
        self.resize = _size(self.resize, "resize", allow_int=True)
        self.crop = _size(self.crop, "crop", allow_int=False)
        self.resize_height = _positive(self.resize_height, "resize_height")
        self.pad_width = _positive(self.pad_width, "pad_width")
        self.channels = int(self.channels)
        if self.channels not in (1, 3):
            raise DataError(f"{where}: 'channels' must be 1 (grayscale) or 3 (color), got {self.channels}")
        self.layout = str(self.layout).upper()
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"{where}: 'layout' must be NCHW or NHWC, got '{self.layout}'")
        self.channel_order = str(self.channel_order).upper()
        if self.channel_order not in ("RGB", "BGR"):
            raise DataError(f"{where}: 'channel_order' must be RGB or BGR, got '{self.channel_order}'")
        self.interpolation = str(self.interpolation).lower()
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(f"{where}: 'interpolation' must be one of {', '.join(_INTERPOLATIONS)}, "
                            f"got '{self.interpolation}'")
        self.mean = _per_channel(self.mean, "mean", self.channels)
        self.std = _per_channel(self.std, "std", self.channels)
        if any(s == 0 for s in self.std):
            raise DataError(f"{where}: 'std' must not contain 0")
        try:
            self.scale = float(self.scale)
            self.pad_value = float(self.pad_value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'scale' and 'pad_value' must be numbers") from None
        try:
            kind = np.dtype(self.dtype).kind
        except TypeError:
            kind = ""
        if kind not in "fiu" or not kind:
            raise DataError(f"{where}: 'dtype' must be a numeric type such as float32 or uint8, got '{self.dtype}'")
        self.dtype = np.dtype(self.dtype).name

    # -- reading specs -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], *, source: str = "preprocessing spec") -> ImagePreprocess:
        """Build from a mapping (parsed YAML/JSON); unknown keys are refused, naming the allowed ones."""
        if not isinstance(spec, Mapping):
            raise DataError(f"{source}: expected a mapping of settings, got {type(spec).__name__}")
        if set(spec) == {"preprocess"} and isinstance(spec["preprocess"], Mapping):
            spec = spec["preprocess"]
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            raise DataError(f"{source}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(allowed)}")
        try:
            return cls(**dict(spec))
        except DataError as exc:
            raise DataError(str(exc).replace("preprocessing spec", source, 1)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ImagePreprocess:
        """Read a ``.yaml``/``.yml``/``.json`` file."""
        path = Path(path)
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            raise DataError(f"preprocessing spec '{path}' {state}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix.lower() == ".json":
                spec = json.loads(text)
            else:
                import yaml

                spec = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - yaml and json raise several types
            raise DataError(f"preprocessing spec '{path}' cannot be parsed: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(spec if spec is not None else {}, source=f"preprocessing spec '{path}'")

    @classmethod
    def coerce(cls, value: Any, folder: str | os.PathLike[str] | None = None) -> ImagePreprocess:
        """A spec from an ImagePreprocess, a mapping, a file path, or (None) the folder's ``preprocess.*`` file."""
        if isinstance(value, ImagePreprocess):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            return cls.from_file(value)
        if value is None:
            for name in PREPROCESS_FILES if folder is not None else ():
                candidate = Path(folder) / name  # type: ignore[arg-type]
                if candidate.is_file():
                    return cls.from_file(candidate)
            return cls()
        raise DataError(f"preprocessing spec must be a mapping or a YAML/JSON file, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("resize", "crop", "mean", "std"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    # -- applying it ---------------------------------------------------------------------------------------------
    def apply(self, image: Any, *, name: str = "image") -> np.ndarray:
        """One sample (no batch axis) from a PIL image, in ``layout`` and ``dtype``."""
        from PIL import Image

        image = image.convert("RGB" if self.channels == 3 else "L")
        width, height = image.size
        size = self._resized(width, height)
        if size != (width, height):
            image = image.resize(size, _resample(Image, self.interpolation))
            width, height = size
        if self.crop is not None:
            crop_h, crop_w = self.crop  # type: ignore[misc]
            if crop_h > height or crop_w > width:
                raise DataError(f"{name} is {height}x{width} (HxW) after resizing, smaller than the crop "
                                f"{crop_h}x{crop_w}; resize it to at least the crop size")
            top, left = int(round((height - crop_h) / 2)), int(round((width - crop_w) / 2))
            image = image.crop((left, top, left + crop_w, top + crop_h))
            width, height = crop_w, crop_h
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, np.newaxis]
        if self.channel_order == "BGR":
            array = array[:, :, ::-1]
        array = (array * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.pad_width is not None:
            if width > self.pad_width:
                raise DataError(f"{name} is {width} pixels wide after resizing, wider than pad_width "
                                f"{self.pad_width}; use resize_height (which caps the width) or a smaller resize")
            padded = np.full((height, self.pad_width, array.shape[2]), self.pad_value, dtype=np.float32)
            padded[:, :width] = array
            array = padded
        if self.layout == "NCHW":
            array = array.transpose(2, 0, 1)
        target = np.dtype(self.dtype)
        if target.kind in "iu":
            info = np.iinfo(target)
            array = np.clip(np.rint(array), info.min, info.max)
        return np.ascontiguousarray(array.astype(target))

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """Target (width, height) in PIL order."""
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        if isinstance(self.resize, int):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.resize, max(1, int(self.resize * long / short))
            return (new_short, new_long) if width <= height else (new_long, new_short)
        if self.resize_height is not None:
            new_width = max(1, math.ceil(self.resize_height * width / height))
            if self.pad_width is not None:
                new_width = min(new_width, self.pad_width)
            return new_width, self.resize_height
        return width, height


def _resample(image_module: Any, name: str) -> Any:
    resampling = getattr(image_module, "Resampling", image_module)
    return getattr(resampling, name.upper())


def _positive(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise DataError(f"preprocessing spec: '{key}' must be a positive integer, got {value!r}")
    return int(value)


def _size(value: Any, key: str, *, allow_int: bool) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number = _positive(value, key)
        return number if allow_int else (number, number)  # type: ignore[return-value]
    if isinstance(value, str) and "x" in value.lower():
        value = value.lower().split("x")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            height, width = (int(v) for v in value)
        except (TypeError, ValueError):
            height = width = 0
        if height > 0 and width > 0:
            return height, width
    raise DataError(f"preprocessing spec: '{key}' must be "
                    f"{'an integer (shorter side) or ' if allow_int else 'an integer or '}[height, width], "
                    f"got {value!r}")


def _per_channel(value: Any, key: str, channels: int) -> tuple[float, ...]:
    try:
        values = [value] if np.ndim(value) == 0 else list(value)
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"preprocessing spec: '{key}' must be a number or a list of numbers, got {value!r}") from None
    if len(floats) not in (1, channels):
        raise DataError(f"preprocessing spec: '{key}' has {len(floats)} values; give 1 or {channels} (one per channel)")
    return floats


def image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)), key=natural_key)


class ImageFolderSource(ChunkedSource):
    """Images from a folder, one sample each, preprocessed by an :class:`ImagePreprocess` (see module docstring)."""

    shape_hint = "adjust resize/resize_height, crop, pad_width or layout in the preprocessing spec"

    def __init__(self, folder: str | os.PathLike[str], preprocess: Any = None):
        self.folder = Path(folder)
        self.where = f"image folder '{self.folder}'"
        if not self.folder.is_dir():
            raise DataError(f"data folder '{self.folder}' does not exist")
        self.preprocess = ImagePreprocess.coerce(preprocess, self.folder)
        top = image_files(self.folder)
        class_dirs = sorted(p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = {name: image_files(self.folder / name, recursive=True) for name in class_dirs}
        if top and any(per_class.values()):
            raise DataError(f"{self.where} has images both at the top and in subfolders; put all images at the top "
                            f"(unlabelled) or all in one subfolder per class (labelled)")
        self.classes: list[str] = []
        self.files: list[Path] = top
        self.labels: list[int] | None = None
        if not top:
            self.classes = class_dirs
            self.files = [path for name in class_dirs for path in per_class[name]]
            self.labels = [index for index, name in enumerate(class_dirs) for _ in per_class[name]]
        if not self.files:
            raise DataError(f"{self.where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def has_labels(self) -> bool:
        return self.labels is not None

    def _estimate_samples(self) -> int | None:
        return len(self.files)

    def _extra(self) -> str:
        return f", {len(self.classes)} classes" if self.classes else ""

    def _chunks(self, specs: Sequence[InputSpec], chunk_size: int) -> Iterator[Chunk]:
        for index, path in enumerate(self.files):
            array = self._read(path)[np.newaxis]
            inputs: dict[str, np.ndarray] | list[np.ndarray] = (
                {self.preprocess.input: array} if self.preprocess.input else [array])
            labels = None if self.labels is None else np.array([self.labels[index]], dtype=np.int64)
            yield Chunk(inputs, labels, f"image '{path.relative_to(self.folder)}'")

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, ImageOps, UnidentifiedImageError

        name = f"{self.where}: image '{path.relative_to(self.folder)}'"
        try:
            with Image.open(path) as image:
                image.load()
                oriented = ImageOps.exif_transpose(image)
                return self.preprocess.apply(oriented if oriented is not None else image, name=name)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{name} cannot be decoded ({cause})") from None


__all__ = ["IMAGE_SUFFIXES", "ImageFolderSource", "ImagePreprocess", "image_files"]
