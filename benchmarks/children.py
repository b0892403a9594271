"""Waiting for a benchmark's child process with its resource usage: the child's own peak RSS, from ``wait4``."""

from __future__ import annotations

import os
import resource
import subprocess
import time


def wait_with_usage(proc: subprocess.Popen, timeout: float) -> tuple[int, resource.struct_rusage]:
    """Wait for ``proc`` (killed once ``timeout`` seconds have passed); its exit code and resource usage
    (``ru_maxrss``: its peak resident memory in KB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(status), usage
