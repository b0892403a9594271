"""The command line: exit codes, messages, outputs, and bad input that must never touch the input or leave files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.cli import main
from onnxopt.modelio import file_sha256
from onnx_builders import conv_classifier, save

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, args, message: str, *inputs: Path, absent: Path | None = None) -> str:
    sums = {p: file_sha256(p) for p in inputs}
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err + out
    for path, digest in sums.items():
        assert file_sha256(path) == digest, f"{path} was modified"
    if absent is not None:
        assert not absent.exists()
        assert not list(absent.parent.glob(f".{absent.name}*")), "temporary files left behind"
    return err


def test_optimize_ok(capsys, model_path: Path, data_path: Path, tmp_path: Path):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", model_path, "-o", out, "--calib", data_path, "--eval", data_path,
                                "--budget", "accuracy_drop=0.01", "--report", tmp_path / "rep.json", "-q")
    assert code == 0, err
    assert "budget accuracy_drop: 0 <= 0.01 met" in stdout
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["verdict"]["passed"] is True
    assert (tmp_path / "rep.md").exists() and (tmp_path / "rep.png").exists()
    onnx.checker.check_model(onnx.load(str(out)))


def test_no_plot_writes_the_report_without_its_png(capsys, model_path: Path, data_path: Path, tmp_path: Path):
    """--no-plot (every command that runs a recipe has it): the JSON and Markdown, no PNG, no link to one."""
    for command in (["optimize", "--pass", "normalize"], ["quantize", "--calib", data_path, "--placement", "all"]):
        out = tmp_path / f"{command[0]}.onnx"
        code, _, err = run_cli(capsys, command[0], model_path, "-o", out, *command[1:], "--no-latency", "--no-plot",
                               "-q")
        assert code == 0, err
        assert Path(f"{out}.report.json").exists() and not Path(f"{out}.report.png").exists()
        assert "![trajectory]" not in Path(f"{out}.report.md").read_text()
        assert not list(tmp_path.glob("*.png"))


def test_missed_budget_exits_1_and_says_which(capsys, model_path: Path, data_path: Path, tmp_path: Path):
    code, stdout, _ = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--eval", data_path,
                              "--budget", "size_ratio=0.01", "--no-latency", "-q")
    assert code == 1
    assert "budget size_ratio" in stdout and "MISSED" in stdout
    report = json.loads((tmp_path / "o.onnx.report.json").read_text())
    assert report["verdict"]["passed"] is False and "size_ratio" in report["verdict"]["summary"]


def test_pass_flags_on_the_command_line(capsys, model_path: Path, tmp_path: Path):
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--pass",
                           "normalize:min_opset=15,simplify=false", "--no-latency", "-q")
    assert code == 0, err
    assert onnx.load(str(tmp_path / "o.onnx")).opset_import[0].version == 15


def test_not_onnx(capsys, tmp_path: Path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    assert_refused(capsys, ["optimize", bad, "-o", tmp_path / "o.onnx"], "is not an ONNX model", bad,
                   absent=tmp_path / "o.onnx")


def test_truncated(capsys, model_path: Path, tmp_path: Path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    assert_refused(capsys, ["optimize", cut, "-o", tmp_path / "o.onnx"], "cut.onnx", cut, absent=tmp_path / "o.onnx")


def test_missing_model_file(capsys, tmp_path: Path):
    assert_refused(capsys, ["optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"], "does not exist")


def test_missing_external_data(capsys, tmp_path: Path):
    model = conv_classifier(channels=64)
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=64)
    (tmp_path / "ext.data").unlink()
    assert_refused(capsys, ["optimize", path, "-o", tmp_path / "o.onnx"], "external file 'ext.data', which is missing",
                   path, absent=tmp_path / "o.onnx")


def test_external_data_model_roundtrip(capsys, tmp_path: Path, data_path: Path):
    path = tmp_path / "ext.onnx"
    onnx.save(conv_classifier(), str(path), save_as_external_data=True, location="ext.data", size_threshold=64)
    code, _, err = run_cli(capsys, "optimize", path, "-o", tmp_path / "o.onnx", "--eval", data_path, "--no-latency",
                           "-q")
    assert code == 0, err
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_quantize_external_data_model(capsys, tmp_path: Path, data_path: Path):
    """Weights in an external file (torch's dynamo exporter writes one for any size): quantize (with and without a
    normalize pass before it) and prune work on it (ORT's quantizer failed on the relative data path when no pass
    had read the tensors), the output is self-contained, the input untouched."""
    path = tmp_path / "ext.onnx"
    # no BN: nothing for quantize's own normalize step to do, so the external tensors reach ORT's quantizer
    onnx.save(conv_classifier(channels=16, with_bn=False), str(path), save_as_external_data=True,
              location="ext.data", size_threshold=64)
    sums = {p: file_sha256(p) for p in (path, tmp_path / "ext.data")}
    for command in (["quantize", path, "-o", tmp_path / "q.onnx", "--calib", data_path],
                    ["optimize", path, "-o", tmp_path / "o.onnx", "--calib", data_path, "--pass", "quantize"],
                    ["optimize", path, "-o", tmp_path / "p.onnx", "--calib", data_path, "--pass", "normalize",
                     "--pass", "prune:ratio=0.25"]):
        code, _, err = run_cli(capsys, *command, "--no-latency", "-q")
        assert code == 0, err
        out = command[3]
        onnx.checker.check_model(str(out), full_check=True)
        loaded = onnx.load(str(out), load_external_data=False)
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in loaded.graph.initializer)
    assert {p: file_sha256(p) for p in sums} == sums


def test_external_tensors_read_into_memory_below_threshold(tmp_path: Path, monkeypatch):
    """Below the threshold a loaded model holds its tensors in memory (every tool's in-memory path); above it they
    stay external (ORT gets the model by path). An ir.Model given to the API keeps its own external tensors."""
    import onnx_ir as ir

    from onnxopt import modelio
    from onnxopt.api import _copy

    path = tmp_path / "ext.onnx"
    onnx.save(conv_classifier(), str(path), save_as_external_data=True, location="ext.data", size_threshold=64)
    assert not modelio.has_external_tensors(modelio.load_model(path))
    given = ir.load(path)
    assert not modelio.has_external_tensors(_copy(given)) and modelio.has_external_tensors(given)
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 64)
    assert modelio.has_external_tensors(modelio.load_model(path))


def test_quantize_pass_reads_external_tensors(tmp_path: Path, data_path: Path, monkeypatch):
    """The per-pass API on a model loaded by onnx_ir itself (tensors still external) quantizes it. Above the
    external-data threshold (lowered here; 1.8 GB in use) the tensors stay mapped from their file, the proto given
    to ORT's quantizer holds them in memory, and ORT sessions get it through a temporary external-data file: the
    same int8 model as in memory, placement search included."""
    import onnx_ir as ir

    from onnxopt import modelio, runtime
    from onnxopt.calib_data import open_data
    from onnxopt.passes.quantize import QuantizePass
    from onnxopt.pipeline.context import PassContext

    path = tmp_path / "ext.onnx"
    onnx.save(conv_classifier(channels=16, with_bn=False), str(path), save_as_external_data=True,
              location="ext.data", size_threshold=64)
    sums = {p: file_sha256(p) for p in (path, tmp_path / "ext.data")}
    context = PassContext(calib=open_data(str(data_path)))
    out = QuantizePass(placement="all").bind(context).apply(ir.load(path))
    assert any(node.op_type == "DequantizeLinear" for node in out.graph)
    reference = modelio.to_proto(out).SerializeToString()

    sessions: list[str] = []
    real_proto_file = modelio.proto_file

    def counting(proto):
        sessions.append(proto.graph.name)
        return real_proto_file(proto)

    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 64)
    monkeypatch.setattr(runtime, "EXTERNAL_DATA_THRESHOLD", 64)
    monkeypatch.setattr(runtime, "proto_file", counting)
    large = ir.load(path)
    assert modelio.has_external_tensors(large)
    out = QuantizePass(placement="all").bind(context).apply(large)
    assert modelio.to_proto(out).SerializeToString() == reference
    assert sessions, "the calibration session did not go through a temporary external-data file"
    sessions.clear()
    chosen = QuantizePass().bind(context).apply(ir.load(path))  # the placement search's sessions too
    assert len(sessions) >= 3
    modelio.check_model(chosen)
    assert {p: file_sha256(p) for p in sums} == sums


def test_unknown_op_domain(capsys, tmp_path: Path):
    model = conv_classifier(with_bn=False)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = save(model, tmp_path / "custom.onnx")
    assert_refused(capsys, ["optimize", path, "-o", tmp_path / "o.onnx"], "unknown domain 'com.example'", path,
                   absent=tmp_path / "o.onnx")


def test_unknown_pass_and_parameter(capsys, model_path: Path, tmp_path: Path):
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--pass", "sharpen"],
                   "unknown pass 'sharpen'", model_path, absent=tmp_path / "o.onnx")
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--pass", "normalize:speed=11"],
                   "has no parameter 'speed'", model_path, absent=tmp_path / "o.onnx")


@pytest.mark.parametrize("kind, message", [
    ("shape", "input 'input'"),
    ("dtype", "input 'input'"),
    ("nan", "NaN"),
    ("inf", "Inf"),
])
def test_bad_calibration_data(capsys, model_path: Path, tmp_path: Path, kind: str, message: str):
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    if kind == "shape":
        x = x[:, :, :4, :]
    elif kind == "dtype":
        x = (x * 100).astype("U8")
    elif kind == "nan":
        x[2, 0, 0, 0] = np.nan
    elif kind == "inf":
        x[1, 0, 0, 0] = np.inf
    data = tmp_path / f"{kind}.npz"
    np.savez(data, input=x)
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--calib", data], message, model_path,
                   data, absent=tmp_path / "o.onnx")


def test_empty_data_folder(capsys, model_path: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "empty"],
                   "empty", model_path, absent=tmp_path / "o.onnx")


def test_output_equals_input(capsys, model_path: Path):
    assert_refused(capsys, ["optimize", model_path, "-o", model_path], "is the input model", model_path)


def test_unwritable_output_folder(capsys, model_path: Path, tmp_path: Path):
    if os.geteuid() == 0:
        target = Path("/proc/onnxopt-test/o.onnx")  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "o.onnx"
    err = assert_refused(capsys, ["optimize", model_path, "-o", target], "output folder", model_path)
    assert str(target.parent) in err


def test_bad_budget_and_shape_syntax(capsys, model_path: Path, tmp_path: Path):
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--budget", "speed=2"],
                   "unknown budget 'speed'", model_path)
    assert_refused(capsys, ["optimize", model_path, "-o", tmp_path / "o.onnx", "--input-shape", "input=1,3"],
                   "must look like NAME:D0,D1", model_path)


def test_usage_errors_exit_2(capsys, model_path: Path):
    code, _, err = run_cli(capsys, "optimize", model_path)
    assert code == 2 and "--output" in err


def test_bench_json_two_models(capsys, model_path: Path, tmp_path: Path):
    other = save(conv_classifier(channels=16, seed=3), tmp_path / "wide.onnx")
    code, out, err = run_cli(capsys, "bench", model_path, other, "--batch", "1,2", "--threads", "1", "--repeats", "3",
                             "--warmup", "1", "--json", "-q")
    assert code == 0, err
    data = json.loads(out)
    labels = {r["label"] for r in data["results"]}
    assert labels == {"tiny.onnx", "wide.onnx"}
    assert {r["batch_size"] for r in data["results"]} == {1, 2}
    assert "flags" in data["host"]


def test_bench_table(capsys, model_path: Path):
    code, out, err = run_cli(capsys, "bench", model_path, "--repeats", "2", "--warmup", "0", "-q")
    assert code == 0, err
    assert "tiny.onnx" in out and "median" in out.lower()


def test_inspect(capsys, tmp_path: Path):
    path = save(conv_classifier(opset=11), tmp_path / "old.onnx")
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "fold 1 BatchNormalization" in out and "raise opset 11 -> 13" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert info["op_counts"]["Conv"] == 1 and info["params"] > 0


def test_passes_listing(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0 and "normalize" in out and "min_opset" in out
    assert "(required)" not in out, "list defaults (default_factory too) are shown"


def test_cli_does_not_import_torch():
    code = ("import sys, onnxopt.cli, onnxopt.bench, onnxopt.api, onnxopt.passes; "
            "from onnxopt.cli import main; main(['--help']); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "optimize" in result.stdout


def test_optimize_and_quantize_do_not_import_torch(tmp_path: Path):
    """onnxsim 0.8 imports torch at import time; normalize hides it so the light commands stay light."""
    code = ("import sys; from onnxopt.cli import main; from onnxopt import examples as e; "
            f"out = {str(tmp_path)!r}; "
            "assert main(['optimize', '--example', '-o', out + '/a.onnx', '-q', '--no-latency']) == 0; "
            "assert main(['quantize', str(e.default_model_path()), '-o', out + '/b.onnx', '--calib', "
            "str(e.default_calib_path()), '-q', '--no-latency']) == 0; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_console_script_entry_point_exit_code(tmp_path: Path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    result = subprocess.run([sys.executable, "-m", "onnxopt", "inspect", str(bad)], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
