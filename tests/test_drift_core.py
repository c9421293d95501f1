"""Drift from binned counts (edgeml/core/drift.py) and the baseline histograms the artifact
carries (edgeml/core/stats.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeml.core import drift
from edgeml.core.stats import baseline_stats, output_stats


def test_bins_are_cut_at_the_baselines_deciles_and_collapse_for_discrete_values():
    rng = np.random.default_rng(0)
    edges = drift.cut(rng.normal(size=50_000))
    assert len(edges) == 9
    np.testing.assert_allclose(edges[4], 0.0, atol=0.03)  # the median
    table = drift.padded([edges])
    counts = drift.count(rng.normal(size=(20_000, 1)), table)[0]
    np.testing.assert_allclose(counts / counts.sum(), 0.1, atol=0.01)  # fresh draws: a tenth in each bin
    spiky = np.r_[np.zeros(900), np.arange(1, 101)]  # 90% zeros, as pixel borders or sparse features are
    assert drift.cut(spiky)[0] == 0.0 and len(drift.cut(spiky)) < 9
    assert drift.cut(np.array([np.nan, np.inf])) == []


def test_counts_of_batches_add_up_to_the_counts_of_all_of_them():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    table = drift.padded([drift.cut(x[:, c]) for c in range(5)])
    whole = drift.count(x, table)
    parts = sum(drift.count(x[i : i + 7], table) for i in range(0, 300, 7))
    np.testing.assert_array_equal(whole, parts)
    assert whole.sum() == x.size
    x[0, 0] = np.nan
    assert drift.count(x, table)[0].sum() == 299  # NaN is left out, not counted in a bin


def test_the_same_distribution_scores_near_zero_and_a_shift_scores_past_the_anchors_thresholds():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(20_000, 3))
    table = drift.padded([drift.cut(base[:, c]) for c in range(3)])
    expected = drift.count(base, table)
    same = drift.scores(expected, drift.count(rng.normal(size=(5_000, 3)), table))
    assert same["js"].max() < 0.03 and same["psi"].max() < 0.01 and same["ks"].max() < 0.03
    shifted = rng.normal(size=(5_000, 3))
    shifted[:, 1] += 1.0  # one feature moves by one standard deviation
    s = drift.scores(expected, drift.count(shifted, table))
    assert s["js"][1] > drift.JS_THRESHOLD and s["psi"][1] > drift.PSI_THRESHOLD and s["ks"][1] > 0.3
    assert s["js"][0] < 0.05 and s["js"][2] < 0.05
    disjoint = drift.scores(np.array([10, 0]), np.array([0, 10]))
    assert disjoint["js"] == pytest.approx(1.0) and disjoint["ks"] == pytest.approx(1.0)


def test_the_baseline_carries_histograms_per_channel_and_for_the_outputs():
    rng = np.random.default_rng(3)
    images = rng.random((40, 8, 8, 3)).astype(np.float32)
    images[..., 2] *= 10  # channels with different ranges get their own edges
    stats = baseline_stats({"image": images, "tokens": rng.integers(0, 50, (40, 16)), "names": np.array(["a"] * 40)})
    bins = stats["inputs"]["image"]["bins"]
    assert len(bins["edges"]) == 3 and len(bins["counts"]) == 3 and len(bins["counts"][0]) == 10
    assert bins["edges"][2][4] > 4 * bins["edges"][0][4]
    assert sum(bins["counts"][0]) == images[..., 0].size
    assert "names" not in stats["inputs"]  # strings: nothing a device could compare
    logits = rng.normal(size=(40, 4)) * 3
    out = output_stats({"scores": logits, "embedding": rng.normal(size=(40, 16))},
                       {"scores": "agreement", "embedding": "cosine"})
    confidence = out["scores"]["confidence"]
    assert 0.25 < confidence["mean"] < 1.0 and sum(confidence["counts"][0]) == 40
    assert "values" in out["embedding"] and sum(out["embedding"]["values"]["counts"][0]) == 40 * 16


def test_confidence_reads_probabilities_as_they_are_and_logits_through_a_softmax():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(drift.confidence(probs), [0.7, 0.8])
    np.testing.assert_allclose(drift.confidence(np.log(probs)), [0.7, 0.8])
    assert drift.confidence(np.zeros((3, 1))) is None and drift.confidence(np.zeros(3)) is None
