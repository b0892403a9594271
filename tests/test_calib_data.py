"""Data sources: every kind of input, validation against the model's inputs, batching, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from onnxopt.calib_data import (
    ArraySource,
    Batch,
    DataSource,
    ImageFolderSource,
    ImagePreprocess,
    IterableSource,
    NpyFileSource,
    NpyFolderSource,
    NpzSource,
    RandomSource,
    ReaderSource,
    check_labels,
    open_data,
    random_data,
)
from onnxopt.calib_data.npzio import NpzArchive
from onnxopt.errors import BadInputError, DataError
from onnxopt.modelio import InputSpec, input_specs, load_model

F32 = np.dtype(np.float32)
IMAGE = [InputSpec("x", ("N", 3, 8, 8), F32)]


def spec(name: str = "x", shape: tuple = ("N", 3, 8, 8), dtype=np.float32) -> list[InputSpec]:
    return [InputSpec(name, shape, np.dtype(dtype))]


def samples(n: int = 10, shape: tuple = (3, 8, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def collect(source: DataSource, specs, batch_size: int = 1) -> list[Batch]:
    return list(source.iter_batches(specs, batch_size))


def stacked(batches: list[Batch], name: str = "x") -> np.ndarray:
    return np.concatenate([b.inputs[name] for b in batches])


def all_labels(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([b.labels for b in batches])


def assert_same_batches(first: list[Batch], second: list[Batch]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.inputs.keys() == b.inputs.keys()
        for name in a.inputs:
            np.testing.assert_array_equal(a.inputs[name], b.inputs[name])
        if a.labels is None:
            assert b.labels is None
        else:
            np.testing.assert_array_equal(a.labels, b.labels)


def solid_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    """A PNG of one color; ``size`` is (width, height) as Pillow takes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


class Reader:
    """An ORT CalibrationDataReader look-alike: feeds once, then None forever."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return next(self._feeds, None)


# -- npz -----------------------------------------------------------------------------------------------------------


def test_npz_round_trip_with_labels_and_batching(tmp_path: Path):
    x, y = samples(10), np.arange(10) % 3
    np.savez(tmp_path / "calib.npz", x=x, y=y)
    source = open_data(tmp_path / "calib.npz")
    assert isinstance(source, NpzSource)
    assert source.num_samples() == 10 and source.has_labels() and not source.synthetic
    assert "calib.npz" in source.description and "10 samples" in source.description
    assert "labelled" in source.description and "unlabelled" not in source.description

    batches = collect(source, IMAGE, batch_size=4)
    assert [b.size for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(stacked(batches), x)
    np.testing.assert_array_equal(all_labels(batches), y)
    assert all(type(b.inputs["x"]) is np.ndarray and b.inputs["x"].flags.c_contiguous for b in batches)
    assert all(b.labels.dtype == np.int64 for b in batches)


def test_iter_samples_cuts_the_last_batch_unless_the_model_fixes_its_batch():
    x = np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8)
    source = ArraySource({"x": x}, labels=np.arange(10))
    batches = list(source.iter_samples(IMAGE, 7, batch_size=4))
    assert [b.size for b in batches] == [4, 3]
    assert [list(b.labels) for b in batches] == [[0, 1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(batches[1].inputs["x"], x[4:7])
    fixed = [InputSpec("x", (5, 3, 8, 8), F32)]  # ORT refuses any batch but 5: whole batches, 10 samples for 7
    assert [b.size for b in source.iter_samples(fixed, 7, batch_size=4)] == [5, 5]
    assert [b.size for b in source.iter_samples(fixed, 5)] == [5]


def test_npz_members_are_memory_mapped_and_compressed_ones_loaded(tmp_path: Path):
    x = samples(6)
    np.savez(tmp_path / "plain.npz", x=x)
    np.savez_compressed(tmp_path / "small.npz", x=x)
    mapped = NpzArchive(tmp_path / "plain.npz").array("x")
    loaded = NpzArchive(tmp_path / "small.npz").array("x")
    assert isinstance(mapped, np.memmap) and not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(mapped, x)
    np.testing.assert_array_equal(loaded, x)
    fortran = np.asfortranarray(samples(4))
    np.savez(tmp_path / "fortran.npz", x=fortran)
    np.testing.assert_array_equal(NpzArchive(tmp_path / "fortran.npz").array("x"), fortran)
    np.testing.assert_array_equal(stacked(collect(open_data(tmp_path / "small.npz"), IMAGE, 4)), x)


def _npz(path: Path, members: dict[str, tuple[np.ndarray, bool]]) -> Path:
    """An .npz whose members are each compressed (True) or stored, as ``np.savez`` writes one or the other."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for key, (array, compressed) in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    return path


def test_compressed_npz_is_read_a_block_at_a_time_with_the_same_batches(tmp_path: Path, monkeypatch):
    x, labels = samples(23), np.arange(23) % 5
    np.savez(tmp_path / "plain.npz", x=x, y=labels)
    np.savez_compressed(tmp_path / "small.npz", x=x, y=labels)
    whole_reads: list[tuple[str, str]] = []
    original = NpzArchive.array
    monkeypatch.setattr(NpzArchive, "array",
                        lambda self, key: whole_reads.append((self.path.name, key)) or original(self, key))
    for batch_size in (1, 4, 7, 32):
        source = NpzSource(tmp_path / "small.npz")
        source.block_bytes = 5 * x[0].nbytes  # blocks of 5 samples (or a batch, when larger)
        assert_same_batches(collect(source, IMAGE, batch_size), collect(open_data(tmp_path / "plain.npz"), IMAGE,
                                                                         batch_size))
    assert {key for _, key in whole_reads} == {"y"}  # labels only, from either file: no input member mapped
    fixed = [InputSpec("x", (4, 3, 8, 8), F32)]
    assert [b.size for b in collect(NpzSource(tmp_path / "small.npz"), fixed)] == [4] * 5  # short tail dropped


def test_batches_never_alias_the_users_arrays_or_a_memory_map(tmp_path: Path):
    x = samples(8)
    for batch in collect(ArraySource({"x": x}), IMAGE, 4):
        assert not np.shares_memory(batch.inputs["x"], x)
    fortran = np.asfortranarray(samples(8))  # memory-mapped: not read by blocks
    np.savez(tmp_path / "fortran.npz", x=fortran)
    mapped = NpzArchive(tmp_path / "fortran.npz").array("x")
    for batch in collect(open_data(tmp_path / "fortran.npz"), IMAGE, 4):
        assert not isinstance(batch.inputs["x"], np.memmap) and not np.shares_memory(batch.inputs["x"], mapped)
        assert batch.inputs["x"].flags["C_CONTIGUOUS"] and batch.inputs["x"].flags["WRITEABLE"]


def test_compressed_npz_counts_samples_from_its_headers(tmp_path: Path, monkeypatch):
    np.savez_compressed(tmp_path / "small.npz", x=samples(9), y=np.zeros(9, np.int64))
    monkeypatch.setattr(NpzArchive, "array", lambda self, key: pytest.fail(f"read '{key}' whole"))
    assert NpzSource(tmp_path / "small.npz").num_samples() == 9
    assert "9 samples, labelled" in NpzSource(tmp_path / "small.npz").description


def test_npz_with_compressed_and_stored_members_streams_both_in_step(tmp_path: Path):
    a, b = samples(11, seed=1), samples(11, (4,), seed=2)
    specs = [InputSpec("a", ("N", 3, 8, 8), F32), InputSpec("b", ("N", 4), F32)]
    mixed = NpzSource(_npz(tmp_path / "mixed.npz", {"a": (a, True), "b": (b, False), "y": (np.arange(11), True)}))
    mixed.block_bytes = 3 * a[0].nbytes
    batches = collect(mixed, specs, 4)
    np.testing.assert_array_equal(stacked(batches, "a"), a)
    np.testing.assert_array_equal(stacked(batches, "b"), b)
    np.testing.assert_array_equal(all_labels(batches), np.arange(11))


def test_compressed_npz_that_cannot_stream_is_read_whole_with_the_same_messages(tmp_path: Path):
    np.savez_compressed(tmp_path / "one.npz", x=samples(1)[0])  # one sample, one rank short of the input
    assert stacked(collect(open_data(tmp_path / "one.npz"), IMAGE)).shape == (1, 3, 8, 8)
    fortran = np.asfortranarray(samples(5))
    np.savez_compressed(tmp_path / "fortran.npz", x=fortran)
    np.testing.assert_array_equal(stacked(collect(open_data(tmp_path / "fortran.npz"), IMAGE, 2)), fortran)
    np.savez_compressed(tmp_path / "counts.npz", x=samples(5), y=np.arange(4))
    with pytest.raises(DataError, match="4 labels for 5 samples"):
        collect(open_data(tmp_path / "counts.npz"), IMAGE)
    np.savez_compressed(tmp_path / "shape.npz", x=samples(40, (3, 9, 9)))
    source = NpzSource(tmp_path / "shape.npz")
    source.block_bytes = 1
    with pytest.raises(DataError, match=r"data has shape \(40, 3, 9, 9\), model expects \(N, 3, 8, 8\)"):
        collect(source, IMAGE)


def test_truncated_compressed_npz_member_is_a_data_error(tmp_path: Path):
    path = _npz(tmp_path / "cut.npz", {"x": (samples(50), True)})
    data = bytearray(path.read_bytes())
    start = data.index(b"x.npy") + 200  # inside the deflated bytes of the member
    data[start:start + 400] = bytes(400)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="cannot read array 'x'"):
        collect(open_data(path), IMAGE, 8)


def test_npz_single_array_feeds_a_single_input_model_whatever_its_name(tmp_path: Path):
    x = samples(3)
    np.savez(tmp_path / "data.npz", x)  # stored as 'arr_0'
    batches = collect(open_data(tmp_path / "data.npz"), spec("images"), 2)
    np.testing.assert_array_equal(stacked(batches, "images"), x)
    assert not open_data(tmp_path / "data.npz").has_labels()
    assert "unlabelled" in open_data(tmp_path / "data.npz").description


def test_npz_with_several_inputs_must_name_them(tmp_path: Path):
    np.savez(tmp_path / "two.npz", a=samples(2), b=samples(2))
    specs = [InputSpec("a", ("N", 3, 8, 8), F32), InputSpec("c", ("N", 3, 8, 8), F32)]
    with pytest.raises(DataError, match=r"data has inputs \['a', 'b'\] but the model's inputs are \['a', 'c'\]"):
        collect(open_data(tmp_path / "two.npz"), specs)


def test_npz_label_count_must_match(tmp_path: Path):
    np.savez(tmp_path / "bad.npz", x=samples(4), y=np.arange(3))
    with pytest.raises(DataError, match=r"3 labels for 4 samples"):
        collect(open_data(tmp_path / "bad.npz"), IMAGE)


def test_model_input_named_y_is_data_not_labels(tmp_path: Path):
    np.savez(tmp_path / "xy.npz", x=samples(2), y=samples(2))
    specs = [InputSpec("x", ("N", 3, 8, 8), F32), InputSpec("y", ("N", 3, 8, 8), F32)]
    batch = collect(open_data(tmp_path / "xy.npz"), specs, 2)[0]
    assert set(batch.inputs) == {"x", "y"} and batch.labels is None


def test_npy_file(tmp_path: Path):
    x = samples(5)
    np.save(tmp_path / "x.npy", x)
    source = open_data(tmp_path / "x.npy")
    assert isinstance(source, NpyFileSource) and source.num_samples() == 5
    np.testing.assert_array_equal(stacked(collect(source, IMAGE, 2)), x)


def test_npy_file_is_read_a_block_at_a_time_and_counted_from_its_header(tmp_path: Path, monkeypatch):
    x = samples(13)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "one.npy", x[0])  # one sample, one rank short of the input
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("loaded whole"))
    source = open_data(tmp_path / "x.npy")
    source.block_bytes = 3 * x[0].nbytes
    assert source.num_samples() == 13 and "13 samples, unlabelled" in source.description
    np.testing.assert_array_equal(stacked(collect(source, IMAGE, 2)), x)
    monkeypatch.undo()
    np.testing.assert_array_equal(stacked(collect(open_data(tmp_path / "one.npy"), IMAGE)), x[:1])
    np.testing.assert_array_equal(stacked(collect(open_data(tmp_path / "fortran.npy"), IMAGE, 4)), x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:len(data) - 100])
    with pytest.raises(DataError, match=r"cut.npy' ends before row 13 of 13 \(the file is truncated\)"):
        collect(open_data(tmp_path / "cut.npy"), IMAGE, 4)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="is not a readable .npy file"):
        open_data(tmp_path / "bad.npy")


# -- npy folders ---------------------------------------------------------------------------------------------------


def test_npy_folder_one_sample_per_file_in_natural_order_with_labels(tmp_path: Path):
    x = samples(12)
    for i in range(12):
        np.save(tmp_path / f"s{i}.npy", x[i])  # s2 must come before s10
    np.save(tmp_path / "y.npy", np.arange(12))
    source = open_data(tmp_path)
    assert isinstance(source, NpyFolderSource) and source.has_labels()
    assert source.num_samples() == 12 and "12 files" in source.description
    batches = collect(source, IMAGE, 5)
    assert [b.size for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(stacked(batches), x)
    np.testing.assert_array_equal(all_labels(batches), np.arange(12))


def test_npy_folder_files_may_hold_batches(tmp_path: Path):
    x = samples(7)
    np.save(tmp_path / "a.npy", x[:3])
    np.save(tmp_path / "b.npy", x[3:6])
    np.save(tmp_path / "c.npy", x[6])  # a single sample without batch axis
    source = open_data(tmp_path)
    assert source.num_samples() is None  # a file may hold one sample or a batch: unknown until read
    batches = collect(source, IMAGE, 4)
    assert [b.size for b in batches] == [4, 3]
    np.testing.assert_array_equal(stacked(batches), x)
    assert source.num_samples() == 7


def test_npy_folder_with_one_subfolder_per_input(tmp_path: Path):
    ids = np.arange(12, dtype=np.int64).reshape(4, 3)
    mask = np.ones((4, 3), dtype=np.int64)
    for i in range(4):
        (tmp_path / "input_ids").mkdir(exist_ok=True)
        (tmp_path / "attention_mask").mkdir(exist_ok=True)
        np.save(tmp_path / "input_ids" / f"{i}.npy", ids[i])
        np.save(tmp_path / "attention_mask" / f"{i}.npy", mask[i])
    specs = [InputSpec("input_ids", ("N", 3), np.dtype(np.int64)),
             InputSpec("attention_mask", ("N", 3), np.dtype(np.int64))]
    batches = collect(open_data(tmp_path), specs, 3)
    assert [b.size for b in batches] == [3, 1]
    np.testing.assert_array_equal(stacked(batches, "input_ids"), ids)
    np.testing.assert_array_equal(stacked(batches, "attention_mask"), mask)


def test_npy_folder_errors(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a" / "0.npy", np.zeros(3))
    np.save(tmp_path / "a" / "1.npy", np.zeros(3))
    np.save(tmp_path / "b" / "0.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"different numbers of files \('a' has 2, 'b' has 1\)"):
        NpyFolderSource(tmp_path)

    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for i in range(3):
        np.save(labelled / f"{i}.npy", samples(1)[0])
    np.save(labelled / "y.npy", np.arange(2))
    with pytest.raises(DataError, match=r"'y.npy' holds 2 labels, fewer than the samples"):
        collect(open_data(labelled), IMAGE)


# -- image folders -------------------------------------------------------------------------------------------------


def test_image_folder_with_class_subfolders(tmp_path: Path):
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "ant": (0, 0, 255)}
    for name, color in colors.items():
        for i in range(2):
            solid_image(tmp_path / "imgs" / name / f"{i}.png", color)
    (tmp_path / "imgs" / "empty").mkdir()  # still a class, so indices do not shift
    source = open_data(tmp_path / "imgs", preprocess={"resize": [8, 8]})
    assert isinstance(source, ImageFolderSource)
    assert source.classes == ["ant", "cat", "dog", "empty"]
    assert source.has_labels() and source.num_samples() == 6
    assert "6 samples" in source.description and "4 classes" in source.description

    batches = collect(source, IMAGE, 4)
    assert [b.size for b in batches] == [4, 2]
    np.testing.assert_array_equal(all_labels(batches), [0, 0, 1, 1, 2, 2])
    x = stacked(batches)
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [0, 0, 1])  # ant: blue, scaled by 1/255
    np.testing.assert_allclose(x[2, :, 0, 0], [1, 0, 0])  # cat: red
    check_labels(all_labels(batches), num_classes=4)


def test_image_preprocess_scale_mean_std_bgr_nhwc(tmp_path: Path):
    solid_image(tmp_path / "a.png", (10, 20, 30), size=(16, 12))
    preprocess = ImagePreprocess(resize=8, crop=(6, 4), scale=1.0, mean=(1, 2, 3), std=(2, 4, 8),
                                 channel_order="BGR", layout="NHWC")
    batch = collect(ImageFolderSource(tmp_path, preprocess), spec(shape=("N", 6, 4, 3)))[0]
    x = batch.inputs["x"]
    assert x.shape == (1, 6, 4, 3) and batch.labels is None
    np.testing.assert_allclose(x[0, 0, 0], [(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8])


def test_image_resize_shorter_side_and_center_crop():
    preprocess = ImagePreprocess(resize=8, crop=6)
    image = Image.new("RGB", (16, 12))  # width 16, height 12 -> 10x8 (W x H)
    assert preprocess._resized(16, 12) == (10, 8)
    assert preprocess.apply(image).shape == (3, 6, 6)


def test_text_line_resize_to_height_and_pad_right(tmp_path: Path):
    solid_image(tmp_path / "lines" / "short.png", (255, 255, 255), size=(40, 20))  # -> 96 wide, padded
    solid_image(tmp_path / "lines" / "wide.png", (255, 255, 255), size=(400, 20))  # -> capped at 192
    preprocess = {"resize_height": 48, "pad_width": 192, "mean": 0.5, "std": 0.5}
    source = open_data(tmp_path / "lines", preprocess=preprocess)
    x = stacked(collect(source, spec(shape=(-1, 3, "?", "?")), 2))
    assert x.shape == (2, 3, 48, 192)
    assert np.all(x[0, :, :, :96] == 1.0) and np.all(x[0, :, :, 96:] == 0.0)
    assert np.all(x[1] == 1.0)


def test_text_line_images_feed_the_paddle_classifier(tmp_path: Path, paddle_cls_path: Path):
    rng = np.random.default_rng(0)
    for i, width in enumerate((60, 150, 300)):
        pixels = rng.integers(0, 256, (32, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"line{i}.jpg")
    (tmp_path / "preprocess.yaml").write_text(
        "resize_height: 48\npad_width: 192\nmean: [0.5, 0.5, 0.5]\nstd: [0.5, 0.5, 0.5]\n")
    specs = input_specs(load_model(paddle_cls_path))
    source = open_data(tmp_path)
    assert source.preprocess.pad_width == 192  # read from the folder's preprocess.yaml
    session = ort.InferenceSession(str(paddle_cls_path), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, batch.inputs)[0] for batch in source.iter_batches(specs, batch_size=2)]
    assert sum(o.shape[0] for o in outputs) == 3 and all(np.isfinite(o).all() for o in outputs)


def test_image_preprocess_from_files_and_dicts(tmp_path: Path):
    (tmp_path / "p.json").write_text(json.dumps({"resize": "32x64", "layout": "nhwc", "channels": 1,
                                                 "dtype": "uint8", "scale": 1}))
    loaded = ImagePreprocess.from_file(tmp_path / "p.json")
    assert loaded.resize == (32, 64) and loaded.layout == "NHWC" and loaded.dtype == "uint8"
    assert ImagePreprocess.from_dict(loaded.to_dict()) == loaded
    (tmp_path / "p.yaml").write_text("preprocess:\n  crop: 10\n")
    assert ImagePreprocess.from_file(tmp_path / "p.yaml").crop == (10, 10)

    pixels = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    x = loaded.apply(Image.fromarray(pixels, mode="L").resize((64, 32)))
    assert x.shape == (32, 64, 1) and x.dtype == np.uint8

    with pytest.raises(DataError, match=r"unknown setting\(s\) 'resize_to'; allowed: resize, resize_height"):
        ImagePreprocess.from_dict({"resize_to": 224})
    with pytest.raises(DataError, match=r"'layout' must be NCHW or NHWC, got 'CHW'"):
        ImagePreprocess(layout="CHW")
    with pytest.raises(DataError, match=r"'mean' has 2 values; give 1 or 3"):
        ImagePreprocess(mean=(0.1, 0.2))
    with pytest.raises(DataError, match=r"either 'resize' or 'resize_height'"):
        ImagePreprocess(resize=8, resize_height=8)
    (tmp_path / "broken.yaml").write_text("resize: [1, 2\n")
    with pytest.raises(DataError, match=r"broken.yaml' cannot be parsed"):
        ImagePreprocess.from_file(tmp_path / "broken.yaml")


def test_image_errors_name_the_file(tmp_path: Path):
    solid_image(tmp_path / "ok.png", (0, 0, 0), size=(10, 10))
    with pytest.raises(DataError, match=r"image 'ok.png': input 'x': data has shape \(1, 3, 10, 10\), model "
                                        r"expects \(N, 3, 8, 8\); adjust resize"):
        collect(open_data(tmp_path), IMAGE)
    with pytest.raises(DataError, match=r"image 'ok.png' is 10x10 \(HxW\) after resizing, smaller than the crop"):
        collect(open_data(tmp_path, preprocess={"crop": 16}), IMAGE)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"image 'bad.jpg' cannot be decoded"):
        collect(open_data(tmp_path, preprocess={"resize": [8, 8]}), IMAGE)


# -- iterables and readers -----------------------------------------------------------------------------------------


def test_iterable_of_dicts_arrays_and_pairs():
    x = samples(6)
    as_dicts = [{"x": x[i], "y": i} for i in range(6)]
    as_arrays = [x[:4], x[4:]]  # batches
    as_pairs = [(x[i], np.int64(i % 2)) for i in range(6)]
    for items, labelled in ((as_dicts, True), (as_arrays, False), (as_pairs, True)):
        source = open_data(items)
        assert isinstance(source, IterableSource) and source.has_labels() is labelled
        batches = collect(source, IMAGE, 4)
        assert [b.size for b in batches] == [4, 2]
        np.testing.assert_array_equal(stacked(batches), x)
    np.testing.assert_array_equal(all_labels(collect(open_data(as_dicts), IMAGE, 4)), np.arange(6))


def test_iterable_with_positional_inputs_and_factories():
    a, b = samples(3), samples(3, seed=1)
    specs = [InputSpec("a", ("N", 3, 8, 8), F32), InputSpec("b", ("N", 3, 8, 8), F32)]
    items = [((a[i], b[i]), None) for i in range(3)]
    batches = collect(open_data(lambda: iter(items)), specs, 3)
    np.testing.assert_array_equal(batches[0].inputs["b"], b)
    assert open_data(lambda: iter(items)).num_samples() is None


def test_generator_is_buffered_and_iterated_twice():
    x = samples(5)
    produced = []

    def generate():
        for i in range(5):
            produced.append(i)
            yield {"x": x[i]}

    source = open_data(generate())
    assert produced == [0, 1, 2, 3, 4]  # consumed once, up front
    first, second = collect(source, IMAGE, 2), collect(source, IMAGE, 2)
    assert_same_batches(first, second)
    np.testing.assert_array_equal(stacked(first), x)
    assert source.num_samples() == 5


def test_ort_reader_is_consumed_once_but_iterated_twice(tmp_path: Path):
    x = samples(6)
    reader = Reader([{"x": x[:2]}, {"x": x[2:5]}, {"x": x[5:]}])
    source = open_data(reader)
    assert isinstance(source, ReaderSource)
    assert reader.calls == 4 and source.num_samples() == 6 and not source.has_labels()
    first, second = collect(source, IMAGE, 4), collect(source, IMAGE, 4)
    assert reader.calls == 4  # never asked again
    assert_same_batches(first, second)
    np.testing.assert_array_equal(stacked(first), x)
    buffer = source._spool.path
    assert buffer.exists()
    source.close()
    assert not buffer.exists()


def test_ort_calibration_data_reader_subclass():
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": samples(1, seed=i)} for i in range(3)])

        def get_next(self):
            return next(self.items, None)

    source = open_data(Feeds())
    assert [b.size for b in collect(source, IMAGE, 2)] == [2, 1]
    assert [b.size for b in collect(source, IMAGE, 2)] == [2, 1]


def test_failing_iterable_is_a_data_error():
    def broken():
        yield samples(1)[0]
        raise RuntimeError("disk gone")

    with pytest.raises(DataError, match=r"reading item 1 failed: RuntimeError: disk gone"):
        open_data(broken())


def test_torch_dataloader_pairs():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(samples(5))
    y = torch.arange(5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2, shuffle=False)
    batches = collect(open_data(loader), IMAGE, 3)
    assert [b.size for b in batches] == [3, 2]
    np.testing.assert_array_equal(all_labels(batches), np.arange(5))


# -- in-memory arrays ----------------------------------------------------------------------------------------------


def test_arrays_and_dicts_of_arrays():
    x = samples(5)
    np.testing.assert_array_equal(stacked(collect(open_data(x), IMAGE, 2)), x)
    source = open_data({"x": x, "y": np.arange(5)})
    assert isinstance(source, ArraySource) and source.has_labels() and source.num_samples() == 5
    np.testing.assert_array_equal(all_labels(collect(source, IMAGE, 2)), np.arange(5))
    source = ArraySource(x, labels=np.zeros(5, dtype=np.int32))
    assert all_labels(collect(source, IMAGE, 5)).dtype == np.int64


def test_a_sample_without_batch_axis_gets_one():
    x = samples(1)[0]
    batch = collect(open_data(x), IMAGE)[0]
    assert batch.inputs["x"].shape == (1, 3, 8, 8)
    assert open_data(x).sample_shapes(IMAGE) == {"x": (1, 3, 8, 8)}


def test_batches_run_through_onnxruntime(tmp_path: Path):
    from onnx_builders import conv_classifier, save

    path = save(conv_classifier(batch="N"), tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", input=samples(5).astype(np.float64), y=np.arange(5) % 4)
    specs = input_specs(load_model(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = [session.run(None, b.inputs)[0] for b in open_data(tmp_path / "data.npz").iter_batches(specs, 2)]
    assert [len(out) for out in logits] == [2, 2, 1]


# -- random data ---------------------------------------------------------------------------------------------------


def test_random_data_shapes_dtypes_and_determinism():
    specs = [InputSpec("image", ("N", 3, 4, 4), F32), InputSpec("ids", ("N", 6), np.dtype(np.int64)),
             InputSpec("mask", ("N", 6), np.dtype(bool)), InputSpec("raw", ("N", 2), np.dtype(np.uint8)),
             InputSpec("half", ("N", 2), np.dtype(np.float16))]
    source = open_data("random:5", seed=3)
    assert isinstance(source, RandomSource) and source.synthetic and source.num_samples() == 5
    assert "random" in source.description and "synthetic" in source.description
    batches = collect(source, specs, 2)
    assert [b.size for b in batches] == [2, 2, 1] and all(b.labels is None for b in batches)
    assert {n: a.dtype for n, a in batches[0].inputs.items()} == {s.name: s.dtype for s in specs}
    ids = stacked(batches, "ids")
    assert ids.min() >= 0 and ids.max() <= 9
    assert stacked(batches, "image").std() > 0.5
    assert_same_batches(batches, collect(source, specs, 2))
    # values do not depend on the batch size, and the seed matters
    np.testing.assert_array_equal(stacked(collect(source, specs, 5), "image"), stacked(batches, "image"))
    assert not np.array_equal(stacked(collect(random_data(5, seed=4), specs, 5), "image"), stacked(batches, "image"))
    assert open_data("random").num_samples() == 8


def test_random_data_needs_shapes_for_dynamic_dims():
    specs = [InputSpec("x", ("batch", 3, "height", "width"), F32)]
    with pytest.raises(DataError, match=r"input 'x' has dynamic dims \(batch, 3, height, width\); give its shape"):
        collect(random_data(), specs)
    source = open_data("random:2", input_shapes={"x": (1, 3, 16, 24)})
    assert stacked(collect(source, specs, 2)).shape == (2, 3, 16, 24)


def test_random_data_fills_one_fixed_batch():
    batches = collect(random_data(3), spec(shape=(4, 3, 8, 8)))
    assert [b.size for b in batches] == [4]


# -- open_data -----------------------------------------------------------------------------------------------------


def test_open_data_passes_sources_through_and_refuses_the_unknown(tmp_path: Path):
    source = random_data()
    assert open_data(source) is source
    with pytest.raises(DataError, match=r"data path '.*missing.npz' does not exist"):
        open_data(tmp_path / "missing.npz")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"data file '.*data.csv' is not a .npz or .npy file"):
        open_data(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data folder '.*empty' is empty \(expected .npy files or images"):
        open_data(tmp_path / "empty")
    with pytest.raises(DataError, match=r"cannot use 42 \(int\) as data; expected a .npz"):
        open_data(42)
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"fake.npz' is not a readable .npz file"):
        open_data(tmp_path / "fake.npz")
    assert issubclass(DataError, BadInputError)


# -- validation ----------------------------------------------------------------------------------------------------


def test_input_names_must_match_and_both_are_listed():
    with pytest.raises(DataError, match=r"data has inputs \['images'\] but the model's inputs are \['x'\] "
                                        r"\(missing 'x'; unknown 'images'\)"):
        collect(open_data({"images": samples(2)}), IMAGE)
    specs = [InputSpec("a", ("N", 3), F32), InputSpec("b", ("N", 3), F32)]
    with pytest.raises(DataError, match=r"1 unnamed array\(s\) but the model has 2 inputs \['a', 'b'\]"):
        collect(open_data(np.zeros((2, 3), np.float32)), specs)


def test_shape_mismatch_names_the_input_and_both_shapes():
    with pytest.raises(DataError, match=r"input 'x': data has shape \(1, 3, 32, 32\), model expects "
                                        r"\(N, 3, 48, 192\)"):
        collect(open_data(samples(1, (3, 32, 32))), spec(shape=("N", 3, 48, 192)))
    with pytest.raises(DataError, match=r"input 'x': data has shape \(2, 5, 3, 8, 8\), model expects \(N, 3, 8, 8\)"):
        collect(open_data(np.zeros((2, 5, 3, 8, 8), np.float32)), IMAGE)


def test_dtype_casts_that_keep_values_and_refusals():
    batch = collect(open_data(samples(2).astype(np.float64)), IMAGE, 2)[0]
    assert batch.inputs["x"].dtype == np.float32
    ids = collect(open_data(np.arange(6, dtype=np.int32).reshape(2, 3)), spec(shape=("N", 3), dtype=np.int64))[0]
    assert ids.inputs["x"].dtype == np.int64
    mask = collect(open_data(np.array([[0, 1, 1]])), spec(shape=("N", 3), dtype=bool))[0]
    assert mask.inputs["x"].dtype == bool
    with pytest.raises(DataError, match=r"input 'x': data is float32 but the model expects int64; float data is "
                                        r"not cast to an integer input"):
        collect(open_data(np.zeros((2, 3), np.float32)), spec(shape=("N", 3), dtype=np.int64))
    with pytest.raises(DataError, match=r"data is int64 but the model expects int32; values range 0\.\.4294967296"):
        collect(open_data(np.array([[0, 2**32]])), spec(shape=("N", 2), dtype=np.int32))
    with pytest.raises(DataError, match=r"a bool input takes bool data"):
        collect(open_data(np.array([[0, 2]])), spec(shape=("N", 2), dtype=bool))


def test_nan_and_inf_name_the_input_and_sample():
    x = samples(6)
    x[4, 1, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"input 'x': sample 4 contains NaN"):
        collect(open_data(x), IMAGE, 4)
    y = samples(3)
    y[2, 0, 0, 0] = -np.inf
    with pytest.raises(DataError, match=r"input 'x': sample 2 contains Inf"):
        collect(open_data([y[0], y[1], y[2]]), IMAGE, 1)
    big = np.full((2, 2), 1e6, dtype=np.float32)
    with pytest.raises(DataError, match=r"input 'x': sample 0 has values that overflow float16"):
        collect(open_data(big), spec(shape=("N", 2), dtype=np.float16))


def test_empty_sources_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match=r"holds no samples"):
        collect(open_data([]), IMAGE)
    with pytest.raises(DataError, match=r"holds no samples"):
        collect(open_data(Reader([])), IMAGE)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"npz '.*empty.npz' is empty: it holds no samples"):
        collect(open_data(tmp_path / "empty.npz"), IMAGE)
    np.savez(tmp_path / "labels_only.npz", y=np.arange(3))
    with pytest.raises(DataError, match=r"holds no input arrays \(only labels 'y'\)"):
        open_data(tmp_path / "labels_only.npz")


def test_label_checks():
    with pytest.raises(DataError, match=r"label -1 of sample 1 is negative"):
        collect(open_data({"x": samples(2), "y": np.array([0, -1])}), IMAGE)
    with pytest.raises(DataError, match=r"labels must be integer class indices, got float64"):
        collect(open_data({"x": samples(2), "y": np.array([0.0, 1.0])}), IMAGE)
    with pytest.raises(DataError, match=r"one-hot labels\?"):
        collect(open_data({"x": samples(2), "y": np.eye(2, dtype=np.int64)}), IMAGE)
    with pytest.raises(DataError, match=r"sample 1 has no labels but earlier samples do"):
        collect(open_data([(samples(1)[0], 0), (samples(1)[0], None)]), IMAGE)
    np.testing.assert_array_equal(check_labels([0, 3, 2], num_classes=4), [0, 3, 2])
    with pytest.raises(DataError, match=r"label 7 of sample 1 is out of range for a model with 4 classes "
                                        r"\(labels must be 0\.\.3\)"):
        check_labels(np.array([1, 7, 2]), num_classes=4)


def test_fixed_batch_dim_gets_exact_batches_and_drops_the_tail():
    x = samples(10)
    batches = collect(open_data(x), spec(shape=(4, 3, 8, 8)), batch_size=3)  # batch_size is overridden
    assert [b.size for b in batches] == [4, 4]
    np.testing.assert_array_equal(stacked(batches), x[:8])
    one = collect(open_data(x), spec(shape=(1, 3, 8, 8)), batch_size=16)
    assert len(one) == 10 and all(b.size == 1 for b in one)
    with pytest.raises(DataError, match=r"holds 3 samples, fewer than the model's fixed batch size of 4"):
        collect(open_data(samples(3)), spec(shape=(4, 3, 8, 8)))


def test_samples_of_different_shapes_are_not_mixed_in_a_batch():
    items = [np.zeros((3, 8, w), np.float32) for w in (5, 5, 5, 7, 7)]
    batches = collect(open_data(items), spec(shape=("N", 3, 8, "W")), batch_size=4)
    assert [b.inputs["x"].shape for b in batches] == [(3, 3, 8, 5), (2, 3, 8, 7)]
    with pytest.raises(DataError, match=r"input 'x': sample 3 has shape \(3, 8, 7\), earlier samples \(3, 8, 5\)"):
        collect(open_data(items), spec(shape=(2, 3, 8, "W")))


def test_bad_batch_size_is_refused():
    with pytest.raises(DataError, match=r"batch size must be at least 1"):
        random_data().iter_batches(IMAGE, 0)


@pytest.mark.parametrize("kind", ["npz", "npy_folder", "images", "iterable", "generator", "reader", "arrays",
                                  "random"])
def test_two_iterations_are_identical(kind: str, tmp_path: Path):
    x = samples(7)
    if kind == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=np.arange(7))
        spec_ = tmp_path / "d.npz"
    elif kind == "npy_folder":
        for i in range(7):
            np.save(tmp_path / f"{i}.npy", x[i])
        spec_ = tmp_path
    elif kind == "images":
        rng = np.random.default_rng(0)
        for i in range(7):
            (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
        spec_ = tmp_path
    elif kind == "iterable":
        spec_ = [x[i] for i in range(7)]
    elif kind == "generator":
        spec_ = (x[i] for i in range(7))
    elif kind == "reader":
        spec_ = Reader([{"x": x[i:i + 2]} for i in range(0, 7, 2)])
    elif kind == "arrays":
        spec_ = {"x": x}
    else:
        spec_ = "random:7"
    source = open_data(spec_, seed=5)
    first, second = collect(source, IMAGE, 3), collect(source, IMAGE, 3)
    assert sum(b.size for b in first) == 7
    assert_same_batches(first, second)
    assert source.num_samples() == 7


MATMUL = [InputSpec("a", (2, 3), F32), InputSpec("b", (3, 4), F32)]  # no batch axis: the leading dims differ


def test_arrays_one_rank_above_the_inputs_are_stacks_of_whole_feeds(tmp_path: Path):
    """A model without a batch axis (a MatMul of [2, 3] by [3, 4]) gets its calibration samples stacked on a new
    first axis: each is one whole feed, one sample, fed as it is; labels go one per feed."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 2, 3)).astype(np.float32), rng.normal(size=(5, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "mm.npz", a=a, b=b, y=np.arange(5))
    for source in (NpzSource(tmp_path / "mm.npz"), ArraySource({"a": a, "b": b}, labels=np.arange(5))):
        assert source.num_samples() == 5
        batches = collect(source, MATMUL, batch_size=4)
        assert len(batches) == 5 and all(batch.is_feed and batch.size == 1 for batch in batches)
        assert [batch.inputs["a"].shape for batch in batches] == [(2, 3)] * 5
        np.testing.assert_array_equal(np.stack([batch.inputs["b"] for batch in batches]), b)
        np.testing.assert_array_equal(all_labels(batches), np.arange(5))
        assert [batch.size for batch in source.iter_samples(MATMUL, 3)] == [1, 1, 1]
    feeds = collect(IterableSource([{"a": a[i:i + 2], "b": b[i:i + 2]} for i in (0, 2)]), MATMUL)
    assert len(feeds) == 4 and feeds[3].inputs["a"].shape == (2, 3)
    reader = collect(IterableSource([{"a": a[i], "b": b[i]} for i in range(5)]), MATMUL)  # an ORT reader's feeds
    assert len(reader) == 5 and all(batch.is_feed for batch in reader)
    np.testing.assert_array_equal(reader[4].inputs["b"], b[4])


def test_npy_files_of_a_model_without_a_batch_axis_are_one_feed_each(tmp_path: Path):
    for name, shape in (("a", (2, 3)), ("b", (3, 4))):
        (tmp_path / name).mkdir()
        for i in range(3):
            np.save(tmp_path / name / f"{i}.npy", np.full(shape, i, np.float32))
    source = open_data(tmp_path)
    batches = collect(source, MATMUL, batch_size=4)
    assert source.num_samples() == 3 and [b.is_feed for b in batches] == [True] * 3
    assert batches[2].inputs["a"].shape == (2, 3) and batches[2].inputs["b"][0, 0] == 2


def test_stacked_feeds_are_checked_feed_by_feed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 2, 3)).astype(np.float32), rng.normal(size=(4, 3, 4)).astype(np.float32)
    with pytest.raises(DataError, match="input 'a' is a stack of feeds .* but input 'b' is not"):
        collect(ArraySource({"a": a, "b": b[0]}), MATMUL)
    with pytest.raises(DataError, match=r"input 'a': feed 0 has shape \(3, 3\), model expects \(2, 3\)"):
        collect(ArraySource({"a": rng.normal(size=(4, 3, 3)).astype(np.float32), "b": b}), MATMUL)
    with pytest.raises(DataError, match=r"'b' has 3"):
        collect(ArraySource({"a": a, "b": b[:3]}), MATMUL)
    broken = a.copy()
    broken[2, 1, 1] = np.nan
    with pytest.raises(DataError, match="input 'a'.*sample 2"):
        collect(ArraySource({"a": broken, "b": b}), MATMUL)
    one_row = [InputSpec("x", (1, 4), F32)]  # a fixed batch of 1: rows, or feeds stacked; not both
    with pytest.raises(DataError, match="sample 2 is a stack of feeds but earlier samples are not"):
        collect(IterableSource([np.zeros(4, np.float32), np.zeros((1, 4), np.float32),
                                np.zeros((3, 1, 4), np.float32)]), one_row)
    with pytest.raises(DataError, match=r"data has shape \(2, 3, 3, 8, 8\), model expects \(N, 3, 8, 8\)"):
        collect(open_data(np.zeros((2, 3, 3, 8, 8), np.float32)), IMAGE)  # a batch axis: one rank above is wrong


def test_a_model_without_a_batch_axis_is_quantized_from_stacked_feeds(tmp_path: Path):
    """The pipeline end to end: calibration, the placement search's checks and the evaluation run one feed per
    sample; the report counts feeds as samples."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import onnxopt

    weight = numpy_helper.from_array(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["ab"], name="mm"), helper.make_node("MatMul", ["ab", "w"], ["y"],
                                                                                    name="head")],
        "mm", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
               helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], [weight])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", a=rng.normal(size=(12, 2, 3)).astype(np.float32),
             b=rng.normal(size=(12, 3, 4)).astype(np.float32))
    result = onnxopt.optimize(str(path), ["normalize", {"name": "quantize", "placement": "all"}],
                              calib=str(tmp_path / "calib.npz"), output=tmp_path / "out.onnx", plot=False,
                              measure_latency=False)
    report = result.report.to_dict()
    assert report["data"]["calib"]["samples"] == 12
    assert report["steps"][-1]["details"]["calib_samples"] == 12
    assert report["steps"][-1]["fidelity_vs_original"]["sqnr_db"] > 20
    assert any(node.op_type == "DequantizeLinear" for node in onnx.load(str(tmp_path / "out.onnx")).graph.node)


def test_training_refuses_stacked_feeds():
    from onnxopt.passes.distill.data import load

    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="stack of whole feeds"):
        load({"a": rng.normal(size=(4, 2, 3)).astype(np.float32), "b": rng.normal(size=(4, 3, 4)).astype(np.float32)},
             MATMUL)
