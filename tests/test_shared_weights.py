"""SharedWeights: one copy of a large model's weights for all its ORT sessions, linked from the input where it can."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.calib_data import open_data
from onnxopt.modelio import file_sha256, proto_tensor_bytes, to_proto, with_tensor_data
from onnxopt.passes.quantize import QuantizePass
from onnxopt.pipeline.context import PassContext
from onnxopt.shared_weights import INLINE_BELOW_BYTES, SharedWeights, external_sources

WIDTH = 64


def mlp_on_disk(folder: Path) -> Path:
    """Two MatMul+Relu layers whose weights (16 KB each) live in ``mlp.bin``; the bias stays inline (small)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="mm0"),
             helper.make_node("Add", ["m0", "b"], ["a0"], name="add0"),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["y"], name="mm1")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="mlp.bin", size_threshold=INLINE_BELOW_BYTES)
    return path


def outputs(path: Path, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(names, {"x": x})


@pytest.fixture
def on_disk(tmp_path):
    path = mlp_on_disk(tmp_path)
    model = ir.load(path)  # tensors stay external, as a model above the external-data threshold keeps them
    proto = with_tensor_data(model)
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return model, proto, x, reference.run(["y"], {"x": x})[0]


def test_external_sources_name_the_input_files_weights(on_disk, tmp_path):
    model, _, _, _ = on_disk
    sources = external_sources(model)
    assert set(sources) == {"w0", "w1"}  # the bias was stored inline
    assert all(s.path == (tmp_path / "mlp.bin").resolve() and s.length == WIDTH * WIDTH * 4
               for s in sources.values())
    assert sources["w1"].offset >= WIDTH * WIDTH * 4


def test_weights_are_linked_from_the_input_and_written_nowhere(on_disk, tmp_path):
    model, proto, x, expected = on_disk
    data = tmp_path / "mlp.bin"
    digest = file_sha256(data)
    with SharedWeights(proto, external_sources(model)) as shared:
        first = shared.model_file()
        np.testing.assert_array_equal(outputs(first, ["y"], x)[0], expected)
        assert shared.written_bytes == 0 and shared.linked_bytes == 2 * WIDTH * WIDTH * 4
        # the graph changes (calibration exposes an activation): a new small file, no weight placed again
        proto.graph.output.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, None))
        second = shared.model_file()
        y, r0 = outputs(second, ["y", "r0"], x)
        np.testing.assert_array_equal(y, expected)
        assert r0.shape == (3, WIDTH) and shared.linked_bytes == 2 * WIDTH * WIDTH * 4
        assert first != second and second.stat().st_size < INLINE_BELOW_BYTES * 2  # graph and bias only
        folder = second.parent
        assert data.stat().st_nlink == 2  # the folder's link to the input's data file
    assert not folder.exists()
    assert data.stat().st_nlink == 1 and file_sha256(data) == digest  # the input as it was


def test_without_sources_the_weights_are_written_once(on_disk):
    _, proto, x, expected = on_disk
    with SharedWeights(proto) as shared:
        for _ in range(2):
            np.testing.assert_array_equal(outputs(shared.model_file(), ["y"], x)[0], expected)
            assert shared.written_bytes == 2 * WIDTH * WIDTH * 4 and shared.linked_bytes == 0


def test_a_link_that_fails_means_a_write(on_disk, monkeypatch):
    """Another filesystem (EXDEV), or no permission: the bytes are written to the folder instead."""
    model, proto, x, expected = on_disk

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    with SharedWeights(proto, external_sources(model)) as shared:
        np.testing.assert_array_equal(outputs(shared.model_file(), ["y"], x)[0], expected)
        assert shared.linked_bytes == 0 and shared.written_bytes == 2 * WIDTH * WIDTH * 4


def test_a_source_of_another_size_is_not_trusted(on_disk):
    """A weight whose bytes no longer match its recorded source (another length) is written, not linked."""
    model, proto, x, expected = on_disk
    sources = external_sources(model)
    sources["w1"] = type(sources["w1"])(sources["w1"].path, 0, 8)
    with SharedWeights(proto, sources) as shared:
        np.testing.assert_array_equal(outputs(shared.model_file(), ["y"], x)[0], expected)
        assert shared.linked_bytes == shared.written_bytes == WIDTH * WIDTH * 4


def test_quantize_makes_no_whole_copy_of_a_large_fp32_model(on_disk, tmp_path, monkeypatch):
    """Calibration and the placement search's sessions of the FP32 model read the shared files (the model counts as
    large here: FILE_FROM_BYTES forced to 0), and the int8 model is the one made without them."""
    from onnxopt import modelio
    from onnxopt.passes.quantize import placement

    model, _, _, _ = on_disk
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, WIDTH)).astype(np.float32))

    def quantize(placement_mode: str) -> onnx.ModelProto:
        context = PassContext(calib=open_data(str(tmp_path / "calib.npz")))
        loaded = ir.load(tmp_path / "mlp.onnx")
        return to_proto(QuantizePass(placement=placement_mode).bind(context).apply(loaded))

    reference = quantize("all").SerializeToString()
    fp32_bytes = proto_tensor_bytes(with_tensor_data(model))
    copies: list[int] = []
    real = modelio.proto_file

    @contextlib.contextmanager
    def spy(proto):
        copies.append(proto_tensor_bytes(proto))
        with real(proto) as path:
            yield path

    monkeypatch.setattr(modelio, "proto_file", spy)
    monkeypatch.setattr(placement, "FILE_FROM_BYTES", 0)
    assert quantize("all").SerializeToString() == reference
    searched = quantize("auto")
    onnx.checker.check_model(searched, full_check=True)
    assert fp32_bytes not in copies  # int8 candidates may go to files; the FP32 model never again


def test_quantize_without_room_for_the_shared_files_works_from_memory(on_disk, tmp_path, monkeypatch):
    """A temporary folder that cannot take the weights: calibration and the search's sessions read the model from
    memory (the search's pool already did), and the pass ends as it would have."""
    import errno

    from onnxopt.passes.quantize import placement
    from onnxopt.shared_weights import SharedWeights as Shared

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, WIDTH)).astype(np.float32))

    def quantize() -> bytes:
        context = PassContext(calib=open_data(str(tmp_path / "calib.npz")))
        step = QuantizePass(placement="all").bind(context)
        return to_proto(step.apply(ir.load(tmp_path / "mlp.onnx"))).SerializeToString()

    reference = quantize()
    monkeypatch.setattr(placement, "FILE_FROM_BYTES", 0)
    monkeypatch.setattr(Shared, "model_file", full)
    assert quantize() == reference
