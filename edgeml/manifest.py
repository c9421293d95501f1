"""Compose the manifest of an artifact from an optimize run (the artifact module adds members)."""
from __future__ import annotations

import datetime as _dt

from .versions import runtime_name, tool_versions


def build_manifest(*, config, source, chosen, measured, goal_met, float_accuracy, eval_ds, calib_ds,
                   labels, preprocessing, selftest, frontier) -> dict:
    base = next((m for m in measured if m.recipe == "fp32" and m.candidate is not None), None)
    return {
        "name": config.artifact_name,
        "version": config.version,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "recipe": chosen.recipe,
        "runtime": {"format": chosen.format, "measured_with": runtime_name(chosen.format), "threads": 1},
        "inputs": [s.to_dict() for s in chosen.inputs],
        "outputs": [s.to_dict() for s in chosen.outputs],
        "preprocessing": preprocessing,
        "labels": labels,
        "metrics": {
            "bytes": chosen.bytes,
            "float_accuracy": float_accuracy,
            **chosen.quality.to_dict(),
            "latency_ms": chosen.latency.to_dict(),
            "max_accuracy_drop": config.max_accuracy_drop,
            "goal_met": goal_met,
            "fp32_bytes": base.bytes if base else None,
            "fp32_latency_ms": base.latency.median_ms if base else None,
        },
        "candidates": [m.to_dict(base) for m in measured],
        "frontier": frontier,
        "lineage": {
            "source": {"file": source.path.name, "kind": source.kind, "sha256": source.sha256},
            "recipe": {"requested": config.recipe, "chosen": chosen.recipe, "details": chosen.details},
            "seed": config.seed,
            "data": {
                "eval": eval_ds.provenance,
                "calibration": calib_ds.provenance if calib_ds is not None else None,
            },
            "tools": tool_versions(),
        },
        "selftest": selftest,
        "baseline": {"member": "baseline.json", "source": "calibration" if calib_ds is not None else "eval"},
    }
