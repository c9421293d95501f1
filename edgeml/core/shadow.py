"""Shadow evaluation, the part both sides share: how a candidate's outputs are compared with the
active model's, and window counts that add up across windows, devices and a fleet.

Agreement is top-1 for class scores (the artifact's baseline says which outputs are; an output
of shape [N, C] or [N, T, C] compares each row's argmax) and cosine similarity of the flattened
outputs otherwise (embeddings, boxes, regressions). Latencies go into fixed logarithmic buckets
(a quarter octave wide, 0.01 ms to ~3 minutes), so percentiles of a whole fleet come from
summed counts, within 9% of the exact value, without shipping every latency.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import numpy as np

BUCKET_BASE_MS = 0.01
BUCKETS_PER_OCTAVE = 4
MAX_BUCKET = 96  # 0.01 ms * 2**24 ~ 168 s; slower runs count in the last bucket
COUNTS = ("sampled", "compared", "dropped", "errors", "rows", "agreed", "cosine_n")


def bucket(ms: float) -> int:
    """The latency bucket of ``ms`` milliseconds."""
    if not ms > BUCKET_BASE_MS:
        return 0
    return min(MAX_BUCKET, int(math.log2(ms / BUCKET_BASE_MS) * BUCKETS_PER_OCTAVE))


def bucket_ms(index: int) -> float:
    """The geometric middle of bucket ``index``, in milliseconds."""
    return BUCKET_BASE_MS * 2.0 ** ((index + 0.5) / BUCKETS_PER_OCTAVE)


def add_counts(into: Dict[str, int], more: Dict) -> Dict[str, int]:
    """``into`` += ``more``, for {bucket: count} dicts (keys as strings, as JSON carries them)."""
    for k, v in (more or {}).items():
        into[str(k)] = into.get(str(k), 0) + int(v)
    return into


def quantile(counts: Dict, q: float) -> Optional[float]:
    """The ``q`` quantile (0..1) of bucketed latencies, as its bucket's middle; None when empty."""
    items = sorted((int(k), int(v)) for k, v in (counts or {}).items() if int(v) > 0)
    total = sum(v for _, v in items)
    if not total:
        return None
    rank, seen = q * total, 0
    for k, v in items:
        seen += v
        if seen >= rank:
            return bucket_ms(k)
    return bucket_ms(items[-1][0])


def compare(active: Dict[str, np.ndarray], shadow: Dict[str, np.ndarray], classes: Iterable[str]) -> dict:
    """Agreement of one request's outputs: {"rows", "agreed"} over the class outputs' rows and
    {"cosine_n", "cosine_sum", "cosine_min"} over the others (one cosine per output)."""
    classes = set(classes)
    out = {"rows": 0, "agreed": 0, "cosine_n": 0, "cosine_sum": 0.0, "cosine_min": None}
    for name, a in active.items():
        if name not in shadow:
            continue
        a, s = np.asarray(a), np.asarray(shadow[name])
        if a.shape != s.shape or a.size == 0:
            out["rows"] += max(1, a.shape[0] if a.ndim else 1) if name in classes else 0
            if name not in classes:
                _cosine(out, -1.0)  # a shape the active model never returns is total disagreement
            continue
        if name in classes and a.ndim >= 2:
            top_a, top_s = a.argmax(-1).ravel(), s.argmax(-1).ravel()
            out["rows"] += int(top_a.size)
            out["agreed"] += int(np.count_nonzero(top_a == top_s))
        else:
            _cosine(out, cosine(a, s))
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened; 1.0 for two all-zero ones, -1 for NaN."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (math.isfinite(na) and math.isfinite(nb)):
        return -1.0
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def _cosine(out: dict, value: float) -> None:
    out["cosine_n"] += 1
    out["cosine_sum"] += value
    out["cosine_min"] = value if out["cosine_min"] is None else min(out["cosine_min"], value)


def add_window(into: dict, window: dict) -> dict:
    """``into`` += ``window``: the counts, the cosines and both latency buckets of a shadow window
    (or of one comparison, ``compare``'s result); missing fields count as none."""
    for k in COUNTS:
        into[k] = into.get(k, 0) + int(window.get(k) or 0)
    into["cosine_sum"] = into.get("cosine_sum", 0.0) + float(window.get("cosine_sum") or 0.0)
    low = window.get("cosine_min")
    into["cosine_min"] = into.get("cosine_min") if low is None else (
        low if into.get("cosine_min") is None else min(into["cosine_min"], low))
    into["active_ms"] = add_counts(into.get("active_ms", {}), window.get("active_ms"))
    into["shadow_ms"] = add_counts(into.get("shadow_ms", {}), window.get("shadow_ms"))
    return into


def summarize(records: Iterable[dict]) -> dict:
    """Add up shadow window records (of one device, a version or a fleet) and read them:
    agreement, latencies of both models on the same requests, errors and drops."""
    total = {"windows": 0, "first": None, "last": None}
    add_window(total, {})
    for r in records:
        total["windows"] += 1
        add_window(total, r)
        ts = r.get("ts")
        if isinstance(ts, (int, float)):
            total["first"] = ts if total["first"] is None else min(total["first"], ts)
            total["last"] = ts if total["last"] is None else max(total["last"], ts)
    a50, s50 = quantile(total["active_ms"], 0.5), quantile(total["shadow_ms"], 0.5)
    tried = total["compared"] + total["errors"]
    return {
        "windows": total["windows"], "sampled": total["sampled"], "compared": total["compared"],
        "dropped": total["dropped"], "errors": total["errors"],
        "error_rate": round(total["errors"] / tried, 6) if tried else None,
        "drop_rate": round(total["dropped"] / total["sampled"], 6) if total["sampled"] else None,
        "rows": total["rows"], "top1_agreement": round(total["agreed"] / total["rows"], 6) if total["rows"] else None,
        "cosine_mean": round(total["cosine_sum"] / total["cosine_n"], 6) if total["cosine_n"] else None,
        "cosine_min": None if total["cosine_min"] is None else round(total["cosine_min"], 6),
        "active_p50_ms": _r(a50), "active_p95_ms": _r(quantile(total["active_ms"], 0.95)),
        "shadow_p50_ms": _r(s50), "shadow_p95_ms": _r(quantile(total["shadow_ms"], 0.95)),
        "latency_ratio": _r(s50 / a50) if a50 and s50 else None, "first": total["first"], "last": total["last"],
    }


def agreement(summary: dict) -> Optional[float]:
    """The one agreement figure of a summary: top-1 where there are class outputs, else mean cosine."""
    return summary["top1_agreement"] if summary.get("top1_agreement") is not None else summary.get("cosine_mean")


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)
