"""Polling for things that happen in other processes (agents, brokers, collectors)."""
from __future__ import annotations

import time


def wait_until(check, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Call ``check`` until it returns something truthy and return that; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
