"""The check a device runs before it serves a model: reference inputs must give reference outputs.

Standard library and numpy only (plus the runtime), so the device agent can use it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np

from .data import Dataset, run_dataset
from .errors import VerificationError
from .runtime import Runner, load_runner


@dataclass
class SelfTestResult:
    ok: bool
    samples: int
    max_abs_error: float
    atol: float
    failed_output: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def require_ok(self, advice: str, where: str = "") -> "SelfTestResult":
        """Raise VerificationError (exit 8), naming the output that failed, unless the self-test passed."""
        if not self.ok:
            raise VerificationError(
                f"{where + ': ' if where else ''}self-test failed on output '{self.failed_output}' (max error "
                f"{self.max_abs_error:.3g} > {self.atol:.3g}); {advice}")
        return self


def tolerance(outputs: Dict[str, np.ndarray], scales: Dict[str, Optional[float]]) -> float:
    """Absolute tolerance for reproducing ``outputs`` on another CPU with the same runtime.

    Kernels differ across CPUs (XNNPACK's paths, fused multiply-add), so exact equality is too
    strict; one quantization step of the output, or 1e-3 of the output's range, is not.
    """
    atol = 1e-5
    for name, y in outputs.items():
        y = np.asarray(y, np.float64)
        span = float(np.max(np.abs(y))) if y.size else 0.0
        atol = max(atol, 1e-3 * span, 2.0 * (scales.get(name) or 0.0))
    return atol


def run_selftest(artifact, runner: Optional[Runner] = None) -> SelfTestResult:
    """Run the artifact's self-test inputs and compare with its reference outputs."""
    runner = runner or load_runner(artifact.model, artifact.model_format)
    meta = artifact.manifest.get("selftest", {})
    atol = float(meta.get("atol", 1e-3))
    samples = Dataset(artifact.selftest_inputs, whole=bool(meta.get("whole_samples", False)))
    got = run_dataset(runner.run, samples)
    worst, failed = 0.0, None
    for name, ref in artifact.selftest_outputs.items():
        err = float(np.max(np.abs(np.asarray(got[name], np.float64) - np.asarray(ref, np.float64))))
        if err > worst:
            worst = err
        if err > atol and failed is None:
            failed = name
    samples = len(next(iter(artifact.selftest_inputs.values()))) if artifact.selftest_inputs else 0
    return SelfTestResult(failed is None, samples, worst, atol, failed)
