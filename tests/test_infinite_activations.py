"""Activations that hold +-inf on the calibration data (a causal attention mask's -inf added to the scores) or a
mask's finite fill in front of a Softmax (-1e9, float32's lowest) have no int8 range: the nodes around them stay
float instead of the pass refusing the model or writing one that attends everywhere; NaN is still refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.calib_data import open_data
from onnxopt.errors import DataError, OnnxoptError
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.quantize.calibrators import Calibrator
from onnxopt.passes.quantize.collect import nodes_reading_or_writing
from onnxopt.pipeline.context import PassContext
from onnxopt.runtime import make_session

SEQ, DIM = 8, 16


def masked_attention(fill: float = -np.inf) -> onnx.ModelProto:
    """One head of causal self-attention: softmax(q k^T / sqrt(d) + mask) v, the mask ``fill`` above the diagonal."""
    rng = np.random.default_rng(0)
    mask = np.triu(np.full((SEQ, SEQ), fill, np.float32), k=1)
    inits = [numpy_helper.from_array((rng.standard_normal((DIM, DIM)) * 0.3).astype(np.float32), name)
             for name in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.array(DIM ** -0.5, np.float32), "s")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"], name="scores"),
             helper.make_node("Mul", ["qk", "s"], ["scaled"], name="scale"),
             helper.make_node("Add", ["scaled", "mask"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["att"], name="mix"),
             helper.make_node("MatMul", ["att", "wo"], ["y"], name="o_proj")]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def padded_attention() -> onnx.ModelProto:
    """The attention above with a key padding mask computed in the graph, as BERT-style exports compute theirs: keys
    whose first feature is below -2 are masked by Where(cond, -inf, 0), reshaped and added to every query's scores.
    Where and Reshape are QDQ op types too: their outputs hold -inf."""
    model = masked_attention(0.0)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "first"),
                              numpy_helper.from_array(np.array([1], np.int64), "second"),
                              numpy_helper.from_array(np.array([2], np.int64), "last_axis"),
                              numpy_helper.from_array(np.array(-2.0, np.float32), "cut"),
                              numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf"),
                              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                              numpy_helper.from_array(np.array([1, 1, SEQ], np.int64), "row")])
    add = next(node for node in graph.node if node.name == "mask_add")
    add.input[1] = "key_mask"
    nodes = [helper.make_node("Slice", ["x", "first", "second", "last_axis"], ["x0"], name="first_feature"),
             helper.make_node("Less", ["x0", "cut"], ["padded"], name="pad_test"),
             helper.make_node("Where", ["padded", "ninf", "zero"], ["fill"], name="pad_fill"),
             helper.make_node("Reshape", ["fill", "row"], ["key_mask"], name="pad_row")]
    for index, node in enumerate(nodes):
        graph.node.insert(index, node)
    onnx.checker.check_model(model)
    return model


def test_calibrator_sets_infinite_activations_aside():
    calibrator = Calibrator(histograms=False)
    calibrator.update_activations({"a": np.array([1.0, 2.0], np.float32), "b": np.array([0.0, 1.0], np.float32)})
    calibrator.update_activations({"a": np.array([-np.inf, 0.5, -np.inf], np.float32),
                                   "b": np.array([3.0], np.float32)})
    calibrator.update_activations({"a": np.array([7.0], np.float32)})  # set aside for good: no range from later ones
    assert calibrator.infinite == {"a": 2} and "a" not in calibrator and calibrator.stats("b").max == 3.0
    with pytest.raises(DataError, match="'c'.*NaN/Inf"):  # NaN: the model computes NaN on the data
        calibrator.update_activations({"c": np.array([np.nan, 1.0], np.float32)})
    other = Calibrator(histograms=False)
    other.update_activations({"b": np.array([np.inf], np.float32), "a": np.array([1.0], np.float32)})
    calibrator.merge(other)
    assert set(calibrator.infinite) == {"a", "b"} and len(calibrator) == 0


def test_nodes_reading_or_writing():
    model = masked_attention()
    ops = ["MatMul", "Mul", "Add", "Softmax", "Transpose"]
    assert nodes_reading_or_writing(model, ["masked"], ops) == ["mask_add", "softmax"]
    assert nodes_reading_or_writing(model, ["masked"], ops, exclude=["softmax"]) == ["mask_add"]
    assert nodes_reading_or_writing(model, ["masked"], ["MatMul"]) == []


def _quantize_and_compare(model: onnx.ModelProto, fmt: str) -> tuple[onnx.ModelProto, QuantizePass, float]:
    """The pass (``placement=all``) on a copy of ``model``, calibrated on 16 seeded samples; the quantized model, the
    pass, and the output SQNR against ``model`` on those samples (both outputs checked finite)."""
    data = np.random.default_rng(1).standard_normal((16, 1, SEQ, DIM)).astype(np.float32)
    step = QuantizePass(format=fmt, placement="all")
    step.bind(PassContext(calib=open_data(data)))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantized = step.apply(copy)
    reference, ours = make_session(model), make_session(quantized)
    ref = np.concatenate([reference.run(None, {"x": sample})[0] for sample in data])
    out = np.concatenate([ours.run(None, {"x": sample})[0] for sample in data])
    assert np.isfinite(ref).all() and np.isfinite(out).all()
    return quantized, step, float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))


FILLS = {"-inf": (-np.inf, "infinite"), "-1e9": (-1e9, "mask_filled"),
         "float32 lowest": (float(np.finfo(np.float32).min), "mask_filled")}


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
@pytest.mark.parametrize("fill", sorted(FILLS))
def test_masked_attention_quantizes_around_the_mask(fmt, fill):
    value, kind = FILLS[fill]
    quantized, step, sqnr = _quantize_and_compare(masked_attention(value), fmt)
    assert sqnr > 25.0
    ops = {node.op_type for node in quantized.graph.node}
    assert {"Add", "Softmax"} <= ops  # the mask's Add and the Softmax reading it run in float
    int8 = {"QLinearMatMul"} if fmt == "qoperator" else {"QuantizeLinear", "DequantizeLinear"}
    assert int8 <= ops
    if fmt == "qoperator":  # QDQ's op types do not include Add: nothing reads or writes the masked scores
        assert step.details[f"{kind}_activations"] == {"tensors": ["masked"], "float_nodes": ["mask_add", "softmax"]}
        assert any("which no int8 range serves" in note for note in step.notes)


def test_mask_filled_softmax_inputs():
    from onnxopt.passes.quantize.collect import mask_filled_softmax_inputs

    calibrator = Calibrator(histograms=False)
    calibrator.update_activations({"masked": np.array([-1e4 + 3.0, 2.0], np.float32), "qk": np.array([-1e4, 1.0])})
    assert mask_filled_softmax_inputs(masked_attention(), calibrator) == {"masked": pytest.approx(1e4 - 1.0)}
    plain = Calibrator(histograms=False)
    plain.update_activations({"masked": np.array([-60.0, 40.0], np.float32)})  # wide, but real scores
    assert mask_filled_softmax_inputs(masked_attention(), plain) == {}


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_padding_mask_computed_in_the_graph(fmt):
    """The code before refused this model in both formats ('fill' holds -inf and Where is a QDQ op type)."""
    _, step, sqnr = _quantize_and_compare(padded_attention(), fmt)
    assert sqnr > 25.0
    record = step.details["infinite_activations"]
    assert {"fill", "key_mask"} <= set(record["tensors"]) and "pad_fill" in record["float_nodes"]


def _log_matmul() -> onnx.ModelProto:
    """y = log(x) @ w: log(0) is -inf, and so is the output where it meets the MatMul."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"], name="log"), helper.make_node("MatMul", ["l", "w"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_model_whose_own_output_is_infinite_runs_through_the_pipeline(tmp_path):
    """The validation after each pass compares the model with the one before: the same -inf is agreement (it
    failed normalize with 'output has NaN/Inf after this pass' before); NaN computed on the data stays a refusal."""
    from onnxopt.api import optimize

    x = np.abs(np.random.default_rng(0).standard_normal((16, 4))).astype(np.float32) + 0.1
    x[3, 1] = 0.0
    path = tmp_path / "log.onnx"
    onnx.save(_log_matmul(), path)
    result = optimize(str(path), ["normalize", {"name": "quantize", "placement": "all"}], calib=x,
                      measure_latency=False)
    steps = result.report.to_dict()["steps"]
    assert [(step["name"], step["status"]) for step in steps] == [("input", "ok"), ("normalize", "ok"),
                                                                  ("quantize", "ok")]
    assert any("hold +-inf on the calibration data" in note for note in steps[-1]["notes"])
    x[5, 2] = -1.0  # log(-1) is NaN
    with pytest.raises(OnnxoptError, match="the model computes NaN on the calibration data"):
        optimize(str(path), ["normalize", {"name": "quantize", "placement": "all"}], calib=x, measure_latency=False)
