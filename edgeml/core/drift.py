"""Drift from binned counts: bins cut at the baseline's own quantiles, live values counted into
the same bins, and PSI, Jensen-Shannon distance and KS computed from the two histograms.

Histograms add up exactly, so a device's windows, a fleet's devices or a rollout wave's devices
merge by summing counts and are judged the same way; raw inputs never leave the device.
Standard library and numpy only: the device and the host both import it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

BINS = 10  # bins per feature: cut at the deciles of the baseline
MAX_VALUES = 100_000  # values per feature the baseline's quantiles are computed from (seeded subsample)
PSI_FLOOR = 1e-4  # an empty bin's share, so PSI stays finite (the usual convention)

# The anchors' defaults: NannyML and Evidently call JS distance > 0.1 drift, PSI > 0.2 is the
# credit-scoring rule of thumb for a significant shift.
JS_THRESHOLD = 0.1
PSI_THRESHOLD = 0.2


def cut(values: np.ndarray, bins: int = BINS, seed: int = 0) -> List[float]:
    """Interior bin edges at the quantiles of ``values`` (finite ones); repeated edges (discrete
    features, a spike at zero) collapse, so a feature may get fewer bins."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return []
    if v.size > MAX_VALUES:
        v = np.random.default_rng(seed).choice(v, MAX_VALUES, replace=False)
    # 6 significant digits keep the baseline small; the counts are made with the rounded edges
    edges = np.unique([float(f"{e:.6g}") for e in np.quantile(v, np.arange(1, bins) / bins)])
    return [float(e) for e in edges]


def padded(edges: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-feature edge lists as one [features, max edges] array, padded with +inf (a value is
    never above +inf, so a padded edge opens no bin)."""
    width = max((len(e) for e in edges), default=0)
    out = np.full((len(edges), max(width, 1)), np.inf)
    for i, e in enumerate(edges):
        out[i, : len(e)] = e
    return out


def count(columns: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts [features, edges + 1] of ``columns`` [values, features] in the bins ``edges``
    [features, edges] cut (bin i holds edges[i-1] < v <= edges[i]); non-finite values are left out."""
    columns = np.asarray(columns, dtype=np.float64)
    features, width = edges.shape
    if features <= 64 and np.all(edges[:, 1:] >= edges[:, :-1]):
        # a binary search per value, feature by feature: 5x faster than comparing every value with
        # every edge (0.42 -> 0.08 ms for 4,096 values x 3 channels), the same counts
        out = np.empty((features, width + 1), np.int64)
        rows = np.ascontiguousarray(columns.T)  # each feature's values in a row, not at a stride
        for f in range(features):
            c = rows[f]
            out[f] = np.bincount(np.searchsorted(edges[f], c[np.isfinite(c)], side="left"), minlength=width + 1)
        return out
    finite = np.isfinite(columns)
    index = (columns[:, :, None] > edges[None, :, :]).sum(axis=2)  # [values, features]
    flat = (index + np.arange(features)[None, :] * (width + 1))[finite]
    return np.bincount(flat, minlength=features * (width + 1)).reshape(features, width + 1)


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def psi(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Population stability index per feature (last axis: bins)."""
    e = np.maximum(_shares(expected), PSI_FLOOR)
    a = np.maximum(_shares(actual), PSI_FLOOR)
    return np.sum((a - e) * np.log(a / e), axis=-1)


def js(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance per feature, base 2 (0 = same distribution, 1 = disjoint)."""
    p, q = _shares(expected), _shares(actual)
    m = (p + q) / 2

    def kl(x):
        return np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / np.where(m > 0, m, 1)), 0.0), axis=-1)

    return np.sqrt(np.clip((kl(p) + kl(q)) / 2, 0.0, 1.0))


def ks(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Kolmogorov-Smirnov statistic per feature from binned CDFs (a lower bound of the exact one)."""
    return np.max(np.abs(np.cumsum(_shares(expected), axis=-1) - np.cumsum(_shares(actual), axis=-1)), axis=-1)


def p_value(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per feature, how likely a difference this large is between two samples of one
    distribution: the G-test of homogeneity on the two histograms (chi-squared with the
    Wilson-Hilferty approximation, so no SciPy). A small window always looks a little drifted;
    this tells that apart from a real shift."""
    import math

    e, a = np.atleast_2d(np.asarray(expected, np.float64)), np.atleast_2d(np.asarray(actual, np.float64))
    observed = np.stack([e, a])  # [2, features, bins]
    rows = observed.sum(axis=2, keepdims=True)
    cols = observed.sum(axis=0, keepdims=True)
    total = observed.sum(axis=(0, 2), keepdims=True)
    want = np.divide(rows * cols, total, out=np.zeros_like(observed), where=total > 0)
    ratio = np.divide(observed, want, out=np.ones_like(observed), where=(observed > 0) & (want > 0))
    g = 2.0 * np.sum(observed * np.log(ratio), axis=(0, 2))
    dof = (cols[0] > 0).sum(axis=-1) - 1
    out = np.ones(len(g))
    for i, (gi, k) in enumerate(zip(g, dof)):
        if k > 0 and rows[0, i, 0] > 0 and rows[1, i, 0] > 0:
            z = ((max(gi, 0.0) / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
            out[i] = 0.5 * math.erfc(z / math.sqrt(2))
    return out


def scores(expected: np.ndarray, actual: np.ndarray) -> Dict[str, np.ndarray]:
    return {"psi": psi(expected, actual), "js": js(expected, actual), "ks": ks(expected, actual),
            "p": p_value(expected, actual)}


def strided_columns(x: np.ndarray, axis: Optional[int], max_values: int = 4096) -> np.ndarray:
    """A batch [N, ...] as columns [values, channels] (``axis`` of a sample, None: the whole tensor
    as one feature), at most ``max_values`` values per channel taken at an even stride, so a large
    image costs the same as a small one. A view where numpy can make one."""
    x = np.asarray(x)
    if axis is None:
        columns = x.reshape(-1, 1)
    else:
        columns = np.moveaxis(x, 1 + axis, -1).reshape(-1, x.shape[1 + axis])
    if len(columns) > max_values:
        columns = columns[:: -(-len(columns) // max_values)]
    return columns


def histogram_of(x: np.ndarray, axis: Optional[int], edges: np.ndarray, max_values: int = 4096) -> np.ndarray:
    """Counts of one batch [N, ...] per channel, over ``strided_columns``."""
    return count(strided_columns(x, axis, max_values), edges)


def confidence(y: np.ndarray) -> Optional[np.ndarray]:
    """Top-1 confidence per row of class scores [N, C] (softmax first when rows are not
    probabilities); None for any other output."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2 or y.size == 0:
        return None
    finite = np.all(np.isfinite(y), axis=1)
    y = y[finite]
    if len(y) == 0:
        return np.zeros(0)
    # np.allclose(sums, 1, atol=1e-3) spelled out: the same test, without its 30 us of machinery
    probs = y.min() >= 0 and y.max() <= 1 and float(np.abs(y.sum(axis=1) - 1.0).max()) <= 1e-3 + 1e-5
    if not probs:
        z = np.exp(y - y.max(axis=1, keepdims=True))
        y = z / z.sum(axis=1, keepdims=True)
    return y.max(axis=1)


# --- a baseline's histograms, and judging live counts against them (the device and the host) -----


class Histogram:
    """One family of bins of a baseline: an input's channels (``input:NAME``), an output's
    classes (``classes:NAME``), its top-1 confidence (``confidence:NAME``) or its values
    (``values:NAME``). ``edges`` is None for classes (the class index is the bin)."""

    def __init__(self, key: str, edges: Optional[np.ndarray], counts, axis: Optional[int] = None,
                 mean: Optional[float] = None):
        self.key, self.edges, self.axis, self.mean = key, edges, axis, mean
        self.counts = np.asarray(counts, dtype=np.int64)

    @property
    def what(self) -> str:
        return self.key.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(":", 1)[1]


def histograms(baseline: dict) -> Dict[str, Histogram]:
    """The histograms of an artifact's baseline (``edgeml.core.stats``), by key; an artifact
    built before they existed has none."""
    found: Dict[str, Histogram] = {}
    for name, spec in (baseline.get("inputs") or {}).items():
        bins = spec.get("bins")
        if bins:
            found[f"input:{name}"] = Histogram(f"input:{name}", padded(bins["edges"]), bins["counts"], spec.get("axis"))
    for name, spec in (baseline.get("outputs") or {}).items():
        if spec.get("frequencies"):
            # shares as counts per million: a class mix compared like any histogram
            freqs = np.round(np.asarray(spec["frequencies"], np.float64) * 1e6)[None, :]
            found[f"classes:{name}"] = Histogram(f"classes:{name}", None, freqs)
        c = spec.get("confidence")
        if c and c.get("edges") is not None:
            found[f"confidence:{name}"] = Histogram(f"confidence:{name}", padded(c["edges"]), c["counts"],
                                                    mean=c.get("mean"))
        v = spec.get("values")
        if v:
            found[f"values:{name}"] = Histogram(f"values:{name}", padded(v["edges"]), v["counts"])
    return found


def judge(baseline: Dict[str, Histogram], live: Dict[str, np.ndarray]) -> List[dict]:
    """One entry per feature with live counts: what, name, channel, js, psi, ks and p."""
    features = []
    for key, h in baseline.items():
        counts = live.get(key)
        if counts is None:
            continue
        counts = np.asarray(counts)
        if counts.shape != h.counts.shape or counts.sum() == 0:
            continue
        s = scores(h.counts, counts)
        for i in range(len(s["js"])):
            features.append({"what": h.what, "name": h.name, "channel": i if h.what == "input" else None,
                             "js": round(float(s["js"][i]), 4), "psi": round(float(s["psi"][i]), 4),
                             "ks": round(float(s["ks"][i]), 4), "p": float(f"{s['p'][i]:.3g}")})
    return features


def ratio(feature: dict, js_threshold: float = JS_THRESHOLD, psi_threshold: float = PSI_THRESHOLD) -> float:
    """How far past its threshold a feature's score is (1.0 = at the line)."""
    return max(feature["js"] / js_threshold, feature["psi"] / psi_threshold)


def drifted(features: List[dict], alpha: float = 0.01, js_threshold: float = JS_THRESHOLD,
            psi_threshold: float = PSI_THRESHOLD, at: float = 1.0) -> List[dict]:
    """The features past ``at`` times their threshold by more than chance (G-test p below
    ``alpha`` over the number of features: the chance that any of them is a false alarm),
    worst first."""
    real = [f for f in features if f["p"] < alpha / max(len(features), 1)]
    over = [f for f in real if ratio(f, js_threshold, psi_threshold) > at]
    return sorted(over, key=lambda f: -ratio(f, js_threshold, psi_threshold))
