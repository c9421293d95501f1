"""The device's durable telemetry queue and the recorder that fills it (no broker needed)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.telemetry import Recorder, TelemetryQueue, sysstats
from edgeml.core.mqtt_contract import decode_batch, encode_batch
from edgeml.core.stats import baseline_stats

ROOT = Path(__file__).resolve().parent.parent


def error_record(i: int, size: int = 100) -> dict:
    return {"kind": "error", "model": "digits", "status": 500, "error": f"{i:06d}".ljust(size, "x"), "latency_ms": 1.5}


def all_records(queue: TelemetryQueue) -> list:
    return queue.peek(10 ** 9, 1 << 62)


def test_queue_persists_across_reopen(tmp_path):
    path = tmp_path / "telemetry.db"
    with TelemetryQueue(path) as q:
        assert q.append([error_record(i) for i in range(100)]) == list(range(1, 101))
        assert q.delete_through(40) == 40
        kept, stats = all_records(q), q.stats()
    assert stats["records"] == 60 and stats["next_seq"] == 101
    with TelemetryQueue(path) as q:
        assert q.stats() == stats
        assert all_records(q) == kept
        assert q.append([error_record(100)]) == [101]
        assert q.delete([41, 42, 999]) == 2


def test_queue_survives_sigkill_and_never_reuses_a_seq(tmp_path):
    path = tmp_path / "telemetry.db"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from device_agent.telemetry import TelemetryQueue
        q = TelemetryQueue({str(path)!r})
        for i in range(30):
            q.append([{{"kind": "system", "n": i}}])
        q.delete_through(10)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=30).returncode == -9
    with TelemetryQueue(path) as q:
        records = all_records(q)
        assert [r["seq"] for r in records] == list(range(11, 31))  # every commit survived the kill
        assert [r["n"] for r in records] == list(range(10, 30))
        assert q.append([{"kind": "system"}])[0] > 30  # after a crash: above the durable ceiling, a gap
    with TelemetryQueue(path) as q:  # after a clean close the numbers continue without a gap
        last = all_records(q)[-1]["seq"]
        assert q.append([{"kind": "system"}]) == [last + 1]


def test_byte_bound_drops_oldest_and_reports_it(tmp_path):
    path = tmp_path / "telemetry.db"
    appended = []
    with TelemetryQueue(path, max_bytes=8192) as q:
        for i in range(0, 300, 5):
            appended += q.append([error_record(j) for j in range(i, i + 5)])
            assert q.stats()["bytes"] <= 8192
        records = all_records(q)
        data = [r for r in records if r["kind"] == "error"]
        reports = [r for r in records if r["kind"] == "dropped"]
        assert len(reports) == 1  # later drops fold into the one report still queued
        assert [r["seq"] for r in data] == appended[-len(data):]  # the newest survive, in order
        lost = len(appended) - len(data)
        assert reports[0]["count"] == lost == q.stats()["dropped_total"]
        assert reports[0]["first_seq"] == 1 and reports[0]["last_seq"] < data[0]["seq"]
        decode_batch(encode_batch("fleet", "dev", records))  # the report is a valid contract record
    with TelemetryQueue(path, max_bytes=8192) as q:
        assert q.stats()["dropped_total"] == lost  # persisted
        q.append([error_record(j) for j in range(20)])
        (report,) = [r for r in all_records(q) if r["kind"] == "dropped"]
        assert report["count"] == q.stats()["dropped_total"] > lost


def test_concurrent_appends_and_deletes(tmp_path):
    q = TelemetryQueue(tmp_path / "telemetry.db")
    seqs, consumed, done = [], [], threading.Event()

    def produce():
        for i in range(50):
            got = q.append([{"kind": "system", "i": i}] * 10)
            seqs.extend(got)  # list.extend is atomic under the GIL

    def consume():
        while not done.is_set() or q.stats()["records"]:
            batch = q.peek(37)
            consumed.extend(r["seq"] for r in batch)
            q.delete(r["seq"] for r in batch)

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce) for _ in range(8)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    done.set()
    consumer.join()
    assert sorted(seqs) == list(range(1, 4001))
    assert sorted(consumed) == sorted(seqs)  # each record handed out once, none lost
    assert q.stats() == {"records": 0, "bytes": 0, "dropped_total": 0, "next_seq": 4001}
    q.close()


def test_append_20000_records(tmp_path):
    q = TelemetryQueue(tmp_path / "telemetry.db")
    record = {"kind": "inference", "model": "digits", "version": 3, "latency_ms": 1.25,
              "outputs": {"probs": {"top1": 7, "score": 0.98}}}
    start = time.perf_counter()
    for _ in range(200):
        q.append([record] * 100)
    print(f"appended 20000 records at {20000 / (time.perf_counter() - start):,.0f}/s")
    assert q.stats()["records"] == 20000
    batch = q.peek(500)
    assert [r["seq"] for r in batch] == list(range(1, 501))
    assert batch[0] == {"seq": 1, "ts": batch[0]["ts"], **record}
    q.close()


def test_recorder_writes_contract_records(tmp_path):
    q = TelemetryQueue(tmp_path / "telemetry.db")
    rec = Recorder(q, "digits", 3, stats_window_s=60, system_interval_s=0.1, data_dir=tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.random((2, 8, 8, 3), dtype=np.float32) * (i + 1) for i in range(5)]
    vectors = [rng.normal(size=(4, 6)) for _ in range(5)]
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    for image, vector in zip(images, vectors):
        rec.inference("digits", 3, 2.5, {"image": image}, {"probs": probs, "value": np.array([[1.0], [3.0]])})
        rec.inference("tabular", 1, 0.5, {"x": vector}, {"y": np.array([np.nan, 2.0, 4.0])})
    rec.inference("tabular", 1, 0.5, {"x": np.full((1, 6), np.nan)}, {"y": np.array([np.inf])})
    rec.error(None, 404, "no such model 'nope'", 0.1)
    rec.error("digits", 500, "boom" * 1000, 7.0)
    time.sleep(0.35)
    rec.close()

    records = decode_batch(encode_batch("fleet", "dev", all_records(q)))["records"]
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)

    first = by_kind["inference"][0]
    assert first["model"] == "digits" and first["version"] == 3 and first["latency_ms"] == 2.5
    assert first["outputs"] == {"probs": {"top1": 1, "score": 0.7}, "value": {"mean": 2.0, "min": 1.0, "max": 3.0}}
    assert by_kind["inference"][1]["outputs"]["y"] == {"mean": 3.0, "min": 2.0, "max": 4.0}  # NaN left out
    assert by_kind["inference"][-1]["outputs"]["y"] == {"mean": None, "min": None, "max": None}

    errors = by_kind["error"]
    assert errors[0] == {"seq": errors[0]["seq"], "ts": errors[0]["ts"], "kind": "error", "model": None,
                         "status": 404, "error": "no such model 'nope'", "latency_ms": 0.1}
    assert len(errors[1]["error"]) == 1000

    stats = {(r["model"], r["version"]): r for r in by_kind["input_stats"]}
    assert set(stats) == {("digits", 3), ("tabular", 1)}
    assert stats["digits", 3]["count"] == 10 and stats["tabular", 1]["count"] == 21
    assert 0 < stats["digits", 3]["window_s"] < 60
    expect_same_as_baseline(stats["digits", 3]["inputs"]["image"], np.concatenate(images))
    expect_same_as_baseline(stats["tabular", 1]["inputs"]["x"], np.concatenate(vectors))  # the NaN row left out

    system = by_kind["system"][-1]
    assert system["rss_bytes"] > 10 << 20 and system["cpu_percent"] >= 0 and system["disk_free_bytes"] > 0
    assert {"queue_records", "queue_bytes", "dropped_total"} <= set(system)
    assert (system["model"], system["version"]) == ("digits", 3)
    q.close()


def expect_same_as_baseline(summary: dict, x: np.ndarray) -> None:
    """The recorder's running statistics agree with edgeml.core.stats on the same inputs (axis convention too)."""
    baseline = baseline_stats({"x": x})["inputs"]["x"]
    assert summary["axis"] == baseline["axis"]
    for key in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(summary[key], [c[key] for c in baseline["channels"]], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("behind", [False, True])
def test_recorder_statistics_off_the_request_path(tmp_path, monkeypatch, behind):
    """Input statistics are made on the telemetry thread from a copy taken during the request: an
    app reusing its input buffer once answered does not change them, and when the thread is
    behind (its byte bound reached) requests make their own, so none is left out."""
    from device_agent.telemetry import recorder

    if behind:
        monkeypatch.setattr(recorder, "MAX_SAMPLED_BYTES", 0)
    q = TelemetryQueue(tmp_path / "telemetry.db")
    rec = Recorder(q, "cam", 1, stats_window_s=60, system_interval_s=60, data_dir=tmp_path)
    rng = np.random.default_rng(1)
    sent, buffer = [], np.empty((1, 64, 64, 3), np.float32)
    for i in range(40):
        buffer[:] = rng.normal(i, 1.0 + i % 3, buffer.shape)  # one buffer, refilled for every request
        sent.append(buffer.copy())
        rec.inference("cam", 1, 1.0, {"image": buffer}, {"y": np.array([[0.2, 0.8]])})
        assert (rec._sampled_bytes == 0) if behind else True  # behind: nothing waits for the thread
    buffer[:] = np.nan  # what the app does with its buffer afterwards is not what it sent
    rec.close()
    stats = [r for r in all_records(q) if r["kind"] == "input_stats"]
    assert len(stats) == 1 and stats[0]["count"] == 40
    expect_same_as_baseline(stats[0]["inputs"]["image"], np.concatenate(sent))  # 4,096 values a channel: all read
    q.close()


def test_recorder_flushes_within_100ms(tmp_path):
    q = TelemetryQueue(tmp_path / "telemetry.db")
    rec = Recorder(q, "digits", 3)
    rec.error("digits", 503, "busy", 1.0)
    deadline = time.monotonic() + 2
    while not q.stats()["records"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.stats()["records"] == 1
    rec.close()
    q.close()


def test_sysstats():
    assert sysstats.rss_bytes() > 1 << 20
    meter = sysstats.CpuMeter()
    busy_until = time.process_time() + 0.05
    while time.process_time() < busy_until:
        pass
    assert meter.percent() > 0
    assert sysstats.disk_free_bytes(ROOT) > 0
    assert sysstats.disk_free_bytes(ROOT / "no" / "such" / "folder") is None


def test_device_side_stays_light():
    code = ("import sys; import device_agent.telemetry, device_agent.mqtt_link; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_queue_refuses_a_tiny_bound_and_unknown_kinds(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        TelemetryQueue(tmp_path / "small.db", max_bytes=1000)
    with TelemetryQueue(tmp_path / "q.db") as q, pytest.raises(ValueError, match="unknown record kind"):
        q.append([{"kind": "gossip"}])
