"""The fast MinMax paths of the quantize pass give what the slower reference paths give.

- minmax-only calibration (``histograms=False``: min/max in float32, no float64 copy, zeros, moments or histograms)
  vs the full statistics;
- the placement search's early-stopping :func:`placement.race` (a fake clock: no real timing here), its shared
  sessions and its batched agreement check.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from onnxopt import examples
from onnxopt.calib_data import ArraySource, open_data
from onnxopt.errors import BadInputError, DataError
from onnxopt.modelio import input_specs, load_model, to_proto
from onnxopt.passes import NormalizePass
from onnxopt.passes.quantize import Calibrator, QuantizePass, TensorStats, placement
from onnxopt.passes.quantize.collect import collect_statistics, tensors_to_calibrate
from onnxopt.pipeline.context import PassContext


@pytest.fixture(scope="module")
def prepared():
    """The example after normalize, with inferred value_info (what collect_statistics sees in the pass)."""
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)
    return save_and_reload_model_with_shape_infer(to_proto(model)), input_specs(model)


def test_shape_inference_without_weight_bytes_equals_plain_inference():
    """The quantize pass infers value_info on a copy of the graph without the float weights' bytes: the model it
    hands ORT is byte-identical to plain inference's, on the example (Conv/BN/Gemm) and on a MatMul net with a Reshape whose
    target is an int64 initializer (kept: inference propagates its values)."""
    from onnxopt.passes.quantize.pass_ import _infer_shapes_without_weight_bytes

    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([2, 32], np.int64), "shape"),
         onnx.numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(rng.normal(size=16).astype(np.float16).astype(np.float32), "b")])
    mlp = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    for model in (load_model(examples.default_model_path()), mlp):
        plain = onnx.shape_inference.infer_shapes(to_proto(model))
        light = _infer_shapes_without_weight_bytes(to_proto(model))
        assert light.SerializeToString() == plain.SerializeToString()
        assert any(info.name == "m" for info in light.graph.value_info) or model is not mlp


def test_large_model_memory_savers_change_no_output(monkeypatch):
    """What keeps a model over 2 GB in memory changes nothing in the int8 model: ORT's rewrite copied into a fresh
    message, and the search's sessions held for one thread setting at a time (both forced on for the example)."""
    from onnxopt.passes.quantize import pass_

    def quantize(placement: str) -> bytes:
        context = PassContext(calib=open_data(str(examples.default_calib_path())))
        model = load_model(examples.default_model_path())
        return to_proto(QuantizePass(placement=placement).bind(context).apply(model)).SerializeToString()

    reference = quantize("all")
    monkeypatch.setattr(pass_, "_REPACK_BYTES", 0)
    monkeypatch.setattr(pass_, "_ONE_SETTING_BYTES", 0)
    monkeypatch.setattr(placement, "FILE_FROM_BYTES", 0)
    assert quantize("all") == reference
    searched = quantize("auto")  # the search, with one thread setting's sessions at a time, ends in a valid model
    onnx.checker.check_model(searched, full_check=True)
    import onnxruntime as ort

    ort.InferenceSession(searched, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- calibration
def test_minmax_only_calibration_equals_the_histogram_path(prepared):
    proto, specs = prepared
    tensors = tensors_to_calibrate(proto, ["Conv", "Gemm", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten"])
    assert len(tensors) > 10
    data = open_data(str(examples.default_calib_path()))
    full, seen_full = collect_statistics(proto, tensors, data, specs, samples=70, histograms=True)
    fast, seen_fast = collect_statistics(proto, tensors, data, specs, samples=70, histograms=False)
    assert seen_full == seen_fast == 70 and fast.nbytes == 0
    for symmetric in (False, True):
        assert fast.compute("minmax", symmetric=symmetric) == full.compute("minmax", symmetric=symmetric)
    assert all(fast.stats(name).count == full.stats(name).count for name in tensors)
    assert "input" in tensors  # graph inputs are folded in too


def test_calibration_falls_back_to_the_basic_optimization_level(prepared, monkeypatch):
    """The calibration session runs at ORT's full optimization level (faster); a graph that level cannot load is
    calibrated at the basic level instead, with the same ranges up to float rounding."""
    from onnxopt import runtime

    proto, specs = prepared
    tensors = tensors_to_calibrate(proto, ["Conv", "Relu", "Add"])
    data = open_data(str(examples.default_calib_path()))
    fast, _ = collect_statistics(proto, tensors, data, specs, samples=40, histograms=False)
    real, levels = runtime.make_session, []

    def refuse_full_level(model, **kwargs):
        levels.append(kwargs["optimization"])
        if kwargs["optimization"] == "all":
            raise BadInputError("ONNX Runtime cannot load the model prepared for calibration: (simulated)")
        return real(model, **kwargs)

    monkeypatch.setattr(runtime, "make_session", refuse_full_level)  # what make_full_session calls
    basic, seen = collect_statistics(proto, tensors, data, specs, samples=40, histograms=False)
    assert levels == ["all", "basic"] and seen == 40
    for name, rng in fast.compute("minmax").items():
        other = basic.compute("minmax")[name]
        assert rng.low == pytest.approx(other.low, rel=1e-5, abs=1e-6)
        assert rng.high == pytest.approx(other.high, rel=1e-5, abs=1e-6)


def test_in_memory_shape_inference_matches_onnx_runtimes_file_round_trip(prepared):
    """The quantize pass infers value_info in memory; ORT's helper does it through files. Same graph, same
    value_info, same metadata mark (ORT's reload only adds an explicit default data_location to big tensors)."""
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    from onnxopt.passes.quantize.pass_ import _with_inferred_shapes

    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)
    ours, ort_ = _with_inferred_shapes(model), save_and_reload_model_with_shape_infer(to_proto(model))
    for proto in (ours, ort_):
        for tensor in proto.graph.initializer:
            tensor.ClearField("data_location")
    assert ours.SerializeToString() == ort_.SerializeToString()
    assert {p.key: p.value for p in ours.metadata_props}["onnx.infer"] == "onnxruntime.quant"


def test_minmax_only_calibration_reports_nan_activations():
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["root"], name="sqrt"), helper.make_node("Relu", ["root"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = onnx.shape_inference.infer_shapes(model)
    specs = input_specs(ir.serde.deserialize_model(model))
    x = np.ones((8, 4), np.float32)
    x[5, 2] = -1.0  # sqrt(-1) is NaN: float32 min/max propagate it
    with pytest.raises(DataError, match="'root'.*NaN/Inf"):
        collect_statistics(model, ["root"], ArraySource(x), specs, samples=8, histograms=False)


def test_minmax_only_stats_match_the_full_statistics():
    rng = np.random.default_rng(3)
    batches = [rng.normal(0.5, 2.0, (7, 5)).astype(np.float32) for _ in range(4)] + [np.zeros((0, 5), np.float32)]
    full, fast = TensorStats(histograms=True), TensorStats(histograms=False)
    for batch in batches:
        full.update(batch)
        fast.update(batch)
    assert (fast.count, fast.min, fast.max, fast.max_abs) == (full.count, full.min, full.max, full.max_abs)
    with pytest.raises(DataError, match="histograms=True"):
        _ = fast.mean
    assert _calibrated(batches, True).compute("minmax") == _calibrated(batches, False).compute("minmax")


def _calibrated(batches: list[np.ndarray], histograms: bool) -> Calibrator:
    calibrator = Calibrator(histograms=histograms)
    for batch in batches:
        calibrator.update("t", batch)
    return calibrator


# ---------------------------------------------------------------- placement search
class _FakeClock:
    """A clock in ns that only moves when a fake model 'runs'."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def runner(self, ms: float):  # noqa: ANN201
        def run() -> None:
            self.now += int(ms * 1e6)

        return run


def test_race_stops_timing_clearly_slower_candidates():
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(10.0), "fast": clock.runner(5.0), "close": clock.runner(5.5),
               "slow": clock.runner(20.0)}
    times = placement.race(runners, warmup=2, repeats=12, screen=4, clock=clock)
    assert len(times["slow"]) == 4  # 20 ms > 1.15 x 5 ms after the screening rounds
    assert len(times["fast"]) == len(times["close"]) == len(times[placement.FP32]) == 12  # within the margin
    assert np.median(times["fast"]) == 5.0 and np.median(times[placement.FP32]) == 10.0


def test_race_ends_when_only_the_reference_is_left():
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(2.0), "a": clock.runner(3.0), "b": clock.runner(4.0)}
    times = placement.race(runners, warmup=1, repeats=30, screen=5, clock=clock)
    assert [len(times[label]) for label in runners] == [5, 5, 5]


def test_race_never_drops_the_reference():
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(9.0), "int8": clock.runner(8.5)}  # faster, but not clearly
    times = placement.race(runners, warmup=0, repeats=8, screen=2, clock=clock)
    assert len(times[placement.FP32]) == len(times["int8"]) == 8


def test_race_ends_early_when_one_candidate_is_clearly_faster_than_the_reference():
    """A confirmation (the winner alone against FP32) stops once even the winner's slowest run beats FP32's fastest
    by the margin; with another candidate still in the race, or a closer one, every round is run."""
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(9.0), "int8": clock.runner(3.0)}
    times = placement.race(runners, warmup=0, repeats=30, screen=4, clock=clock)
    assert len(times[placement.FP32]) == len(times["int8"]) == 4
    assert np.median(times[placement.FP32]) / np.median(times["int8"]) == 3.0
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(9.0), "int8": clock.runner(3.0), "other": clock.runner(3.2)}
    times = placement.race(runners, warmup=0, repeats=30, screen=4, clock=clock)
    assert len(times["int8"]) == len(times["other"]) == 30  # two fast candidates: the race must rank them
    clock = _FakeClock()
    runners = {placement.FP32: clock.runner(9.0), "int8": clock.runner(8.0)}  # 1.125x: inside the margin
    assert len(placement.race(runners, warmup=0, repeats=30, screen=4, clock=clock)["int8"]) == 30


def test_shared_sessions_and_batched_agreement(prepared):
    proto, specs = prepared
    data = open_data(str(examples.default_calib_path()))
    feeds = []
    for batch in data.iter_batches(specs, batch_size=1):
        feeds.append(batch.inputs)
        if len(feeds) == 9:
            break
    with placement.sharing_sessions():
        session = placement._session(proto, None)
        assert placement._session(proto, None) is session
        batched = placement.first_outputs(proto, feeds, None)
    assert len(batched) == 1 and batched[0].shape[0] == 9  # one run for all samples (dynamic batch dim)
    name = session.get_outputs()[0].name
    per_feed = [np.asarray(session.run([name], feed)[0]) for feed in feeds]
    assert placement.top1_agreement(per_feed, batched) == 1.0
    assert placement.top1_agreement(batched, per_feed) == 1.0
    flipped = [np.asarray(out)[:, ::-1] for out in per_feed]
    assert placement.top1_agreement(batched, flipped) < 1.0
    assert placement._session(proto, None) is not session  # outside the block: no pool


def test_rejected_candidate_frees_its_sessions(prepared):
    """A candidate rejected (here: top-1 agreement with FP32 too low) gives back its pooled sessions, at every
    thread setting, and keeps its record; the FP32 reference keeps its session."""
    proto, specs = prepared
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    for init in broken.graph.initializer:  # negated weights: the same graph, other top-1 classes
        array = onnx.numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(onnx.numpy_helper.from_array(-array, init.name))
    feeds = [batch.inputs for _, batch in zip(range(8), open_data(str(examples.default_calib_path()))
                                                  .iter_batches(specs, batch_size=1))]
    cand = placement.Candidate("negated", broken)
    with placement.sharing_sessions() as pool:
        trial = placement.Trial(proto, feeds, None, "cpu", {})
        placement._session(broken, 1)  # a second thread setting, as a confirmation would make
        assert not trial.vet(cand) and cand.rejected.startswith("top-1 agreement")
        assert {key[0] for key in pool._sessions} == {id(proto)}


def test_pool_of_a_large_model_holds_one_thread_setting(prepared):
    """For a large model the pool holds the sessions of one thread setting at a time (each holds its weights): a
    session at another setting drops the others, and one asked for again is made again."""
    proto, _ = prepared
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    with placement.sharing_sessions(one_setting=True) as pool:
        first = placement._session(proto, None)
        placement._session(other, None)
        assert placement._session(proto, None) is first
        placement._session(proto, 1)
        assert {key[1] for key in pool._sessions} == {1}
        assert placement._session(proto, None) is not first
    with placement.sharing_sessions() as pool:  # small models keep every setting's sessions
        placement._session(proto, None)
        placement._session(proto, 1)
        assert {key[1] for key in pool._sessions} == {None, 1}


def test_pool_writes_a_large_model_once_for_all_its_sessions(prepared, monkeypatch):
    """A model over FILE_FROM_BYTES (forced to 0 here) gets its sessions from one file (a 2.4 GB model was written
    to disk for each thread setting); a released model's file and, after the block, every file are deleted."""
    from onnxopt import modelio

    proto, specs = prepared
    written: list[Path] = []
    real = modelio.proto_file

    @contextlib.contextmanager
    def spy(model):
        with real(model) as path:
            written.append(path)
            yield path

    monkeypatch.setattr(modelio, "proto_file", spy)
    monkeypatch.setattr(placement, "FILE_FROM_BYTES", 0)
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    feed = next(iter(open_data(str(examples.default_calib_path())).iter_batches(specs, batch_size=2))).inputs
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    with placement.sharing_sessions() as pool:
        for threads in (None, 1):
            np.testing.assert_array_equal(placement._session(proto, threads).run(None, feed)[0], expected[0])
        assert len(written) == 1 and written[0].exists()
        placement._session(other, None)
        pool.release(proto)
        assert len(written) == 2 and not written[0].exists() and written[1].exists()
    assert not written[1].exists()


def test_pool_falls_back_to_memory_when_the_temporary_folder_is_full(prepared, monkeypatch):
    import errno

    from onnxopt import modelio

    @contextlib.contextmanager
    def full(model):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield  # pragma: no cover

    proto, _ = prepared
    monkeypatch.setattr(modelio, "proto_file", full)
    monkeypatch.setattr(placement, "FILE_FROM_BYTES", 0)
    with placement.sharing_sessions() as pool:
        assert placement._session(proto, None).get_outputs()
        assert pool._files == {}


def test_time_models_returns_a_median_and_fastest_run_per_model(prepared):
    """The real timing path runs (no assertion on the figures: the machine is shared)."""
    proto, _ = prepared
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    with placement.sharing_sessions():
        timings = placement.time_models({placement.FP32: proto, "copy": other}, 1, {})
    assert set(timings) == {placement.FP32, "copy"}  # a runner stopped early still has its screening runs
    assert all(0 < t.min_ms <= t.median_ms for t in timings.values())
    assert placement._timing_shape("x", ["N", 3, 8], {}) == (1, 3, 8)
    assert placement._timing_shape("x", ["N", "H"], {"x": (1, 5)}) == (1, 5)
    with pytest.raises(BadInputError, match="dynamic dim 1"):
        placement._timing_shape("x", ["N", "H"], {})


@pytest.mark.parametrize(("run_ms", "loops"), [({"a": 0.25, "b": 0.5}, 8), ({"a": 5.0}, 1), ({"a": 0.001}, 64),
                                               ({"a": 1.5, "b": 3.0}, 2)])
def test_loops_per_run_makes_the_fastest_models_runs_last_min_run_ms(run_ms, loops):
    """Sub-millisecond models run several times within each timed run, all models of a race alike, at most
    MAX_LOOPS times; a model as slow as MIN_RUN_MS runs once."""
    now = [0]
    calls = {label: 0 for label in run_ms}

    def runner(label):
        def run():
            calls[label] += 1
            now[0] += int(run_ms[label] * 1e6)
        return run

    got = placement.loops_per_run({label: runner(label) for label in run_ms}, clock=lambda: now[0])
    assert got == loops and all(n == placement.WARMUP for n in calls.values())  # the warm-up runs, the last timed
    repeated = placement._repeated(runner("a"), got)
    repeated()
    assert calls["a"] == placement.WARMUP + got


def test_placement_builds_identical_candidates_once(fake_time_models):
    """With a single conv, 'first' and 'head' name the same node: the second candidate is not built again."""
    rng = np.random.default_rng(5)
    weight = onnx.numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["scores"], name="flatten")],
        "one_conv", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 6])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    fake_time_models(lambda models, threads, shapes: {
        label: (2.0 if label == placement.FP32 else 1.0) for label in models})
    step = QuantizePass(placement="auto", placement_search="full")  # int8 faster: staged would try no region
    step.bind(PassContext(calib=ArraySource(rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32))))
    step.apply(model)
    labels = [c["label"] for c in step.details["placement"]["candidates"]]
    assert "conv_gemm_matmul_fp32_first" in labels and "conv_gemm_matmul_fp32_head" not in labels
    assert len(labels) == len(set(labels))


# ---------------------------------------------------------------- per-channel weight scales
def _example_quantizer(params: dict):
    """A function that quantizes the normalized example with ``params`` (placement all) and returns the bytes."""
    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)

    def quantize() -> bytes:
        step = QuantizePass(placement="all", calib_samples=32, **params)
        step.bind(PassContext(calib=open_data(str(examples.default_calib_path()))))
        return step.apply(to_proto(model)).SerializeToString()

    return quantize


@pytest.mark.parametrize("params", [{}, {"reduce_range": "on"}, {"per_channel_min_gain_db": 1.0},
                                    {"format": "qoperator"}])
def test_our_per_channel_scales_give_ort_the_model_it_would_write_itself(monkeypatch, params):
    """The vectorized scales handed to ORT as TensorQuantOverrides change nothing in its output (byte-identical)."""
    quantize = _example_quantizer(params)
    ours = quantize()
    # ORT's own path: no scale overrides (only the per-channel axes that per_channel_min_gain_db needs)
    monkeypatch.setattr(QuantizePass, "_scale_overrides",
                        lambda self, proto, axes, reduce_range: {name: [{"axis": axis}] for name, axis in axes.items()}
                        if self.per_channel_min_gain_db > 0 else {})
    assert ours == quantize()


def test_per_channel_scales_follow_ort_for_zero_and_tiny_channels():
    from onnxruntime.quantization.quant_utils import compute_data_quant_params
    from onnxruntime.quantization.quant_utils import QuantType

    from onnxopt.passes.quantize.weights_prep import per_channel_scale_overrides

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    weight[1] = 0.0
    weight[2] *= 1e-39  # below float32's smallest normal: ORT falls back to scale 1
    weight[3] = np.abs(weight[3])  # one-signed channel
    model = helper.make_model(helper.make_graph([], "g", [], [], [onnx.numpy_helper.from_array(weight, "w")]))
    for reduce_range in (False, True):
        rows = per_channel_scale_overrides(model, {"w": 0}, reduce_range)["w"]
        assert rows[0]["axis"] == 0 and len(rows) == 5
        for c, row in enumerate(rows):
            zero, scale = compute_data_quant_params(weight[c].ravel(), QuantType.QInt8.tensor_type, True,
                                                    reduce_range=reduce_range)
            assert row["scale"].dtype == np.float32 and row["scale"] == scale and row["zero_point"] == zero


# ---------------------------------------------------------------- ORT's weight quantization, vectorized
@pytest.mark.parametrize("block", [1 << 16, 7, 1])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("quant_type", [onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16])
def test_vectorized_per_channel_weights_are_byte_identical(axis, quant_type, block, monkeypatch):
    """Per channel and per tensor, in one block or in blocks of 7 and 1 elements (rows, then channels, split)."""
    from onnxruntime.quantization.quant_utils import quantize_onnx_initializer

    from onnxopt.passes.quantize import ort_fast
    from onnxopt.passes.quantize.ort_fast import blockwise_initializer

    monkeypatch.setattr(ort_fast, "BLOCK_ELEMENTS", block)

    rng = np.random.default_rng(abs(axis) + quant_type)
    weight = rng.normal(0, 0.3, (6, 5, 3, 2)).astype(np.float32)
    weight[..., 0] *= 40.0  # values that clip at the type's limits
    channels = weight.shape[axis]
    scale = rng.uniform(1e-3, 5e-2, channels).astype(np.float32)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
    zero_point = rng.integers(0, 5, channels).astype(dtype)
    proto = onnx.numpy_helper.from_array(weight, "w")
    fast = blockwise_initializer(quantize_onnx_initializer)
    ours = fast(proto, quant_type, zero_point, scale, axis)
    reference = quantize_onnx_initializer(proto, quant_type, zero_point, scale, axis)
    assert ours.SerializeToString() == reference.SerializeToString()
    # per tensor (a 0-d and a 1-element scale), with a named output
    for one_scale, one_zero in ((scale[:1], zero_point[:1]), (scale[0].reshape(()), zero_point[0].reshape(()))):
        assert fast(proto, quant_type, one_zero, one_scale, None, "q").SerializeToString() == \
            quantize_onnx_initializer(proto, quant_type, one_zero, one_scale, None, "q").SerializeToString()
    # a float16 weight and a float64 scale take the same float arithmetic as ORT's
    half = onnx.numpy_helper.from_array(weight.astype(np.float16), "h")
    wide = scale.astype(np.float64)
    assert fast(half, quant_type, zero_point, wide, axis).SerializeToString() == \
        quantize_onnx_initializer(half, quant_type, zero_point, wide, axis).SerializeToString()


@pytest.mark.parametrize("params", [{}, {"reduce_range": "on"}, {"format": "qoperator"}])
def test_quantize_pass_output_is_the_same_with_ort_own_weight_loop(monkeypatch, params):
    import contextlib

    from onnxopt.passes.quantize import ort_fast

    quantize = _example_quantizer(params)
    ours = quantize()
    monkeypatch.setattr(ort_fast, "vectorized_weight_quantization", contextlib.nullcontext)
    assert ours == quantize()


def test_vectorized_weight_quantization_restores_ort():
    from onnxruntime.quantization import qdq_quantizer

    from onnxopt.passes.quantize.ort_fast import vectorized_weight_quantization

    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    before = qdq_quantizer.quantize_onnx_initializer
    loop = BaseQuantizer.quantize_weight_per_channel_impl
    params = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params
    reader = qdq_quantizer.tensor_proto_to_array
    with vectorized_weight_quantization():
        inside = qdq_quantizer.quantize_onnx_initializer
        inside_loop = BaseQuantizer.quantize_weight_per_channel_impl
        inside_params = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params
        with vectorized_weight_quantization():  # re-entrant: not wrapped twice
            assert qdq_quantizer.quantize_onnx_initializer is inside
            assert BaseQuantizer.quantize_weight_per_channel_impl is inside_loop
            assert qdq_quantizer.QDQQuantizer._calc_initializer_quant_params is inside_params
        assert inside is not before and getattr(inside, "_onnxopt_vectorized", False)
        assert getattr(inside_loop, "_onnxopt_vectorized", False)
        assert inside_params is not params and getattr(inside_params, "_onnxopt_vectorized", False)
    assert qdq_quantizer.quantize_onnx_initializer is before
    assert BaseQuantizer.quantize_weight_per_channel_impl is loop
    assert qdq_quantizer.QDQQuantizer._calc_initializer_quant_params is params
    assert qdq_quantizer.tensor_proto_to_array is reader


def test_fixed_weights_are_not_read_for_their_parameters(monkeypatch):
    """In ``_calc_initializer_quant_params``, the weights whose scale and zero point our overrides fix are given as
    zero-memory stand-ins (ORT uses only their type and rank there), and ORT's reader is restored after; the
    model is byte-identical with ORT's own reads (test_quantize_pass_output_is_the_same_with_ort_own_weight_loop)."""
    from onnxruntime.quantization import qdq_quantizer

    reads: list[tuple[str, bool]] = []
    real = qdq_quantizer.tensor_proto_to_array
    params = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params

    def spying(self):
        inner = qdq_quantizer.tensor_proto_to_array

        def read(initializer):
            array = inner(initializer)
            reads.append((initializer.name, array.strides == (0,) * array.ndim and array.size > 1))
            return array

        qdq_quantizer.tensor_proto_to_array = read
        try:
            return params(self)
        finally:
            qdq_quantizer.tensor_proto_to_array = inner

    monkeypatch.setattr(qdq_quantizer.QDQQuantizer, "_calc_initializer_quant_params", spying)
    _example_quantizer({})()
    assert reads and all(stand_in for _, stand_in in reads)  # the example's weights are all per-channel overrides
    assert qdq_quantizer.tensor_proto_to_array is real


def test_qoperator_weights_take_the_vectorized_path(monkeypatch):
    """The QOperator writer's per-channel weights go through the one-expression path (the byte-identity with ORT's
    loop is test_quantize_pass_output_is_the_same_with_ort_own_weight_loop[qoperator])."""
    from onnxopt.passes.quantize import ort_fast

    plans = []
    original = ort_fast._override_plan
    monkeypatch.setattr(ort_fast, "_override_plan", lambda *args: plans.append(original(*args)) or plans[-1])
    _example_quantizer({"format": "qoperator"})()
    assert plans and all(plan is not None for plan in plans)


def _mlp_quantizer(params: dict):
    """Like :func:`_example_quantizer`, on a 3-layer MLP whose MatMul weights are 2-D (QLinearMatMul in QOperator)."""
    rng = np.random.default_rng(11)
    sizes = [24, 32, 16, 10]
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        inits += [onnx.numpy_helper.from_array(rng.normal(0, 0.3, (k, n)).astype(np.float32), f"W{i}"),
                  onnx.numpy_helper.from_array(rng.normal(0, 0.1, (n,)).astype(np.float32), f"B{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"add{i}")]
        x = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 24])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = ArraySource(rng.normal(0, 1, (32, 24)).astype(np.float32))

    def quantize() -> bytes:
        step = QuantizePass(placement="all", calib_samples=32, **params)
        step.bind(PassContext(calib=data))
        return step.apply(model).SerializeToString()

    return quantize


@pytest.mark.parametrize("params", [{"format": "qoperator"}, {"format": "qoperator", "reduce_range": "on"}])
def test_qoperator_matmul_weights_take_the_vectorized_path_and_give_ort_own_model(monkeypatch, params):
    """ORT's QOperator writer quantizes 2-D MatMul weights per channel too (its loop over channels was 2.6 s of a
    269 MB MLP's QOperator build): our scales for them go through the one-expression path, and the model is
    byte-identical to the one ORT writes alone (its own scales and its own loop)."""
    import contextlib

    from onnxopt.passes.quantize import ort_fast

    quantize = _mlp_quantizer(params)
    plans = []
    original = ort_fast._override_plan
    monkeypatch.setattr(ort_fast, "_override_plan", lambda *args: plans.append(original(*args)) or plans[-1])
    ours = quantize()
    assert len(plans) == 3 and all(plan is not None for plan in plans)
    assert b"QLinearMatMul" in ours
    monkeypatch.setattr(QuantizePass, "_scale_overrides", lambda self, proto, axes, reduce_range: {})
    monkeypatch.setattr(ort_fast, "vectorized_weight_quantization", contextlib.nullcontext)
    assert ours == quantize()


# ---------------------------------------------------------------- candidates derived from a QDQ model
def _rewriter(proto: onnx.ModelProto):
    """ORT's rewrite of ``proto`` (our calibration, the pass's settings) for given op types and excluded nodes."""
    step = QuantizePass(compact=False)
    step._scales, step._worth_it = {}, {}
    ops = step._op_types()
    specs = [s for s in input_specs(ir.serde.deserialize_model(proto))]
    calibrator, _ = collect_statistics(proto, tensors_to_calibrate(proto, ops, []),
                                       open_data(str(examples.default_calib_path())), specs, samples=24,
                                       histograms=False)
    ranges = calibrator.compute("minmax")
    return ops, lambda op_types, exclude: step._rewrite(proto, ranges, False, op_types, exclude)


def _outputs(model: onnx.ModelProto) -> np.ndarray:
    import onnxruntime as ort

    x = np.load(examples.default_calib_path())["input"][:12]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize("heavy_only", [False, True])
def test_candidates_derived_from_the_qdq_model_equal_ort_rewrites(prepared, heavy_only):
    """keep_float(whole-model QDQ, nodes left int8) gives the model ORT's quantizer writes when asked to exclude
    the others: same nodes, same outputs bit for bit (first conv, head Gemm, depthwise convs with the ReLU6 ORT had
    folded into a Quantize put back, every heavy node)."""
    from onnxopt.passes.quantize.float_nodes import keep_float

    proto, _ = prepared
    ops, rewrite = _rewriter(proto)
    ops = list(placement.HEAVY_OPS) if heavy_only else ops
    full = rewrite(ops, [])
    regions = placement.regions(proto, placement.HEAVY_OPS)
    heavy = [n.name for n in proto.graph.node if n.op_type in placement.HEAVY_OPS]
    tries = [regions["first"], regions["head"], regions["depthwise"], regions["first"] + regions["depthwise"], heavy]
    for floating in tries:
        int8 = {n.name for n in proto.graph.node if n.op_type in ops and n.name not in floating}
        derived = keep_float(full, proto, int8, floating)
        assert derived is not None
        onnx.checker.check_model(derived)
        reference = rewrite(ops, floating)
        op_types = sorted(n.op_type for n in derived.graph.node)
        assert op_types == sorted(n.op_type for n in reference.graph.node), floating
        assert np.array_equal(_outputs(derived), _outputs(reference)), floating
        float_weights = {n.input[1] for n in derived.graph.node if n.name in floating}
        assert float_weights <= {init.name for init in derived.graph.initializer}
    assert full.SerializeToString() == rewrite(ops, []).SerializeToString()  # the input model is not touched


def test_derivation_refuses_node_names_it_cannot_match(prepared):
    from onnxopt.passes.quantize.float_nodes import keep_float

    proto, _ = prepared
    ops, rewrite = _rewriter(proto)
    full = rewrite(ops, [])
    twice = onnx.ModelProto()
    twice.CopyFrom(proto)
    convs = [n for n in twice.graph.node if n.op_type == "Conv"]
    convs[1].name = convs[0].name
    assert keep_float(full, twice, set(), [convs[0].name]) is None


def test_placement_and_budget_search_give_the_same_models_derived_or_built(monkeypatch, fake_time_models):
    """The pass with derive_candidates on and off: the same candidates (each with the same outputs), the same
    bisection steps of the budget search, and the same final model."""
    from onnxopt.passes.quantize import budget
    seen: dict[bool, dict[str, np.ndarray]] = {}
    original = placement.Trial.time

    def spy(self, candidates):
        seen[derive] = {c.label: _outputs(c.model) for c in candidates if c.model is not None}
        return original(self, candidates)

    monkeypatch.setattr(placement.Trial, "time", spy)
    fake_time_models(lambda models, threads, shapes: {
        label: (1.0 if label == placement.FP32 else 2.0) for label in models})  # int8 "slower": every region built

    def drop(self, model):  # 0.1 pt per int8 Conv/Gemm: the budget (2 pt) needs 9 of the 29 in FP32
        dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return 0.001 * sum(n.op_type in ("Conv", "Gemm") and n.input[1] in dequantized for n in model.graph.node)

    monkeypatch.setattr(budget.Evaluator, "drop", drop)
    finals, trials = {}, {}
    for derive in (True, False):
        model = load_model(examples.default_model_path())
        NormalizePass().apply(model)
        step = QuantizePass(calib_samples=16, derive_candidates=derive, accuracy_drop=0.02, eval_samples=16,
                            compact=False)
        data = str(examples.default_calib_path())
        step.bind(PassContext(calib=open_data(data), eval=open_data(data)))
        finals[derive] = step.apply(to_proto(model))
        trials[derive] = step.details["mixed_precision"]["trials"]
    assert seen[True].keys() == seen[False].keys() and len(seen[True]) >= 8
    for label, outputs in seen[True].items():
        assert np.array_equal(outputs, seen[False][label]), label
    assert trials[True] == trials[False] and len(trials[True]) > 2  # the bisection ran, on the same drops
    assert np.array_equal(_outputs(finals[True]), _outputs(finals[False]))


def test_a_region_candidate_must_beat_the_whole_int8_model_head_to_head(fake_time_models):
    """A candidate with FP32 regions that wins the race but ties the whole int8 model head to head is dropped for
    the whole model; one that beats it head to head is kept."""
    def run(head_to_head_ms: float):
        calls = []

        def fake_time(models, threads, shapes):
            calls.append(sorted(models))
            if placement.FP32 not in models:  # the head-to-head run (None: the rival could not be timed)
                if head_to_head_ms is None:
                    return {label: 1.0 for label in models if "_fp32_" in label}
                return {label: (head_to_head_ms if "_fp32_" in label else 1.0) for label in models}
            return {label: 2.0 if label == placement.FP32 else (0.8 if label == "conv_gemm_matmul_fp32_first"
                                                                 else 1.0) for label in models}

        fake_time_models(fake_time)
        model = load_model(examples.default_model_path())
        NormalizePass().apply(model)
        step = QuantizePass(calib_samples=16, placement_search="full")
        step.bind(PassContext(calib=open_data(str(examples.default_calib_path()))))
        step.apply(to_proto(model))
        return step.details["placement"], calls

    tie, calls = run(1.0)
    assert tie["head_to_head"][0]["label"] == "conv_gemm_matmul_fp32_first" and tie["chosen"] in ("all", "qoperator")
    assert ["all", "conv_gemm_matmul_fp32_first"] in calls or ["conv_gemm_matmul_fp32_first", "qoperator"] in calls
    dropped = {c["label"]: c["rejected"] for c in tie["candidates"]}["conv_gemm_matmul_fp32_first"]
    assert dropped.startswith("not faster than") and "head to head (1.00x)" in dropped
    faster, _ = run(0.5)
    assert faster["chosen"] == "conv_gemm_matmul_fp32_first" and faster["head_to_head"][0]["speedup"] == 2.0
    untimed, _ = run(None)
    assert untimed["chosen"] == "conv_gemm_matmul_fp32_first" and untimed["head_to_head"][0]["speedup"] is None


def test_calibration_batch_follows_the_activation_bytes_per_sample():
    """Min-max runs of large per-sample activations use small batches (cache), histograms always CALIB_BATCH."""
    from onnxopt.passes.quantize import collect

    TensorProto = onnx.TensorProto

    def model(channels: int, spatial: int | str) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, spatial, spatial])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, spatial, spatial])
        mid = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", channels, spatial, spatial])
        nodes = [helper.make_node("Relu", ["x"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], value_info=[mid]))

    big = model(64, 64)  # 3 tensors x 1 MiB per sample: 16 MiB / 3 MiB -> the floor, 8
    assert collect.calibration_batch(big, ["x", "m", "y"], histograms=False) == collect.MIN_CALIB_BATCH
    assert collect.calibration_batch(big, ["x", "m", "y"], histograms=True) == collect.CALIB_BATCH
    small = model(16, 8)  # 4 KiB per tensor and sample
    assert collect.calibration_batch(small, ["x", "m", "y"], histograms=False) == collect.CALIB_BATCH
    middle = model(64, 32)  # 256 KiB per tensor: 16 MiB / 768 KiB = 21
    assert collect.calibration_batch(middle, ["x", "m", "y"], histograms=False) == 21
    unknown = model(64, "H")  # shapes not known beyond the batch dim: the default
    assert collect.calibration_batch(unknown, ["x", "m", "y"], histograms=False) == collect.CALIB_BATCH


@pytest.mark.parametrize("head_to_head_ms, kept", [(1.0, "all"), (0.5, "qoperator")])
def test_another_whole_model_must_beat_the_every_op_model_head_to_head(fake_time_models, head_to_head_ms, kept):
    """The QOperator model wins the race; head to head against the every-op QDQ model ("all") a tie goes to "all",
    and a clear win keeps it (near-ties among whole models went to the noise on ResNet)."""
    def fake_time(models, threads, shapes):
        if placement.FP32 not in models:  # the head-to-head run
            return {label: (head_to_head_ms if label == "qoperator" else 1.0) for label in models}
        return {label: {placement.FP32: 2.0, "qoperator": 0.8}.get(label, 1.0) for label in models}

    fake_time_models(fake_time)
    model = load_model(examples.default_model_path())
    NormalizePass().apply(model)
    step = QuantizePass(calib_samples=16)
    step.bind(PassContext(calib=open_data(str(examples.default_calib_path()))))
    step.apply(to_proto(model))
    search = step.details["placement"]
    assert search["head_to_head"][0] == {"label": "qoperator", "rival": "all", "speedup": 1.0 / head_to_head_ms}
    assert search["chosen"] == kept
    if kept == "all":
        rejected = {c["label"]: c["rejected"] for c in search["candidates"]}["qoperator"]
        assert rejected == "not faster than all head to head (1.00x)"
