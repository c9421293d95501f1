"""How well the served model does on live traffic: the evidence an update is judged by.

``HealthMonitor`` is a ``TelemetrySink`` beside the recorder: every request the API or the
in-process client serves or refuses passes through it. It keeps the last requests (bounded) with
the model version that served them, so at any moment it can say, for one version since a time:
requests, runtime errors (5xx; a client's 4xx is not the model's fault), p95 of the time spent in
the model (HTTP and queueing are the same whichever model serves, and only add noise), responses
holding NaN or infinity, and the predicted-class distribution. An update compares the new
model's window with the replaced model's recent traffic (``reference``), and the class
distribution with the artifact's baseline.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Optional

import numpy as np

from edgeml.core.stats import js_distance
from edgeml.core.update_contract import LATENCY_MIN_REQUESTS

from ..serving import RUNTIME_REFUSAL

log = logging.getLogger("edgeml-agent.updates")
KEEP = 20_000  # requests remembered: enough for a window and a reference at a few hundred requests/s


class HealthMonitor:
    def __init__(self, keep: int = KEEP):
        self._lock = threading.Lock()
        # the last ``keep`` requests in a ring of arrays, not a deque of tuples: 30 bytes a
        # request rather than about 150 (3 MiB of the agent's RSS once the deque was full)
        self._keep, self._count = keep, 0
        self._ts = np.zeros(keep)  # monotonic
        self._version = np.full(keep, -1, np.int64)  # -1: no version known
        self._latency = np.zeros(keep)  # ms
        self._failed = np.zeros(keep, bool)
        self._nan = np.zeros(keep, bool)
        self._top1 = np.full(keep, -1, np.int32)  # -1: not a classifier
        self.version: Optional[int] = None  # the version serving now (refused requests carry no version)

    # -- TelemetrySink ---------------------------------------------------------------------

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        nan, top1 = False, -1
        for i, value in enumerate(outputs.values()):
            a = np.asarray(value)
            if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
                nan = True
            if i == 0 and a.dtype.kind == "f" and a.ndim == 2 and a.shape[-1] > 1 and len(a):
                top1 = int(np.argmax(np.where(np.isfinite(a[0]), a[0], -np.inf)))
        # the model's own time when known: HTTP and queueing are the same for both models and only add noise
        self._append(version, float(run_ms if run_ms is not None else latency_ms), False, nan, top1)

    def error(self, model, status, message, latency_ms) -> None:
        if (int(status) < 500 and int(status) != RUNTIME_REFUSAL) or model is None:
            return  # the client's mistake, or a request for another model: not the model's health
        self._append(self.version, float(latency_ms), True, False, -1)

    def _append(self, version, latency_ms: float, failed: bool, nan: bool, top1: int) -> None:
        with self._lock:
            i = self._count % self._keep
            self._ts[i] = time.monotonic()
            self._version[i] = -1 if version is None else version
            self._latency[i], self._failed[i], self._nan[i], self._top1[i] = latency_ms, failed, nan, top1
            self._count += 1

    # -- figures ----------------------------------------------------------------------------

    def figures(self, version: int, since: float = 0.0, last: Optional[int] = None) -> dict:
        """Requests, error rate, p95 latency and NaN rate of ``version`` since ``since`` (monotonic),
        or over its ``last`` requests."""
        with self._lock:
            held = min(self._count, self._keep)
            order = (np.arange(held) + (self._count % self._keep if self._count > self._keep else 0)) % self._keep
            ts, versions = self._ts[order], self._version[order]
            latency, failed, nan, top1 = self._latency[order], self._failed[order], self._nan[order], self._top1[order]
        rows = np.flatnonzero((versions == version) & (ts >= since))
        if last is not None:
            rows = rows[-last:]
        n = len(rows)
        served = rows[~failed[rows]]
        seen = top1[served]
        labels, counts = np.unique(seen[seen >= 0], return_counts=True)
        nans = int(nan[served].sum())
        return {
            "requests": n,
            "errors": n - len(served),
            "error_rate": (n - len(served)) / n if n else None,
            "latency_p95_ms": float(np.percentile(latency[served], 95)) if len(served) else None,
            "nan_outputs": nans,
            "nan_rate": nans / len(served) if len(served) else None,
            "classes": {int(c): int(k) for c, k in zip(labels, counts)},
        }


def class_shift(classes: Dict[int, int], baseline: dict) -> Optional[float]:
    """Jensen-Shannon distance between predicted classes and the artifact's baseline frequencies
    of its first classifier output; None without a baseline or predictions."""
    outputs = (baseline or {}).get("outputs") or {}
    if not outputs or not classes:
        return None
    freqs = next(iter(outputs.values())).get("frequencies")
    if not freqs or max(classes) >= len(freqs):
        return None
    seen = np.zeros(len(freqs))
    for cls, count in classes.items():
        seen[cls] = count
    return js_distance(seen, freqs)


def evidence(monitor: HealthMonitor, version: int, since: float, reference: dict, baseline: dict,
             window_s: float) -> dict:
    """The new model's figures over its window, with the replaced model's beside them."""
    fig = monitor.figures(version, since)
    classes = fig.pop("classes")
    fig["class_shift"] = class_shift(classes, baseline)
    fig["window_s"] = round(window_s, 3)
    fig["reference"] = reference
    return fig


def reference_figures(monitor: HealthMonitor, version: int, selftest_latency_ms: Optional[float],
                      min_requests: int = LATENCY_MIN_REQUESTS, recent_s: float = 3600.0) -> dict:
    """The replaced model's recent live figures (its last hour, at most its last 1,000 requests);
    when it served too few to give a p95, its latency on the self-test inputs measured on this
    device instead (the new model's is then compared on the same inputs)."""
    fig = monitor.figures(version, time.monotonic() - recent_s, last=1000)
    fig.pop("classes")
    if fig["requests"] >= min_requests and fig["latency_p95_ms"] is not None:
        return {**fig, "source": "live"}
    return {"requests": fig["requests"], "error_rate": fig["error_rate"] or 0.0,
            "latency_p95_ms": selftest_latency_ms, "nan_rate": fig["nan_rate"] or 0.0, "source": "selftest"}


class Tee:
    """One TelemetrySink that hands every call to several (the recorder, the health monitor); one
    failing does not keep the call from the others.

    ``later`` sinks keep only memory (health, drift, the shadow's sample): the HTTP API reports a
    served request to them after its response is out (``inference_before`` / ``inference_after``),
    so the client does not wait for them; the durable recorder is told before, as its record must
    be committed before the response. ``inference`` tells them all, in that order."""

    def __init__(self, *sinks, later=()):
        self.sinks = sinks
        self.later = tuple(later)

    def inference(self, *args) -> None:
        self._each(self.sinks + self.later, "inference", args)  # run_ms travels positionally

    def inference_before(self, *args) -> None:
        self._each(self.sinks, "inference", args)

    def inference_after(self, *args) -> None:
        self._each(self.later, "inference", args)

    def error(self, *args) -> None:
        self._each(self.sinks + self.later, "error", args)

    @staticmethod
    def _each(sinks, method: str, args) -> None:
        for sink in sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:  # telemetry must never fail a request
                log.exception("a telemetry sink failed")
