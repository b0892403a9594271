"""The shipped example (onnxopt/examples/) and the example zoo (onnxopt/zoo/nets.py).

Nothing here trains: the shipped files are checked as they are, and the data pipeline of
examples/build_default_model.py (numpy + scikit-learn only) is re-run to show the .npz files are what it makes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import examples
from onnxopt.runtime import make_session

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "build_default_model.py"
CALIB_SIZE, EVAL_SIZE = 300, 400
INPUT_SHAPE = (3, 32, 32)


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    """examples/build_default_model.py as a module (its top level imports only numpy and the standard library)."""
    return _load_script("build_default_model", SCRIPT)


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads(examples.default_info_path().read_text())


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_shipped_files_exist_and_are_small():
    paths = [examples.default_model_path(), examples.default_calib_path(), examples.default_eval_path(),
             examples.default_info_path()]
    for path in paths:
        assert isinstance(path, Path) and path.is_file() and path.parent == examples.EXAMPLES_DIR
    assert examples.default_model_path().stat().st_size < 1.5e6
    assert sum(p.stat().st_size for p in paths) < 3e6


def test_examples_module_does_not_import_torch():
    code = "import sys, onnxopt.examples as e; e.default_model_path(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_model_passes_checker_with_expected_io(info):
    model = onnx.load(examples.default_model_path())
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 13)]
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    in_dims = graph_input.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].dim_value  # dynamic batch
    assert tuple(d.dim_value for d in in_dims[1:]) == INPUT_SHAPE
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = graph_output.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 10
    ops = [node.op_type for node in model.graph.node]
    # The normalizer is meant to find work: inference-form BN after Conv, depthwise convs and residual adds.
    batchnorms = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    assert len(batchnorms) == info["batchnorm_nodes"] > 20
    assert all(len(node.output) == 1 for node in batchnorms)
    assert "Dropout" not in ops and ops.count("Add") >= 3
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) >= 5


@pytest.mark.parametrize("which, size", [("calib", CALIB_SIZE), ("eval", EVAL_SIZE)])
def test_npz_matches_model_input(which, size):
    path = examples.default_calib_path() if which == "calib" else examples.default_eval_path()
    data = _npz(path)
    assert set(data) == {"input", "y"}
    x, y = data["input"], data["y"]
    assert x.dtype == np.float32 and x.shape == (size, *INPUT_SHAPE)
    assert y.dtype == np.int64 and y.shape == (size,)
    assert np.isfinite(x).all()
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10 and counts.min() >= size // 10 - 2  # stratified: every class about equally often


def test_onnxruntime_accuracy_on_eval(info):
    session = make_session(examples.default_model_path(), threads=1)
    data = _npz(examples.default_eval_path())
    logits = session.run(["logits"], {"input": data["input"]})[0]
    assert logits.shape == (EVAL_SIZE, 10)
    accuracy = float(np.mean(logits.argmax(1) == data["y"]))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(info["accuracy"]["eval_onnxruntime"], abs=2 / EVAL_SIZE)
    single = session.run(["logits"], {"input": data["input"][:1]})[0]  # the batch dim is dynamic
    np.testing.assert_allclose(single, logits[:1], rtol=1e-4, atol=1e-4)


def test_info_records_the_shipped_files(info):
    assert info["sha256"] == {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (examples.default_model_path(), examples.default_calib_path(), examples.default_eval_path())
    }
    assert info["accuracy"]["eval_torch"] == info["accuracy"]["eval_onnxruntime"] >= 0.95
    assert 100_000 <= info["params"] <= 300_000 and 5e6 <= info["macs_per_image"] <= 20e6


def test_data_pipeline_reproduces_the_shipped_arrays(builder, info):
    pytest.importorskip("sklearn")
    splits, norm = builder.build_splits(info["seed"])
    assert norm == {"mean": info["data"]["mean"], "std": info["data"]["std"]}
    for name, path in (("calib", examples.default_calib_path()), ("eval", examples.default_eval_path())):
        shipped = _npz(path)
        x, y = splits[name]
        assert np.array_equal(x, shipped["input"]) and np.array_equal(y, shipped["y"])
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert sizes == {"train": 1797 - CALIB_SIZE - EVAL_SIZE, "calib": CALIB_SIZE, "eval": EVAL_SIZE}


def test_splits_are_disjoint_and_cover_the_dataset(builder):
    labels = np.repeat(np.arange(10), 180)[:1797]
    indices = builder.split_indices(labels, seed=0)
    joined = np.concatenate(list(indices.values()))
    assert len(joined) == len(np.unique(joined)) == 1797


def test_upsampling_is_exact_bilinear(builder):
    weights = builder.bilinear_matrix(8, 32)
    np.testing.assert_array_equal(weights.sum(1), 1.0)
    assert np.all(weights * 8 == np.round(weights * 8))  # dyadic weights: integer pixels upsample exactly
    image = np.arange(64, dtype=np.float64).reshape(1, 8, 8)
    up = builder.upsample(image)
    assert up.shape == (1, 32, 32) and up[0, 0, 0] == 0 and up[0, -1, -1] == 63  # clamped edges
    torch = pytest.importorskip("torch")
    reference = torch.nn.functional.interpolate(torch.from_numpy(image)[:, None], size=32, mode="bilinear",
                                                align_corners=False)[:, 0].numpy()
    np.testing.assert_array_equal(up, reference)


def test_npz_writer_is_deterministic(builder):
    arrays = {"input": np.linspace(-1, 1, 96, dtype=np.float32).reshape(2, 3, 4, 4), "y": np.arange(2)}
    first, second = builder.npz_bytes(arrays), builder.npz_bytes(arrays)
    assert first == second
    with np.load(io.BytesIO(first)) as loaded:
        assert set(loaded.files) == {"input", "y"}
        np.testing.assert_array_equal(loaded["input"], arrays["input"])


@pytest.fixture(scope="module")
def zoo():
    pytest.importorskip("torch")
    from onnxopt.zoo import nets

    return nets


def test_zoo_package_does_not_import_torch():
    code = "import sys, onnxopt.zoo; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet", "shufflenetv2", "vgg"])
def test_zoo_nets_export_with_batchnorm(zoo, name, tmp_path):
    import torch

    net = zoo.build(name, seed=0).eval()
    x = torch.randn(2, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x).numpy()
    assert expected.shape == (2, 10)
    path = tmp_path / f"{name}.onnx"
    data = zoo.export_onnx(net, path)  # exported at batch 1, run at batch 2: the batch dim is dynamic
    assert path.read_bytes() == data
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert any(node.op_type == "BatchNormalization" for node in model.graph.node)
    got = make_session(path, threads=1).run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert zoo.count_params(net) > 50_000 and zoo.count_macs(net) > 1e6
