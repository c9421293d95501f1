"""Pick the candidate ``auto`` keeps: the smallest and fastest one within the accuracy goal.

"Smallest and fastest" conflict when an int8 model is a quarter of the bytes but slower than
float (int8 kernels on CPUs without VNNI): the kept candidate is the one with the least
bytes × median latency, which is the same ordering as the product of both ratios to fp32.
A model half the size at the same speed beats one a third smaller but 60% slower.
"""
from __future__ import annotations

from typing import List, Sequence


def cost(m) -> float:
    return m.bytes * m.latency.median_ms


def choose(measured: Sequence, max_drop: float) -> tuple:
    """Return ``(chosen, goal_met)``.

    ``measured`` items have ``.bytes``, ``.latency.median_ms`` and ``.quality.drop``. When no
    candidate meets the goal, the one with the smallest drop is returned (ties: smaller bytes).
    """
    passing = [m for m in measured if m.quality.drop <= max_drop + 1e-12]
    if not passing:
        best = min(measured, key=lambda m: (round(m.quality.drop, 6), m.bytes))
        return best, False
    return min(passing, key=lambda m: (cost(m), m.bytes)), True


def frontier(measured: Sequence) -> List:
    """Candidates no other candidate beats on bytes, latency and drop at once."""
    def dominated(a, b) -> bool:
        return (b.bytes <= a.bytes and b.latency.median_ms <= a.latency.median_ms
                and b.quality.drop <= a.quality.drop
                and (b.bytes, b.latency.median_ms, b.quality.drop) != (a.bytes, a.latency.median_ms, a.quality.drop))
    return [a for a in measured if not any(dominated(a, b) for b in measured)]
