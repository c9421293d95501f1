"""Drift across a fleet, from the window histograms devices send (``drift`` records) and the
baseline each model version starts with (``baseline`` records): counts in the same bins add up
exactly, so a fleet, a version, a device or a rollout wave is judged the way one device judges
itself (``edgeml.core.drift``), without a raw input leaving any device. And the alerts devices
raised and cleared (``alert`` records)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np

from edgeml.core import drift
from edgeml.core.errors import UsageError

BY = ("fleet", "device", "version", "wave")
WORST = 5


def fleet_drift(store, fleet: str, by: str = "device", since_s: Optional[float] = 3600.0,
                rollout: Optional[str] = None, alpha: float = 0.01, js_threshold: float = drift.JS_THRESHOLD,
                psi_threshold: float = drift.PSI_THRESHOLD) -> dict:
    """Rows of drift per group (``by``: fleet, device, version or a rollout's wave; the row's
    ``group`` names it: the fleet, the device id, "v3", "wave 2") over the windows of the last
    ``since_s`` seconds (None: all). Groups are always split by model version as well: versions
    have their own bins."""
    if by not in BY:
        raise UsageError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    waves = _waves(store, fleet, rollout) if by == "wave" else {}
    since = None if since_s is None else time.time() - since_s
    baselines: Dict[str, dict] = {}
    for _, _, record in store.records(["baseline"], fleet=fleet):
        baselines[record.get("sha256")] = record  # the latest of each artifact
    groups: Dict[tuple, dict] = {}
    for _, device, record in store.records(["drift"], fleet=fleet, since=since):
        if by == "wave" and device not in waves:
            continue
        label = {"fleet": fleet, "device": device, "version": f"v{record.get('version')}",
                 "wave": f"wave {waves.get(device)}"}[by]
        key = (label, record.get("model"), record.get("version"), record.get("sha256"))
        g = groups.setdefault(key, {"devices": set(), "windows": 0, "samples": 0, "live": {}, "confidence_sum": 0.0,
                                    "first": record["ts"], "last": record["ts"]})
        g["devices"].add(device)
        g["windows"] += 1
        g["samples"] += int(record.get("samples") or 0)
        g["last"] = record["ts"]
        for name, spec in (record.get("inputs") or {}).items():
            _add(g["live"], f"input:{name}", spec.get("counts"))
        for name, spec in (record.get("outputs") or {}).items():
            for what in ("classes", "confidence", "values"):
                _add(g["live"], f"{what}:{name}", spec.get(what))
            g["confidence_sum"] += float(spec.get("confidence_sum") or 0.0)
    rows = []
    for (label, model, version, sha), g in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][2]))):
        base = baselines.get(sha)
        row = {"group": label, "model": model, "version": version, "sha256": sha, "devices": sorted(g["devices"]),
               "windows": g["windows"], "samples": g["samples"], "first_ts": g["first"], "last_ts": g["last"]}
        if base is None:
            row.update(judged=False, reason="no baseline record for this artifact has reached the host yet")
            rows.append(row)
            continue
        hist = drift.histograms(base.get("baseline") or {})
        features = drift.judge(hist, g["live"])
        inputs = [f for f in features if f["what"] == "input"]
        outputs = [f for f in features if f["what"] in ("classes", "values")]
        worst_inputs = drift.drifted(inputs, alpha, js_threshold, psi_threshold)
        worst_outputs = drift.drifted(outputs, alpha, js_threshold, psi_threshold)
        row.update(judged=True, input_drift=bool(worst_inputs), prediction_drift=bool(worst_outputs),
                   worst=(worst_inputs + worst_outputs)[:WORST] or sorted(
                       features, key=lambda f: -drift.ratio(f, js_threshold, psi_threshold))[:WORST],
                   js_max=max((f["js"] for f in features), default=None),
                   psi_max=max((f["psi"] for f in features), default=None))
        conf = next((h for h in hist.values() if h.what == "confidence"), None)
        seen = int(np.sum(g["live"].get(conf.key, 0))) if conf is not None else 0
        if conf is not None and conf.mean is not None and seen:
            row["confidence"] = {"baseline": round(conf.mean, 4), "live": round(g["confidence_sum"] / seen, 4)}
        rows.append(row)
    return {"fleet": fleet, "by": by, "since_s": since_s, "rollout": rollout if by == "wave" else None, "rows": rows}


def _add(live: dict, key: str, counts) -> None:
    if counts is None:
        return
    counts = np.asarray(counts, dtype=np.int64)
    if key in live and live[key].shape == counts.shape:
        live[key] = live[key] + counts
    elif key not in live:
        live[key] = counts


def _waves(store, fleet: str, rollout: Optional[str]) -> Dict[str, int]:
    if rollout is None:
        found = store.rollouts(fleet)
        if not found:
            raise UsageError(f"fleet {fleet!r} has no rollout: --by wave needs one (or pass --rollout ID)")
        rollout = found[-1]["id"]
    r = store.rollout(rollout)
    if r is None:
        raise UsageError(f"no rollout {rollout!r}")
    with store.transaction(write=False):
        return {a["device"]: a["wave"] for a in store.assignments(r["id"])}


def alerts(store, fleet: Optional[str] = None, since_s: Optional[float] = None) -> dict:
    """Every alert devices raised, open or cleared: one row per raise, with its clearing if it came."""
    since = None if since_s is None else time.time() - since_s
    rows: List[dict] = []
    open_rows: Dict[tuple, dict] = {}
    for fl, device, record in store.records(["alert"], fleet=fleet, since=since):
        key = (fl, device, record.get("model"), record.get("version"), record.get("alert"))
        if record.get("state") == "raised":
            row = {"fleet": fl, "device": device, "model": record.get("model"), "version": record.get("version"),
                   "alert": record.get("alert"), "state": "open", "since": record.get("since") or record["ts"],
                   "cleared": None, "features": record.get("features") or [], "samples": record.get("samples")}
            open_rows[key] = row
            rows.append(row)
        elif record.get("state") == "cleared" and key in open_rows:
            row = open_rows.pop(key)
            row.update(state="cleared", cleared=record.get("cleared") or record["ts"])
    rows.sort(key=lambda r: (r["state"] != "open", -(r["since"] or 0)))
    return {"open": sum(r["state"] == "open" for r in rows), "alerts": rows}


def describe_feature(f: dict) -> str:
    """One judged feature in a few words: ``image[2] JS 0.31``, ``x[5] shift 1.2 std``."""
    where = f.get("name") or f.get("what")
    if f.get("channel") is not None:
        where = f"{where}[{f['channel']}]"
    if "js" in f:
        return f"{where} JS {f['js']:.2f}"
    if "mean_shift" in f:
        return f"{where} shift {f['mean_shift']:.1f} std"
    if "drop" in f:
        return f"confidence -{f['drop']:.2f}"
    return str(where)
