"""Pick the candidate ``auto`` keeps: the smallest and fastest one within the accuracy goal."""
from __future__ import annotations

from typing import List, Sequence

# Candidates whose bytes are within this fraction of the smallest passing one count as equally
# small; among those the fastest wins (dynamic and int8 are about the same size, int8 is faster).
SIZE_TIE = 0.10


def choose(measured: Sequence, max_drop: float) -> tuple:
    """Return ``(chosen, goal_met)``.

    ``measured`` items have ``.bytes``, ``.latency.median_ms`` and ``.quality.drop``. When no
    candidate meets the goal, the one with the smallest drop is returned (ties: smaller bytes).
    """
    passing = [m for m in measured if m.quality.drop <= max_drop + 1e-12]
    if not passing:
        best = min(measured, key=lambda m: (round(m.quality.drop, 6), m.bytes))
        return best, False
    smallest = min(m.bytes for m in passing)
    near = [m for m in passing if m.bytes <= smallest * (1 + SIZE_TIE)]
    return min(near, key=lambda m: (m.latency.median_ms, m.bytes)), True


def frontier(measured: Sequence) -> List:
    """Candidates no other candidate beats on bytes, latency and drop at once."""
    def dominated(a, b) -> bool:
        return (b.bytes <= a.bytes and b.latency.median_ms <= a.latency.median_ms
                and b.quality.drop <= a.quality.drop
                and (b.bytes, b.latency.median_ms, b.quality.drop) != (a.bytes, a.latency.median_ms, a.quality.drop))
    return [a for a in measured if not any(dominated(a, b) for b in measured)]
