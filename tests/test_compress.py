"""The compress pass: int8-stored weights that ONNX Runtime folds back at load (a small file at FP32 speed)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt import examples
from onnxopt.calib_data import open_data
from onnxopt.errors import RecipeError
from onnxopt.modelio import as_ir_model, load_model, serialized_size, to_proto
from onnxopt.passes import CompressPass, NormalizePass
from onnxopt.passes.compress import expand_weights
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.quantize.sensitivity import sqnr_db
from onnxopt.pipeline.context import PassContext
from onnxopt.runtime import make_session


@pytest.fixture(scope="module")
def normalized() -> onnx.ModelProto:
    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)
    return to_proto(model)


def _large_weights(model: onnx.ModelProto, min_elements: int = 256) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
               and np.prod(inits[n.input[1]].dims) >= min_elements)


def _x() -> np.ndarray:
    return np.load(examples.default_eval_path())["input"][:64]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_compressed_file_is_small_close_and_valid(normalized):
    step = CompressPass()
    small = step.apply(normalized)
    onnx.checker.check_model(small, full_check=True)
    assert step.details["compressed_weights"] == _large_weights(normalized) >= 20
    ratio = serialized_size(as_ir_model(small)) / serialized_size(as_ir_model(normalized))
    assert ratio < 0.32
    rebuilt = {n.output[0] for n in small.graph.node if n.op_type == "Mul"}
    assert len(rebuilt) == _large_weights(normalized)
    assert rebuilt <= {i.name for i in normalized.graph.initializer}  # the float weights keep their names
    x = _x()
    reference, approx = _run(normalized, x), _run(small, x)
    assert sqnr_db(reference, approx) > 35.0
    assert np.array_equal(reference.argmax(1), approx.argmax(1))
    assert step.details["max_relative_error"] <= 0.5 / 127 + 1e-6  # half a step of the channel's int8 grid


def test_onnx_runtime_folds_the_rebuild_at_load(normalized, tmp_path):
    """What ORT runs after its graph optimizations has no Cast/Mul left: the weights are FP32 initializers again."""
    small = CompressPass().apply(normalized)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(small.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["Cast"] == 0
    assert ops == Counter(n.op_type for n in normalized.graph.node)


def test_expand_weights_restores_initializers_exactly(normalized):
    small = CompressPass().apply(normalized)
    model = as_ir_model(small)
    assert expand_weights(model.graph) == _large_weights(normalized)
    restored = to_proto(model)
    assert Counter(n.op_type for n in restored.graph.node) == Counter(n.op_type for n in normalized.graph.node)
    assert {i.name for i in restored.graph.initializer} == {i.name for i in normalized.graph.initializer}
    x = _x()
    np.testing.assert_array_equal(_run(restored, x), _run(small, x))


def test_quantizing_a_compressed_model_equals_quantizing_the_float_one(normalized):
    def quantize(model: onnx.ModelProto) -> onnx.ModelProto:
        step = QuantizePass(placement="all", calib_samples=32)
        step.bind(PassContext(calib=open_data(str(examples.default_calib_path()))))
        return step.apply(model)

    x = _x()
    via_compress = quantize(CompressPass().apply(normalized))
    direct = quantize(normalized)
    # The same graph; int8-rounded weights can only make more scales and biases identical (shared by compact).
    assert Counter(n.op_type for n in via_compress.graph.node) == Counter(n.op_type for n in direct.graph.node)
    assert abs(via_compress.ByteSize() - direct.ByteSize()) <= 0.005 * direct.ByteSize()
    assert np.array_equal(_run(via_compress, x).argmax(1), _run(direct, x).argmax(1))


def test_small_and_excluded_weights_stay_float(normalized):
    conv = next(n for n in normalized.graph.node if n.op_type == "Conv")
    step = CompressPass(exclude_nodes=[conv.name], min_elements=10**9)
    same = step.apply(normalized)
    assert step.details["compressed_weights"] == 0 and "nothing to compress" in step.notes[0]
    assert Counter(n.op_type for n in same.graph.node) == Counter(n.op_type for n in normalized.graph.node)
    step = CompressPass(exclude_nodes=[conv.name])
    step.apply(normalized)
    assert step.details["compressed_weights"] == _large_weights(normalized) - (
        np.prod(next(i for i in normalized.graph.initializer if i.name == conv.input[1]).dims) >= 256)
    with pytest.raises(ValueError, match="op_types"):
        CompressPass(op_types=["Relu"])
    with pytest.raises(RecipeError, match="not in the model: nope"):
        CompressPass(exclude_nodes=["nope"]).apply(normalized)


def test_cli_bad_compress_parameters_exit_2(tmp_path, capsys):
    from onnxopt.cli import main

    out = tmp_path / "o.onnx"
    for spec in ("compress:op_types=[Relu]", "compress:exclude_nodes=[nope]"):
        code = main(["optimize", str(examples.default_model_path()), "-o", str(out), "--pass", spec, "--no-latency",
                     "--quiet"])
        assert code == 2 and not out.exists()
        assert "compress" in capsys.readouterr().err


def test_a_model_left_fp32_by_quantize_keeps_its_stored_weights(normalized):
    small = CompressPass().apply(normalized)
    step = QuantizePass(placement="all", op_types=["MatMul"])  # the example has no MatMul: nothing to quantize
    step.bind(PassContext(calib=open_data(str(examples.default_calib_path()))))
    kept = step.apply(small)
    assert Counter(n.op_type for n in kept.graph.node) == Counter(n.op_type for n in small.graph.node)
    assert kept.ByteSize() == small.ByteSize()
    assert any("stays FP32 with its int8-stored weights" in note for note in step.notes)


def test_runtime_key_groups_models_that_onnx_runtime_runs_alike(normalized):
    from onnxopt.pipeline.search import runtime_key

    base = as_ir_model(normalized)
    compressed = as_ir_model(CompressPass().apply(normalized))
    retrained = as_ir_model(normalized)  # other weight values, same graph (what distillation changes)
    for value in retrained.graph.initializers.values():
        value.const_value = ir.tensor(value.const_value.numpy() * 2)
    assert runtime_key(base) == runtime_key(compressed) == runtime_key(retrained)
    assert runtime_key(base) != runtime_key(as_ir_model(load_model(examples.default_model_path())))  # BN unfolded
