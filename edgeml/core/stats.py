"""Baseline statistics so a device can judge what it sees: inputs per feature or channel (drift),
and what the model predicts (the class distribution a new model is checked against).

Standard library and numpy only: the device computes the same figures on live inputs.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from . import drift

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
MAX_CHANNELS = 256  # above this, one summary for the whole tensor keeps the file small


def channel_axis(shape) -> int | None:
    """The per-sample axis statistics are kept for: channels of images, features of vectors."""
    rank = len(shape)
    if rank == 0:
        return None
    if rank == 3:  # [H, W, C] or [C, H, W]: channels are the short side
        return 0 if shape[0] < shape[-1] else rank - 1
    return rank - 1


def summarize(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0}
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "quantiles": [float(q) for q in np.quantile(v, QUANTILES)],
    }


def baseline_stats(inputs: Dict[str, np.ndarray]) -> dict:
    """{input name: {"axis": per-sample axis or None, "channels": [summary, ...], "bins": histogram}}.

    ``bins`` (``edgeml.core.drift``): per channel, edges at the baseline's own deciles and the
    baseline's counts in those bins, counted as the device will count live requests."""
    result = {"quantile_levels": list(QUANTILES), "inputs": {}}
    for name, x in inputs.items():
        x = np.asarray(x)
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            continue  # strings: no statistics a device could compare
        axis = channel_axis(x.shape[1:])
        if axis is None or x.shape[1 + axis] > MAX_CHANNELS:
            axis, columns = None, x.reshape(-1, 1)
        else:
            columns = np.moveaxis(x, 1 + axis, -1).reshape(-1, x.shape[1 + axis])
        result["inputs"][name] = {
            "axis": axis,
            "samples": int(len(x)),
            "channels": [summarize(columns[:, c]) for c in range(columns.shape[1])],
            "bins": histogram(x, axis, [drift.cut(columns[:, c]) for c in range(columns.shape[1])]),
        }
    return result


def histogram(x: np.ndarray, axis, edges: list) -> dict:
    """The baseline's histogram of ``x`` over ``edges`` (one list per channel), counted per sample
    with the same cap on values as a device's request, so both sides weigh samples alike."""
    table = drift.padded(edges)
    counts = sum(drift.histogram_of(x[i : i + 1], axis, table) for i in range(len(x)))
    return {"edges": edges, "counts": np.asarray(counts).astype(int).tolist()}


def class_frequencies(y: np.ndarray) -> list | None:
    """Share of each predicted class (argmax of the last axis) for class scores [N, C] or [N, T, C]
    with C > 1; None for any other output."""
    y = np.asarray(y)
    if y.dtype.kind != "f" or y.ndim not in (2, 3) or y.shape[-1] < 2 or y.size == 0:
        return None
    counts = np.bincount(y.argmax(-1).ravel(), minlength=y.shape[-1]).astype(np.float64)
    return [float(c) for c in counts / counts.sum()]


CLASS_KINDS = ("accuracy", "agreement", "sequence")  # the optimizer's output kinds whose argmax is the answer


def output_stats(outputs: Dict[str, np.ndarray], kinds: Optional[Dict[str, str]] = None) -> dict:
    """Per output: class scores get {"classes": C, "frequencies": [...]} and, for [N, C], the
    mean top-1 confidence and its histogram (a label-free quality signal); any other numeric
    output gets a histogram of its values as one feature. ``kinds`` (the optimizer's output kinds)
    tells embeddings and regressions from class scores; without it any [N, C] float is scores."""
    found = {}
    for name, y in outputs.items():
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.number) or y.size == 0:
            continue
        scores = kinds is None or kinds.get(name) in CLASS_KINDS
        freqs = class_frequencies(y) if scores else None
        if freqs is not None:
            found[name] = {"classes": len(freqs), "frequencies": freqs}
            top = drift.confidence(y)
            if top is not None and top.size:
                found[name]["confidence"] = {"mean": float(top.mean()),
                                             **histogram(top.reshape(-1, 1), None, [drift.cut(top)])}
            continue
        found[name] = {"values": histogram(y, None, [drift.cut(y)])}
    return found


def js_distance(p, q) -> float:
    """Jensen-Shannon distance (base 2, so 0..1) between two distributions of the same length."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_distance needs two non-empty distributions of the same length")
    return float(drift.js(p.ravel(), q.ravel()))  # the drift monitor's, so both sides measure alike
