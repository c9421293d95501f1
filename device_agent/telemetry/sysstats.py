"""Process and disk figures for ``system`` telemetry records (standard library only).

Linux answers from /proc; elsewhere the figures fall back to what the platform offers, or None.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional


def rss_bytes() -> Optional[int]:
    """Resident memory of this process now (Linux), else the peak the platform reports."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, the others KiB


def disk_free_bytes(path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class CpuMeter:
    """CPU time of this process per wall time since the previous reading, in percent of one
    core (as top shows it: a process busy on two cores reads 200)."""

    def __init__(self):
        self._last = self._now()

    @staticmethod
    def _now():
        return time.monotonic(), time.process_time()  # user + system CPU of all threads, ns resolution

    def percent(self) -> Optional[float]:
        now = self._now()
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return round(100.0 * cpu / wall, 1) if wall > 0 else None
