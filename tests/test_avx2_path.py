"""benchmarks/on_avx2_path.py: the AVX2 code path on an AVX-512 host (the flag filter always; the path itself where
the host allows CPUID faulting and a private mount namespace)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark


def _wrapper():  # noqa: ANN202
    return load_benchmark("on_avx2_path.py", "on_avx2_path")


CPUINFO = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512vl avx512_vnni avx512_bf16 avx_vnni amx_int8 vpclmulqdq gfni
bogomips\t: 4000

processor\t: 1
flags\t\t: avx2 avx512bw
"""


def test_the_filtered_cpuinfo_keeps_avx2_and_drops_what_cpuid_hides() -> None:
    text = _wrapper().cpuinfo_without_hidden(CPUINFO)
    lines = text.splitlines()
    assert lines[2] == "flags\t\t: fpu sse2 avx avx2 fma vpclmulqdq gfni"
    assert lines[6] == "flags\t\t: avx2"
    assert [line for line in lines if not line.startswith("flags")] == \
        [line for line in CPUINFO.splitlines() if not line.startswith("flags")]


def test_the_path_makes_mlas_saturate_and_hides_vnni_from_every_reader(tmp_path: Path) -> None:
    wrapper = _wrapper()
    try:
        wrapper._require_host()
    except wrapper.PathError as why:
        pytest.skip(f"no AVX2 path on this host: {why}")
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here")
    library, cpuinfo = wrapper._build(tmp_path)
    seen = wrapper.check(cpuinfo, wrapper.environment(library))
    assert seen["saturates"] and seen["avx2"]
    assert not (seen["vnni"] or seen["avx512"] or seen["numpy_avx512f"])
    assert "avx512" not in seen["host"]
