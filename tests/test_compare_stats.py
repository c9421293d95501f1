"""The tests ``fleet rollout compare`` runs (edgeml/fleet/compare.py), against SciPy's."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from edgeml.fleet.compare import mann_whitney, two_proportions


@pytest.mark.parametrize("shift,ties", [(0.0, False), (0.3, False), (0.0, True), (0.5, True)])
def test_mann_whitney_matches_scipy(shift, ties):
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=400), rng.lognormal(size=300) * np.exp(shift)
    if ties:  # latencies rounded to 0.001 ms tie a lot
        a, b = np.round(a, 1), np.round(b, 1)
    ours = mann_whitney(a, b)
    theirs = stats.mannwhitneyu(b, a, alternative="two-sided", method="asymptotic", use_continuity=False)
    assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-6)
    assert ours["p_greater"] == pytest.approx(theirs.statistic / (len(a) * len(b)), abs=1e-4)


def test_two_proportions():
    assert two_proportions(5, 1000, 5, 1000) == pytest.approx(1.0)
    assert two_proportions(5, 1000, 40, 1000) < 1e-4
    table = np.array([[5, 995], [40, 960]])
    chi2 = stats.chi2_contingency(table, correction=False)
    assert two_proportions(5, 1000, 40, 1000) == pytest.approx(chi2.pvalue, rel=1e-6)  # the z-test is the 2x2 chi-squared
    assert two_proportions(0, 0, 1, 10) is None


class _Store:
    """What compare_rollout reads of a store: one rollout of two devices, and their records."""

    def __init__(self, records):
        self._records = records

    def rollout(self, rollout_id):
        return {"id": "r1", "fleet": "f1", "state": "paused", "wave": 1, "created": 0.0,
                "plan": {"target": {"name": "m", "version": 2}}}

    def transaction(self, write=True):
        import contextlib

        return contextlib.nullcontext(self)

    def assignments(self, rollout_id):
        return [{"device": "a"}, {"device": "b"}]

    def records(self, kinds, fleet=None, since=None):
        return [("f1", d, r) for d, r in self._records if r["kind"] in kinds]


def test_live_accuracy_from_feedback_is_compared_between_cohorts():
    from edgeml.fleet.compare import compare_rollout

    rng = np.random.default_rng(0)
    records = []
    for i in range(300):
        records.append(("a", {"kind": "inference", "ts": 10.0 + i, "version": 1, "latency_ms": float(rng.lognormal()),
                              "outputs": {"p": {"top1": int(i % 10)}}}))
        records.append(("b", {"kind": "inference", "ts": 10.0 + i, "version": 2, "latency_ms": float(rng.lognormal()),
                              "outputs": {"p": {"top1": int(i % 10)}}}))
    records.append(("a", {"kind": "feedback", "ts": 400.0, "version": 1, "labelled": 200, "correct": 190}))
    records.append(("b", {"kind": "feedback", "ts": 400.0, "version": 2, "labelled": 200, "correct": 150}))
    result = compare_rollout(_Store(records), "r1")
    assert result["cohorts"]["new"]["accuracy"] == 0.75 and result["cohorts"]["old"]["accuracy"] == 0.95
    assert result["tests"]["accuracy"]["verdict"] == "new version less accurate"
    assert result["tests"]["latency"]["verdict"] == "no significant difference"
    assert result["tests"]["predictions"]["verdict"] == "no significant difference"
