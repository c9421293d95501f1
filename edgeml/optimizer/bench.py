"""``edgeml bench``: measure an artifact on data with the runtime the device uses."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from edgeml.core.data import load_data, match_inputs, run_dataset
from edgeml.core.runtime import load_runner
from edgeml.core.selftest import run_selftest

from .evaluate import accuracy, measure_latency
from .versions import runtime_name


def bench(artifact_path, data: str, *, public_key=None, runs: int = 100, samples: Optional[int] = 1000,
          seed: int = 0) -> dict:
    """Verify (when a public key is given) or integrity-check the artifact, then measure it."""
    from edgeml.core.artifact import read_artifact, verify_artifact

    artifact = verify_artifact(artifact_path, public_key) if public_key else read_artifact(artifact_path)
    runner = load_runner(artifact.model, artifact.model_format)
    dataset = match_inputs(load_data(data, limit=samples, seed=seed, role="bench"), runner.feed_specs(), "bench")
    selftest = run_selftest(artifact, runner)
    result = {
        "artifact": str(Path(artifact_path)),
        "name": artifact.manifest.get("name"),
        "version": artifact.manifest.get("version"),
        "format": artifact.model_format,
        "runtime": runtime_name(artifact.model_format),
        "signature_verified": bool(public_key),
        "model_bytes": len(artifact.model),
        "file_bytes": artifact.size,
        "samples": len(dataset),
        "selftest": selftest.to_dict(),
        "accuracy": None,
        "claimed": {k: artifact.manifest.get("metrics", {}).get(k) for k in ("accuracy", "agreement", "latency_ms")},
    }
    if dataset.labels is not None:
        outputs = run_dataset(runner.run, dataset)
        first = runner.outputs[0].name
        result["accuracy"] = accuracy(np.asarray(outputs[first]), dataset.labels)
    result["latency_ms"] = measure_latency(runner.run, dataset, runs=runs, budget_s=30.0).to_dict()
    return result
