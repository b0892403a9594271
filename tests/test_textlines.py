"""Rendered text lines for PaddleOCR's orientation classifier: format, balance, determinism, real accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt.calib_data import ImagePreprocess, open_data
from onnxopt.datasets import (
    CLASS_NAMES,
    find_fonts,
    render_textlines,
    textline_images,
    textline_preprocess,
    write_textline_folder,
)
from onnxopt.datasets.textlines import _random_text, _render_one
from onnxopt.errors import BadInputError
from onnxopt.modelio import InputSpec

CLS_INPUT = [InputSpec("x", ("N", 3, 48, 192), np.dtype(np.float32))]


def test_arrays_have_the_classifier_input_format():
    x, y = render_textlines(24, seed=3)
    assert x.shape == (24, 3, 48, 192) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (24,) and y.dtype == np.int64 and set(y.tolist()) <= {0, 1}
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
    # paper is light, so the (normalized) image is mostly positive; short lines are right-padded with exact zeros
    images, _ = textline_images(24, seed=3)
    for sample, image in zip(x, images):
        width = min(192, int(np.ceil(48 * image.width / image.height)))
        assert sample[:, :, :width].mean() > 0.0
        assert np.all(sample[:, :, width:] == 0.0)
    assert any(image.width / image.height < 3 for image in images)  # some lines are padded


def test_channels_reach_the_model_in_bgr_order_like_rapidocr():
    images, _ = textline_images(4, seed=5)
    x, _ = render_textlines(4, seed=5)
    rgb = ImagePreprocess(**{**textline_preprocess().to_dict(), "channel_order": "RGB"}).apply(images[0])
    np.testing.assert_array_equal(x[0], rgb[::-1])
    assert textline_preprocess().channel_order == "BGR"


def test_labels_are_balanced_and_shuffled():
    _, y = render_textlines(101, seed=0)
    assert np.bincount(y).tolist() == [51, 50]
    assert not np.array_equal(y, np.sort(y)) and not np.array_equal(y, np.arange(101) % 2)
    _, labels = textline_images(101, seed=0)
    np.testing.assert_array_equal(labels, y)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    x1, y1 = render_textlines(16, seed=11)
    x2, y2 = render_textlines(16, seed=11)
    assert x1.tobytes() == x2.tobytes() and y1.tobytes() == y2.tobytes()
    x3, _ = render_textlines(16, seed=12)
    assert x1.tobytes() != x3.tobytes()


def test_turned_lines_differ_from_upright_ones_only_by_orientation():
    """Label 1 is label 0 turned 180 degrees, so orientation is the only cue that tells the classes apart."""
    from PIL import Image

    fonts = find_fonts()
    for index in range(5):
        upright = _render_one(np.random.default_rng([9, index]), fonts, upside_down=False)
        turned = _render_one(np.random.default_rng([9, index]), fonts, upside_down=True)
        assert upright.mode == turned.mode == "RGB"
        assert turned.tobytes() == upright.transpose(Image.Transpose.ROTATE_180).tobytes()
        assert turned.tobytes() != upright.tobytes()


def test_text_is_three_to_twenty_five_characters():
    lengths = [len(_random_text(np.random.default_rng([4, i]))) for i in range(500)]
    assert min(lengths) >= 3 and max(lengths) <= 25
    assert min(lengths) <= 5 and max(lengths) >= 22  # the whole range is used


def test_paddle_classifier_accuracy_on_rendered_lines(paddle_cls_path: Path):
    x, y = render_textlines(200, seed=0)
    session = ort.InferenceSession(str(paddle_cls_path), providers=["CPUExecutionProvider"])
    probs = np.concatenate([session.run(None, {"x": x[i:i + 50]})[0] for i in range(0, len(x), 50)])
    predicted = probs.argmax(axis=1)
    accuracy = float((predicted == y).mean())
    assert accuracy >= 0.95, f"FP32 Paddle classifier scores {accuracy:.3f} on rendered lines"
    for label in (0, 1):  # both classes are recognised, not one predicted everywhere
        assert (predicted[y == label] == label).mean() >= 0.9


def test_image_folder_round_trips_through_the_loader(tmp_path: Path):
    folder = write_textline_folder(tmp_path / "lines", 20, seed=1)
    x, y = render_textlines(20, seed=1)
    files = {name: sorted(p.name for p in (folder / name).glob("*.png")) for name in CLASS_NAMES}
    assert len(files["0"]) == int((y == 0).sum()) and len(files["180"]) == int((y == 1).sum())
    assert ImagePreprocess.from_file(folder / "preprocess.yaml") == textline_preprocess()

    source = open_data(folder)  # picks up preprocess.yaml; class index = sorted folder name: "0" -> 0, "180" -> 1
    batches = list(source.iter_batches(CLS_INPUT, batch_size=8))
    loaded_x = np.concatenate([b.inputs["x"] for b in batches])
    loaded_y = np.concatenate([b.labels for b in batches])
    order = [int(name[:-4]) for name in files["0"] + files["180"]]
    np.testing.assert_array_equal(loaded_y, y[order])
    np.testing.assert_array_equal(loaded_x, x[order])  # PNG is lossless: the loader reproduces the arrays

    with pytest.raises(BadInputError, match=r"already holds images"):
        write_textline_folder(folder, 4, seed=1)


def test_font_argument_and_font_errors(tmp_path: Path):
    fonts = find_fonts()
    assert fonts and all(p.suffix.lower() in (".ttf", ".otf") for p in fonts)
    x_one, _ = render_textlines(6, seed=0, fonts=fonts[0])
    x_folder, _ = render_textlines(6, seed=0, fonts=[fonts[0]])
    assert x_one.tobytes() == x_folder.tobytes()
    with pytest.raises(BadInputError, match=r"font '.*missing\.ttf' does not exist"):
        render_textlines(2, fonts=tmp_path / "missing.ttf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=r"font folder '.*empty' holds no \.ttf/\.otf files"):
        find_fonts(tmp_path / "empty")
    (tmp_path / "bad.ttf").write_bytes(b"not a font")
    with pytest.raises(BadInputError, match=r"font '.*bad\.ttf' cannot be loaded"):
        render_textlines(2, fonts=tmp_path / "bad.ttf")
    with pytest.raises(BadInputError, match=r"positive integer"):
        render_textlines(0)
