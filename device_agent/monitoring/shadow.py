"""Shadow evaluation on the device: a candidate model runs beside the active one on a sampled share
of live requests, off the response path, and the two are compared (``edgeml.core.shadow``).

``ShadowRunner`` is a telemetry sink: the serving path hands it each request it answered, after
the answer is computed. Sampling and a bounded queue keep that hand-off to a few microseconds: a
request that does not fit (the candidate is slower than the traffic) is dropped and counted, the
response never waits. One background thread, at a lower CPU priority than serving, runs the
candidate on the queued inputs and counts agreement, both models' run times on the same request
and the candidate's errors; each window goes to telemetry as a ``shadow`` record.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from typing import Callable, Optional

from edgeml.core import shadow as sh
from edgeml.core.errors import first_line

log = logging.getLogger("edgeml-agent.shadow")
NICE = 10  # the candidate's thread yields the CPU to serving on a busy device


class ShadowRunner:
    def __init__(self, candidate, *, sample: float, rollout: Optional[str], emit: Callable[[dict], None],
                 window_s: float = 60.0, max_pending: int = 32, seed: Optional[int] = None, active=None):
        if not 0 < sample <= 1:
            raise ValueError("the shadow sample must be above 0 and at most 1")
        self.candidate, self.sample, self.rollout, self.emit = candidate, float(sample), rollout, emit
        self.window_s, self.max_pending = float(window_s), int(max_pending)
        # class-score outputs, by either model's baseline: compared on top-1, the others on cosine
        self.classes = class_outputs(candidate)
        self.active_classes = class_outputs(active) if active is not None else set()
        self._rng = random.Random(seed)
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._window = self._empty()
        self._window_started = time.monotonic()
        self._active = (None, None)  # (model, version) of the requests sampled
        self._first_error: Optional[str] = None
        self.totals = self._empty()  # since the start, for status
        self._thread = threading.Thread(target=self._run, name="edgeml-shadow", daemon=True)
        self._thread.start()

    @property
    def content_sha256(self) -> str:
        return self.candidate.artifact.content_sha256

    # -- the request path: a few microseconds, never a wait --------------------------------------

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return
        with self._lock:
            self._window["sampled"] += 1
            if len(self._queue) >= self.max_pending:
                self._window["dropped"] += 1
                return
            self._queue.append((inputs, outputs, latency_ms if run_ms is None else run_ms))
            self._active = (model, version)
        self._wake.set()

    def error(self, model, status, message, latency_ms) -> None:
        pass  # a request the active model did not answer has nothing to compare with

    # -- the candidate's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            while self._queue and not self._stop.is_set():
                self._compare(*self._queue.popleft())
            if time.monotonic() - self._window_started >= self.window_s:
                self._flush()

    def _compare(self, inputs, outputs, active_ms) -> None:
        try:
            out = self.candidate.infer(inputs)
            shadow_ms = self.candidate.last_run_ms()
            paired, classes = _pair(outputs, out, self.classes)
            classes |= self.active_classes & set(outputs)
            found = sh.compare(outputs, paired, classes)
        except Exception as exc:  # the candidate's failure is a finding, never the agent's
            with self._lock:
                self._window["errors"] += 1
                if self._first_error is None:
                    self._first_error = first_line(getattr(exc, "message", None) or str(exc), 300)
            return
        with self._lock:
            w = self._window
            w["compared"] += 1
            for k in ("rows", "agreed", "cosine_n"):
                w[k] += found[k]
            w["cosine_sum"] += found["cosine_sum"]
            if found["cosine_min"] is not None:
                w["cosine_min"] = found["cosine_min"] if w["cosine_min"] is None else min(w["cosine_min"],
                                                                                         found["cosine_min"])
            _count(w["active_ms"], sh.bucket(active_ms))
            if shadow_ms is not None:
                _count(w["shadow_ms"], sh.bucket(shadow_ms))

    def _flush(self) -> None:
        with self._lock:
            w, self._window = self._window, self._empty()
            elapsed = time.monotonic() - self._window_started
            self._window_started = time.monotonic()
            error, self._first_error = self._first_error, None
            model, version = self._active
        for k in sh.COUNTS + ("cosine_sum",):
            self.totals[k] += w[k]
        if w["cosine_min"] is not None:
            self.totals["cosine_min"] = min(w["cosine_min"], self.totals["cosine_min"] if
                                            self.totals["cosine_min"] is not None else w["cosine_min"])
        sh.add_counts(self.totals["active_ms"], w["active_ms"])
        sh.add_counts(self.totals["shadow_ms"], w["shadow_ms"])
        if not w["sampled"]:
            return  # no traffic, nothing to say
        m = self.candidate.manifest
        record = {"kind": "shadow", "ts": time.time(), "model": model, "version": version,
                  "shadow_model": m["name"], "shadow_version": m["version"], "shadow_sha256": self.content_sha256,
                  "rollout": self.rollout, "window_s": round(elapsed, 3), **w}
        if error:
            record["first_error"] = error
        try:
            self.emit(record)
        except Exception:
            log.exception("shadow: a window could not be recorded")

    def status(self) -> dict:
        return {"rollout": self.rollout, "sample": self.sample, "shadow_version": self.candidate.version,
                **sh.summarize([self.totals])}

    def close(self, timeout: float = 10.0):
        """Stop comparing: requests still queued count as dropped; the last window is recorded.
        Returns the candidate (loaded and self-tested, for a promotion to use)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            self._window["dropped"] += len(self._queue)
            self._queue.clear()
        self._flush()
        return self.candidate

    @staticmethod
    def _empty() -> dict:
        return {"sampled": 0, "compared": 0, "dropped": 0, "errors": 0, "rows": 0, "agreed": 0, "cosine_n": 0,
                "cosine_sum": 0.0, "cosine_min": None, "active_ms": {}, "shadow_ms": {}}


def class_outputs(service) -> set:
    outputs = (service.artifact.baseline or {}).get("outputs") or {}
    return {name for name, spec in outputs.items() if isinstance(spec, dict) and "classes" in spec}


def _pair(active: dict, shadow: dict, shadow_classes) -> tuple:
    """The candidate's outputs under the active model's names: by name, or, when no name is shared
    and both return as many outputs (a model converted again renames them), in order."""
    if set(active) & set(shadow) or len(active) != len(shadow):
        return shadow, {n for n in shadow_classes if n in active}
    pairs = dict(zip(active, shadow))
    return {a: shadow[s] for a, s in pairs.items()}, {a for a, s in pairs.items() if s in shadow_classes}


def _count(counts: dict, index: int) -> None:
    counts[str(index)] = counts.get(str(index), 0) + 1
