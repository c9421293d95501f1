"""The agent's drift monitor (device_agent/monitoring/drift.py) on real data: scikit-learn's
digits and a logistic regression trained on them. Windows are closed by hand, so each test
decides what traffic each window sees."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from device_agent.monitoring.drift import DriftMonitor, DriftSettings
from edgeml.core.stats import baseline_stats, output_stats

SETTINGS = DriftSettings(windows=4, min_samples=200)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    model = LogisticRegression(max_iter=2000).fit(x[:900], y[:900])
    baseline = baseline_stats({"x": x[:900]})
    baseline["outputs"] = output_stats({"probs": model.predict_proba(x[:900])}, {"probs": "agreement"})
    return x, model, baseline


def _monitor(baseline, records, settings=SETTINGS):
    return DriftMonitor(baseline, "digits", 1, "ab" * 32, settings, emit=records.append, start=False)


def _serve(monitor, model, x, batch=1):
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        monitor.inference("digits", 1, 0.1, {"x": xb}, {"probs": model.predict_proba(xb)})


def _alerts(records, state=None):
    return [r for r in records if r["kind"] == "alert" and (state is None or r["state"] == state)]


def test_traffic_from_the_baselines_distribution_raises_nothing(digits):
    x, model, baseline = digits
    records = []
    monitor = _monitor(baseline, records)
    held_out = x[900:]
    for start in range(0, len(held_out), 100):  # 9 windows of 100 held-out digits
        _serve(monitor, model, held_out[start : start + 100])
        monitor.close_window()
    assert monitor.last["samples"] >= SETTINGS.min_samples
    assert _alerts(records) == [] and monitor.status()["open"] == [], _alerts(records)
    # some of 64 features look past the line by chance, but none by more than chance
    features = [f for f in monitor.last["features"] if f["what"] == "input"]
    assert all(f["p"] >= SETTINGS.alpha / len(features) for f in features if f["js"] > SETTINGS.js_threshold)


def test_a_shift_raises_an_alert_naming_the_worst_features_and_it_clears_with_hysteresis(digits):
    x, model, baseline = digits
    records = []
    monitor = _monitor(baseline, records)
    held_out = x[900:]
    shifted = held_out.copy()
    shifted[:, 32:] = np.clip(shifted[:, 32:] + 6, 0, 16)  # the lower half of every image brightens
    for start in range(0, 400, 100):
        _serve(monitor, model, shifted[start : start + 100])
        monitor.close_window()
    raised = _alerts(records, "raised")
    kinds = {a["alert"] for a in raised}
    assert "input_drift" in kinds and "prediction_drift" in kinds, kinds
    alert = next(a for a in raised if a["alert"] == "input_drift")
    assert alert["features"] and all(f["name"] == "x" and f["channel"] >= 32 for f in alert["features"])
    assert alert["model"] == "digits" and alert["version"] == 1 and alert["since"] > 0
    assert {"input_drift", "prediction_drift"} <= set(monitor.status()["open"])

    # traffic comes back: the shifted windows leave the sliding sum one by one
    def worst():  # the largest score of a feature shifted by more than chance, in thresholds
        real = [f for f in monitor.last["features"] if f["what"] == "input" and f["p"] < SETTINGS.alpha / 64]
        return max((max(f["js"] / SETTINGS.js_threshold, f["psi"] / SETTINGS.psi_threshold) for f in real), default=0.0)

    steps = []
    for start in range(0, 800, 100):
        _serve(monitor, model, held_out[start : start + 100])
        monitor.close_window()
        steps.append((worst(), "input_drift" in monitor.alerts))
        if not monitor.alerts:
            break
    assert {a["alert"] for a in _alerts(records, "cleared")} >= {"input_drift"}, steps
    assert all(ratio >= SETTINGS.clear_ratio for ratio, still_open in steps if still_open), steps
    assert len(_alerts(records, "raised")) == len(raised)  # no flapping on the way down


def test_an_alert_clears_only_well_below_its_threshold_so_it_does_not_flap():
    """One feature, one window judged at a time, shifts chosen to land a score at 1.5x, 0.85x
    and 0.3x the threshold: between clear_ratio (0.7) and 1 an alert neither opens nor closes."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(20_000, 1)).astype(np.float32)
    noise = rng.normal(size=(5_000, 1)).astype(np.float32)
    baseline = baseline_stats({"x": base})
    from edgeml.core import drift

    table, expected = drift.padded(baseline["inputs"]["x"]["bins"]["edges"]), baseline["inputs"]["x"]["bins"]["counts"]

    def ratio(delta):
        s = drift.scores(expected, drift.count(noise + delta, table))
        return max(s["js"][0] / SETTINGS.js_threshold, s["psi"][0] / SETTINGS.psi_threshold)

    grid = np.arange(0, 2, 0.01)
    ratios = np.array([ratio(d) for d in grid])
    high, middle, low = (grid[np.argmin(np.abs(ratios - r))] for r in (1.5, 0.85, 0.3))
    assert 1.3 < ratio(high) and 0.75 < ratio(middle) < 0.95 and ratio(low) < 0.5

    records = []
    monitor = DriftMonitor(baseline, "m", 1, "00" * 32, DriftSettings(windows=1, min_samples=1000),
                           emit=records.append, start=False)
    opened = []
    for delta in (high, middle, high, middle, low, middle, high):
        monitor.inference("m", 1, 0.1, {"x": noise + delta}, {})
        monitor.close_window()
        opened.append("input_drift" in monitor.alerts)
    assert opened == [True, True, True, True, False, False, True]
    assert [a["state"] for a in _alerts(records)] == ["raised", "cleared", "raised"]


def test_window_records_add_up_to_every_request_counted(digits):
    x, model, baseline = digits
    records = []
    monitor = _monitor(baseline, records)
    for start in range(0, 300, 60):
        _serve(monitor, model, x[900 + start : 960 + start], batch=7)
        monitor.close_window()
    assert records[0]["kind"] == "baseline" and records[0]["baseline"]["inputs"]["x"]["bins"]
    windows = [r for r in records if r["kind"] == "drift"]
    assert len(windows) == 5 and sum(w["samples"] for w in windows) == 300
    counts = np.sum([w["inputs"]["x"]["counts"] for w in windows], axis=0)
    assert counts.shape == (64, len(baseline["inputs"]["x"]["bins"]["counts"][0])) and counts.sum() == 300 * 64
    classes = np.sum([w["outputs"]["probs"]["classes"] for w in windows], axis=0)
    assert classes.sum() == 300
    confidence = sum(w["outputs"]["probs"]["confidence_sum"] for w in windows) / 300
    assert 0.5 < confidence <= 1.0
    assert all(w["sha256"] == "ab" * 32 for w in windows)


def test_memory_is_bounded_whatever_the_traffic(digits):
    x, model, baseline = digits
    monitor = _monitor(baseline, [])
    before = monitor.memory_bytes()
    for _ in range(20):
        _serve(monitor, model, x[:300], batch=50)
        monitor.close_window()
    assert monitor.memory_bytes() == before
    assert before < 64 * 1024  # 64 features x 17 values kept (baseline, window, 4 windows), classes, confidence


def test_an_artifact_without_histograms_is_judged_on_the_mean_alone(digits):
    x, model, baseline = digits
    legacy = {"inputs": {"x": {k: v for k, v in baseline["inputs"]["x"].items() if k != "bins"}}}
    records = []
    monitor = _monitor(legacy, records)
    _serve(monitor, model, x[900:1200], batch=10)
    monitor.close_window()
    assert _alerts(records) == []
    shifted = x[900:1200].copy()
    shifted[:, :8] += 8
    _serve(monitor, model, shifted, batch=10)
    monitor.close_window()
    alert, = _alerts(records, "raised")
    assert alert["alert"] == "input_drift" and all(f["channel"] < 8 for f in alert["features"])


def test_requests_for_another_version_are_not_counted(digits):
    x, model, baseline = digits
    records = []
    monitor = _monitor(baseline, records)
    monitor.inference("digits", 2, 0.1, {"x": x[:5]}, {"probs": model.predict_proba(x[:5])})
    monitor.close_window()
    assert [r["kind"] for r in records] == ["baseline"] and monitor.last["samples"] == 0


def test_the_request_path_only_hands_over_and_a_burst_beyond_the_bound_is_skipped_and_counted(digits):
    x, model, baseline = digits
    records = []
    monitor = _monitor(baseline, records)  # no counting thread: requests wait until the window closes
    probs = model.predict_proba(x[:300])
    for i in range(300):
        monitor.inference("digits", 1, 0.1, {"x": x[i : i + 1]}, {"probs": probs[i : i + 1]})
    assert len(monitor._pending) == SETTINGS.max_pending and monitor.skipped == 300 - SETTINGS.max_pending
    monitor.close_window()
    window = [r for r in records if r["kind"] == "drift"][-1]
    assert window["samples"] == SETTINGS.max_pending and window["skipped"] == 300 - SETTINGS.max_pending
