"""Benchmark structure, interleaving, inputs, skips and errors; host information. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runtime
from onnxopt.bench import BenchConfig, BenchReport, LatencyResult, benchmark, measure_latency
from onnxopt.errors import BadInputError
from onnxopt.hostinfo import HostInfo, host_info, int8_kernel_notes, parse_cpuinfo, suggest_reduce_range

REPO = Path(__file__).resolve().parents[1]
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_relu(batch="N", size=8, name="conv_relu"):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [batch, 3, size, size])],
                  [helper.make_tensor_value_info("y", F, [batch, 4, size, size])], [w], name)


def gemm(batch="N", name="gemm"):
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32), "w")
    nodes = [helper.make_node("Gemm", ["v", "w"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("v", F, [batch, 12])],
                  [helper.make_tensor_value_info("y", F, [batch, 5])], [w], name)


def small(**overrides) -> BenchConfig:
    settings = {"warmup": 1, "repeats": 3}
    settings.update(overrides)
    return BenchConfig(**settings)


class RecordingSession:
    """Wraps an ORT session and logs (label, feeds) of every run into a shared list."""

    def __init__(self, session, label, log):
        self.session, self.label, self.log = session, label, log

    def run(self, names, feeds):
        self.log.append((self.label, feeds))
        return self.session.run(names, feeds)


@pytest.fixture
def run_log(monkeypatch):
    log: list = []
    real = runtime.make_session

    def make_session(model, **kwargs):
        return RecordingSession(real(model, **kwargs), kwargs["what"], log)

    monkeypatch.setattr(runtime, "make_session", make_session)
    return log


# ------------------------------------------------------------------------------------------------------ structure
def test_two_models_every_setting_measured():
    report = benchmark([conv_relu(), gemm()], small(batch_sizes=(1, 2), threads=(1, 2)), labels=["conv", "fc"])
    assert isinstance(report, BenchReport) and report.labels == ["conv", "fc"]
    assert len(report.results) == 2 * 2 * 2 and report.skipped == []
    settings = [(r.batch_size, r.threads, r.label) for r in report.results]
    assert settings == [(b, t, m) for b in (1, 2) for t in (1, 2) for m in ("conv", "fc")]
    for item in report.results:
        assert isinstance(item, LatencyResult) and item.provider == "cpu" and item.runs == 3
        assert 0 < item.min_ms <= item.median_ms <= item.p90_ms
        assert item.throughput == pytest.approx(item.batch_size * 1000 / item.median_ms)
    assert report.stats["conv"].macs == 4 * 27 * 8 * 8 and report.stats["fc"].macs == 60
    assert report.ratio("conv", "conv") == 1.0
    assert report.ratio("conv", "fc") * report.ratio("fc", "conv") == pytest.approx(1.0)
    assert report.ratio("fc", "conv", 2, 2) == pytest.approx(report.result("fc", 2, 2).median_ms
                                                            / report.result("conv", 2, 2).median_ms)
    with pytest.raises(KeyError, match="batch 4"):
        report.ratio("conv", "fc", 4)


def test_runs_are_interleaved_round_robin(run_log):
    benchmark([conv_relu(), gemm(), conv_relu(name="other")], small(warmup=2, repeats=4))
    labels = [label for label, _ in run_log]
    names = ["model 'conv_relu'", "model 'gemm'", "model 'other'"]
    assert labels[:6] == [names[0]] * 2 + [names[1]] * 2 + [names[2]] * 2  # warm-up, each model in turn
    timed = labels[6:]
    assert len(timed) == 3 * 4
    for start in range(0, len(timed), 3):  # every round runs each model exactly once
        assert sorted(timed[start:start + 3]) == sorted(names)
    assert timed[:3] != timed[3:6]  # the first model of a round rotates


def test_interleaved_sessions_do_not_spin_and_a_model_alone_does(monkeypatch):
    """Sessions timed round-robin turn ORT's intra-op spinning off (their threads would spin on the cores the next
    session needs: benchmarks/spinning.py); one model timed alone keeps it, as it runs deployed."""
    assert runtime.session_options(2, spinning=False).get_session_config_entry("session.intra_op.allow_spinning") \
        == "0"
    with pytest.raises(Exception):  # noqa: B017 - ORT's own error for an entry never set: spinning left as default
        runtime.session_options(2).get_session_config_entry("session.intra_op.allow_spinning")
    seen: list[bool] = []
    original = runtime.make_session

    def spy(*args, **kwargs):
        seen.append(kwargs["spinning"])
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "make_session", spy)
    config = BenchConfig(batch_sizes=(1,), threads=(1,), warmup=1, repeats=2)
    benchmark([conv_relu(), gemm()], config)
    assert seen == [False, False]
    seen.clear()
    benchmark([conv_relu()], config)
    assert seen == [True]
    seen.clear()  # forced either way (onnxopt bench --spinning on|off)
    benchmark([conv_relu(), gemm()], BenchConfig(batch_sizes=(1,), threads=(1,), warmup=1, repeats=2, spinning=True))
    benchmark([conv_relu()], BenchConfig(batch_sizes=(1,), threads=(1,), warmup=1, repeats=2, spinning=False))
    assert seen == [True, True, False]
    from onnxopt.passes.quantize.placement import SessionPool  # the placement search times its candidates so too

    pool = SessionPool()
    try:
        session = pool.get(conv_relu(), 1)
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        pool.close()


def test_models_get_the_same_seeded_inputs(run_log):
    benchmark([conv_relu(), conv_relu(name="twin")], small(seed=7))
    first = [feeds["x"] for label, feeds in run_log if label == "model 'conv_relu'"]
    second = [feeds["x"] for label, feeds in run_log if label == "model 'twin'"]
    np.testing.assert_array_equal(first[0], second[0])
    assert first[0].shape == (1, 3, 8, 8) and first[0].dtype == np.float32
    run_log.clear()
    benchmark([conv_relu()], small(seed=7))
    np.testing.assert_array_equal(run_log[0][1]["x"], first[0])
    run_log.clear()
    benchmark([conv_relu()], small(seed=8))
    assert not np.array_equal(run_log[0][1]["x"], first[0])


def test_integer_inputs_get_small_non_negative_values(run_log):
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    model = _model([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                   [helper.make_tensor_value_info("y", F, ["N", 6, 4])], [table], "embedding")
    report = benchmark([model], small(batch_sizes=(3,)))
    ids = run_log[0][1]["ids"]
    assert ids.dtype == np.int64 and ids.shape == (3, 6)
    assert ids.min() >= 0 and ids.max() < 10
    assert len(report.results) == 1


# ---------------------------------------------------------------------------------------------- skips and errors
def test_fixed_batch_model_is_skipped_at_other_batch_sizes():
    report = benchmark([conv_relu(), gemm(batch=1)], small(batch_sizes=(1, 4)), labels=["dynamic", "fixed"])
    assert [(r.label, r.batch_size) for r in report.results] == [("dynamic", 1), ("fixed", 1), ("dynamic", 4)]
    assert len(report.skipped) == 1
    label, batch, reason = report.skipped[0]
    assert (label, batch) == ("fixed", 4)
    assert "'v'" in reason and "fixed to 1" in reason
    assert report.to_dict()["results"][2]["speedup_vs_first"] == 1.0
    assert "skipped fixed at batch 4" in report.format_table()


def test_model_that_fails_above_batch_one_is_skipped():
    shape = numpy_helper.from_array(np.array([1, 12], dtype=np.int64), "shape")
    model = _model([helper.make_node("Reshape", ["v", "shape"], ["y"], name="hard_coded")],
                   [helper.make_tensor_value_info("v", F, ["N", 12])],
                   [helper.make_tensor_value_info("y", F, [1, 12])], [shape], "reshape_to_1")
    report = benchmark([gemm(), model], small(batch_sizes=(1, 2)), labels=["ok", "bad"])
    assert ("bad", 2) in [(s.label, s.batch_size) for s in report.skipped]
    assert {(r.label, r.batch_size) for r in report.results} == {("ok", 1), ("bad", 1), ("ok", 2)}


def test_dynamic_dim_without_a_size_is_a_clear_error():
    model = conv_relu(size="H")
    with pytest.raises(BadInputError, match=r"input 'x' \[N,3,H,H\] has dynamic dim 2 \('H'\).*--input-shape x:1,3"):
        benchmark([model], small())
    report = benchmark([model], small(batch_sizes=(2,), input_shapes={"x": (1, 3, 6, 6)}))
    assert report.results[0].batch_size == 2
    assert report.stats[report.labels[0]].macs == 4 * 27 * 6 * 6
    with pytest.raises(BadInputError, match="has dynamic dim 2"):
        measure_latency(model)


def test_input_shape_that_contradicts_the_model_is_refused():
    with pytest.raises(BadInputError, match=r"input 'x' has shape \[N,3,8,8\].*\(1, 3, 9, 9\)"):
        benchmark([conv_relu()], small(input_shapes={"x": (1, 3, 9, 9)}))
    with pytest.raises(BadInputError, match="has 4 dims"):
        benchmark([conv_relu()], small(input_shapes={"x": (1, 3, 8)}))


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"batch_sizes": (0,)}, {"threads": (0,)},
                                    {"min_time_s": -1.0}])
def test_bad_config(kwargs):
    with pytest.raises(BadInputError):
        BenchConfig(**kwargs)


def test_unknown_provider_and_bad_labels():
    with pytest.raises(BadInputError, match="not available"):
        benchmark([gemm()], small(provider="no-such-provider"))
    with pytest.raises(BadInputError, match="2 labels"):
        benchmark([gemm()], small(), labels=["a", "b"])
    with pytest.raises(BadInputError, match="no models"):
        benchmark([], small())


# ------------------------------------------------------------------------------------------------- other entries
def test_json_round_trip_and_table(tmp_path):
    conv_path, gemm_path = tmp_path / "conv.onnx", tmp_path / "fc.onnx"
    onnx.save(conv_relu(), str(conv_path))
    onnx.save(gemm(), str(gemm_path))
    report = benchmark([conv_path, str(gemm_path)], small(threads=(None,)))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == "onnxopt.bench" and data["schema_version"] == 1
    assert data["models"] == ["conv.onnx", "fc.onnx"]
    assert data["config"]["threads"] == [None] and data["config"]["batch_sizes"] == [1]
    assert {r["label"] for r in data["results"]} == {"conv.onnx", "fc.onnx"}
    assert data["results"][0]["speedup_vs_first"] == 1.0
    assert data["stats"]["fc.onnx"]["params"] == 60 and data["stats"]["fc.onnx"]["macs"] == 60
    assert set(data["host"]["flags"]) and data["host"]["onnxruntime_version"]
    assert data["skipped"] == []
    table = report.format_table()
    for text in ("conv.onnx", "fc.onnx", "median ms", "p90 ms", "samples/s", "median latency of conv.onnx", "MACs/sample",
                 "CPU flags", "threads default"):
        assert text in table


def test_min_time_keeps_running():
    report = benchmark([gemm()], small(repeats=2, min_time_s=0.02))
    item = report.results[0]
    assert item.runs >= 2 and item.mean_ms * item.runs >= 20.0


def test_duplicate_graph_names_get_unique_labels():
    report = benchmark([gemm(), gemm()], small())
    assert report.labels == ["0:gemm", "1:gemm"]


def test_measure_latency_single_model():
    result = measure_latency(conv_relu(), batch_size=2, threads=1)
    assert result.runs == 20 and result.batch_size == 2 and result.threads == 1 and result.median_ms > 0
    with pytest.raises(BadInputError, match="fixed to 1"):
        measure_latency(conv_relu(batch=1), batch_size=2)


def test_importing_bench_is_cheap():
    code = ("import sys, onnxopt.bench; "
            "print(','.join(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import onnxopt.bench pulled in: {result.stdout.strip()}"


# ---------------------------------------------------------------------------------------------------- host info
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2
processor\t: 1
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_host_info_fields():
    info = host_info()
    assert info is host_info()  # cached
    data = json.loads(json.dumps(info.to_dict()))
    for key in ("cpu_model", "machine", "logical_cores", "flags", "os", "python", "onnxruntime_version",
                "onnx_version", "onnx_ir_version", "numpy_version", "ort_providers"):
        assert key in data
    assert info.logical_cores >= 1 and "CPUExecutionProvider" in info.ort_providers
    assert info.onnxruntime_version == __import__("onnxruntime").__version__
    if sys.platform.startswith("linux") and info.is_x86:
        assert set(info.flags) == {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c"}
        assert info.flags_known
    assert isinstance(int8_kernel_notes(info), str) and info.describe()


def test_parse_cpuinfo_x86_and_arm():
    model, flags = parse_cpuinfo(X86_CPUINFO, "x86_64")
    assert model.startswith("Intel(R) Core(TM) i7-8700")
    assert flags == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "amx_int8": False,
                     "fma": True, "f16c": True}
    model, flags = parse_cpuinfo(ARM_CPUINFO, "aarch64")
    assert flags == {"asimd": True, "asimddp": True, "i8mm": False}
    assert "0xd0c" in model
    assert parse_cpuinfo("processor : 0\n", "x86_64") is None


def _host(machine, flags):
    return HostInfo(cpu_model="test", machine=machine, logical_cores=4, usable_cores=4, flags=flags)


def test_int8_properties_and_reduce_range():
    avx2 = _host("x86_64", {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False,
                            "amx_int8": False, "fma": True, "f16c": True})
    assert avx2.has_avx2 and not avx2.has_vnni and not avx2.has_avx512
    assert suggest_reduce_range(avx2) and "saturate" in int8_kernel_notes(avx2)
    vnni = _host("x86_64", {**avx2.flags, "avx512f": True, "avx512_vnni": True})
    assert vnni.has_vnni and vnni.has_avx512 and not suggest_reduce_range(vnni)
    assert "AVX512-VNNI" in int8_kernel_notes(vnni)
    alder = _host("x86_64", {**avx2.flags, "avx_vnni": True})
    assert alder.has_vnni and "AVX-VNNI" in int8_kernel_notes(alder)
    unknown = _host("AMD64", {name: None for name in avx2.flags})
    assert not unknown.flags_known and suggest_reduce_range(unknown) and "unknown" in int8_kernel_notes(unknown)
    arm = _host("aarch64", {"asimd": True, "asimddp": True, "i8mm": False})
    assert arm.is_arm and arm.has_arm_dot and not suggest_reduce_range(arm)
    assert "dot product" in int8_kernel_notes(arm)


# ------------------------------------------------------------------------------------------------------ prepacking
def _prepacking(session) -> bool:
    options = session.get_session_options()
    try:
        return options.get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # never set: ORT's default, prepacking on
        return True


def test_few_samples_on_large_weights_skip_prepacking(monkeypatch):
    """ORT's weight prepacking is skipped only for a session that will run a few samples of a model with large
    weights (the threshold lowered here); a timed session (samples unknown) always prepacks, like a deployed one."""
    model = gemm()
    assert runtime.worth_prepacking(model, 1)  # 240 bytes of weights
    monkeypatch.setattr(runtime, "PREPACK_SKIP_BYTES", 100)
    for source in (model, model.SerializeToString()):
        assert not runtime.worth_prepacking(source, runtime.FEW_SAMPLES)
        assert runtime.worth_prepacking(source, runtime.FEW_SAMPLES + 1)
        assert runtime.worth_prepacking(source, None)
    assert not _prepacking(runtime.make_session(model, samples=8))
    assert _prepacking(runtime.make_session(model))
    feed = {"v": np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32)}
    np.testing.assert_allclose(runtime.make_session(model, samples=8).run(None, feed)[0],
                               runtime.make_session(model).run(None, feed)[0], rtol=1e-5, atol=1e-6)


def test_calibration_and_evaluation_sessions_say_how_many_samples_they_run(monkeypatch):
    """The quantize pass's calibration session and the pipeline's evaluation sessions pass their sample counts
    (what decides prepacking); the placement search's timed sessions do not."""
    import onnxopt
    from onnxopt import examples

    counts: dict[str, list] = {}
    real = runtime.make_session

    def make_session(model, **kwargs):
        counts.setdefault(kwargs.get("what", ""), []).append(kwargs.get("samples"))
        return real(model, **kwargs)

    monkeypatch.setattr(runtime, "make_session", make_session)
    for module in ("onnxopt.pipeline.evaluation", "onnxopt.passes.quantize.collect"):
        monkeypatch.setattr(f"{module}.make_session", make_session, raising=False)
    onnxopt.optimize(examples.default_model_path(), ["quantize"], calib=str(examples.default_calib_path()),
                     measure_latency=False)
    from onnxopt.calib_data import open_data

    from onnxopt.passes.quantize import QuantizePass

    samples = open_data(str(examples.default_calib_path())).num_samples()  # 300: the calibration and the evaluation
    assert counts["the model prepared for calibration"] == [min(samples, QuantizePass().calib_samples)]
    assert counts["the input model"] and all(n == samples for n in counts["the input model"])
    assert counts["a placement candidate"] and all(n is None for n in counts["a placement candidate"])
