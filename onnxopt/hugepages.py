"""Transparent huge pages for the CLI's own memory: the command re-executes itself once with glibc's malloc asking
the kernel for them.

A large model's weights pass through many fresh buffers of hundreds of MB (protobuf copies, ``bytes``, ORT's
session buffers). Where the kernel backs a process's memory with huge pages only on request (THP mode ``madvise``,
the default of Debian and Ubuntu kernels), numpy asks for them and glibc's malloc does not: every 4 KiB page of those
buffers is faulted and zeroed on first touch. On the 2.4 GB MLP of ``benchmarks/large_model.py`` a quantize run
spent 46.7 s of system CPU time in 74.6 s (ad hoc; with huge pages 24.5 s in 49.4 s; measured side by side in
``reports/large_model.md``). glibc >= 2.35 makes malloc ask for them too when the process starts with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; a tunable is read only at process start, so ``onnxopt`` (the console
script and ``python -m onnxopt``) replays its own command line once with it set, before it imports anything heavy.

It pays only on large models: the `onnxopt quantize` command on the 269 MB MLP was no faster with it, and on the
67 MB one and the example model it was slower (by 1.3 s and 0.5 s in an ad-hoc alternated count; the benchmark's
"forced" rows measure it), so the command replays itself only when its ``.onnx`` arguments hold at least
``RELAUNCH_FROM_BYTES`` with their external data. Nothing is done where it cannot help either: not Linux with
glibc >= 2.35, THP mode other than ``madvise`` (``always`` already has them, ``never`` refuses them), a
``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb``, or ``ONNXOPT_MALLOC_HUGEPAGES=0``. The Python API
cannot restart its caller: set the variable before starting Python.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence

#: The tunable and the value glibc reads: 1 = madvise(MADV_HUGEPAGE) on the memory malloc maps.
TUNABLE = "glibc.malloc.hugetlb"
#: "0": the CLI never re-executes itself; "1": it does whatever its models' size (where it can help); unset: from
#: ``RELAUNCH_FROM_BYTES``. The re-executed process sees the tunable set and does not loop.
ENV_SWITCH = "ONNXOPT_MALLOC_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)
#: Models (their files and external data together) from this size on get the replay.
RELAUNCH_FROM_BYTES = 1 << 30
#: Model files smaller than this are parsed for the external data they name; a larger one holds its weights.
PARSED_BELOW_BYTES = 64 << 20


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's THP mode (the bracketed word of ``enabled``: always, madvise, never), None where unknown."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr on this OS
        return None
    name, _, version = text.partition(" ")
    parts = version.split(".")
    if name != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


def _hugetlb_value(tunables: str | None) -> str | None:
    """The value a ``GLIBC_TUNABLES`` string gives ``glibc.malloc.hugetlb`` ("" when named without one), or None."""
    for entry in (tunables or "").split(":"):
        name, _, value = entry.partition("=")
        if name == TUNABLE:
            return value
    return None


def tunables_with_hugetlb(current: str | None) -> str | None:
    """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added; None when ``current`` already sets it."""
    if _hugetlb_value(current) is not None:
        return None
    return ":".join([*(entry for entry in (current or "").split(":") if entry), f"{TUNABLE}=1"])


def state(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """What a report records: the THP mode and whether this process's malloc asked for huge pages."""
    environ = os.environ if environ is None else environ
    return {"thp_mode": thp_mode(), "malloc_hugepages": _hugetlb_value(environ.get("GLIBC_TUNABLES")) in ("1", "2")}


def relaunch_environment(environ: Mapping[str, str], *, system: str, glibc: tuple[int, int] | None,
                         mode: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would not change anything (or is switched
    off)."""
    if environ.get(ENV_SWITCH) == "0" or system != "linux" or glibc is None or glibc < MIN_GLIBC:
        return None
    if mode != "madvise":
        return None
    tunables = tunables_with_hugetlb(environ.get("GLIBC_TUNABLES"))
    if tunables is None:
        return None
    return {**environ, "GLIBC_TUNABLES": tunables}


def _relaunch_environment_here(environ: Mapping[str, str]) -> dict[str, str] | None:
    """:func:`relaunch_environment` on this process's platform, C library and THP mode."""
    return relaunch_environment(environ, system=sys.platform, glibc=glibc_version(), mode=thp_mode())


def helps_here(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this host and ``environ`` let a restart with the tunable change anything."""
    return _relaunch_environment_here(os.environ if environ is None else environ) is not None


def _stored_bytes(path: str) -> int:
    """A file's bytes on disk: a sparse file's holes are no memory to copy (a 2 GiB weight of zeros in a sparse
    file, tests/test_reliability.py, is mapped, never read)."""
    info = os.stat(path)
    blocks = getattr(info, "st_blocks", None)
    return info.st_size if blocks is None else min(info.st_size, 512 * blocks)


def advice(weight_bytes: int, environ: Mapping[str, str] | None = None) -> str | None:
    """A note for a run of the Python API on a model of ``RELAUNCH_FROM_BYTES`` or more in a process whose malloc
    does not ask for huge pages where that would help (the command restarts itself instead); None otherwise."""
    if weight_bytes < RELAUNCH_FROM_BYTES or not helps_here(environ):  # not when malloc already asks for them
        return None
    return (f"this process's malloc does not ask for transparent huge pages; for {weight_bytes / 2**30:.1f} GiB of "
            f"weights, starting Python with GLIBC_TUNABLES={TUNABLE}=1 (what the onnxopt command does) saves much "
            "of the time spent faulting in fresh memory (the quantize pass on a 2.4 GB MLP: 13-16 s, "
            "reports/large_model.md)")


def model_bytes(path: str) -> int:
    """Bytes of an ONNX file and of the external data its initializers name (each data file counted once, whole,
    as stored); the file's own size where it cannot be parsed (the command then reports what is wrong with it)."""
    size = _stored_bytes(path)
    if size >= PARSED_BELOW_BYTES:  # its weights are in it: the command parses it once, later
        return size
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not for this check to judge
        return size
    folder, seen = os.path.dirname(os.path.abspath(path)), set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is not None and location not in seen:
                seen.add(location)
                with contextlib.suppress(OSError):
                    size += _stored_bytes(os.path.join(folder, location))
        for node in graph.node:
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    return size


#: Options whose value is a file the command writes: an earlier output there is not a model it reads.
OUTPUT_OPTIONS = ("-o", "--output")


def models_bytes(argv: Sequence[str]) -> int:
    """:func:`model_bytes` summed over the command line's existing ``.onnx`` files, outputs left out."""
    outputs = {value for option, value in zip(argv, argv[1:]) if option in OUTPUT_OPTIONS}
    outputs |= {arg.split("=", 1)[1] for arg in argv if arg.startswith("--output=")}
    paths = {arg for arg in argv if arg.lower().endswith(".onnx") and arg not in outputs and os.path.isfile(arg)}
    return sum(model_bytes(path) for path in sorted(paths))


def relaunch(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the same command line under :func:`relaunch_environment` when its models hold
    ``RELAUNCH_FROM_BYTES`` or more (or ``ONNXOPT_MALLOC_HUGEPAGES=1``); returns when nothing is to be done or the
    exec fails (the command then runs as it is)."""
    argv = list(sys.orig_argv if argv is None else argv)
    env = _relaunch_environment_here(os.environ)
    if env is None or not argv:
        return
    try:
        if os.environ.get(ENV_SWITCH) != "1" and models_bytes(argv) < RELAUNCH_FROM_BYTES:
            return
    except Exception:  # noqa: BLE001 - a speed-up must never stop the command; its own checks report bad files
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return


__all__ = ["ENV_SWITCH", "OUTPUT_OPTIONS", "PARSED_BELOW_BYTES", "RELAUNCH_FROM_BYTES", "TUNABLE", "advice",
           "glibc_version", "helps_here", "model_bytes", "models_bytes", "relaunch", "relaunch_environment", "state",
           "thp_mode", "tunables_with_hugetlb"]
