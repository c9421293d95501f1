"""Shadow evaluation on the device: a candidate model runs beside the active one on a sampled share
of live requests, off the response path, and the two are compared (``edgeml.core.shadow``).

``ShadowRunner`` is a telemetry sink: the serving path hands it each request it answered, after
the answer is computed. Sampling and a bounded queue keep that hand-off to a few microseconds: a
request that does not fit (the candidate is slower than the traffic) is dropped and counted, the
response never waits. A feeder thread passes the queue in batches to the shadow's own process
(``worker``, at a lower CPU priority), which runs the candidate on each request and counts
agreement, both models' run times and the candidate's errors. The candidate runs in a process of
its own because in a thread its Python work would contend for the agent's interpreter lock on
every sampled request. Each window goes to telemetry as a ``shadow`` record.
"""
from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Optional

from edgeml.core import shadow as sh

from .frames import read_frame, write_frame

log = logging.getLogger("edgeml-agent.shadow")
BATCH = 64  # requests per message to the shadow's process
START_TIMEOUT_S = 120.0  # loading the candidate in the shadow's process
REPLY_TIMEOUT_S = 120.0  # its counts, once asked: it answers after the requests it holds (a pipe's worth)
STOP_TIMEOUT_S = 10.0  # at close: past this its last counts are lost, not the agent's time


class ShadowRunner:
    def __init__(self, candidate, *, sample: float, rollout: Optional[str], emit: Callable[[dict], None],
                 window_s: float = 60.0, max_pending: int = 256, seed: Optional[int] = None, active=None,
                 threads: int = 1):
        if not 0 < sample <= 1:
            raise ValueError("the shadow sample must be above 0 and at most 1")
        self.candidate, self.sample, self.rollout, self.emit = candidate, float(sample), rollout, emit
        self.window_s, self.max_pending = float(window_s), int(max_pending)
        self.active_classes = tuple(class_outputs(active)) if active is not None else ()
        self._rng = random.Random(seed)
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._window = {"sampled": 0, "dropped": 0}
        self._window_started = time.monotonic()
        self._active = (None, None)  # (model, version) of the requests sampled
        self._failed: Optional[str] = None  # why the shadow's process does not run, once it does not
        self.ready = threading.Event()  # the candidate is loaded in its process and comparing
        self.totals: dict = {}  # every window added up, for status
        self._process = subprocess.Popen(
            [sys.executable, "-m", "device_agent.shadow.worker", str(candidate.artifact.path),
             candidate.artifact.sha256, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
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
            if len(self._queue) >= self.max_pending or self._failed:
                self._window["dropped"] += 1
                return
            self._queue.append((inputs, outputs, latency_ms if run_ms is None else run_ms, self.active_classes))
            self._active = (model, version)
        if len(self._queue) >= BATCH:
            self._wake.set()

    def error(self, model, status, message, latency_ms) -> None:
        pass  # a request the active model did not answer has nothing to compare with

    # -- the feeder thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        reply = self._ask(None, START_TIMEOUT_S)
        if reply is None or reply[0] != "ready":
            self._fail(reply[1] if reply else "the shadow's process did not start")
        else:
            self.ready.set()
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            self._feed()
            if time.monotonic() - self._window_started >= self.window_s:
                self._flush()

    def _feed(self) -> None:
        while self._queue and not self._failed:
            batch = []
            while self._queue and len(batch) < BATCH:
                batch.append(self._queue.popleft())
            try:
                write_frame(self._process.stdin, ("req", batch))
            except (OSError, ValueError):
                with self._lock:
                    self._window["dropped"] += len(batch)
                self._fail(f"the shadow's process ended (exit {self._process.poll()})")

    def _ask(self, message, timeout: float):
        """Send ``message`` (None: only read) and read one reply, within ``timeout``; None if none."""
        if self._failed:
            return None
        box: list = []

        def exchange():
            try:
                if message is not None:
                    write_frame(self._process.stdin, message)
                box.append(read_frame(self._process.stdout))
            except (OSError, ValueError, EOFError) as exc:
                box.append(None)
                log.warning("shadow: %s", exc)

        t = threading.Thread(target=exchange, daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive() or not box or box[0] is None:
            self._fail("the shadow's process did not answer" if t.is_alive() else
                       f"the shadow's process ended (exit {self._process.poll()})")
            return None
        return box[0]

    def _fail(self, why: str) -> None:
        if self._failed is None:
            self._failed = why
            log.error("shadow: %s; the candidate is no longer compared", why)
            if self._process.poll() is None:
                self._process.kill()

    def _flush(self, message=("flush",), timeout: float = REPLY_TIMEOUT_S) -> None:
        reply = self._ask(message, timeout)
        counts = reply[1] if reply and reply[0] == "counts" else {}
        with self._lock:
            w, self._window = self._window, {"sampled": 0, "dropped": 0}
            elapsed = time.monotonic() - self._window_started
            self._window_started = time.monotonic()
            model, version = self._active
        error = counts.pop("first_error", None) or self._failed
        w.update({k: counts.get(k, 0) for k in ("compared", "errors", "rows", "agreed", "cosine_n")})
        w.update(cosine_sum=counts.get("cosine_sum", 0.0), cosine_min=counts.get("cosine_min"),
                 active_ms=counts.get("active_ms", {}), shadow_ms=counts.get("shadow_ms", {}))
        sh.add_window(self.totals, w)
        if not w["sampled"] and not w["compared"]:
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
                "failed": self._failed, **sh.summarize([self.totals])}

    def close(self, timeout: float = 10.0):
        """Stop comparing: what the shadow's process has is counted, requests still queued count as
        dropped; the last window is recorded. Returns the candidate (loaded and self-tested, for a
        promotion to use)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            self._window["dropped"] += len(self._queue)
            self._queue.clear()
        self._flush(("stop",), STOP_TIMEOUT_S)
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        return self.candidate


def class_outputs(service) -> set:
    outputs = (service.artifact.baseline or {}).get("outputs") or {}
    return {name for name, spec in outputs.items() if isinstance(spec, dict) and "classes" in spec}


def pair(active: dict, shadow: dict, shadow_classes) -> tuple:
    """The candidate's outputs under the active model's names: by name, or, when no name is shared
    and both return as many outputs (a model converted again renames them), in order."""
    if set(active) & set(shadow) or len(active) != len(shadow):
        return shadow, {n for n in shadow_classes if n in active}
    pairs = dict(zip(active, shadow))
    return {a: shadow[s] for a, s in pairs.items()}, {a for a, s in pairs.items() if s in shadow_classes}
