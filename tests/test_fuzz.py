"""Property tests: random conv nets (tests/fuzz_models.py) through the passes and the bridge, with each one's oracle,
and random corruptions of a valid file through the loader. Bounded (a dozen examples each) and derandomized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import onnxopt
from fuzz_models import FUZZ_SETTINGS, conv_nets, corrupt, corruptions
from onnx_builders import conv_classifier, relative_error, run
from onnxopt.errors import BadInputError, OnnxoptError
from onnxopt.modelio import as_ir_model, load_model, to_proto


def _optimize(net, recipe, calib=None, **kwargs):
    feeds = net.feeds(batch=16, seed=1)
    data = None if calib is None else {"input": feeds["input"]}
    return onnxopt.optimize(net.model, recipe=recipe, calib=data, eval={"input": feeds["input"]},
                            measure_latency=False, seed=0, **kwargs)


@FUZZ_SETTINGS
@given(net=conv_nets())
def test_normalize_keeps_outputs(net):
    """normalize is exact: outputs within 1e-4 of the input model's, a checker-valid model, BN folded after Conv."""
    result = _optimize(net, ["normalize"])
    onnx.checker.check_model(result.model, full_check=True)
    feeds = net.feeds(batch=4, seed=2)
    error = relative_error(run(net.model, feeds), run(result.model, feeds))
    assert error <= 1e-4, f"{net.describe()}: relative error {error:.2e}"
    assert result.model.opset_import[0].version >= 13


@FUZZ_SETTINGS
@given(net=conv_nets())
def test_quantize_gives_valid_agreeing_model(net):
    """quantize: a valid model that runs, with the same output shape, an output SQNR of at least 15 dB against the
    input model (40 of these nets measured 24 dB or more; a broken scale or bias gives a few dB) and mostly the same
    top-1 on its calibration distribution (random nets can have near-tied logits, so the bar is a majority)."""
    result = _optimize(net, [{"name": "quantize", "params": {"placement": "all", "calib_samples": 16}}], calib=True)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    feeds = net.feeds(batch=32, seed=1)
    reference, quantized = run(net.model, feeds)[0], run(model, feeds)[0]
    assert quantized.shape == reference.shape and np.all(np.isfinite(quantized))
    quantized_nodes = sum(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)
    agreement = float(np.mean(reference.argmax(-1) == quantized.argmax(-1)))
    if quantized_nodes:
        assert agreement >= 0.5, f"{net.describe()}: top-1 agreement {agreement:.0%}"
        noise = float(np.sum((reference - quantized) ** 2))
        sqnr = 10 * np.log10(float(np.sum(reference ** 2)) / noise) if noise else float("inf")
        assert sqnr >= 15.0, f"{net.describe()}: int8 output SQNR {sqnr:.1f} dB"
    fidelity = result.report.to_dict()["steps"][-1]["fidelity_vs_original"]
    assert fidelity is not None and fidelity["samples"] > 0, "the report must carry the fidelity figures"


@FUZZ_SETTINGS
@given(net=conv_nets(), heavy_only=st.booleans(), chosen=st.randoms(use_true_random=False))
def test_derived_placements_equal_ort_rewrites(net, heavy_only, chosen):
    """A placement candidate derived from the whole-model QDQ graph (float_nodes.keep_float) is the model ORT's
    quantizer writes when asked to leave the same nodes FP32: same op-type counts, bit-identical outputs."""
    from collections import Counter

    from onnxopt.calib_data import ArraySource
    from onnxopt.modelio import input_specs
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.quantize import QuantizePass
    from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
    from onnxopt.passes.quantize.float_nodes import keep_float
    from onnxopt.passes.quantize.pass_ import _with_inferred_shapes
    from onnxopt.passes.quantize.placement import HEAVY_OPS

    model = as_ir_model(net.model)
    NormalizePass().apply(model)
    proto = _with_inferred_shapes(model)
    step = QuantizePass(compact=False)
    step._scales, step._worth_it = {}, {}
    ops = list(HEAVY_OPS) if heavy_only else step._op_types()
    calib = ArraySource(net.feeds(batch=16, seed=1)["input"])
    calibrator, _ = collect_statistics(proto, tensors_to_calibrate(proto, ops, []), calib, input_specs(model),
                                       samples=16, histograms=False)
    ranges = calibrator.compute("minmax")
    full = step._rewrite(proto, ranges, False, ops, [])
    heavy = [n.name for n in proto.graph.node if n.op_type in HEAVY_OPS and n.name]
    floating = chosen.sample(heavy, chosen.randint(1, len(heavy))) if heavy else []
    derived = keep_float(full, proto, {n.name for n in proto.graph.node if n.op_type in ops} - set(floating), floating)
    assert derived is not None, net.describe()
    onnx.checker.check_model(derived)
    reference = step._rewrite(proto, ranges, False, ops, floating)
    assert Counter(n.op_type for n in derived.graph.node) == Counter(n.op_type for n in reference.graph.node), \
        f"{net.describe()}: {floating}"
    feeds = net.feeds(batch=4, seed=5)
    assert np.array_equal(run(derived, feeds)[0], run(reference, feeds)[0]), f"{net.describe()}: {floating}"


@FUZZ_SETTINGS
@given(net=conv_nets())
def test_sensitivity_from_cuts_equals_the_whole_graph(net):
    """The sensitivity table's probes from cuts of several activations (a residual's or concat's pending branch, an
    SE block's input) give the table the whole graph gives: every figure within float rounding (ORT fuses
    differently at a cut), the layers in the same order up to near-ties."""
    from onnxopt.calib_data import ArraySource
    from onnxopt.modelio import input_specs
    from onnxopt.passes import NormalizePass
    from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
    from onnxopt.passes.quantize.pass_ import _with_inferred_shapes
    from onnxopt.passes.quantize.placement import HEAVY_OPS
    from onnxopt.passes.quantize.sensitivity import layer_sensitivity
    from onnxopt.passes.quantize.weights_prep import weight_quantizer

    model = as_ir_model(net.model)
    NormalizePass().apply(model)
    proto = _with_inferred_shapes(model)
    x = net.feeds(batch=8, seed=1)["input"]
    calibrator, _ = collect_statistics(proto, tensors_to_calibrate(proto, list(HEAVY_OPS), []), ArraySource(x),
                                       input_specs(model), samples=8, histograms=False)
    layers = [n for n in proto.graph.node if n.op_type in HEAVY_OPS and n.name and len(n.input) > 1]
    args = (proto, layers, calibrator.compute("minmax"), weight_quantizer(True, False, "minmax"),
            [{"input": x[i:i + 1]} for i in range(4)], None, False, False)
    whole = {row.node: row for row in layer_sensitivity(*args, cuts=False)}
    cut = {row.node: row for row in layer_sensitivity(*args, cuts=True)}
    assert set(whole) == set(cut), net.describe()
    for name, row in whole.items():
        for field in ("output_sqnr_db", "layer_sqnr_db"):
            a, b = getattr(row, field), getattr(cut[name], field)
            assert a == b or abs(a - b) < 0.05, f"{net.describe()}: {name} {field} {a:.3f} vs {b:.3f}"


@FUZZ_SETTINGS
@given(net=conv_nets(), ratio=st.sampled_from([0.25, 0.5]))
def test_prune_gives_valid_smaller_model(net, ratio):
    """prune: a checker-valid model with the same input/output signature and no more parameters than before, or a
    clear refusal (nothing to prune)."""
    from onnxopt.stats import model_stats

    try:
        result = _optimize(net, ["normalize", {"name": "prune", "params": {"ratio": ratio}}])
    except OnnxoptError as exc:
        assert "prune" in str(exc), str(exc)
        return
    onnx.checker.check_model(result.model, full_check=True)
    feeds = net.feeds(batch=2, seed=3)
    out = run(result.model, feeds)[0]
    assert out.shape == (2, net.classes) and np.all(np.isfinite(out))
    assert model_stats(result.ir_model).params <= model_stats(as_ir_model(net.model)).params


@FUZZ_SETTINGS
@given(net=conv_nets())
def test_bridge_matches_onnxruntime(net):
    """The torch bridge runs every generated net like ONNX Runtime (1e-4 relative)."""
    torch = pytest.importorskip("torch")
    from onnxopt.bridge import to_torch

    torch.set_num_threads(1)
    feeds = net.feeds(batch=3, seed=4)
    module = to_torch(net.model)
    with torch.no_grad():
        out = module(torch.from_numpy(feeds["input"]))
    error = relative_error(run(net.model, feeds), [out.numpy()])
    assert error <= 1e-4, f"{net.describe()}: bridge vs ORT relative error {error:.2e}"


@pytest.fixture(scope="module")
def valid_model_bytes() -> bytes:
    return conv_classifier(channels=4).SerializeToString()


@FUZZ_SETTINGS
@given(damage=corruptions())
def test_loader_on_corrupted_protobufs(tmp_path_factory, valid_model_bytes, damage):
    """A damaged file either raises BadInputError or loads as a model that passes the checker: nothing else."""
    path = tmp_path_factory.mktemp("corrupt") / "m.onnx"
    path.write_bytes(corrupt(valid_model_bytes, *damage))
    try:
        model = load_model(path)
    except BadInputError as exc:
        assert str(path) in str(exc) or path.name in str(exc), str(exc)
        return
    onnx.checker.check_model(to_proto(model))


def test_loader_fuzz_covers_both_outcomes(tmp_path: Path):
    """The corruption generator reaches both branches (a guard against a test that only ever takes one)."""
    model = conv_classifier(channels=4)
    data = model.SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(corrupt(data, [], len(data) // 2))
    with pytest.raises(BadInputError):
        load_model(path)
    weight = data.find(model.graph.initializer[0].raw_data)
    path.write_bytes(corrupt(data, [(weight, 0x01)], None))  # the lowest mantissa bit of the first weight
    onnx.checker.check_model(to_proto(load_model(path)))
