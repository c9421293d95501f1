"""A rollout held at a wave is an A/B test: the devices on the new version against those still on
the old one, on the live traffic each served since the rollout began (``fleet rollout compare``).

Each figure gets a test fit for it, so a difference is called only when chance is unlikely to
explain it: latency by Mann-Whitney U (no assumption about its skewed distribution), error rate
by a two-proportion z-test, live accuracy (where devices got feedback) the same way, the
predicted-class mix by a G-test on the two histograms (with its Jensen-Shannon distance as the
size of the change). NumPy only; normal approximations with tie
correction, which hold for the hundreds of requests a wave serves.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from edgeml.core import drift
from edgeml.core.errors import UsageError

ALPHA = 0.01  # a difference is called at p below this
MAX_SAMPLES = 50_000  # latencies per cohort the rank test uses (a seeded subsample beyond)


def mann_whitney(a: np.ndarray, b: np.ndarray) -> dict:
    """Two-sided Mann-Whitney U of ``b`` against ``a``: the probability that a value of b is above
    one of a (0.5: neither is larger), and the p-value (normal approximation, ties corrected)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return {"p_greater": None, "p": None}
    values = np.concatenate([a, b])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u_b = ranks[n1:].sum() - n2 * (n2 + 1) / 2.0
    ties = (ends - starts).astype(np.float64)
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - np.sum(ties ** 3 - ties) / (n * (n - 1)))) if n > 1 else 0.0
    if sigma == 0:
        return {"p_greater": 0.5, "p": 1.0}
    z = (u_b - n1 * n2 / 2.0) / sigma
    return {"p_greater": round(u_b / (n1 * n2), 4), "p": math.erfc(abs(z) / math.sqrt(2))}


def two_proportions(k1: int, n1: int, k2: int, n2: int) -> Optional[float]:
    """Two-sided p-value that k1/n1 and k2/n2 are one rate (pooled z-test); None without data."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return 1.0
    z = (k2 / n2 - k1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


def compare_rollout(store, rollout_id: str, seed: int = 0) -> dict:
    """The rollout's devices split into the cohort on its target version and the one still on
    another, each with requests, p50/p95 latency, error rate and class mix since the rollout
    began, and the tests between them."""
    r = store.rollout(rollout_id)
    if r is None:
        raise UsageError(f"no rollout {rollout_id!r} (give its id or a unique start of it)")
    with store.transaction(write=False):
        assignments = store.assignments(r["id"])
    target = r["plan"]["target"]
    devices = {a["device"] for a in assignments}
    records = [(d, rec) for _, d, rec in store.records(["inference", "error", "feedback"], fleet=r["fleet"],
                                                       since=r["created"]) if d in devices]
    switched: Dict[str, float] = {}  # device -> when it first served the target version
    for device, rec in records:
        if rec["kind"] == "inference" and rec.get("version") == target["version"] and device not in switched:
            switched[device] = rec["ts"]
    # Cohorts are devices: those serving the target version, from the moment they switched, and
    # those that never switched. A switched device's requests before the switch are left out, so
    # neither cohort mixes a device's two models.
    cohorts = {"old": _Cohort(), "new": _Cohort()}
    for device, rec in records:
        if device in switched:
            if rec["ts"] < switched[device] or (rec["kind"] == "inference" and rec.get("version") != target["version"]):
                continue
            side = "new"
        else:
            side = "old"
        if rec["kind"] == "inference":
            cohorts[side].add_inference(device, rec)
        elif rec["kind"] == "feedback":
            if (rec.get("version") == target["version"]) == (side == "new"):
                cohorts[side].labelled += int(rec.get("labelled") or 0)
                cohorts[side].correct += int(rec.get("correct") or 0)
        else:
            cohorts[side].add_error(device, rec)
    rng = np.random.default_rng(seed)
    old, new = cohorts["old"], cohorts["new"]
    result = {"ok": True, "rollout": r["id"], "fleet": r["fleet"], "state": r["state"], "wave": r["wave"],
              "target": {"name": target["name"], "version": target["version"]},
              "cohorts": {"old": old.summary(), "new": new.summary()}, "alpha": ALPHA, "tests": {}}
    if old.requests and new.requests:
        lat = mann_whitney(_sample(old.latencies, rng), _sample(new.latencies, rng))
        ratio = new.p(50) / old.p(50) if old.p(50) else None
        result["tests"]["latency"] = {"test": "Mann-Whitney U", **lat, "p50_ratio": _round(ratio),
                                      "verdict": _verdict(lat["p"], (lat["p_greater"] or 0.5) > 0.5, "slower", "faster")}
        p = two_proportions(old.errors, old.total, new.errors, new.total)
        result["tests"]["error_rate"] = {"test": "two-proportion z", "p": p,
                                         "verdict": _verdict(p, new.error_rate > old.error_rate, "more errors",
                                                             "fewer errors")}
        if old.labelled and new.labelled:  # live accuracy, where devices got feedback
            p = two_proportions(old.correct, old.labelled, new.correct, new.labelled)
            result["tests"]["accuracy"] = {"test": "two-proportion z", "p": p, "verdict": _verdict(
                p, new.correct / new.labelled < old.correct / old.labelled, "less accurate", "more accurate")}
        classes = max(len(old.classes), len(new.classes))
        if classes:
            a = np.bincount(old.classes_array(), minlength=classes)[None, :]
            b = np.bincount(new.classes_array(), minlength=classes)[None, :]
            p = float(drift.p_value(a, b)[0])
            result["tests"]["predictions"] = {"test": "G-test of the predicted-class mix", "p": p,
                                              "js": round(float(drift.js(a, b)[0]), 4),
                                              "verdict": "different" if p < ALPHA else "no significant difference"}
    else:
        result["reason"] = ("a comparison needs requests served on both versions since the rollout began: "
                            f"{old.requests} on the old, {new.requests} on the new")
    return result


class _Cohort:
    def __init__(self):
        self.devices: set = set()
        self.latencies: List[float] = []
        self.errors = 0
        self.classes: Dict[int, int] = {}
        self.labelled = self.correct = 0  # feedback: ground truth for its requests

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def total(self) -> int:
        return self.requests + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.total if self.total else 0.0

    def add_inference(self, device: str, rec: dict) -> None:
        self.devices.add(device)
        if isinstance(rec.get("latency_ms"), (int, float)):
            self.latencies.append(float(rec["latency_ms"]))
        outputs = rec.get("outputs") or {}
        first = outputs[sorted(outputs)[0]] if outputs else {}
        if isinstance(first, dict) and isinstance(first.get("top1"), int):
            self.classes[first["top1"]] = self.classes.get(first["top1"], 0) + 1

    def add_error(self, device: str, rec: dict) -> None:
        self.devices.add(device)
        if int(rec.get("status") or 0) >= 500 or int(rec.get("status") or 0) == 422:  # the model's failures, not the client's
            self.errors += 1

    def classes_array(self) -> np.ndarray:
        return np.repeat(np.array(list(self.classes), dtype=np.int64), list(self.classes.values())) \
            if self.classes else np.zeros(0, np.int64)

    def p(self, q: float) -> Optional[float]:
        return float(np.percentile(self.latencies, q)) if self.latencies else None

    def summary(self) -> dict:
        return {"devices": sorted(self.devices), "requests": self.requests, "errors": self.errors,
                "error_rate": round(self.error_rate, 6), "latency_p50_ms": _round(self.p(50)),
                "latency_p95_ms": _round(self.p(95)), "labelled": self.labelled,
                "accuracy": _round(self.correct / self.labelled) if self.labelled else None,
                "classes": {str(k): v for k, v in sorted(self.classes.items())}}


def _sample(values: List[float], rng) -> np.ndarray:
    a = np.asarray(values)
    return rng.choice(a, MAX_SAMPLES, replace=False) if len(a) > MAX_SAMPLES else a


def _round(v, digits: int = 4):
    return None if v is None else round(float(v), digits)


def _verdict(p: Optional[float], worse: bool, worse_text: str, better_text: str) -> str:
    if p is None:
        return "not enough data"
    if p >= ALPHA:
        return "no significant difference"
    return f"new version {worse_text}" if worse else f"new version {better_text}"
