"""The check a device runs before it serves a model: reference inputs must give reference outputs.

Standard library and numpy only (plus the runtime), so the device agent can use it. The build
machine chooses what to store with ``build_selftest``, the strongest self-test that fits the
artifact's size budget; a device runs ``run_selftest``. How the arrays are stored (narrower
inputs, compact references and the bounds that go with them) is ``artifact.selftest_data``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import numpy as np

from . import transfer
from .artifact import selftest_data as stored
from .artifact.sizes import overhead_budget
from .data import Dataset, run_dataset
from .errors import VerificationError
from .runtime import Runner, load_runner

log = logging.getLogger(__name__)

SAMPLES = 8
METADATA_ALLOWANCE = 8 << 10  # manifest, signature, baseline and ZIP headers, compressed, out of the budget
COMPACT_ABOVE = 1024  # outputs with more values per sample get compact references when space is short
_ESTIMATE_LEVEL = 3  # quick; the file's level 19 packs tighter, so near the budget that is measured too


@dataclass
class SelfTestResult:
    ok: bool
    samples: int
    max_abs_error: float  # the worst error in units of atol: for projections, ‖error‖ / (margin·√d)
    atol: float
    failed_output: Optional[str] = None
    references: Dict[str, str] = field(default_factory=dict)  # output -> "full", "topk+projection", "projection"

    def to_dict(self) -> dict:
        return asdict(self)

    def require_ok(self, advice: str, where: str = "") -> "SelfTestResult":
        """Raise VerificationError (exit 8), naming the output that failed, unless the self-test passed."""
        if not self.ok:
            kind = self.references.get(self.failed_output, "full")
            raise VerificationError(
                f"{where + ': ' if where else ''}self-test failed on output '{self.failed_output}' (max error "
                f"{self.max_abs_error:.3g} > {self.atol:.3g}{'' if kind == 'full' else ', ' + kind + ' reference'}); "
                f"{advice}")
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


# -- building (the build machine) ------------------------------------------------------------------


@dataclass
class SelfTestSet:
    """What ``write_artifact`` takes: the inputs as the model takes them (``selftest_inputs``), the
    full outputs on them (``selftest_outputs``) and the manifest's ``selftest`` section (``meta``),
    which says how they are stored. ``stored_bytes`` estimates ``selftest.npz`` compressed."""

    inputs: Dict[str, np.ndarray]
    outputs: Dict[str, np.ndarray]
    meta: dict
    stored_bytes: int
    budget_bytes: int


def build_selftest(runner: Runner, dataset: Dataset, *, model_zstd_bytes: int, samples: int = SAMPLES) -> SelfTestSet:
    """The strongest self-test from the first ``samples`` of ``dataset`` that keeps the artifact's
    overhead within ``overhead_budget(model_zstd_bytes)`` (``METADATA_ALLOWANCE`` of it kept for the
    manifest, signature and baseline).

    Tried in order, the first that fits is kept: every sample stored as it is with full reference
    outputs (an artifact older readers read too); then inputs stored narrower (float16, the
    narrowest integer type) and outputs of more than ``COMPACT_ABOVE`` values per sample as compact
    references, with ``samples``, 4 and 2 samples; 2 samples with float inputs in 256 levels (an
    image's own resolution); at last 1 sample. When not even that fits, it is kept with a
    warning: the self-test never goes below one sample. Reference outputs are always computed on
    the inputs as a device will decode them, so storing inputs narrower costs the check nothing.
    """
    budget = int(overhead_budget(model_zstd_bytes)) - METADATA_ALLOWANCE
    scales = {s.name: s.scale for s in runner.outputs}
    chosen = None
    for n, how in _ladder(min(samples, len(dataset))):
        chosen = _candidate(runner, dataset.head(n), scales, how, budget)
        if chosen.stored_bytes <= budget:
            return chosen
    log.warning("the self-test takes %d bytes even with one sample, over its budget of %d bytes: the artifact "
                "will carry more than %d bytes beyond its model", chosen.stored_bytes, budget,
                overhead_budget(model_zstd_bytes))
    return chosen


def _ladder(most: int):
    """(samples, how inputs are stored), strongest first: all samples as they are, then narrower
    inputs with compact references and fewer samples; 8-bit inputs before a single sample."""
    steps = [(most, "as is")] + [(n, "narrow") for n in (most, 4, 2) if n <= most]
    steps += [(n, how) for n, how in ((2, "8-bit"), (1, "narrow"), (1, "8-bit")) if n <= most]
    return list(dict.fromkeys(steps))


def _candidate(runner: Runner, ds: Dataset, scales, how: str, budget: int) -> SelfTestSet:
    inputs, in_specs = dict(ds.inputs), {}
    for name, x in ds.inputs.items():
        spec = _input_spec(x, how)
        if spec:
            in_specs[name] = spec
            inputs[name] = stored.decode_input(stored.quantize_input(x, spec), spec)
    outputs = run_dataset(runner.run, Dataset(inputs, whole=ds.whole))
    meta = {"samples": len(ds), "atol": tolerance(outputs, scales), "whole_samples": ds.whole}
    refs = {name: _compact_spec(y) for name, y in outputs.items() if how != "as is" and _wants_compact(y)}
    if in_specs:
        meta["inputs"] = in_specs
    if refs:
        meta["references"] = refs
    packed = stored.pack(inputs, outputs, meta)
    size = transfer.compressed_size(packed, level=_ESTIMATE_LEVEL)
    if budget < size < 2 * budget:  # near the line: as tight as the file will pack it
        size = transfer.compressed_size(packed)
    return SelfTestSet(inputs, outputs, meta, size, budget)


def _input_spec(x: np.ndarray, how: str) -> Optional[dict]:
    if how == "8-bit" and x.dtype.kind == "f":
        return stored.byte_spec(x)
    narrow = stored.narrowest(x) if how != "as is" else None
    return {"dtype": str(x.dtype), "stored": narrow} if narrow else None


def _wants_compact(y: np.ndarray) -> bool:
    y = np.asarray(y)
    return y.ndim >= 2 and y.dtype.kind in "biuf" and y[0].size > COMPACT_ABOVE


def _compact_spec(y: np.ndarray) -> dict:
    """Class scores ([n, C] or [n, T, C], C >= 16) get top-k and a projection, anything else a projection."""
    y = np.asarray(y)
    spec = {"kind": "projection", "shape": list(y.shape),
            "projection": {"dims": stored.PROJECTION_DIMS, "seed": 0, "margin": stored.PROJECTION_MARGIN}}
    if y.dtype.kind == "f" and y.ndim in (2, 3) and y.shape[-1] >= max(16, 2 * stored.TOPK):
        spec.update(kind="topk+projection", topk=stored.TOPK)
    return spec


# -- checking (the device) -------------------------------------------------------------------------


def run_selftest(artifact, runner: Optional[Runner] = None) -> SelfTestResult:
    """Run the artifact's self-test inputs and compare with its reference outputs, full or compact."""
    runner = runner or load_runner(artifact.model, artifact.model_format)
    meta = stored.section(artifact.manifest)
    atol = float(meta.get("atol", 1e-3))
    samples = Dataset(artifact.selftest_inputs, whole=bool(meta.get("whole_samples", False)))
    got = run_dataset(runner.run, samples)
    errors = {name: _full_error(got.get(name), ref) for name, ref in artifact.selftest_outputs.items()}
    kinds = {name: "full" for name in errors}
    for name, spec in meta.get("references", {}).items():
        errors[name] = _compact_error(got.get(name), artifact.selftest_references[name], spec, atol)
        kinds[name] = spec["kind"]
    failed = next((name for name, err in errors.items() if not err <= atol), None)
    worst = max(errors.values(), default=0.0)
    return SelfTestResult(failed is None, len(samples), worst, atol, failed, kinds)


def _full_error(got, ref) -> float:
    if got is None:
        return float("inf")
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    try:
        diff = np.abs(g - r)
    except ValueError:  # shapes that do not broadcast
        return float("inf")
    return _finite_max(np.where(np.isnan(g) & np.isnan(r), 0.0, diff))  # NaN where the reference has NaN is equal


def _compact_error(got, parts: Dict[str, np.ndarray], spec: dict, atol: float) -> float:
    """The error in units of ``atol``: top-k entries and the rest's ceiling as absolute errors, the
    projection's ‖error‖ scaled by its bound (``selftest_data``), so ``<= atol`` passes."""
    if got is None or list(np.shape(got)) != list(spec["shape"]):
        return float("inf")
    y = np.asarray(got)
    err = 0.0
    if "topk" in spec:
        rows = y.reshape(-1, y.shape[-1]).astype(np.float64)
        index = parts["topk_index"].reshape(len(rows), -1).astype(np.int64)
        value = parts["topk_value"].reshape(len(rows), -1).astype(np.float64)
        err = _finite_max(np.abs(np.take_along_axis(rows, index, axis=1) - value))
        if index.shape[1] < rows.shape[1]:
            np.put_along_axis(rows, index, -np.inf, axis=1)  # what is left: no entry may rise above the k-th
            ceiling = np.max(rows, axis=1) - np.min(value, axis=1)
            err = max(err, _finite_max(np.maximum(ceiling, 0.0)))
    projected = np.linalg.norm(stored.project(y, spec["projection"]) - parts["projection"], axis=1)
    scaled = _finite_max(projected) * atol / stored.projection_bound(spec, atol) if atol > 0 else float("inf")
    return max(err, scaled)


def _finite_max(a: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(a)) if np.all(np.isfinite(a)) else float("inf")
