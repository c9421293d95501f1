"""Durable telemetry on the device: a bounded on-disk queue and the recorder that fills it.

The ``Recorder`` is the serving side's ``TelemetrySink``: requests never wait on disk, it keeps
their records in memory and a background thread moves them into the ``TelemetryQueue`` every
100 ms (and at ``close()``), so a SIGKILL can lose at most the last 100 ms of records. The queue
survives restarts; ``device_agent.mqtt_link`` publishes from it and deletes what the broker
acknowledged. Record kinds and fields are those of ``edgeml.core.mqtt_contract``.

Durability: SQLite in WAL mode with ``synchronous=NORMAL``. A commit is in the WAL before it
returns, so a killed process loses nothing committed; after a power loss the database is intact
but the last commits (since the last WAL sync) may be gone. Paying an fsync per 100 ms flush
(FULL) would wear SD cards for telemetry that is best effort anyway. What must survive a power
loss is that sequence numbers are never reused (collectors deduplicate on them, so a reused
number would hide a new record): numbers are handed out from a ceiling committed with FULL
(an fsync every ``SEQ_BLOCK`` numbers); a reopened queue continues above the ceiling, exactly
where it stopped after ``close()``, with a gap after a crash.

Bound: over ``max_bytes`` the oldest records go, and a ``dropped`` record reports them
(count, first_seq..last_seq). A drop while the broker is down is exact; records (or a report)
that were in flight at that moment may still arrive, so the count is then an upper bound.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from edgeml.core.mqtt_contract import KINDS, MAX_BATCH_BYTES
from edgeml.core.stats import MAX_CHANNELS, channel_axis

from . import sysstats

log = logging.getLogger(__name__)

SEQ_BLOCK = 10_000  # sequence numbers per durable ceiling: one fsync per this many records
RECORD_OVERHEAD = 48  # what seq, ts, kind and punctuation add to a record's body in a batch
DROPPED_ROOM = 256  # kept free under max_bytes for the `dropped` record a drop writes
MAX_RECORD_BYTES = MAX_BATCH_BYTES // 4  # so one record always fits a batch
MAX_MESSAGE_CHARS = 1000  # error messages are truncated, a record stays small

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class TelemetryQueue:
    """Records waiting for the broker, oldest first, at most ``max_bytes`` (drop-oldest).

    Thread-safe: serving threads append while the publisher peeks and deletes.
    """

    def __init__(self, path, max_bytes: int = 64 << 20):
        if max_bytes < 16 * DROPPED_ROOM:
            raise ValueError(f"max_bytes {max_bytes} is too small for a telemetry queue")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._has_records = threading.Condition(self._lock)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back after checkpoints
        self._db.executescript(_SCHEMA)
        self._ceiling = self._meta("seq_ceiling")
        self._next_seq = self._ceiling + 1
        self._dropped_total = self._meta("dropped_total")
        self._drop_logged = -float("inf")
        # the one `dropped` report that may still be queued (later drops fold into it)
        self._report_seq = self._db.execute("SELECT MAX(seq) FROM records WHERE kind = 'dropped'").fetchone()[0]
        self._records, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records").fetchone()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def append(self, records: Iterable[dict]) -> List[int]:
        """Store records (``kind``, optional ``ts``, the kind's fields) in one transaction; their seqs."""
        now = time.time()
        rows = []
        for record in records:
            if record.get("kind") not in KINDS:
                raise ValueError(f"unknown record kind {record.get('kind')!r}")
            body = _dumps({k: v for k, v in record.items() if k not in ("seq", "ts", "kind")})
            if len(body) > MAX_RECORD_BYTES:
                raise ValueError(f"a {record['kind']} record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
            rows.append([None, float(record.get("ts", now)), record["kind"], body, len(body) + RECORD_OVERHEAD])
        if not rows:
            return []
        with self._lock:
            seqs = list(range(self._next_seq, self._next_seq + len(rows)))
            for row, seq in zip(rows, seqs):
                row[0] = seq
            self._write(rows)
            self._has_records.notify_all()
            return seqs

    def _write(self, rows: list) -> None:
        """Insert, drop the oldest when over the bound, all in one transaction."""
        last = rows[-1][0] + 1  # +1: the `dropped` record this append may write
        raise_ceiling = last > self._ceiling
        if raise_ceiling:  # this commit hands out numbers above the durable ceiling: fsync it
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records (seq, ts, kind, body, size) VALUES (?, ?, ?, ?, ?)", rows)
                if raise_ceiling:
                    self._set_meta("seq_ceiling", last + SEQ_BLOCK)
                added = sum(row[4] for row in rows)
                excess = self._bytes + added - (self.max_bytes - DROPPED_ROOM)
                drop = self._drop_oldest(excess, last) if self._bytes + added > self.max_bytes else None
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        finally:
            if raise_ceiling:
                self._db.execute("PRAGMA synchronous=NORMAL")
        if raise_ceiling:
            self._ceiling = last + SEQ_BLOCK
        self._next_seq = rows[-1][0] + 1
        self._records += len(rows)
        self._bytes += added
        if drop:
            self._apply_drop(last, *drop)

    def _drop_oldest(self, excess: int, seq: int) -> Tuple[int, int, int, int]:
        """Delete the oldest records holding ``excess`` bytes; write the ``dropped`` record ``seq``
        reporting them. The previous report, if still queued, is folded into it, so a long outage
        leaves one report, not one per flush. -> (deleted rows, their bytes, records lost now,
        the report's size)."""
        freed = deleted = folded = 0
        first = None
        old = self._db.execute("SELECT body, size FROM records WHERE seq = ?", (self._report_seq,)).fetchone()
        if old:
            self._db.execute("DELETE FROM records WHERE seq = ?", (self._report_seq,))
            report = json.loads(old[0])
            folded, first, freed, deleted = report["count"], report["first_seq"], old[1], 1
        lost = 0
        through = None
        rows = self._db.execute("SELECT seq, size FROM records ORDER BY seq")
        for row_seq, size in rows:
            if freed >= excess:
                break
            first = row_seq if first is None else first
            through, freed, lost = row_seq, freed + size, lost + 1
        rows.close()
        if through is not None:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (through,))
        last_seq = through if through is not None else report["last_seq"]  # only the old report went
        body = _dumps({"count": folded + lost, "first_seq": first, "last_seq": last_seq})
        size = len(body) + RECORD_OVERHEAD
        self._db.execute("INSERT INTO records (seq, ts, kind, body, size) VALUES (?, ?, 'dropped', ?, ?)",
                         (seq, time.time(), body, size))
        self._set_meta("dropped_total", self._dropped_total + lost)
        return deleted + lost, freed, lost, size

    def _apply_drop(self, seq: int, deleted: int, freed: int, lost: int, size: int) -> None:
        self._report_seq = seq
        self._next_seq = seq + 1
        self._records += 1 - deleted
        self._bytes += size - freed
        self._dropped_total += lost
        if time.monotonic() - self._drop_logged >= 60:  # a long outage drops on every flush: log once a minute
            self._drop_logged = time.monotonic()
            log.warning("telemetry queue full (%d bytes): dropping the oldest records, %d so far",
                        self.max_bytes, self._dropped_total)

    def peek(self, max_records: int = 500, max_bytes: int = 256 << 10) -> List[dict]:
        """The oldest records, at most ``max_records`` and ``max_bytes`` (at least one record)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, ts, kind, body, size FROM records ORDER BY seq LIMIT ?",
                                    (max_records,)).fetchall()
        batch, total = [], 0
        for seq, ts, kind, body, size in rows:
            total += size
            if batch and total > max_bytes:
                break
            batch.append({"seq": seq, "ts": ts, "kind": kind, **json.loads(body)})
        return batch

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove these records (the broker has them); how many were still queued."""
        return self._delete("seq IN (SELECT value FROM json_each(?))", _dumps(list(seqs)))

    def delete_through(self, seq: int) -> int:
        return self._delete("seq <= ?", seq)

    def _delete(self, where: str, arg) -> int:
        with self._lock:
            sizes = self._db.execute(f"DELETE FROM records WHERE {where} RETURNING size", (arg,)).fetchall()
            self._records -= len(sizes)
            self._bytes -= sum(s for (s,) in sizes)
            return len(sizes)

    def wait_for_records(self, timeout: float) -> bool:
        """Block until the queue holds a record or ``timeout`` passes; whether it does."""
        with self._has_records:
            return self._has_records.wait_for(lambda: self._records > 0, timeout)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"records": self._records, "bytes": self._bytes,
                    "dropped_total": self._dropped_total, "next_seq": self._next_seq}

    def close(self) -> None:
        """Lower the durable ceiling to the next number, so a reopened queue continues without a gap."""
        with self._lock:
            if self._db is None:
                return
            self._db.execute("PRAGMA synchronous=FULL")
            self._set_meta("seq_ceiling", self._next_seq - 1)
            self._db.close()
            self._db = None

    def __enter__(self) -> "TelemetryQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def _numeric(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_


def summarize_output(value) -> dict:
    """A classifier's [N, C] output -> top1 and score of the first sample; else mean/min/max."""
    a = np.asarray(value)
    if not _numeric(a) or a.size == 0:
        return {"mean": None, "min": None, "max": None}
    if a.ndim == 2 and a.shape[1] > 1:
        row = a[0].astype(np.float64)
        top = int(np.argmax(np.where(np.isfinite(row), row, -np.inf)))
        return {"top1": top, "score": _finite(row[top])}
    v = a.astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


class Moments:
    """Running count/mean/M2/min/max per channel (Chan's parallel update: no sum of squares,
    so no cancellation on large means). Non-finite values are left out."""

    def __init__(self, axis: Optional[int], channels: int):
        self.axis = axis
        self.samples = 0
        self.n = np.zeros(channels)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    @classmethod
    def of_batch(cls, x: np.ndarray) -> "Moments":
        """Statistics of one request's batch, per channel as ``edgeml.core.stats.baseline_stats`` keeps them."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 0:
            x = x.reshape(1)
        axis = channel_axis(x.shape[1:])
        if axis is None or x.shape[1 + axis] > MAX_CHANNELS:
            axis, cols = None, x.reshape(-1, 1)
        else:
            cols = np.moveaxis(x, 1 + axis, -1).reshape(-1, x.shape[1 + axis])
        m = cls(axis, cols.shape[1])
        m.samples = len(x)
        if np.isfinite(cols).all():
            m.n[:] = len(cols)
            if len(cols):
                m.mean, m.min, m.max = cols.mean(axis=0), cols.min(axis=0), cols.max(axis=0)
                m.m2 = ((cols - m.mean) ** 2).sum(axis=0)
            return m
        finite = np.isfinite(cols)
        m.n = finite.sum(axis=0).astype(np.float64)
        masked = np.where(finite, cols, 0.0)
        m.mean = np.divide(masked.sum(axis=0), m.n, out=np.zeros_like(m.n), where=m.n > 0)
        m.m2 = (np.where(finite, cols - m.mean, 0.0) ** 2).sum(axis=0)
        m.min = np.where(finite, cols, np.inf).min(axis=0)
        m.max = np.where(finite, cols, -np.inf).max(axis=0)
        return m

    def merge(self, other: "Moments") -> "Moments":
        if other.axis != self.axis or other.n.shape != self.n.shape:
            return other  # the input changed shape: the window restarts with the new one
        n = self.n + other.n
        delta = other.mean - self.mean
        w = np.divide(other.n, n, out=np.zeros_like(n), where=n > 0)
        self.mean = self.mean + delta * w
        self.m2 = self.m2 + other.m2 + delta ** 2 * self.n * w
        self.n, self.samples = n, self.samples + other.samples
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        return self

    def summary(self) -> dict:
        seen = self.n > 0
        std = np.sqrt(np.divide(self.m2, self.n, out=np.zeros_like(self.n), where=seen))

        def values(a):
            return [float(v) if s else None for v, s in zip(a, seen)]

        return {"axis": self.axis, "mean": values(self.mean), "std": values(std),
                "min": values(self.min), "max": values(self.max)}


class Recorder:
    """The ``TelemetrySink`` of the serving side: inference/error records per request,
    ``input_stats`` per model every ``stats_window_s``, ``system`` every ``system_interval_s``
    (its disk figure is for ``data_dir``, by default the queue's folder)."""

    def __init__(self, queue: TelemetryQueue, model_name: str, version: int,
                 stats_window_s: float = 60.0, system_interval_s: float = 30.0, flush_interval_s: float = 0.1,
                 flush_records: int = 1000, data_dir=None, durable: bool = True):
        # durable: a request's record is committed before its response goes out, so a SIGKILL
        # never loses a request a client saw served (about 20 us each); False buffers up to
        # flush_interval_s in memory, for throughput where losing that window is acceptable.
        self.durable = durable
        self.queue = queue
        self.data_dir = Path(data_dir) if data_dir is not None else queue.path.parent
        self.model_name, self.version = model_name, version
        self.stats_window_s, self.system_interval_s = stats_window_s, system_interval_s
        self.flush_interval_s, self.flush_records = flush_interval_s, flush_records
        self._lock = threading.Lock()
        self._pending: List[dict] = []
        self._window: Dict[Tuple[str, int], Dict[str, Moments]] = {}
        self._window_start = self._last_system = time.monotonic()
        self._cpu = sysstats.CpuMeter()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edgeml-telemetry", daemon=True)
        self._thread.start()

    def inference(self, model, version, latency_ms, inputs, outputs) -> None:
        record = {"kind": "inference", "ts": time.time(), "model": model, "version": version,
                  "latency_ms": round(float(latency_ms), 3),
                  "outputs": {name: summarize_output(v) for name, v in outputs.items()}}
        arrays = {name: np.asarray(x) for name, x in inputs.items()}
        # the costly part, outside the lock
        batch = {name: Moments.of_batch(a) for name, a in arrays.items() if _numeric(a)}
        with self._lock:
            window = self._window.setdefault((model, version), {})
            for name, m in batch.items():
                window[name] = window[name].merge(m) if name in window else m
        self._add(record)

    def error(self, model, status, message, latency_ms) -> None:
        self._add({"kind": "error", "ts": time.time(), "model": model, "status": int(status),
                   "error": str(message)[:MAX_MESSAGE_CHARS], "latency_ms": round(float(latency_ms), 3)})

    def _add(self, record: dict) -> None:
        if self.durable:
            self._store([record])
            return
        with self._lock:
            self._pending.append(record)
            if len(self._pending) >= self.flush_records:
                self._wake.set()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            now = time.monotonic()
            if now - self._window_start >= self.stats_window_s:
                self._close_window(now)
            if now - self._last_system >= self.system_interval_s:
                self._last_system = now
                self._store([self._system_record()])
            self._flush()

    def _close_window(self, now: float) -> None:
        with self._lock:
            window, self._window = self._window, {}
            elapsed, self._window_start = now - self._window_start, now
            self._pending.extend(
                {"kind": "input_stats", "ts": time.time(), "model": model, "version": version,
                 "window_s": round(elapsed, 3), "count": max(m.samples for m in inputs.values()),
                 "inputs": {name: m.summary() for name, m in inputs.items()}}
                for (model, version), inputs in window.items() if inputs)

    def _system_record(self) -> dict:
        q = self.queue.stats()
        return {"kind": "system", "ts": time.time(), "model": self.model_name, "version": self.version,
                "rss_bytes": sysstats.rss_bytes(), "cpu_percent": self._cpu.percent(),
                "disk_free_bytes": sysstats.disk_free_bytes(self.data_dir),
                "queue_records": q["records"], "queue_bytes": q["bytes"], "dropped_total": q["dropped_total"]}

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        self._store(pending)

    def _store(self, records: List[dict]) -> None:
        try:
            self.queue.append(records)
        except (sqlite3.Error, OSError, ValueError) as exc:  # telemetry must never stop serving
            log.error("telemetry: %d records lost, the queue refused them: %s", len(records), exc)

    def close(self) -> None:
        """Stop the thread; store the partial stats window and everything pending."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._close_window(time.monotonic())
        self._flush()
