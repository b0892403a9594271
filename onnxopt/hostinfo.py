"""What machine a measurement was taken on: CPU, the instruction sets int8 kernels depend on, library versions.

Latency numbers (and whether int8 is faster than float at all) depend on the CPU: ONNX Runtime's u8s8 int8 GEMM
is fast with AVX512-VNNI / AVX-VNNI / AMX on x86 and with the dot-product extension on ARM; on AVX2 without VNNI
it uses ``vpmaddubsw``, whose 16-bit intermediate sums can saturate unless weights use 7 bits (``reduce_range``).
Every report carries this so numbers from different machines are not compared blindly.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from onnxopt import hugepages

#: x86 flags as /proc/cpuinfo spells them.
X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c")
#: ARM features as /proc/cpuinfo spells them (asimd is NEON on AArch64; 32-bit kernels say "neon").
ARM_FLAGS = ("asimd", "asimddp", "i8mm")
# macOS reports ARM features through sysctl under other names.
_MACOS_ARM_SYSCTL = {"asimd": "hw.optional.neon", "asimddp": "hw.optional.arm.FEAT_DotProd",
                     "i8mm": "hw.optional.arm.FEAT_I8MM"}
_MACOS_X86_SYSCTL = {"avx2": "hw.optional.avx2_0", "avx512f": "hw.optional.avx512f", "fma": "hw.optional.fma",
                     "f16c": "hw.optional.f16c"}


@dataclass(frozen=True)
class HostInfo:
    """The host a benchmark or run report was measured on.

    ``flags`` maps each relevant instruction-set flag to True/False, or None where it could not be read (an OS
    without /proc/cpuinfo or sysctl).
    """

    cpu_model: str
    machine: str
    logical_cores: int
    #: Cores this process may run on (CPU affinity / container limits); None where the OS does not say.
    usable_cores: int | None
    flags: dict[str, bool | None] = field(default_factory=dict)
    os: str = ""
    python: str = ""
    onnxruntime_version: str = ""
    onnx_version: str = ""
    onnx_ir_version: str = ""
    numpy_version: str = ""
    ort_providers: tuple[str, ...] = ()
    #: The kernel's transparent-huge-page mode and whether this process's malloc asked for them
    #: (:mod:`onnxopt.hugepages`): large models' run times depend on it.
    memory: dict[str, object] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @property
    def is_arm(self) -> bool:
        return self.machine.lower().startswith(("arm", "aarch64"))

    @property
    def flags_known(self) -> bool:
        return bool(self.flags) and all(v is not None for v in self.flags.values())

    @property
    def has_avx2(self) -> bool:
        return bool(self.flags.get("avx2"))

    @property
    def has_avx512(self) -> bool:
        return bool(self.flags.get("avx512f"))

    @property
    def has_vnni(self) -> bool:
        """x86 int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, or AMX, which implies them)."""
        return any(bool(self.flags.get(name)) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def has_arm_dot(self) -> bool:
        """ARM sdot/udot (ARMv8.2 dot product), what ORT's fast int8 ARM kernels need."""
        return bool(self.flags.get("asimddp"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ort_providers"] = list(self.ort_providers)
        data["flags"] = dict(self.flags)
        return data

    def describe(self) -> str:
        """One line for tables: CPU, cores, the flags that are set."""
        if self.flags and not self.flags_known:
            flags = "unknown"
        else:
            flags = ", ".join(name for name, value in self.flags.items() if value) or "none of " + "/".join(self.flags)
        limited = self.usable_cores and self.usable_cores != self.logical_cores
        usable = f" ({self.usable_cores} usable)" if limited else ""
        return (f"{self.cpu_model} [{self.machine}], {self.logical_cores} logical cores{usable}; CPU flags: {flags}; "
                f"onnxruntime {self.onnxruntime_version}")


def channel_block(info: HostInfo) -> int:
    """The channel block of ONNX Runtime's CPU conv kernels (MLAS NCHWc) on this CPU: 16 floats with AVX-512F, 8
    otherwise (AVX2; other CPUs get 8 too, a multiple of every NEON/SSE width).

    A pruned layer whose channel count is not a multiple of it falls off the blocked path: on this 2-core AVX-512
    host, a MobileNetV2 cut to about 1.2M MACs ran 1.5x slower with counts rounded to 8 than to 16 (one run,
    ``benchmarks/round_to.py``).
    """
    return 16 if info.is_x86 and info.has_avx512 else 8


def suggest_reduce_range(info: HostInfo) -> bool:
    """Whether u8s8 int8 weights should use 7 bits on this CPU.

    x86 without VNNI computes u8 x s8 products in ``vpmaddubsw``, which saturates its 16-bit pair sums; 7-bit weights
    avoid that. VNNI/AMX and ARM kernels accumulate in 32 bits. An x86 CPU whose flags are unknown gets the safe
    answer (True).
    """
    if info.is_x86:
        return not info.has_vnni if info.flags_known else True
    return False


def int8_kernel_notes(info: HostInfo) -> str:
    """What ONNX Runtime's int8 kernels can do on this CPU, in a sentence for reports and the quantizer's notes."""
    if info.is_x86:
        if not info.flags_known:
            return ("x86 CPU with unknown instruction flags: int8 speed-up unknown; weights use reduce_range "
                    "(7 bits) to be safe against u8s8 saturation")
        if info.flags.get("amx_int8"):
            return "AMX-INT8 and VNNI: int8 GEMM/Conv run natively; expect large int8 speed-ups, full 8-bit weights"
        if info.has_vnni:
            kind = "AVX512-VNNI" if info.flags.get("avx512_vnni") else "AVX-VNNI"
            return f"{kind}: int8 dot products accumulate in 32 bits; expect int8 speed-ups, full 8-bit weights"
        if info.has_avx2:
            wide = "AVX512 " if info.has_avx512 else ""
            return (f"{wide}AVX2 without VNNI: u8s8 int8 GEMM uses vpmaddubsw, whose 16-bit sums can saturate; "
                    "use reduce_range (7-bit weights); int8 speed-ups are modest")
        return "no AVX2: ONNX Runtime's int8 kernels are slow on this CPU; quantization may not speed it up"
    if info.is_arm:
        if not info.flags_known:
            return "ARM CPU with unknown features: int8 speed-up unknown"
        if info.flags.get("i8mm"):
            return "ARM i8mm and dot product: int8 matrix multiply runs natively; expect int8 speed-ups"
        if info.has_arm_dot:
            return "ARM dot product (sdot/udot): int8 GEMM accumulates in 32 bits; expect int8 speed-ups"
        return "ARM without the dot-product extension: int8 kernels are widening NEON; speed-ups are small"
    return f"{info.machine or 'unknown'} CPU: int8 kernel support unknown"


@functools.lru_cache(maxsize=1)
def host_info() -> HostInfo:
    """Gathered once per process (reading /proc/cpuinfo and the library versions is not free)."""
    machine = platform.machine() or "unknown"
    cpu_model, flags = _cpu_model_and_flags(machine)
    try:
        import onnxruntime as ort

        providers: tuple[str, ...] = tuple(ort.get_available_providers())
    except Exception:  # noqa: BLE001 - a broken ORT install must not stop a report from being written
        providers = ()
    return HostInfo(
        cpu_model=cpu_model,
        machine=machine,
        logical_cores=os.cpu_count() or 1,
        usable_cores=_usable_cores(),
        flags=flags,
        os=platform.platform(),
        python=platform.python_version(),
        onnxruntime_version=_version("onnxruntime"),
        onnx_version=_version("onnx"),
        onnx_ir_version=_version("onnx-ir", "onnx_ir"),
        numpy_version=_version("numpy"),
        ort_providers=providers,
        memory=hugepages.state(),
    )


def _is_arm(machine: str) -> bool:
    return machine.lower().startswith(("arm", "aarch64"))


def _cpu_model_and_flags(machine: str) -> tuple[str, dict[str, bool | None]]:
    names = ARM_FLAGS if _is_arm(machine) else X86_FLAGS
    unknown: dict[str, bool | None] = {name: None for name in names}
    fallback_model = platform.processor() or machine
    if sys.platform.startswith("linux"):
        parsed = parse_cpuinfo(_read_text("/proc/cpuinfo"), machine)
        if parsed is not None:
            return parsed[0] or fallback_model, parsed[1]
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string") or fallback_model
        table = _MACOS_ARM_SYSCTL if _is_arm(machine) else _MACOS_X86_SYSCTL
        flags = dict(unknown)
        for name, key in table.items():
            value = _sysctl(key)
            flags[name] = None if value is None else value.strip() == "1"
        return model, flags
    return fallback_model, unknown


def parse_cpuinfo(text: str | None, machine: str) -> tuple[str, dict[str, bool | None]] | None:
    """(model name, flags) from the text of /proc/cpuinfo (first processor), or None if it has no flags line."""
    if not text:
        return None
    model = ""
    features: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and features is None:
            features = set(value.split())
    if features is None:
        return None
    if _is_arm(machine):
        flags = {name: name in features for name in ARM_FLAGS}
        flags["asimd"] = flags["asimd"] or "neon" in features
    else:
        flags = {name: name in features for name in X86_FLAGS}
    if not model and _is_arm(machine):
        model = _arm_part_name(text)
    return model, dict(flags)


def _arm_part_name(text: str) -> str:
    """ARM kernels list 'CPU implementer/part' instead of a model name; say at least that much."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("CPU implementer", "CPU part") and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if not fields:
        return ""
    return f"ARM implementer {fields.get('CPU implementer', '?')} part {fields.get('CPU part', '?')}"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _sysctl(key: str) -> str | None:
    try:
        result = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


__all__ = ["ARM_FLAGS", "X86_FLAGS", "HostInfo", "host_info", "int8_kernel_notes", "parse_cpuinfo",
           "suggest_reduce_range"]
