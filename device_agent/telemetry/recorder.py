"""The serving side's ``TelemetrySink``: per-request records, per-window input statistics and
system figures, moved into the durable ``TelemetryQueue``.

By default a request's record is committed before its response goes out; with
``durable=False`` requests never wait on disk: records stay in memory and a background thread
moves them into the queue every 100 ms (and at ``close()``), so a SIGKILL can lose at most the
last 100 ms of records.

A request only copies the values its input statistics are made of (at most 4,096 per channel);
the background thread makes the statistics from them (a request makes its own when 8 MiB of
copies wait), so the window's figures cost the request path a copy, not a dozen reductions.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeml.core.drift import strided_columns
from edgeml.core.stats import MAX_CHANNELS, channel_axis

from . import sysstats
from .queue import TelemetryQueue

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1000  # error messages are truncated, a record stays small


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


MAX_VALUES = 4096  # values per channel and request the input statistics read
YIELD_EVERY_S = 0.0005
MAX_SAMPLED_BYTES = 8 << 20  # sampled values waiting for the telemetry thread; beyond, requests make their own


def sampled_rows(x) -> Tuple[Optional[int], np.ndarray, int]:
    """What the input statistics of one request's batch are made of: its channel axis (as
    ``edgeml.core.stats.baseline_stats`` keeps them; None: one feature), at most ``MAX_VALUES``
    values per channel at an even stride (as the drift monitor counts; the whole of a 224x224x3
    image cost 4.5 ms a request, more than the model) as float64 rows [channels, values], and the
    batch's sample count. A copy: the caller may reuse its arrays once the request is answered."""
    x = np.asarray(x)
    if x.ndim == 0:
        x = x.reshape(1)
    axis = channel_axis(x.shape[1:])
    if axis is not None and x.shape[1 + axis] > MAX_CHANNELS:
        axis = None
    cols = strided_columns(x, axis, MAX_VALUES)
    # channels first and contiguous: numpy reduces a [values, 3] array along axis 0 at a
    # stride, 10x slower than each channel's row (0.44 -> 0.04 ms on a 224x224x3 image)
    return axis, np.ascontiguousarray(cols.T, dtype=np.float64), len(x)


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
        """Statistics of one request's batch (``sampled_rows`` then ``of_rows``)."""
        return cls.of_rows(*sampled_rows(x))

    @classmethod
    def of_rows(cls, axis: Optional[int], rows: np.ndarray, samples: int) -> "Moments":
        """Statistics of what ``sampled_rows`` took from a batch of ``samples``."""
        m = cls(axis, rows.shape[0])
        m.samples = samples
        if np.isfinite(rows).all():
            m.n[:] = rows.shape[1]
            if rows.shape[1]:
                m.mean, m.min, m.max = rows.mean(axis=1), rows.min(axis=1), rows.max(axis=1)
                m.m2 = ((rows - m.mean[:, None]) ** 2).sum(axis=1)
            return m
        finite = np.isfinite(rows)
        m.n = finite.sum(axis=1).astype(np.float64)
        masked = np.where(finite, rows, 0.0)
        m.mean = np.divide(masked.sum(axis=1), m.n, out=np.zeros_like(m.n), where=m.n > 0)
        m.m2 = (np.where(finite, rows - m.mean[:, None], 0.0) ** 2).sum(axis=1)
        m.min = np.where(finite, rows, np.inf).min(axis=1)
        m.max = np.where(finite, rows, -np.inf).max(axis=1)
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
    (its disk figure is for ``data_dir``, by default the queue's folder). ``stats()``, when given,
    adds fields to every ``system`` record: the serving model's ``telemetry_stats`` (its response
    cache's hits and misses); a provider that fails costs its fields, not the record."""

    def __init__(self, queue: TelemetryQueue, model_name: str, version: int,
                 stats_window_s: float = 60.0, system_interval_s: float = 30.0, flush_interval_s: float = 0.1,
                 flush_records: int = 1000, data_dir=None, durable: bool = True,
                 stats: Optional[Callable[[], dict]] = None):
        # durable: a request's record is committed before its response goes out, so a SIGKILL
        # never loses a request a client saw served (about 20 us each); False buffers up to
        # flush_interval_s in memory, for throughput where losing that window is acceptable.
        self.durable = durable
        self.queue = queue
        self.data_dir = Path(data_dir) if data_dir is not None else queue.path.parent
        self.model_name, self.version = model_name, version
        self.stats_window_s, self.system_interval_s = stats_window_s, system_interval_s
        self.flush_interval_s, self.flush_records = flush_interval_s, flush_records
        self.stats = stats
        self._lock = threading.Lock()
        self._pending: List[dict] = []
        self._window: Dict[Tuple[str, int], Dict[str, Moments]] = {}
        self._sampled: deque = deque()  # (model, version), {input: sampled_rows(...)}, bytes: not yet in the window
        self._sampled_bytes = 0
        self._window_start = self._last_system = time.monotonic()
        self._cpu = sysstats.CpuMeter()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="edgeml-telemetry", daemon=True)
        self._thread.start()

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        record = {"kind": "inference", "ts": time.time(), "model": model, "version": version,
                  "latency_ms": round(float(latency_ms), 3),
                  "outputs": {name: summarize_output(v) for name, v in outputs.items()}}
        arrays = {name: np.asarray(x) for name, x in inputs.items()}
        sampled = {name: sampled_rows(a) for name, a in arrays.items() if _numeric(a)}
        size = sum(rows.nbytes for _, rows, _ in sampled.values())
        with self._lock:
            later = self._sampled_bytes + size <= MAX_SAMPLED_BYTES
            if later:  # the statistics are made on the telemetry thread, off the request path
                self._sampled.append(((model, version), sampled, size))
                self._sampled_bytes += size
        if not later:  # the thread is behind: this request makes its own (slower, nothing skipped)
            self._merge((model, version), sampled)
        self._add(record)

    def _merge(self, key, sampled) -> None:
        batch = {name: Moments.of_rows(*taken) for name, taken in sampled.items()}
        with self._lock:
            window = self._window.setdefault(key, {})
            for name, m in batch.items():
                window[name] = window[name].merge(m) if name in window else m

    def _make_stats(self) -> None:
        """Fold what requests sampled into the window's statistics (the telemetry thread)."""
        held = time.perf_counter()
        while True:
            with self._lock:
                if not self._sampled:
                    return
                key, sampled, size = self._sampled.popleft()
                self._sampled_bytes -= size
            self._merge(key, sampled)
            if time.perf_counter() - held > YIELD_EVERY_S:  # as the drift monitor does: a backlog
                time.sleep(0)  # must not keep a request waiting for the interpreter lock
                held = time.perf_counter()

    def error(self, model, status, message, latency_ms) -> None:
        self._add({"kind": "error", "ts": time.time(), "model": model, "status": int(status),
                   "error": str(message)[:MAX_MESSAGE_CHARS], "latency_ms": round(float(latency_ms), 3)})

    def record(self, record: dict) -> None:
        """Any other record (a drift window, an alert) into the queue, durably."""
        self._store([record])

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
            self._make_stats()
            now = time.monotonic()
            if now - self._window_start >= self.stats_window_s:
                self._close_window(now)
            if now - self._last_system >= self.system_interval_s:
                self._last_system = now
                self._store([self._system_record()])
            self._flush()

    def _close_window(self, now: float) -> None:
        self._make_stats()
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
        record = {"kind": "system", "ts": time.time(), "model": self.model_name, "version": self.version,
                  "rss_bytes": sysstats.rss_bytes(), "cpu_percent": self._cpu.percent(),
                  "disk_free_bytes": sysstats.disk_free_bytes(self.data_dir),
                  "queue_records": q["records"], "queue_bytes": q["bytes"], "dropped_total": q["dropped_total"]}
        if self.stats is not None:
            try:
                extra = self.stats()
            except Exception:  # telemetry must never stop serving
                log.exception("telemetry: the stats provider failed")
            else:
                record.update({k: v for k, v in extra.items() if k not in record})
        return record

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
