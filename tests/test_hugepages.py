"""The CLI's re-execution with malloc asking for transparent huge pages (onnxopt.hugepages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt import hugepages
from onnxopt.hugepages import ENV_SWITCH, relaunch_environment, thp_mode, tunables_with_hugetlb

REPO = Path(__file__).resolve().parents[1]
LINUX = {"system": "linux", "glibc": (2, 36), "mode": "madvise"}


@pytest.mark.parametrize(("text", "mode"), [("always [madvise] never\n", "madvise"),
                                            ("[always] madvise never", "always"),
                                            ("always madvise [never]", "never"), ("no brackets", None)])
def test_thp_mode_reads_the_bracketed_word(tmp_path: Path, text: str, mode: str | None):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert thp_mode(str(path)) == mode


def test_thp_mode_of_a_missing_file_is_unknown(tmp_path: Path):
    assert thp_mode(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(("current", "expected"), [
    (None, "glibc.malloc.hugetlb=1"),
    ("", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", None),  # the user's own choice stands
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", None),
])
def test_tunables_add_hugetlb_once(current: str | None, expected: str | None):
    assert tunables_with_hugetlb(current) == expected


def test_relaunch_environment_sets_the_tunable_once():
    env = relaunch_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert relaunch_environment(env, **LINUX) is None  # the re-executed process does not re-execute again
    assert relaunch_environment({**env, ENV_SWITCH: "1"}, **LINUX) is None


@pytest.mark.parametrize("change", [
    {"system": "darwin"}, {"system": "win32"}, {"glibc": None}, {"glibc": (2, 34)},
    {"mode": "always"}, {"mode": "never"}, {"mode": None},
])
def test_no_relaunch_where_it_cannot_help(change: dict):
    assert relaunch_environment({"PATH": "/bin"}, **{**LINUX, **change}) is None


@pytest.mark.parametrize("environ", [{ENV_SWITCH: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}])
def test_the_user_can_opt_out(environ: dict):
    assert relaunch_environment(environ, **LINUX) is None


def _host_that_helps(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    return calls


def test_relaunch_replays_the_command_line_of_a_large_model(monkeypatch: pytest.MonkeyPatch):
    calls = _host_that_helps(monkeypatch)
    monkeypatch.setattr(hugepages, "models_bytes", lambda argv: hugepages.RELAUNCH_FROM_BYTES)
    hugepages.relaunch(["python", "-m", "onnxopt", "inspect", "m.onnx"])
    [(exe, argv, env)] = calls
    assert exe == sys.executable and argv == ["python", "-m", "onnxopt", "inspect", "m.onnx"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_no_relaunch_for_a_small_model_unless_asked(monkeypatch: pytest.MonkeyPatch):
    calls = _host_that_helps(monkeypatch)
    monkeypatch.setattr(hugepages, "models_bytes", lambda argv: hugepages.RELAUNCH_FROM_BYTES - 1)
    hugepages.relaunch(["python", "-m", "onnxopt", "inspect", "m.onnx"])
    assert calls == []
    monkeypatch.setenv(ENV_SWITCH, "1")
    hugepages.relaunch(["python", "-m", "onnxopt", "inspect", "m.onnx"])
    assert len(calls) == 1


def test_model_bytes_counts_external_data_once(tmp_path: Path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.ones((64, 64), np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], weights)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    total = path.stat().st_size + (tmp_path / "m.bin").stat().st_size
    assert hugepages.model_bytes(str(path)) == total
    assert hugepages.models_bytes(["python", str(path), "--calib", str(tmp_path / "absent.onnx"), str(path)]) == total
    assert hugepages.models_bytes(["onnxopt", "bench", "-o", str(path)]) == 0  # an earlier output is not read
    assert hugepages.models_bytes(["onnxopt", "bench", f"--output={path}"]) == 0
    with pytest.MonkeyPatch.context() as patch:  # a model file this large holds its weights: not parsed
        patch.setattr(hugepages, "PARSED_BELOW_BYTES", path.stat().st_size)
        assert hugepages.model_bytes(str(path)) == path.stat().st_size
    sparse = tmp_path / "m.bin"
    sparse.unlink()
    with open(sparse, "wb") as handle:  # the same length, as a hole: nothing stored
        handle.truncate(2 * 64 * 64 * 4)
    assert hugepages.model_bytes(str(path)) < total
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"\x00\x01garbage")
    assert hugepages.model_bytes(str(garbage)) == garbage.stat().st_size


def test_a_failed_size_count_runs_the_command_as_it_is(monkeypatch: pytest.MonkeyPatch):
    calls = _host_that_helps(monkeypatch)

    def broken(argv: object) -> int:
        raise PermissionError("unreadable")

    monkeypatch.setattr(hugepages, "models_bytes", broken)
    hugepages.relaunch(["python", "-m", "onnxopt", "inspect", "m.onnx"])
    assert calls == []


def test_a_failed_exec_runs_the_command_as_it_is(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hugepages, "relaunch_environment", lambda *a, **k: {"X": "1"})

    def fail(*args: object) -> None:
        raise OSError("exec refused")

    monkeypatch.setattr(os, "execve", fail)
    hugepages.relaunch(["python", "-m", "onnxopt"])  # returns: no exception


def test_glibc_version_parses_confstr(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36")
    assert hugepages.glibc_version() == (2, 36)
    monkeypatch.setattr(os, "confstr", lambda name: "musl 1.2")
    assert hugepages.glibc_version() is None

    def missing(name: str) -> str:
        raise ValueError(name)

    monkeypatch.setattr(os, "confstr", missing)
    assert hugepages.glibc_version() is None


def test_the_cli_process_reports_what_it_ran_with(tmp_path: Path):
    """`python -m onnxopt` on this host: re-executed with the tunable where that helps, and the report says so."""
    from onnxopt import examples

    environ = {k: v for k, v in os.environ.items() if k not in (ENV_SWITCH, "GLIBC_TUNABLES")}
    helps = hugepages.helps_here(environ)
    out = tmp_path / "out.onnx"
    command = [sys.executable, "-m", "onnxopt", "optimize", str(examples.default_model_path()), "-o", str(out),
               "--pass", "normalize", "--no-latency", "--no-plot", "-q"]
    for switch, expected in ((None, False), ("1", helps), ("0", False)):  # the example is small: only when asked
        env = environ if switch is None else {**environ, ENV_SWITCH: switch}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        memory = json.loads(out.with_name("out.onnx.report.json").read_text())["host"]["memory"]
        assert memory == {"thp_mode": thp_mode(), "malloc_hugepages": expected}, switch
        if thp_mode() is not None:  # the Markdown names the setting where the kernel says its mode
            assert ("malloc on" if expected else "malloc off") in out.with_name("out.onnx.report.md").read_text()


def test_only_a_process_started_as_the_cli_restarts(monkeypatch: pytest.MonkeyPatch):
    from onnxopt import cli

    assert cli._launched_as_cli() is False  # pytest: a program calling run() is not ours to restart
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/onnxopt", "inspect", "m.onnx"])
    assert cli._launched_as_cli() is True


def test_advice_for_a_large_model_in_a_process_without_huge_pages(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(sys, "platform", "linux")
    big = hugepages.RELAUNCH_FROM_BYTES
    note = hugepages.advice(big, {})
    assert note is not None and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in note
    assert hugepages.advice(big - 1, {}) is None  # small: it would cost time
    assert hugepages.advice(big, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None  # already on
    assert hugepages.advice(big, {ENV_SWITCH: "0"}) is None  # the user said no
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "always")
    assert hugepages.advice(big, {}) is None  # the kernel gives them anyway


def test_the_pipeline_notes_the_advice_on_the_input_step(monkeypatch: pytest.MonkeyPatch):
    import onnxopt
    from onnxopt import examples

    monkeypatch.setattr(hugepages, "advice", lambda weight_bytes, environ=None: f"advice for {weight_bytes} bytes")
    result = onnxopt.optimize(str(examples.default_model_path()), [], measure_latency=False)
    notes = result.report.steps[0].notes
    assert any(note.startswith("advice for ") for note in notes), notes
