"""What "as good as the float model" means for each output: the task metric.

A candidate is judged against the float model output by output, with the measure that fits
what the output is. ``--metric auto`` (the default) reads it off the float model's outputs:

==================  ==========================================  ==========================
kind                output                                      drop
==================  ==========================================  ==========================
``accuracy``        any, with labels ``y`` in the eval data      float acc - candidate acc
``agreement``       class scores [N, C]; class ids [N]           1 - top-1 agreement
``sequence``        per-position scores [N, T, C]                1 - per-position agreement
``iou``             a probability map [N, 1, H, W] / [N, H, W, 1] 1 - mask IoU at a threshold
``cosine``          embeddings, regressions, feature maps        1 - mean cosine similarity
``relative-error``  the same, judged by size of the error        ||float - cand|| / ||float||
==================  ==========================================  ==========================

Class scores and embeddings have the same shape; an output is an embedding when its name says
so (``embedding``, ``hidden``, ``pooler`` ...), when its rows are unit vectors, or when the
model reads token ids and the output is wide (64 or more); a name with ``logits``, ``prob`` or
``score`` says class scores. ``--metric`` names the kind (``iou@0.3`` sets the threshold) where the
guess is wrong. Cosine and relative error are reported for every float output whatever the kind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from edgeml.core.errors import UsageError

KINDS = ("accuracy", "agreement", "sequence", "iou", "cosine", "relative-error")
GATING = ("accuracy", "agreement", "sequence", "iou")  # outputs of these kinds decide when present
DEFAULT_THRESHOLD = 0.5
EMBEDDING_NAME = re.compile(r"embed|hidden|pooler|pooled|feature|vector|encod|latent", re.I)
SCORES_NAME = re.compile(r"logit|prob|score|class|label|softmax", re.I)
WIDE = 64  # a token model's output this wide is a representation, not a handful of classes
TOKEN_INPUT = re.compile(r"ids$|token|mask", re.I)


@dataclass(frozen=True)
class Metric:
    """A kind from ``KINDS`` (or ``auto``) and, for ``iou``, the probability threshold of a mask."""

    kind: str = "auto"
    threshold: float = DEFAULT_THRESHOLD

    def __str__(self) -> str:
        return f"iou@{self.threshold:g}" if self.kind == "iou" else self.kind


def parse_metric(text: Optional[str]) -> Metric:
    """``auto``, a kind, or ``iou@T`` with 0 < T < 1."""
    if text is None or text == "auto":
        return Metric()
    kind, _, threshold = str(text).partition("@")
    if kind not in KINDS:
        raise UsageError(f"unknown metric {text!r}; choose auto or one of {', '.join(KINDS)} (iou@0.3 sets the mask threshold)")
    if threshold and kind != "iou":
        raise UsageError(f"only iou takes a threshold (iou@0.3), not {kind}")
    try:
        t = float(threshold) if threshold else DEFAULT_THRESHOLD
    except ValueError:
        t = float("nan")
    if not 0 < t < 1:
        raise UsageError(f"the iou threshold must be a probability between 0 and 1, as in iou@0.3, not {threshold!r}")
    return Metric(kind, t)


def infer_kind(name: str, y: np.ndarray, token_inputs: bool = False) -> str:
    """The task of one float-model output, read off its name, shape and values."""
    y = np.asarray(y)
    if y.dtype.kind in "iu" and y.ndim == 1:
        return "agreement"  # predicted class ids
    if y.dtype.kind != "f":
        return "agreement" if y.dtype.kind in "iub" else "cosine"
    if y.ndim == 4 and 1 in (y.shape[1], y.shape[-1]) and min(y.shape[1:]) == 1 and _probabilities(y):
        return "iou"
    scores = y.ndim in (2, 3) and y.shape[-1] > 1
    if scores and SCORES_NAME.search(name):
        return "agreement" if y.ndim == 2 else "sequence"
    if EMBEDDING_NAME.search(name) or (token_inputs and y.shape[-1] >= WIDE):
        return "cosine"
    if y.ndim == 2 and y.shape[-1] > 1:
        return "cosine" if _unit_rows(y) else "agreement"
    if y.ndim == 3 and y.shape[-1] > 1:
        return "sequence"
    return "cosine"


def output_kinds(reference: Mapping[str, np.ndarray], metric: Metric, input_names: Sequence[str] = (),
                 labels_given: bool = False) -> Dict[str, str]:
    """Each output's kind: the user's ``metric`` for every output that it fits, else the guess.

    With labels, the first output is scored by accuracy (the labels belong to it)."""
    token_inputs = any(TOKEN_INPUT.search(n) for n in input_names)
    kinds: Dict[str, str] = {}
    for i, (name, y) in enumerate(reference.items()):
        guess = infer_kind(name, y, token_inputs)
        if labels_given and i == 0:
            kinds[name] = "accuracy"
        elif metric.kind in ("auto", "accuracy"):
            kinds[name] = guess
        else:
            fits(metric.kind, name, np.asarray(y))
            kinds[name] = metric.kind
    if metric.kind == "accuracy" and not labels_given:
        raise UsageError("--metric accuracy needs labels: add 'y' to the eval data, or use --metric auto")
    return kinds


def fits(kind: str, name: str, y: np.ndarray) -> None:
    """Refuse a metric that cannot apply to an output, naming both."""
    if kind in ("agreement", "sequence") and not (y.dtype.kind in "iu" and y.ndim == 1) and not (
            y.dtype.kind == "f" and y.ndim >= 2 and y.shape[-1] > 1):
        raise UsageError(f"--metric {kind} needs class scores, but output '{name}' has shape {list(y.shape[1:])}")
    if kind == "iou" and y.dtype.kind != "f":
        raise UsageError(f"--metric iou needs a probability map, but output '{name}' is {y.dtype}")


def _probabilities(y: np.ndarray) -> bool:
    return bool(y.size) and float(np.min(y)) >= 0.0 and float(np.max(y)) <= 1.0


def _unit_rows(y: np.ndarray) -> bool:
    norms = np.linalg.norm(y.astype(np.float64), axis=-1)
    return bool(norms.size) and float(np.mean(np.abs(norms - 1.0) < 1e-3)) >= 0.95


# --- the measures ---------------------------------------------------------------------------------


def top1_agreement(r: np.ndarray, g: np.ndarray) -> float:
    """Share of samples (or positions, for [N, T, C]) with the same top class; class ids compare as they are."""
    if r.dtype.kind in "iu" and r.ndim == 1:
        return float(np.mean(r == g)) if r.size else 1.0
    same = r.argmax(-1) == g.argmax(-1)
    return float(np.mean(same)) if same.size else 1.0


def mask_ious(r: np.ndarray, g: np.ndarray, threshold: float) -> np.ndarray:
    """Per-sample IoU of the masks ``> threshold``; two empty masks agree fully."""
    a = r.reshape(len(r), -1) > threshold
    b = g.reshape(len(g), -1) > threshold
    inter = np.sum(a & b, axis=1)
    union = np.sum(a | b, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mask_iou(r: np.ndarray, g: np.ndarray, threshold: float) -> float:
    """Mean per-sample IoU (``mask_ious``)."""
    iou = mask_ious(r, g, threshold)
    return float(np.mean(iou)) if len(iou) else 1.0


def relative_error(r: np.ndarray, g: np.ndarray) -> float:
    """||float - candidate|| / ||float|| over the whole output: one number that, unlike a
    per-sample cosine, does not blow up on samples that are all but zero. A float output that is
    zero everywhere gives 0 when the candidate is zero too, else 1."""
    r = r.astype(np.float64).ravel()
    g = g.astype(np.float64).ravel()
    norm = float(np.linalg.norm(r))
    err = float(np.linalg.norm(r - g))
    if norm == 0.0:
        return 0.0 if err == 0.0 else 1.0
    return err / norm
