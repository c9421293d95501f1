"""Pick the candidate ``auto`` keeps: the smallest and fastest one within the accuracy goal.

"Smallest and fastest" conflict when an int8 model is a quarter of the bytes but slower than
float (int8 kernels on CPUs without VNNI): the kept candidate is the one with the least
transfer bytes (zstd) × median latency, which is the same ordering as the product of both
ratios to fp32. A model half the size at the same speed beats one a third smaller but 60%
slower. Transfer bytes, because that is what shipping costs, and it is where pruning shows.
"""
from __future__ import annotations

from typing import List, Sequence


def size(m) -> int:
    return getattr(m, "zstd_bytes", 0) or m.bytes


def cost(m) -> float:
    return size(m) * m.latency.median_ms


# what counts as smaller or faster than the float model: below these, a quantizer left the model
# as it was (every node in float) or the difference is measurement noise
SMALLER = 0.95
FASTER = 0.90
FASTER_MS = 0.01  # and by this much: a few microseconds on a tiny model are timer noise


def pays(m, baseline) -> bool:
    """Smaller or faster than ``baseline`` (the float model) by more than noise."""
    base_ms, ms = baseline.latency.median_ms, m.latency.median_ms
    return size(m) <= SMALLER * size(baseline) or (ms <= FASTER * base_ms and base_ms - ms >= FASTER_MS)


def choose(measured: Sequence, max_drop: float, baseline=None) -> tuple:
    """Return ``(chosen, goal_met)``.

    ``measured`` items have ``.bytes``, ``.latency.median_ms`` and ``.quality.drop``. When no
    candidate meets the goal, the one with the smallest drop is returned (ties: smaller bytes).
    With ``baseline`` (the fp32 candidate), a candidate neither smaller nor faster than it is
    never chosen: when none within the goal pays, the baseline itself is.
    """
    passing = [m for m in measured if m.quality.drop <= max_drop + 1e-12]
    if baseline is not None and passing:
        passing = [m for m in passing if pays(m, baseline)] or [baseline]
    if not passing:
        best = min(measured, key=lambda m: (round(m.quality.drop, 6), size(m)))
        return best, False
    return min(passing, key=lambda m: (cost(m), size(m))), True


def frontier(measured: Sequence) -> List:
    """Candidates no other candidate beats on bytes, latency and drop at once."""
    def key(m):
        return size(m), m.latency.median_ms, _total_drop(m)

    def dominated(a, b) -> bool:
        return all(y <= x for x, y in zip(key(a), key(b))) and key(a) != key(b)
    return [a for a in measured if not any(dominated(a, b) for b in measured)]


def _total_drop(m) -> float:
    """Against the user's model: after training stages, a candidate's own drop is against the trained one."""
    total = getattr(m, "total", None)
    return total.drop if total is not None else m.quality.drop
