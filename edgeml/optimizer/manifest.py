"""Compose the manifest of an artifact from an optimize run (the artifact module adds members)."""
from __future__ import annotations

import datetime as _dt

from edgeml.core import transfer

from .versions import runtime_name, tool_versions


def build_manifest(*, config, source, chosen, measured, goal_met, float_accuracy, eval_ds, calib_ds,
                   labels, preprocessing, selftest, frontier, stages=(), train_ds=None) -> dict:
    """``source`` is the user's model; ``stages`` the training stages (the first is that model, as fp32)."""
    base = stages[0].measured if stages else next(
        (m for m in measured if m.recipe == "fp32" and m.candidate is not None), None)
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
            "zstd_bytes": chosen.zstd_bytes,
            "float_accuracy": float_accuracy,
            **chosen.quality.to_dict(),
            "total_quality": chosen.total.to_dict() if chosen.total is not None else None,
            "latency_ms": chosen.latency.to_dict(),
            "max_accuracy_drop": config.max_accuracy_drop,
            "goal_met": goal_met,
            "fp32_bytes": base.bytes if base else None,
            "fp32_zstd_bytes": base.zstd_bytes if base else None,
            "fp32_latency_ms": base.latency.median_ms if base else None,
        },
        # what shipping costs: the model member compressed as the artifact file is; the self-test,
        # manifest, signature and baseline come on top, within max(5% of it, 32 KiB)
        # (edgeml.core.selftest.build_selftest, edgeml.core.artifact.overhead)
        "transfer": {"encoding": "zstd", "level": transfer.LEVEL, "model_bytes": chosen.zstd_bytes},
        "stages": [s.to_dict(base) for s in stages],
        "candidates": [m.to_dict(base) for m in measured],
        "frontier": frontier,
        "lineage": {
            "source": {"file": source.path.name, "kind": source.kind, "sha256": source.sha256},
            "recipe": {"requested": config.recipe, "chosen": chosen.recipe, "details": chosen.details,
                       "plan": config.plan.to_dict() if config.plan else None},
            "seed": config.seed,
            "data": {
                "eval": eval_ds.provenance,
                "calibration": calib_ds.provenance if calib_ds is not None else None,
                "train": train_ds.provenance if train_ds is not None else None,
            },
            "tools": tool_versions(),
        },
        "selftest": selftest,
        "baseline": {"member": "baseline.json", "source": "calibration" if calib_ds is not None else "eval"},
    }
