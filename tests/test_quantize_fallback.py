"""placement=auto's mixed-precision fallback (:mod:`onnxopt.passes.quantize.mixed_fallback`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_builders import outlier_net

from onnxopt.calib_data import open_data
from onnxopt.modelio import as_ir_model, to_proto
from onnxopt.passes.quantize import QuantizePass, placement
from onnxopt.passes.quantize.agreement import output_sqnr_db
from onnxopt.passes.quantize.mixed_fallback import fewest_passing, fp32_cap
from onnxopt.pipeline.context import PassContext
from onnxopt.runtime import make_session


def test_fewest_passing_bisects_to_the_smallest_k():
    tried: list[int] = []

    def passes(k: int) -> bool:
        tried.append(k)
        return k >= 7

    search = fewest_passing(20, passes)
    assert search.found == 7 and tried[0] == 20 and len(tried) <= 6
    assert search.trials == [(k, k >= 7) for k in tried]
    hopeless = fewest_passing(20, lambda k: False)
    assert hopeless.found is None and hopeless.trials == [(20, False)]  # one check when even the cap fails
    assert fewest_passing(0, passes).found is None and fewest_passing(1, lambda k: True).found == 1
    assert fp32_cap(62) == 31 and fp32_cap(1) == 0


def _run(params: dict, budgets: dict | None = None) -> tuple[onnx.ModelProto, QuantizePass, np.ndarray]:
    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    step = QuantizePass(placement="auto", calib_samples=32, **params)
    step.bind(PassContext(calib=open_data({"x": x}), budgets=budgets or {}))
    return step.apply(to_proto(as_ir_model(outlier_net()))), step, x


def _sqnr(model: onnx.ModelProto, x: np.ndarray) -> float:
    reference = make_session(outlier_net()).run(None, {"x": x})[0]
    return output_sqnr_db([reference], [make_session(model).run(None, {"x": x})[0]])


def _float_weight_convs(model: onnx.ModelProto) -> set[str]:
    inits = {init.name for init in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits}


def test_fallback_keeps_the_sensitive_layer_fp32_and_the_rest_int8(fake_time_models):
    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})
    model, step, x = _run({})
    search = step.details["placement"]
    assert search["chosen"] == "conv_gemm_matmul_fp32_sensitive_1"
    whole = [c for c in search["candidates"] if c["label"] != search["chosen"]]
    assert whole and all("SQNR" in (c["rejected"] or "") for c in whole if c.get("sqnr_db") is not None)
    fallback = search["mixed_fallback"]
    assert fallback["fp32_layers"] == ["conv2"] and fallback["cap"] == 1
    assert fallback["trials"][0]["passed"] and fallback["trials"][0]["sqnr_db"] >= placement.MIN_SQNR_DB
    assert _float_weight_convs(model) == {"conv2"}  # conv1 and conv3 int8, conv2 FP32
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert _sqnr(model, x) >= placement.MIN_SQNR_DB  # the real int8 model, not the search's word for it
    assert any(note.startswith("mixed-precision fallback:") and "conv2" in note for note in step.notes)


def test_without_the_fallback_or_when_it_cannot_pass_the_model_stays_fp32(fake_time_models, monkeypatch):
    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})
    model, step, _ = _run({"mixed_fallback": False})
    assert step.details["placement"]["chosen"] == placement.FP32 and "mixed_fallback" not in step.details["placement"]
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    # A bar no candidate reaches: one check at the cap, a note, FP32.
    model, step, _ = _run({}, budgets={"min_sqnr_db": 200.0})
    fallback = step.details["placement"]["mixed_fallback"]
    assert fallback["fp32_layers"] is None and [t["fp32_layers"] for t in fallback["trials"]] == [1]
    assert step.details["placement"]["chosen"] == placement.FP32
    assert any("and so did a conv_gemm_matmul candidate" in note for note in step.notes)


def test_no_fallback_when_int8_is_slower(fake_time_models):
    """The fallback answers a failed check only: int8 that does not pay is not rescued by more FP32 layers."""
    fake_time_models(lambda models, threads, shapes: {label: 1.0 if label == placement.FP32 else 2.0
                                                      for label in models})
    _, step, _ = _run({})
    assert step.details["placement"]["chosen"] == placement.FP32
    assert "mixed_fallback" not in step.details["placement"]


@pytest.mark.parametrize("value", ["false", "true"])
def test_mixed_fallback_is_a_recipe_parameter(value):
    from onnxopt.pipeline import registry

    assert registry.create("quantize", {"mixed_fallback": value}).mixed_fallback is (value == "true")


def test_a_failing_fallback_leaves_the_fp32_verdict(fake_time_models, monkeypatch):
    """The fallback is a last resort: if it breaks (here its ranking), the pass still returns the FP32 model and says
    why, instead of failing."""
    from onnxopt.passes.quantize import sensitivity

    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})

    def broken(*args, **kwargs):
        raise RuntimeError("probe session refused")

    monkeypatch.setattr(sensitivity, "layer_sensitivity", broken)
    model, step, _ = _run({})
    assert step.details["placement"]["chosen"] == placement.FP32
    assert "probe session refused" in step.details["placement"]["mixed_fallback"]["error"]
    assert any("mixed-precision fallback failed" in note for note in step.notes)
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_fallback_skipped_on_large_models(fake_time_models, monkeypatch):
    from onnxopt.passes.quantize import mixed_fallback

    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})
    monkeypatch.setattr(mixed_fallback, "MAX_WEIGHT_BYTES", 1000)  # the test net has ~3 KB of weights
    _, step, _ = _run({})
    assert step.details["placement"]["chosen"] == placement.FP32
    assert step.details["placement"]["mixed_fallback"]["skipped"].startswith("skipped: 0 MB of weights")
    assert any(note.startswith("mixed-precision fallback skipped") for note in step.notes)


def test_fallback_reuses_the_sensitivity_table_when_one_was_made(fake_time_models):
    """With sensitivity=True the table (on the eval samples) already ranks the layers: the fallback orders by it
    rather than running its own probes."""
    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})
    _, step, _ = _run({"sensitivity": True})
    assert step.details["sensitivity"][0]["node"] == "conv2"
    fallback = step.details["placement"]["mixed_fallback"]
    assert fallback["ranking"] == "the sensitivity table" and fallback["fp32_layers"] == ["conv2"]
    assert step.details["placement"]["chosen"] == "conv_gemm_matmul_fp32_sensitive_1"


def test_the_added_noise_order_finds_what_a_misleading_table_misses(fake_time_models, monkeypatch):
    """With a sensitivity table that puts the culprit last, the one layer the fallback may keep FP32 (the cap: half
    of 3) is the wrong one and fails; the second order, by the noise each layer adds in the all-int8 model, puts
    conv2 first, and its candidate passes and is kept."""
    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})
    real = QuantizePass._sensitivity
    monkeypatch.setattr(QuantizePass, "_sensitivity", lambda self, *args: real(self, *args)[::-1])
    model, step, x = _run({})
    search = step.details["placement"]
    fallback = search["mixed_fallback"]
    assert fallback["fp32_layers"] is None and fallback["trials"][0]["passed"] is False
    assert fallback["added_noise"]["fp32_layers"] == ["conv2"]
    assert search["chosen"] == "conv_gemm_matmul_fp32_noisiest_1"
    assert _float_weight_convs(model) == {"conv2"} and _sqnr(model, x) >= placement.MIN_SQNR_DB




def test_a_second_order_that_cannot_be_traced_leaves_the_first_orders_result(fake_time_models, monkeypatch):
    """A QOperator base renames the activations the trace reads, say: the error is recorded, nothing is added, and
    the first order's verdict stands (here: its candidate failed, so FP32), with no crash."""
    from onnxopt.passes.quantize import sensitivity

    fake_time_models(lambda models, threads, shapes: {label: 2.0 if label == placement.FP32 else 1.0
                                                      for label in models})

    def untraceable(*args, **kwargs):
        raise RuntimeError("no such tensor")

    real = QuantizePass._sensitivity
    monkeypatch.setattr(QuantizePass, "_sensitivity", lambda self, *args: real(self, *args)[::-1])
    monkeypatch.setattr(sensitivity, "added_noise_ranking", untraceable)
    model, step, _ = _run({})
    fallback = step.details["placement"]["mixed_fallback"]
    assert fallback["fp32_layers"] is None and fallback["added_noise"] == {"error": "RuntimeError: no such tensor"}
    assert step.details["placement"]["chosen"] == placement.FP32
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
