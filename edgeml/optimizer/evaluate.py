"""Measure a model against the float model: task quality, error, latency, bytes.

The figure that gates a candidate (``drop``) is each output's task metric (see
``edgeml.optimizer.metrics``): accuracy against labels, top-1 or per-position agreement, mask
IoU, cosine or relative error against the float model. With several outputs, the worst of the
outputs whose kind decides (accuracy, agreement, sequence, IoU) gates; other outputs (a
recurrent state, a feature tap) gate only when no output of those kinds exists.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import numpy as np

from edgeml.core.data import Dataset, Outputs
from edgeml.core.errors import DataError

from .metrics import GATING, Metric, mask_iou, output_kinds, relative_error, top1_agreement


@dataclass
class Quality:
    accuracy: Optional[float] = None  # with labels, on the first output
    agreement: Optional[float] = None  # top-1 (per-position for sequences) agreement with float, worst output
    cosine: Optional[float] = None  # mean per-sample cosine similarity, worst float output
    max_abs_error: Optional[float] = None
    relative_error: Optional[float] = None  # ||float - candidate|| / ||float||, worst float output
    iou: Optional[float] = None  # mean mask IoU with float, worst probability-map output
    drop: float = 0.0
    drop_kind: str = "cosine"  # one of edgeml.optimizer.metrics.KINDS
    kinds: Optional[Dict[str, str]] = None  # each output's kind

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Latency:
    median_ms: float
    p95_ms: float
    runs: int
    threads: int = 1
    batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def is_classifier(y: np.ndarray) -> bool:
    """Class scores: [N, C] or [N, T, C] floats with C > 1."""
    return y.dtype.kind == "f" and y.ndim in (2, 3) and y.shape[-1] > 1


def is_label(y: np.ndarray) -> bool:
    """Predicted class ids, one per sample ([N] integers: scikit-learn's ``output_label``)."""
    return y.dtype.kind in "iu" and y.ndim == 1


def accuracy(y: np.ndarray, labels: np.ndarray) -> float:
    if is_label(y):
        labels = np.asarray(labels)
        if labels.shape != y.shape:
            raise DataError(f"eval labels 'y' have shape {labels.shape} but the model predicts {y.shape}; "
                            "give one class id per sample")
        if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
            raise DataError(f"eval labels 'y' are {labels.dtype} values, but the model predicts integer class ids; "
                            "give each sample's class id")
        return float(np.mean(y == labels))
    if not is_classifier(y):
        raise DataError(
            f"eval labels 'y' were given but the model's first output has shape {y.shape[1:]}, "
            "not class scores; drop 'y' to compare against the float model instead"
        )
    labels = np.asarray(labels)
    if labels.ndim == y.ndim and labels.shape[-1] == y.shape[-1]:
        labels = labels.argmax(-1)  # one-hot
    if labels.shape != y.shape[:-1]:
        raise DataError(
            f"eval labels 'y' have shape {labels.shape} but the model predicts {y.shape[:-1]}; "
            "give one class id per sample"
        )
    classes = y.shape[-1]
    integral = labels.dtype.kind in "iu" or (labels.dtype.kind == "f" and np.all(labels == np.round(labels)))
    if not integral:
        raise DataError(
            f"eval labels 'y' are {labels.dtype} values, not class indices; give each sample's class as an "
            f"integer 0..{classes - 1} (for named classes, their position in the --labels file)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"eval labels 'y' range over {int(labels.min())}..{int(labels.max())} but the model has {classes} "
            f"classes (0..{classes - 1}); an accuracy against them would mean nothing"
        )
    return float(np.mean(y.argmax(-1) == labels))


def compare(reference: Outputs, candidate: Outputs, labels: Optional[np.ndarray] = None,
            reference_accuracy: Optional[float] = None, kinds: Optional[Dict[str, str]] = None,
            metric: Metric = Metric()) -> Quality:
    """Compare candidate outputs with the float reference (same names, same sample order).

    ``kinds`` gives each output's task (``metrics.output_kinds``); by default they are read off
    the reference. ``metric`` carries the IoU threshold."""
    if kinds is None:
        kinds = output_kinds(reference, metric, labels_given=labels is not None)
    q = Quality(kinds=dict(kinds))
    drops: Dict[str, tuple] = {}  # output -> (kind, drop)
    agreements, cosines, errors, relative, ious = [], [], [], [], []
    for name, ref in reference.items():
        got = np.asarray(candidate[name])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            raise DataError(f"output '{name}' has shape {got.shape}, the float model gives {ref.shape}")
        kind = kinds.get(name, "cosine")
        r = ref.astype(np.float64).reshape(len(ref), -1)
        g = got.astype(np.float64).reshape(len(got), -1)
        errors.append(float(np.max(np.abs(r - g))) if r.size else 0.0)
        if ref.dtype.kind == "f":  # a cosine between class ids means nothing
            cosines.append(_cosine(r, g))
            relative.append(relative_error(r, g))
        if kind == "accuracy" and (is_label(ref) or is_classifier(ref)):
            agreements.append(top1_agreement(ref, got))  # reported beside the accuracy, which gates
        elif kind in ("agreement", "sequence"):
            agreements.append(top1_agreement(ref, got))
            drops[name] = (kind, 1.0 - agreements[-1])
        elif kind == "iou":
            ious.append(mask_iou(ref, got, metric.threshold))
            drops[name] = (kind, 1.0 - ious[-1])
        elif kind == "relative-error":
            drops[name] = (kind, relative[-1] if ref.dtype.kind == "f" else 1.0 - top1_agreement(ref, got))
        elif kind == "cosine":
            drops[name] = (kind, max(0.0, 1.0 - cosines[-1]) if ref.dtype.kind == "f" else
                           1.0 - top1_agreement(ref, got))
    q.cosine = min(cosines) if cosines else None
    q.max_abs_error = max(errors) if errors else None
    q.agreement = min(agreements) if agreements else None
    q.relative_error = max(relative) if relative else None
    q.iou = min(ious) if ious else None
    if labels is not None:
        first = next(iter(candidate))
        q.accuracy = accuracy(np.asarray(candidate[first]), labels)
        base = reference_accuracy if reference_accuracy is not None else accuracy(np.asarray(reference[first]), labels)
        q.drop, q.drop_kind = max(0.0, base - q.accuracy), "accuracy"
        return q
    deciding = {k: v for k, v in drops.items() if v[0] in GATING} or drops
    if deciding:
        q.drop_kind, q.drop = max(deciding.values(), key=lambda kv: kv[1])
        q.drop = max(0.0, q.drop)
    return q


def _cosine(r: np.ndarray, g: np.ndarray) -> float:
    """Mean per-sample cosine similarity; over the whole batch when a sample is a few numbers
    (the cosine of a single number is only its sign).

    Cosine is ill-conditioned near zero: an all-but-zero output (a text detector's map of an image
    without text) rebuilt with float rounding errors can have a cosine of 0.8. So a sample whose
    outputs differ by no more than float rounding counts as identical, and a sample that is all
    but zero next to the others is judged by its error against the typical sample's size."""
    if r.shape[1] < 8:
        r, g = r.reshape(1, -1), g.reshape(1, -1)
    rn, gn = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    err = np.linalg.norm(r - g, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(rn * gn > 0, np.sum(r * g, axis=1) / np.where(rn * gn > 0, rn * gn, 1), 0.0)
    typical = float(np.median(rn)) if len(rn) else 0.0
    rounding = 1e-6 * max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
    same = np.max(np.abs(r - g), axis=1) <= rounding if r.size else np.ones(len(r), bool)
    near_zero = rn < 1e-3 * typical
    by_error = 1.0 - np.minimum(1.0, err / typical) if typical > 0 else np.zeros(len(r))
    sim = np.where(same, 1.0, np.where(near_zero, by_error, cos))
    return float(np.mean(sim))


def measure_latency(run: Callable[[Outputs], Outputs], dataset: Dataset, *, warmup: int = 5,
                    runs: int = 50, budget_s: float = 5.0) -> Latency:
    """Single-sample latency over warm runs, cycling through the data.

    Stops early when ``budget_s`` is spent (after at least 10 runs) so a big model does not
    stall the whole optimize run; the number of runs is reported with the figures.
    """
    samples = [dataset.feed(i) for i in range(min(len(dataset), 16))]
    for i in range(warmup):
        run(samples[i % len(samples)])
    times = []
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        run(samples[i % len(samples)])
        times.append(time.perf_counter() - t0)
        if i >= 9 and time.perf_counter() - start > budget_s:
            break
    ms = np.asarray(times) * 1e3
    return Latency(float(np.median(ms)), float(np.percentile(ms, 95)), len(ms))
