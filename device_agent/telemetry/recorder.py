"""The serving side's ``TelemetrySink``: per-request records, per-window input statistics and
system figures, moved into the durable ``TelemetryQueue``.

By default a request's record is committed before its response goes out; with
``durable=False`` requests never wait on disk: records stay in memory and a background thread
moves them into the queue every 100 ms (and at ``close()``), so a SIGKILL can lose at most the
last 100 ms of records.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

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
        """Statistics of one request's batch, per channel as ``edgeml.core.stats.baseline_stats`` keeps
        them, over at most ``MAX_VALUES`` values per channel at an even stride (as the drift monitor
        counts): on a 224x224x3 image the whole of it cost 4.5 ms a request, more than the model."""
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        axis = channel_axis(x.shape[1:])
        if axis is None or x.shape[1 + axis] > MAX_CHANNELS:
            axis, cols = None, x.reshape(-1, 1)
        else:
            cols = np.moveaxis(x, 1 + axis, -1).reshape(-1, x.shape[1 + axis])
        if len(cols) > MAX_VALUES:
            cols = cols[::-(-len(cols) // MAX_VALUES)]
        cols = cols.astype(np.float64)
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
