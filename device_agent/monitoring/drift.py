"""Drift on the device: live requests counted into the baseline's bins, judged over a sliding
window, alerts raised and cleared with hysteresis.

Per input channel (or feature) and for the outputs (predicted classes, top-1 confidence, or
the values of other outputs) the monitor keeps one row of integer counts per bin for the
window being filled and for each of the last ``windows`` closed windows: memory is features x
bins x (windows + 1) integers whatever the traffic. At each window's close it

- hands the window's counts to telemetry (a ``drift`` record: they add up exactly on the
  host, so drift can be computed for a fleet, a version or a rollout wave), and
- scores the sum of the last ``windows`` windows against the baseline (PSI, Jensen-Shannon
  distance, binned KS per feature) and raises an alert when a score passes its threshold with
  at least ``min_samples`` samples seen, on a feature whose shift is more than chance (a
  G-test, p below ``alpha`` over the number of features: with 64 features and 400 samples,
  in-distribution traffic puts some feature's JS distance past 0.1); the alert clears only
  once no such feature is above ``clear_ratio`` of its threshold, so a score hovering at the
  line does not flap.

Artifacts built before the baseline carried histograms still serve: their inputs are judged
on the shift of each channel's mean, in baseline standard deviations.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from edgeml.core import drift

log = logging.getLogger(__name__)

WORST = 5  # features named in an alert
YIELD_EVERY_S = 0.0005  # the counting thread lets request threads run at least this often


@dataclass
class DriftSettings:
    enabled: bool = True
    window_s: float = 60.0  # one window's length; its counts go to telemetry when it closes
    windows: int = 10  # the judgement covers the last this many windows
    min_samples: int = 200  # fewer samples than this in them: no judgement (small samples look drifted)
    js_threshold: float = drift.JS_THRESHOLD
    psi_threshold: float = drift.PSI_THRESHOLD
    confidence_drop: float = 0.1  # mean top-1 confidence this far below the baseline's
    mean_shift: float = 0.5  # legacy baselines (no histograms): |mean - baseline mean| / baseline std
    clear_ratio: float = 0.7  # an alert clears when every score is below this share of its threshold
    alpha: float = 0.01  # and a feature counts only if a shift that large is unlikely to be chance
    #                      (G-test p below alpha / features judged: small windows always look a little drifted)
    max_values: int = 4096  # values counted per channel and request (an even stride over larger inputs)
    max_pending: int = 256  # requests waiting to be counted; beyond, they are skipped (and counted as such)


class DriftMonitor:
    """A ``TelemetrySink`` for one model version. ``emit`` takes each record (``drift`` per
    window, ``alert`` when one is raised or cleared): the agent sends them through the durable
    telemetry queue and publishes alerts on the events topic as well."""

    def __init__(self, baseline: dict, model: str, version: int, sha256: str, settings: DriftSettings,
                 emit: Callable[[dict], None], clock: Callable[[], float] = time.monotonic, start: bool = True):
        self.model, self.version, self.sha256, self.settings = model, version, sha256, settings
        self.emit, self.clock = emit, clock
        self.features: Dict[str, drift.Histogram] = {}
        self.legacy: Dict[str, dict] = {}  # input -> mean/std of a baseline without histograms
        self._legacy_sums: Dict[str, np.ndarray] = {}
        self._read(baseline or {})
        self._confidence_sum = 0.0
        self._samples = 0
        self._pending: deque = deque()  # requests handed over, not yet counted
        self.skipped = 0  # requests not counted this window: the counting thread was behind
        self._history: deque = deque(maxlen=max(int(settings.windows), 1))  # (samples, {key: counts}, conf, legacy)
        self.alerts: Dict[str, dict] = {}  # open alerts by kind
        self.last: Optional[dict] = None  # the last judgement, for status and tests
        self._lock = threading.Lock()
        self._window_start = clock()
        if self.features:
            # the host judges the windows it collects against this, exactly as the device does
            emit({"kind": "baseline", "ts": time.time(), "model": model, "version": version, "sha256": sha256,
                  "baseline": _histograms_only(baseline)})
        self._stop = threading.Event()
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="edgeml-drift", daemon=True)
            self._thread.start()

    # --- the baseline ---------------------------------------------------------------------------

    def _read(self, baseline: dict) -> None:
        self.features = drift.histograms(baseline)
        for f in self.features.values():
            f.current = np.zeros_like(f.counts)
        for name, spec in (baseline.get("inputs") or {}).items():
            if f"input:{name}" in self.features or not spec.get("channels"):
                continue
            means = [c.get("mean") for c in spec["channels"]]
            stds = [c.get("std") for c in spec["channels"]]
            if all(m is not None for m in means) and all(v is not None for v in stds):
                std = np.asarray(stds, np.float64)
                # a channel constant in the baseline (an image's border) would make any change
                # infinitely many std: it gets a tenth of the input's typical spread instead
                floor = max(0.1 * float(np.median(std)), 1e-6)
                self.legacy[name] = {"axis": spec.get("axis"), "mean": np.asarray(means, np.float64),
                                     "std": np.maximum(std, floor)}

    def memory_bytes(self) -> int:
        """What the drift state holds: every histogram, its baseline and its edges."""
        legacy = sum(v["mean"].nbytes * (3 + self.settings.windows) for v in self.legacy.values())
        kept = self.settings.windows + 2  # the baseline, the window being filled, the closed ones
        return sum(f.counts.nbytes * kept + (f.edges.nbytes if f.edges is not None else 0)
                   for f in self.features.values()) + legacy

    # --- the request path -------------------------------------------------------------------------

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        """On the request path: only a hand-over to the counting thread (a deque append). When
        counting falls behind by ``max_pending`` requests, further ones are skipped and counted
        as skipped, so a burst never slows serving or grows memory."""
        if version != self.version or model != self.model:
            return
        if len(self._pending) >= self.settings.max_pending:
            self.skipped += 1
            return
        self._pending.append((inputs, outputs))

    def drain(self) -> None:
        """Count what the request path handed over (the counting thread does this every 50 ms)."""
        held = time.perf_counter()
        while True:
            try:
                inputs, outputs = self._pending.popleft()
            except IndexError:
                return
            try:
                self._count(inputs, outputs)
            except Exception:  # a request the monitor cannot read must not stop the counting
                log.exception("drift: a request could not be counted")
            # hand the interpreter back every half millisecond: otherwise a backlog is counted in
            # one go and a request arriving meanwhile waits up to the GIL's 5 ms switch interval
            # (measured: HTTP p99 1.5 -> 4.6 ms); yielding after every request costs the p50 instead
            if time.perf_counter() - held > YIELD_EVERY_S:
                time.sleep(0)
                held = time.perf_counter()

    def _count(self, inputs, outputs) -> None:
        counted: Dict[str, np.ndarray] = {}
        legacy: Dict[str, np.ndarray] = {}
        samples, confidence = 0, 0.0
        for name, x in inputs.items():
            x = np.asarray(x)
            samples = max(samples, len(x) if x.ndim else 1)
            f = self.features.get(f"input:{name}")
            if f is not None and x.ndim and x.dtype.kind in "biuf":
                counted[f.key] = drift.histogram_of(x, f.axis, f.edges, self.settings.max_values)
            elif name in self.legacy and x.ndim and x.dtype.kind in "biuf":
                sums = _channel_sums(x, self.legacy[name]["axis"], len(self.legacy[name]["mean"]))
                if sums is not None:
                    legacy[name] = sums
        for name, y in outputs.items():
            y = np.asarray(y)
            if y.dtype.kind not in "biuf" or y.size == 0:
                continue
            f = self.features.get(f"classes:{name}")
            if f is not None and y.ndim in (2, 3) and y.shape[-1] == f.counts.shape[1]:
                counted[f.key] = np.bincount(y.argmax(-1).ravel(), minlength=y.shape[-1])[None, :]
            f = self.features.get(f"confidence:{name}")
            top = drift.confidence(y) if f is not None else None
            if top is not None:
                counted[f.key] = drift.count(top.reshape(-1, 1), f.edges)
                confidence += float(top.sum())
            f = self.features.get(f"values:{name}")
            if f is not None:
                counted[f.key] = drift.histogram_of(y, None, f.edges, self.settings.max_values)
        with self._lock:
            for key, c in counted.items():
                f = self.features[key]
                if c.shape == f.current.shape:
                    f.current += c
            for name, sums in legacy.items():
                prev = self._legacy_sums.get(name)
                self._legacy_sums[name] = sums if prev is None or prev.shape != sums.shape else prev + sums
            self._samples += samples
            self._confidence_sum += confidence

    def error(self, model, status, message, latency_ms) -> None:
        pass

    # --- windows and judgements -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.drain()
            self.tick()

    def tick(self) -> None:
        """Close the window once it is ``window_s`` old (the thread calls this; tests may too)."""
        now = self.clock()
        if now - self._window_start >= self.settings.window_s:
            self.close_window(now)

    def close_window(self, now: Optional[float] = None) -> None:
        now = self.clock() if now is None else now
        self.drain()
        with self._lock:
            elapsed, self._window_start = now - self._window_start, now
            window = {key: f.current for key, f in self.features.items()}
            for f in self.features.values():
                f.current = np.zeros_like(f.counts)
            samples, self._samples = self._samples, 0
            confidence, self._confidence_sum = self._confidence_sum, 0.0
            legacy, self._legacy_sums = self._legacy_sums, {}
            skipped, self.skipped = self.skipped, 0
            self._history.append((samples, window, confidence, legacy))
            judged = self._judge()
        if samples:
            self.emit({**self._window_record(window, samples, confidence, elapsed, judged), "skipped": skipped})
        self._alerts(judged)

    def _window_record(self, window: dict, samples: int, confidence: float, elapsed: float, judged: dict) -> dict:
        inputs, outputs = {}, {}
        for key, counts in window.items():
            f = self.features[key]
            if f.what == "input":
                inputs[f.name] = {"axis": f.axis, "counts": counts.tolist()}
            else:
                outputs.setdefault(f.name, {})[f.what] = counts.tolist()
        for name, spec in outputs.items():
            if "confidence" in spec:
                spec["confidence_sum"] = round(confidence, 6)
        return {"kind": "drift", "ts": time.time(), "model": self.model, "version": self.version,
                "sha256": self.sha256, "window_s": round(elapsed, 3), "samples": int(samples),
                "inputs": inputs, "outputs": outputs, "scores": judged.get("summary")}

    def _judge(self) -> dict:
        """Scores of the last windows' sum against the baseline (under the lock)."""
        samples = sum(h[0] for h in self._history)
        judged: dict = {"samples": samples, "features": []}
        if samples == 0:
            return judged
        live = {key: sum(h[1][key] for h in self._history if key in h[1]) for key in self.features}
        features = drift.judge(self.features, live)
        for name, base in self.legacy.items():
            sums = [h[3][name] for h in self._history if name in h[3]]
            if sums:
                total = sum(sums)
                mean = np.divide(total[0], total[1], out=np.zeros_like(total[0]), where=total[1] > 0)
                shift = np.abs(mean - base["mean"]) / base["std"]
                # a z-test on the mean (values taken as independent): chance alone rarely moves it far
                p = [math.erfc(v * math.sqrt(n) / math.sqrt(2)) for v, n in zip(shift, total[1])]
                features.extend({"what": "input", "name": name, "channel": i, "mean_shift": round(float(v), 4),
                                 "p": float(f"{pi:.3g}")} for i, (v, pi) in enumerate(zip(shift, p)))
        judged["features"] = features
        conf = self._confidence_baseline()
        if conf is not None:
            seen = sum(int(np.sum(live[k])) for k in live if k.startswith("confidence:"))
            judged["confidence"] = {"baseline": round(conf, 4),
                                    "live": round(sum(h[2] for h in self._history) / seen, 4) if seen else None}
        judged["summary"] = _summary(features, judged.get("confidence"))
        return judged

    def _confidence_baseline(self) -> Optional[float]:
        for f in self.features.values():
            if f.what == "confidence" and f.mean is not None:
                return float(f.mean)
        return None

    def _alerts(self, judged: dict) -> None:
        s = self.settings
        self.last = judged
        enough = judged["samples"] >= s.min_samples
        by_kind = {"input_drift": [f for f in judged["features"] if f["what"] == "input"],
                   "prediction_drift": [f for f in judged["features"] if f["what"] in ("classes", "values")]}
        for kind, features in by_kind.items():
            real = [f for f in features if f.get("p", 0.0) < s.alpha / max(len(features), 1)]
            over = [f for f in real if _ratio(f, s) > 1.0]
            calm = all(_ratio(f, s) < s.clear_ratio for f in real)
            self._transition(kind, enough, over, calm, features)
        conf = judged.get("confidence") or {}
        if conf.get("live") is not None:
            drop = conf["baseline"] - conf["live"]
            detail = [{"what": "confidence", "baseline": conf["baseline"], "live": conf["live"], "drop": round(drop, 4)}]
            self._transition("confidence_drop", enough, detail if drop > s.confidence_drop else [],
                             drop < s.clear_ratio * s.confidence_drop, detail)

    def _transition(self, kind: str, enough: bool, over: list, calm: bool, features: list) -> None:
        open_alert = self.alerts.get(kind)
        if open_alert is None and enough and over:
            worst = sorted(over, key=lambda f: -_ratio(f, self.settings))[:WORST]
            alert = {"kind": "alert", "ts": time.time(), "model": self.model, "version": self.version,
                     "alert": kind, "state": "raised", "since": time.time(), "features": worst,
                     "samples": sum(h[0] for h in self._history)}
            self.alerts[kind] = alert
            log.warning("drift: %s on %s v%s (%s)", kind, self.model, self.version, _describe(worst))
            self.emit(alert)
        elif open_alert is not None and enough and calm:
            del self.alerts[kind]
            worst = sorted(features, key=lambda f: -_ratio(f, self.settings))[:WORST]
            log.info("drift: %s on %s v%s cleared", kind, self.model, self.version)
            self.emit({**open_alert, "ts": time.time(), "state": "cleared", "cleared": time.time(), "features": worst})

    def status(self) -> dict:
        return {"open": sorted(self.alerts), "samples": (self.last or {}).get("samples", 0),
                "summary": (self.last or {}).get("summary"), "memory_bytes": self.memory_bytes()}

    def close(self) -> None:
        """Stop the thread and hand over the partial window (so a model swap loses no counts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._samples or self._pending:
            self.close_window()


def _histograms_only(baseline: dict) -> dict:
    """What of a baseline the host needs to judge windows: the bins, not the summaries."""
    inputs = {name: {"axis": spec.get("axis"), "bins": spec["bins"]}
              for name, spec in (baseline.get("inputs") or {}).items() if spec.get("bins")}
    return {"inputs": inputs, "outputs": baseline.get("outputs") or {}}


def _channel_sums(x: np.ndarray, axis: Optional[int], channels: int) -> Optional[np.ndarray]:
    """[sum per channel, count per channel] of one batch, finite values only; None when the
    batch's channels are not the baseline's."""
    x = np.asarray(x, dtype=np.float64)
    cols = x.reshape(-1, 1) if axis is None else np.moveaxis(x, 1 + axis, -1).reshape(-1, x.shape[1 + axis])
    if cols.shape[1] != channels:
        return None
    finite = np.isfinite(cols)
    return np.stack([np.where(finite, cols, 0.0).sum(axis=0), finite.sum(axis=0).astype(np.float64)])


def _ratio(f: dict, s: DriftSettings) -> float:
    """How far past its threshold a feature's score is (1.0 = at the line)."""
    if "mean_shift" in f:
        return f["mean_shift"] / s.mean_shift
    if "drop" in f:
        return f["drop"] / s.confidence_drop
    return max(f["js"] / s.js_threshold, f["psi"] / s.psi_threshold)


def _summary(features: List[dict], confidence: Optional[dict]) -> dict:
    out: dict = {}
    scored = [f for f in features if "js" in f]
    if scored:
        worst = max(scored, key=lambda f: f["js"])
        out.update(js_max=worst["js"], psi_max=max(f["psi"] for f in scored), ks_max=max(f["ks"] for f in scored),
                   worst={k: worst[k] for k in ("what", "name", "channel")})
    shifted = [f["mean_shift"] for f in features if "mean_shift" in f]
    if shifted:
        out["mean_shift_max"] = max(shifted)
    if confidence:
        out["confidence"] = confidence
    return out


def _describe(features: List[dict]) -> str:
    parts = []
    for f in features[:3]:
        where = f"{f.get('name')}[{f['channel']}]" if f.get("channel") is not None else str(f.get("name", f.get("what")))
        parts.append(f"{where} " + (f"JS {f['js']:.3f} PSI {f['psi']:.3f}" if "js" in f else
                                    f"mean shift {f['mean_shift']:.2f} std" if "mean_shift" in f else
                                    f"confidence {f['live']:.3f} vs {f['baseline']:.3f}"))
    return "; ".join(parts)
