"""``edgeml optimize``: build candidates, measure each against the float model, keep one, sign it."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .backends import BuildOptions, Candidate, get_backend
from .choose import choose, frontier
from .config import OptimizeConfig
from .data import Dataset, load_data, match_inputs
from .errors import AccuracyGoalNotMet, ConversionError, InputError, UnsupportedModelError, UsageError
from .evaluate import Latency, Quality, accuracy, compare, measure_latency, run_dataset
from .runtime import load_runner
from .source import SourceModel, load_source
from .specs import TensorSpec

log = logging.getLogger(__name__)

AUTO_RECIPES = ("float16", "dynamic", "int8")
SELFTEST_SAMPLES = 8


@dataclass
class Measured:
    """A candidate with its figures; ``error`` is set when it could not be built."""

    recipe: str
    format: str
    bytes: int = 0
    quality: Quality = field(default_factory=Quality)
    latency: Latency = field(default_factory=lambda: Latency(float("nan"), float("nan"), 0))
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    candidate: Optional[Candidate] = field(default=None, repr=False)
    inputs: List[TensorSpec] = field(default_factory=list)
    outputs: List[TensorSpec] = field(default_factory=list)

    def to_dict(self, baseline: Optional["Measured"] = None) -> dict:
        if self.candidate is None:  # could not be built: no figures to report
            return {"recipe": self.recipe, "format": self.format, "failed": True, "notes": list(self.notes)}
        d = {
            "recipe": self.recipe,
            "format": self.format,
            "bytes": self.bytes,
            "quality": self.quality.to_dict(),
            "latency_ms": self.latency.to_dict(),
            "notes": list(self.notes),
        }
        if baseline is not None and baseline.bytes:
            d["ratio_to_fp32"] = {
                "bytes": self.bytes / baseline.bytes,
                "latency": self.latency.median_ms / baseline.latency.median_ms,
            }
        return d


@dataclass
class OptimizeResult:
    artifact: Path
    chosen: Measured
    candidates: List[Measured]
    goal_met: bool
    max_accuracy_drop: float
    float_accuracy: Optional[float]
    manifest: dict
    plot: Optional[Path] = None

    @property
    def baseline(self) -> Optional[Measured]:
        return next((m for m in self.candidates if m.recipe == "fp32"), None)

    def to_dict(self) -> dict:
        base = self.baseline
        return {
            "ok": self.goal_met,
            "artifact": str(self.artifact),
            "plot": str(self.plot) if self.plot else None,
            "name": self.manifest["name"],
            "version": self.manifest["version"],
            "chosen": self.chosen.recipe,
            "goal_met": self.goal_met,
            "max_accuracy_drop": self.max_accuracy_drop,
            "float_accuracy": self.float_accuracy,
            "candidates": [m.to_dict(base) for m in self.candidates],
        }


def optimize(config: OptimizeConfig, on_step: Callable[[str], None] = lambda s: None) -> OptimizeResult:
    """Run the whole job; raise AccuracyGoalNotMet (after writing) when no candidate is good enough."""
    from .artifact import write_artifact
    from .signing import load_private_key
    from .report import plot_candidates
    from .stats import baseline_stats
    from .manifest import build_manifest
    from .selftest import tolerance

    config.check()
    private_key = load_private_key(config.key)  # fail on a bad key before any heavy work
    labels_list = _read_labels(config.labels)
    preprocessing = _read_json(config.preprocessing, "--preprocessing")

    on_step("loading model")
    source = load_source(config.model)
    fmt = config.format or source.default_format
    backend = get_backend(fmt)
    _check_labels(labels_list, source)

    on_step("loading data")
    eval_ds = match_inputs(load_data(config.eval, limit=config.eval_samples, seed=config.seed, role="eval"),
                           source.inputs, "eval")
    calib_ds = None
    if config.calibration:
        calib_ds = match_inputs(
            load_data(config.calibration, limit=config.calibration_samples, seed=config.seed, role="calibration"),
            source.inputs, "calibration")

    on_step("running the float model")
    reference = run_dataset(source.reference, eval_ds)
    float_acc = None
    if eval_ds.labels is not None:
        float_acc = accuracy(np.asarray(reference[source.outputs[0].name]), eval_ds.labels)

    recipes = _recipes_for(config, calib_ds is not None)
    options = BuildOptions(seed=config.seed, min_agreement=max(0.99, 1.0 - config.max_accuracy_drop))
    measured: List[Measured] = []
    for recipe in recipes:
        on_step(f"building and measuring {recipe}")
        try:
            cand = backend.build(source, recipe, calib_ds, options)
            measured.append(_measure(cand, source, eval_ds, reference, float_acc, config))
        except (ConversionError, UnsupportedModelError) as exc:
            if config.recipe != "auto" or recipe == "fp32":
                raise
            log.warning("candidate %s failed: %s", recipe, exc)
            measured.append(Measured(recipe, fmt, notes=[f"failed: {exc}"]))

    built = [m for m in measured if m.candidate is not None]
    wanted = AUTO_RECIPES if config.recipe == "auto" else (config.recipe,)
    eligible = [m for m in built if m.recipe in wanted]  # fp32 is the baseline, not a choice of auto
    if not eligible:
        raise ConversionError(f"no candidate could be built for recipe {config.recipe}; see the notes above")
    chosen, goal_met = choose(eligible, config.max_accuracy_drop)

    on_step("writing the artifact")
    runner = load_runner(chosen.candidate.model, fmt)
    st_ds = eval_ds.head(SELFTEST_SAMPLES)
    st_in, st_out = st_ds.inputs, run_dataset(runner.run, st_ds)
    atol = tolerance(st_out, {s.name: s.scale for s in runner.outputs})
    baseline = baseline_stats((calib_ds or eval_ds).inputs)
    baseline["source"] = "calibration" if calib_ds is not None else "eval"
    manifest = build_manifest(
        config=config, source=source, chosen=chosen, measured=measured, goal_met=goal_met,
        float_accuracy=float_acc, eval_ds=eval_ds, calib_ds=calib_ds, labels=labels_list,
        preprocessing=preprocessing, selftest={"samples": len(st_ds), "atol": atol, "whole_samples": st_ds.whole},
        frontier=[m.recipe for m in frontier(built)],
    )
    write_artifact(config.output, model=chosen.candidate.model, model_format=fmt, manifest=manifest,
                   selftest_inputs=st_in, selftest_outputs=st_out, baseline=baseline,
                   private_key=private_key)
    result = OptimizeResult(config.output, chosen, measured, goal_met, config.max_accuracy_drop,
                            float_acc, manifest)
    if config.plot:
        result.plot = plot_candidates(built, chosen, config.output.with_suffix(".candidates.png"))
    if not goal_met:
        raise AccuracyGoalNotMet(
            f"no candidate is within --max-accuracy-drop {config.max_accuracy_drop:g}: wrote the best one "
            f"({chosen.recipe}, drop {chosen.quality.drop:.4f}) to {config.output}; allow a larger drop, "
            "give more calibration data, or use --recipe fp32",
            result,
        )
    return result


def _recipes_for(config: OptimizeConfig, have_calibration: bool) -> List[str]:
    if config.recipe == "auto":
        wanted = ["fp32", *AUTO_RECIPES]
        if not have_calibration:
            log.warning("auto without --calibration skips the int8 candidate")
            wanted.remove("int8")
        return wanted
    return ["fp32"] if config.recipe == "fp32" else ["fp32", config.recipe]


def _measure(cand: Candidate, source: SourceModel, eval_ds: Dataset, reference, float_acc, config) -> Measured:
    runner = load_runner(cand.model, cand.format)
    missing = [s.name for s in source.outputs if s.name not in {o.name for o in runner.outputs}]
    if missing:
        raise ConversionError(
            f"the {cand.recipe} model lost outputs {missing} (it has {[o.name for o in runner.outputs]}); "
            "this is a bug in the converter step, please report it"
        )
    outputs = run_dataset(runner.run, eval_ds)
    quality = compare(reference, {k: outputs[k] for k in reference}, eval_ds.labels, float_acc)
    latency = measure_latency(runner.run, eval_ds, runs=config.latency_runs)
    return Measured(cand.recipe, cand.format, len(cand.model), quality, latency, list(cand.notes),
                    dict(cand.details), cand, list(runner.inputs), list(runner.outputs))


def _check_labels(labels: Optional[list], source: SourceModel) -> None:
    """Class labels must name every class of the first output, when its size is known."""
    if labels is None or not source.outputs:
        return
    classes = source.outputs[0].shape[-1] if source.outputs[0].shape else None
    if classes is not None and len(labels) != classes:
        raise UsageError(
            f"--labels has {len(labels)} labels but the model's output '{source.outputs[0].name}' has "
            f"{classes} classes; give one label per line for each class"
        )


def _read_labels(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --labels file {path}: {exc.strerror}; give a text file with one label per line") from exc
    return [line.strip() for line in lines if line.strip()]


def _read_json(path: Optional[Path], option: str) -> Optional[dict]:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {option} file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{option} file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
