"""Waiting for a benchmark's child process with its resource usage: the child's own peak RSS, from ``wait4``."""

from __future__ import annotations

import os
import resource
import subprocess
import time


def wait_with_usage(proc: subprocess.Popen, timeout: float,
                    limit_mb: int | None = None) -> tuple[int, resource.struct_rusage]:
    """Wait for ``proc`` (killed once ``timeout`` seconds have passed, or once its resident memory passes
    ``limit_mb``: a run that would exhaust the machine is stopped from outside, whatever it is doing); its exit code
    and resource usage (``ru_maxrss``: its peak resident memory in KB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline or (limit_mb is not None and resident_mb(proc.pid) > limit_mb):
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01 if limit_mb is not None else 0.05)
    return os.waitstatus_to_exitcode(status), usage


def resident_mb(pid: int) -> float:
    """Current resident memory of ``pid`` in MB (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0
