"""Run a command on the AVX2 code path of a host that has AVX-512 and VNNI.

ONNX Runtime's MLAS picks its int8 kernels from CPUID, with no switch to force the AVX2 ones, and those are the
kernels the quantize pass must not lose to (the u8s8 saturation that ``reduce_range`` works around, int8 convs that
are slower than FP32). This wrapper lets a VNNI host take that path: it preloads ``avx2_path/hide_avx512.c``
(compiled here with the system C compiler), which hides AVX-512, VNNI and AMX from every CPUID in the command's
processes through the kernel's CPUID faulting, and, in a private mount namespace, binds over ``/proc/cpuinfo`` a copy
without those flags (what ``onnxopt.hostinfo`` reads to choose ``reduce_range``). It then checks the path before it
runs anything: a u8 x s8 ``MatMulInteger`` whose pair sums overflow 16 bits must saturate (MLAS's AVX2 kernel, not
the VNNI one), numpy must not see AVX512F, and ``onnxopt.hostinfo`` must read AVX2 without VNNI. The command sees
``ONNXOPT_BENCH_CPU_PATH`` (a sentence the benchmark reports print beside the host line).

This is the AVX2 code on this host's cores, not an AVX2 host: the int8 and FP32 kernels are those an AVX2 CPU runs,
their speed that of this CPU's execution units. Needs Linux on x86-64 with the ``cpuid_fault`` flag, root (for the
mount namespace), ``unshare`` and ``cc``.

Usage: python benchmarks/on_avx2_path.py [--check] [-- COMMAND ...]
       e.g. python benchmarks/on_avx2_path.py -- nice -n 5 python benchmarks/quantization.py --repeats 30 \\
            --out reports/quantization_avx2_path.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "avx2_path" / "hide_avx512.c"
#: The environment variable a benchmark report reads to say which code path it ran on.
CPU_PATH_ENV = "ONNXOPT_BENCH_CPU_PATH"
NOTE = ("AVX2 code path on this AVX-512 VNNI host: AVX-512, VNNI and AMX hidden from CPUID and /proc/cpuinfo by "
        "benchmarks/on_avx2_path.py (the kernels an AVX2 CPU runs, at this CPU's speed; MLAS's AVX2 u8s8 kernel "
        "checked to saturate)")
#: /proc/cpuinfo flags the preloaded library hides from CPUID.
HIDDEN_FLAG = re.compile(r"^(avx512\w*|avx_vnni\w*|amx\w*)$")
#: glibc chose its string functions from CPUID before the library loaded: tell it to drop AVX-512 too.
GLIBC_HWCAPS = "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"

PROBE = r"""
import json
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

a = np.full((4, 64), 255, np.uint8)
b = np.full((64, 8), 127, np.int8)
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
                          [numpy_helper.from_array(b, "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
try:
    from numpy._core._multiarray_umath import __cpu_features__ as features
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as features
from onnxopt.hostinfo import host_info
info = host_info()
print(json.dumps({"saturates": bool((y != a.astype(np.int32) @ b.astype(np.int32)).any()),
                  "numpy_avx512f": bool(features.get("AVX512F")), "avx2": info.has_avx2, "vnni": info.has_vnni,
                  "avx512": info.has_avx512, "host": info.describe()}))
"""


class PathError(RuntimeError):
    """The AVX2 path cannot be set up or checked here."""


def cpuinfo_without_hidden(text: str) -> str:
    """``/proc/cpuinfo`` text with the flags the library hides removed from every ``flags`` line."""
    def strip(match: re.Match) -> str:
        kept = [flag for flag in match.group(2).split() if not HIDDEN_FLAG.match(flag)]
        return match.group(1) + " ".join(kept)
    return re.sub(r"^(flags\s*:\s*)(.*)$", strip, text, flags=re.MULTILINE)


def _require_host() -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise PathError("needs Linux on x86-64")
    flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    if not flags or "cpuid_fault" not in flags.group(1).split():
        raise PathError("this CPU or hypervisor offers no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo)")
    for tool in ("cc", "unshare", "mount"):
        if shutil.which(tool) is None:
            raise PathError(f"'{tool}' is not on PATH")
    if os.geteuid() != 0:
        raise PathError("needs root for the private mount namespace over /proc/cpuinfo")


def _build(workdir: Path) -> tuple[Path, Path]:
    """The compiled library and the filtered cpuinfo copy, in ``workdir``."""
    library = workdir / "hide_avx512.so"
    done = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode:
        raise PathError(f"compiling {SOURCE.name} failed:\n{done.stderr}")
    cpuinfo = workdir / "cpuinfo"
    cpuinfo.write_text(cpuinfo_without_hidden(Path("/proc/cpuinfo").read_text()))
    return library, cpuinfo


def environment(library: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), GLIBC_HWCAPS]))
    env[CPU_PATH_ENV] = NOTE
    return env


def wrapped(cpuinfo: Path, argv: list[str]) -> list[str]:
    """``argv`` run in a private mount namespace where ``/proc/cpuinfo`` is the filtered copy."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /proc/cpuinfo && exec "$@"', str(cpuinfo), *argv]


def check(cpuinfo: Path, env: dict[str, str]) -> dict:
    """Run the probe on the path; raise unless every library there sees an AVX2 CPU without VNNI."""
    done = subprocess.run(wrapped(cpuinfo, [sys.executable, "-c", PROBE]), env=env, capture_output=True, text=True)
    if done.returncode:
        raise PathError(f"the probe failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = [what for what, bad in (("MLAS's u8s8 MatMulInteger did not saturate (not its AVX2 kernel)",
                                     not seen["saturates"]),
                                    ("numpy sees AVX512F", seen["numpy_avx512f"]),
                                    ("onnxopt.hostinfo does not read AVX2", not seen["avx2"]),
                                    ("onnxopt.hostinfo reads VNNI or AVX-512", seen["vnni"] or seen["avx512"]))
             if bad]
    if wrong:
        raise PathError("the AVX2 path did not take: " + "; ".join(wrong))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="set up and check the path, print what it saw, exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.check:
        parser.error("give a command after --, or --check")
    try:
        _require_host()
        with tempfile.TemporaryDirectory(prefix="onnxopt-avx2-") as workdir:
            library, cpuinfo = _build(Path(workdir))
            env = environment(library)
            seen = check(cpuinfo, env)
            print(f"AVX2 path checked: {seen['host']}; MLAS u8s8 saturates, numpy without AVX512F", flush=True)
            if not command:
                return 0
            return subprocess.run(wrapped(cpuinfo, command), env=env).returncode
    except PathError as error:
        print(f"on_avx2_path: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
