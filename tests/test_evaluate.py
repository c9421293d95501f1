"""Comparison with the float model, latency figures, and how auto picks a candidate."""
from types import SimpleNamespace as NS

import numpy as np
import pytest

from edgeml.core.data import Dataset
from edgeml.core.errors import DataError
from edgeml.core.stats import baseline_stats
from edgeml.optimizer.choose import choose, frontier
from edgeml.optimizer.evaluate import compare, measure_latency


def test_compare_with_labels_reports_accuracy_drop():
    ref = {"p": np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]}
    cand = {"p": ref["p"].copy()}
    cand["p"][0] = [0, 1, 0, 0]  # one prediction changes
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    q = compare(ref, cand, labels)
    assert q.accuracy == pytest.approx(7 / 8) and q.drop == pytest.approx(1 / 8)
    assert q.agreement == pytest.approx(7 / 8) and q.drop_kind == "accuracy"


def test_compare_without_labels_uses_agreement_then_cosine():
    ref = {"p": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}
    q = compare(ref, {"p": np.array([[0.1, 0.9], [0.2, 0.8]], np.float32)})
    assert q.drop_kind == "agreement" and q.drop == pytest.approx(0.5)
    reg = {"v": np.array([[1.0], [2.0], [3.0], [4.0]])}
    q = compare(reg, {"v": np.array([[1.0], [2.0], [3.0], [4.1]])})
    assert q.drop_kind == "cosine" and 0 < q.drop < 1e-3 and q.max_abs_error == pytest.approx(0.1)


def test_labels_for_a_non_classifier_are_refused():
    with pytest.raises(DataError, match="not class scores"):
        compare({"v": np.zeros((3, 1))}, {"v": np.zeros((3, 1))}, np.zeros(3))


def test_latency_is_measured_on_single_samples():
    seen = []
    ds = Dataset({"x": np.arange(40, dtype=np.float32).reshape(20, 2)})
    lat = measure_latency(lambda feed: seen.append(feed["x"].shape) or {}, ds, warmup=2, runs=12)
    assert lat.runs == 12 and lat.median_ms >= 0 and lat.p95_ms >= lat.median_ms
    assert set(seen) == {(1, 2)}


def _m(name, size, ms, drop):
    return NS(recipe=name, bytes=size, latency=NS(median_ms=ms), quality=NS(drop=drop))


def test_choose_keeps_least_bytes_times_latency_within_goal():
    fp32, f16, dyn, int8 = _m("fp32", 400, 1.0, 0), _m("float16", 200, 1.0, 0), _m("dynamic", 105, 1.5, 0.002), _m("int8", 100, 0.5, 0.004)
    assert choose([f16, dyn, int8], 0.01) == (int8, True)
    assert choose([f16, dyn, int8], 0.003)[0] is dyn
    assert choose([f16, dyn, int8], 0.0)[0] is f16
    best, ok = choose([dyn, int8], 0.001)
    assert best is dyn and ok is False
    # a third of the bytes but 60% slower loses to half the bytes at the same speed
    small_slow, half_fast = _m("int8", 130, 1.6, 0.0), _m("float16", 200, 1.0, 0.0)
    assert choose([small_slow, half_fast], 0.01)[0] is half_fast
    assert set(m.recipe for m in frontier([fp32, f16, dyn, int8])) == {"float16", "dynamic", "int8"}


def test_baseline_stats_per_channel_and_per_feature():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(50, 4, 4, 3)) + np.array([0.0, 5.0, -5.0])
    stats = baseline_stats({"img": img, "vec": rng.random((50, 7)), "seq": rng.random((50, 1000))})
    chans = stats["inputs"]["img"]["channels"]
    assert stats["inputs"]["img"]["axis"] == 2 and len(chans) == 3
    assert chans[1]["mean"] == pytest.approx(5.0, abs=0.2) and chans[2]["mean"] == pytest.approx(-5.0, abs=0.2)
    assert len(stats["inputs"]["vec"]["channels"]) == 7
    assert stats["inputs"]["seq"]["axis"] is None and stats["inputs"]["seq"]["channels"][0]["count"] == 50000
    nchw = baseline_stats({"x": rng.random((10, 3, 16, 16))})["inputs"]["x"]
    assert nchw["axis"] == 0 and len(nchw["channels"]) == 3


def test_a_candidate_no_smaller_and_no_faster_than_fp32_is_never_kept():
    """An int8 build that left every node in float (1.000x the bytes, same speed) is not a win."""
    fp32 = _m("fp32", 400, 1.0, 0)
    same_int8, same_dyn = _m("int8", 398, 1.0, 0.0), _m("dynamic", 400, 0.97, 0.0)
    assert choose([same_int8, same_dyn], 0.01, baseline=fp32) == (fp32, True)
    smaller = _m("float16", 200, 1.0, 0.0)
    assert choose([same_int8, smaller], 0.01, baseline=fp32)[0] is smaller
    faster = _m("int8", 400, 0.5, 0.0)
    assert choose([same_dyn, faster], 0.01, baseline=fp32)[0] is faster


def test_cosine_is_robust_near_zero():
    """A rebuild that differs by float rounding is never a drop, even when the output is all but
    zero (a detector's map of an image with nothing to detect); a real difference still is."""
    rng = np.random.default_rng(0)
    tiny = rng.random((8, 1, 8, 8)) * 1e-6  # probability maps [N, 1, H, W]
    rebuilt = tiny + rng.standard_normal((8, 1, 8, 8)) * 1e-7
    q = compare({"map": tiny}, {"map": rebuilt}, None)
    assert q.drop_kind == "cosine" and q.drop == 0.0
    maps = rng.random((8, 1, 8, 8))
    maps[0] = 1e-9  # one sample with nothing in it, among ordinary ones
    near = maps.copy()
    near[0] += 1e-4
    assert compare({"map": maps}, {"map": near}, None).drop < 1e-3
    assert compare({"map": maps}, {"map": -maps}, None).drop > 0.9  # a real difference still counts
    np.testing.assert_equal(compare({"map": maps}, {"map": maps}, None).drop, 0.0)
