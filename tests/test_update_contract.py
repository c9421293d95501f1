"""The shared vocabulary of updates, without processes: rules, waves, desired messages, signed
rollback orders, deltas."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgeml.core import update_contract as uc
from edgeml.core.delta import apply_patch, make_patch
from edgeml.core.errors import VerificationError
from edgeml.core.orders import make_order, refusal, verify_order
from edgeml.core.signing import generate_keys, load_private_key


def test_rules_parse_and_judge_against_the_replaced_model():
    rules = uc.parse_rules("error_rate>0.05, latency_p95>1.5x, nan_rate>0, class_shift>0.3, failed>10%")
    assert [str(r) for r in rules] == ["error_rate>0.05", "latency_p95>1.5x", "nan_rate>0", "class_shift>0.3",
                                       "failed>10%"]
    assert rules[-1].threshold == pytest.approx(0.1) and rules[-1].where == "fleet"
    ref = {"requests": 500, "error_rate": 0.0, "latency_p95_ms": 2.0, "source": "live"}
    good = {"requests": 100, "error_rate": 0.01, "latency_p95_ms": 2.5, "nan_rate": 0.0, "class_shift": 0.1,
            "reference": ref}
    assert uc.violations(rules, good) == []
    bad = dict(good, error_rate=0.2, latency_p95_ms=40.0, nan_rate=0.01)
    broken = uc.violations(rules, bad)
    assert len(broken) == 3 and "latency_p95 40 > 1.5x the replaced model's 2" in broken[1]
    # a p95 of few requests is not judged; the class distribution only once the window closed
    assert uc.violations(rules, dict(bad, requests=50)) == broken[:1] + broken[2:]
    shifted = dict(good, class_shift=0.5)
    assert uc.violations(rules, shifted, early=True) == [] and len(uc.violations(rules, shifted)) == 1
    # slower by more than the factor but by less than LATENCY_SLACK_MS: noise, not held against it
    assert uc.violations(rules, dict(good, latency_p95_ms=2.9)) == []
    # without live traffic to compare with, latency is compared on the self-test inputs
    selftest = dict(good, latency_p95_ms=40.0, selftest_ms=3.0, reference=dict(ref, latency_p95_ms=0.5,
                                                                                source="selftest"))
    assert uc.violations(rules, selftest) == ["latency_p95 3 > 1.5x the replaced model's 0.5"]
    assert uc.violations(rules, dict(selftest, selftest_ms=0.9)) == []
    for text, message in (("error_rate<0.1", "should look like"), ("speed>2x", "unknown metric"),
                          ("latency_p95>2", "takes"), ("failed>2x", "takes")):
        with pytest.raises(ValueError, match=message):
            uc.parse_rules(text)


def test_waves_durations_and_sizes():
    assert uc.wave_sizes(uc.parse_waves("1,10%,50%,100%"), 1000) == [1, 100, 500, 1000]
    assert uc.wave_sizes(uc.parse_waves("1,10%,50%,100%"), 2) == [1, 2]  # waves that add nobody go
    assert uc.wave_sizes(uc.parse_waves("5"), 3) == [3]
    assert uc.wave_sizes(uc.parse_waves("2"), 10) == [2, 10]  # 100% is always the last
    assert [uc.parse_duration(t) for t in ("300", "30s", "5m", "2h", "250ms", 7)] == [300, 30, 300, 7200, 0.25, 7]
    for bad in ("0%", "150%", "x", "-1"):
        with pytest.raises(ValueError):
            uc.parse_waves(bad)
    with pytest.raises(ValueError):
        uc.parse_duration("soon")


def test_desired_round_trip_and_what_a_device_refuses_to_read():
    data = bytes(range(256)) * 40
    full = uc.Transfer.of(data, "full", 4096)
    assert full.blocks == 3 and full.span(2) == (8192, len(data) - 8192)
    target = {"name": "m", "version": 2, "sha256": full.id, "content_sha256": "c" * 64, "size": len(data),
              "format": "tflite"}
    desired = uc.Desired("f1", "dev1", "r1", time.time(), target, full, None, uc.Health(window_s=10))
    back = uc.decode_desired(desired.encode())
    assert back.full == full and back.health.window_s == 10 and back.version == 2
    assert uc.decode_desired(b"") is None  # a cleared retained message: nothing desired
    for mangle, message in ((lambda d: d.update(schema=2), "schema 1"),
                            (lambda d: d["target"].update(version="2"), "target needs"),
                            (lambda d: d["full"].update(hashes=["0" * 16]), "malformed"),
                            (lambda d: d["full"].update(id="a" * 64), "not the target's file"),
                            (lambda d: d["health"].update(rules="error_rate<1"), "health")):
        import json

        body = json.loads(desired.encode())
        mangle(body)
        with pytest.raises(ValueError, match=message):
            uc.decode_desired(json.dumps(body).encode())


def test_block_requests_are_bounded():
    payload = uc.encode_request("a" * 64, [0, 1, 2], "t1")
    assert uc.decode_request(payload) == ("a" * 64, [0, 1, 2], "t1")
    for bad in (uc.encode_request("a" * 64, list(range(uc.MAX_BLOCKS_PER_REQUEST + 1)), "t"),
                uc.encode_request("not-a-sha", [0], "t"), b"{", uc.encode_request("a" * 64, [-1], "t")):
        with pytest.raises(ValueError):
            uc.decode_request(bad)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate_keys(folder)
    other, _ = generate_keys(folder / "other")
    return private, public, other


def test_rollback_orders_are_signed_expire_and_cannot_be_replayed(keys):
    private, public, other = keys
    signed = make_order(private, fleet="f1", devices=["dev1"], name="digits", allow=[(2, "c" * 64)],
                        expires_in=3600)
    body = verify_order(signed, public)
    ok = dict(fleet="f1", device="dev1", name="digits", version=2, content_sha256="c" * 64, last_issued=0.0)
    assert refusal(body, **ok) is None
    assert "does not name device" in refusal(body, **dict(ok, device="dev2"))
    assert "does not allow" in refusal(body, **dict(ok, version=1))
    assert "replay" in refusal(body, **dict(ok, last_issued=body["issued"]))
    assert "expired" in refusal(body, **ok, now=body["expires"] + 1)
    assert "fleet" in refusal(body, **dict(ok, fleet="f2"))
    forged = dict(signed, order=dict(signed["order"], allow=[[1, "c" * 64]]))
    with pytest.raises(VerificationError, match="changed or forged"):
        verify_order(forged, public)
    with pytest.raises(VerificationError, match="not the fleet's key"):
        verify_order(make_order(load_private_key(other), fleet="f1", devices="*", name="digits",
                                allow=[(1, "c" * 64)]), public)
    with pytest.raises(ValueError, match="expire within"):
        make_order(private, fleet="f1", devices="*", name="digits", allow=[], expires_in=10 ** 9)


def test_delta_rebuilds_exactly_and_refuses_what_does_not_apply():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, 200_000, dtype=np.uint8).tobytes()
    target = base[:120_000] + rng.integers(0, 255, 500, dtype=np.uint8).tobytes() + base[120_500:]
    patch = make_patch(base, target)
    assert len(patch) < 3000  # a 500-byte change in 200 KB
    assert apply_patch(base, patch, max_size=1 << 20) == target
    with pytest.raises(ValueError, match="at most"):
        apply_patch(base, patch, max_size=1000)
    with pytest.raises(ValueError):
        apply_patch(base, patch[:-10], max_size=1 << 20)


def test_controller_counts_a_device_on_the_target_only_when_it_is_idle():
    """A device that serves the target while busy with an update the rollout cannot see (say, one
    restarted mid-observation) is not committed; idle on the target, it is."""
    from edgeml.fleet.controller import Controller

    c = Controller(store=None, publish=lambda sends: [])
    r = {"id": "r1", "state": "running", "plan": {"target": {"content_sha256": "new"}}}
    a = {"state": "sent", "detail": {}}
    busy = {"content_sha256": "new", "update": {"state": "observing", "rollout": "r0"}}
    assert c._observed(r, a, busy)[0] == "sent"
    assert c._observed(r, a, {"content_sha256": "new", "update": {"state": "idle"}})[0] == "committed"
    ours = {"content_sha256": "new", "update": {"state": "observing", "rollout": "r1"}}
    assert c._observed(r, a, ours)[0] == "observing"


def test_health_counts_what_the_model_failed_on_not_what_the_client_got_wrong():
    """5xx and 422 (valid inputs the model could not run on) are the model's errors; other 4xx are not."""
    from device_agent.updates import HealthMonitor

    h = HealthMonitor()
    h.version = 2
    for status in (400, 404, 413, 422, 500):
        h.error("m", status, "x", 1.0)
    h.inference("m", 2, 1.0, {}, {"out": np.zeros((1, 3), np.float32)}, run_ms=0.5)
    f = h.figures(2)
    assert f["requests"] == 3 and f["errors"] == 2


def test_health_keeps_the_last_requests_in_order_across_the_ring():
    """The monitor keeps its last ``keep`` requests: figures over a version, a time and the last N
    are those of a plain list of the same requests, after the ring has wrapped around."""
    from device_agent.updates import HealthMonitor

    h = HealthMonitor(keep=7)
    h.version = 1
    kept = []  # what a plain list of the last 7 would hold: (version, latency, failed, nan, top1)
    rng = np.random.default_rng(3)
    for i in range(19):
        version = 1 if i < 9 else 2
        h.version = version
        if i % 5 == 4:
            h.error("m", 500, "boom", 9.0 + i)
            kept.append((version, 9.0 + i, True, False, None))
        else:
            scores = rng.random((1, 4)).astype(np.float32)
            if i % 6 == 0:
                scores[0, 1] = np.nan
            h.inference("m", version, 100.0, {}, {"out": scores}, run_ms=float(i))
            finite = np.where(np.isfinite(scores[0]), scores[0], -np.inf)
            kept.append((version, float(i), False, i % 6 == 0, int(np.argmax(finite))))
        kept = kept[-7:]
    for version, last in ((2, None), (2, 3), (1, None)):
        rows = [r for r in kept if r[0] == version]
        rows = rows[-last:] if last else rows
        served = [r for r in rows if not r[2]]
        f = h.figures(version, last=last)
        classes = {}
        for r in served:
            classes[r[4]] = classes.get(r[4], 0) + 1
        assert f["requests"] == len(rows) and f["errors"] == len(rows) - len(served)
        assert f["latency_p95_ms"] == (float(np.percentile([r[1] for r in served], 95)) if served else None)
        assert f["nan_outputs"] == sum(r[3] for r in served) and f["classes"] == classes
    assert h.figures(2, since=time.monotonic() + 1)["requests"] == 0
