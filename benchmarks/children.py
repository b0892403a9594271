"""Waiting for a benchmark's child process: its exit code, resource usage and its own peak resident memory.

``wait4``'s ``ru_maxrss`` is not the child's own peak: Linux carries the high-water mark across ``execve``, so a child
starts from its parent's resident size at the fork (the large-model benchmark's parent held 8 GB after checking a
2.4 GB output, and every later row reported 8334 MB). The child's own peak is ``VmHWM`` in ``/proc/PID/status``,
which starts afresh with the new program; it is read while the child runs (a high-water mark only grows, so the last
reading before exit is the peak up to the polling interval).
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from typing import NamedTuple


class Waited(NamedTuple):
    code: int
    usage: resource.struct_rusage
    #: VmHWM of the child's program (MB); None if it ended before it could be read (then use ``usage``).
    own_peak_mb: float | None


def wait_with_usage(proc: subprocess.Popen, timeout: float, limit_mb: int | None = None) -> Waited:
    """Wait for ``proc`` (killed once ``timeout`` seconds have passed, or once its resident memory passes
    ``limit_mb``: a run that would exhaust the machine is stopped from outside, whatever it is doing)."""
    deadline = time.monotonic() + timeout
    peak: float | None = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        memory = _status_mb(proc.pid)
        if "VmHWM" in memory:  # the latest reading, not the largest: right after the fork the child reads as its parent
            peak = memory["VmHWM"]
        if time.monotonic() > deadline or (limit_mb is not None and memory.get("VmRSS", 0.0) > limit_mb):
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    return Waited(os.waitstatus_to_exitcode(status), usage, peak)


def _status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB (empty once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                    if line.startswith(("VmRSS", "VmHWM"))}
    except (OSError, ValueError, IndexError):
        return {}
