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
from collections import deque
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
        self._requests = deque(maxlen=keep)  # (monotonic, version, latency_ms, failed, nan, top1 or None)
        self.version: Optional[int] = None  # the version serving now (refused requests carry no version)

    # -- TelemetrySink ---------------------------------------------------------------------

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        nan, top1 = False, None
        for i, value in enumerate(outputs.values()):
            a = np.asarray(value)
            if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
                nan = True
            if i == 0 and a.dtype.kind == "f" and a.ndim == 2 and a.shape[-1] > 1 and len(a):
                top1 = int(np.argmax(np.where(np.isfinite(a[0]), a[0], -np.inf)))
        with self._lock:
            # the model's own time when known: HTTP and queueing are the same for both models and only add noise
            self._requests.append((time.monotonic(), version, float(run_ms if run_ms is not None else latency_ms),
                                   False, nan, top1))

    def error(self, model, status, message, latency_ms) -> None:
        if (int(status) < 500 and int(status) != RUNTIME_REFUSAL) or model is None:
            return  # the client's mistake, or a request for another model: not the model's health
        with self._lock:
            self._requests.append((time.monotonic(), self.version, float(latency_ms), True, False, None))

    # -- figures ----------------------------------------------------------------------------

    def figures(self, version: int, since: float = 0.0, last: Optional[int] = None) -> dict:
        """Requests, error rate, p95 latency and NaN rate of ``version`` since ``since`` (monotonic),
        or over its ``last`` requests."""
        with self._lock:
            rows = [r for r in self._requests if r[1] == version and r[0] >= since]
        if last is not None:
            rows = rows[-last:]
        n = len(rows)
        served = [r for r in rows if not r[3]]
        latencies = [r[2] for r in served]
        classes: Dict[int, int] = {}
        for r in served:
            if r[5] is not None:
                classes[r[5]] = classes.get(r[5], 0) + 1
        return {
            "requests": n,
            "errors": n - len(served),
            "error_rate": (n - len(served)) / n if n else None,
            "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
            "nan_outputs": sum(1 for r in served if r[4]),
            "nan_rate": sum(1 for r in served if r[4]) / len(served) if served else None,
            "classes": classes,
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
    failing does not keep the call from the others."""

    def __init__(self, *sinks):
        self.sinks = sinks

    def inference(self, *args) -> None:
        self._each("inference", args)  # run_ms travels positionally

    def error(self, *args) -> None:
        self._each("error", args)

    def _each(self, method: str, args) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:  # telemetry must never fail a request
                log.exception("a telemetry sink failed")
