"""``edgeml optimize``: build candidates, measure each against the float model, keep one, sign it."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from edgeml.core import transfer
from edgeml.core.data import Dataset, load_data, match_inputs, rename_inputs, run_dataset
from edgeml.core.errors import AccuracyGoalNotMet, ConversionError, InputError, UnsupportedModelError, UsageError
from edgeml.core.runtime import load_runner
from edgeml.core.specs import TensorSpec

from .backends import BuildOptions, Candidate, get_backend
from .backends.base import ONNX_ONLY
from .choose import choose, frontier, pays, size
from .config import OptimizeConfig
from .evaluate import Latency, Quality, accuracy, compare, measure_latency
from .metrics import output_kinds, parse_metric
from .sources.base import SourceModel, load_source

log = logging.getLogger(__name__)

AUTO_RECIPES = ("float16", "dynamic", "int8", "int8-weights")
SELFTEST_SAMPLES = 8


@dataclass
class Measured:
    """A candidate with its figures; ``error`` is set when it could not be built."""

    recipe: str
    format: str
    bytes: int = 0
    zstd_bytes: int = 0  # the model compressed as it ships: the cost of sending it to a device
    quality: Quality = field(default_factory=Quality)
    total: Optional[Quality] = None  # against the user's model, when training stages came first
    latency: Latency = field(default_factory=lambda: Latency(float("nan"), float("nan"), 0))
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    candidate: Optional[Candidate] = field(default=None, repr=False)
    inputs: List[TensorSpec] = field(default_factory=list)
    outputs: List[TensorSpec] = field(default_factory=list)
    eval_outputs: Optional[dict] = field(default=None, repr=False)  # its outputs on eval

    def to_dict(self, baseline: Optional["Measured"] = None) -> dict:
        if self.candidate is None:  # could not be built: no figures to report
            return {"recipe": self.recipe, "format": self.format, "failed": True, "notes": list(self.notes)}
        d = {
            "recipe": self.recipe,
            "format": self.format,
            "bytes": self.bytes,
            "zstd_bytes": self.zstd_bytes,
            "quality": self.quality.to_dict(),
            "latency_ms": self.latency.to_dict(),
            "notes": list(self.notes),
        }
        if self.total is not None:
            d["total_quality"] = self.total.to_dict()
        if baseline is not None and baseline.bytes:
            d["ratio_to_fp32"] = {
                "bytes": self.bytes / baseline.bytes,
                "zstd_bytes": self.zstd_bytes / baseline.bytes,
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
    stages: list = field(default_factory=list)  # stages.StageResult, when the recipe trains
    artifact_bytes: int = 0  # the file as shipped (zstd)
    mlflow: Optional[dict] = None  # what was recorded in MLflow (run id, registered version)
    tracking_error: Optional[str] = None

    @property
    def baseline(self) -> Optional[Measured]:
        """What ratios are relative to: the user's model as fp32 (before any training stage)."""
        if self.stages:
            return self.stages[0].measured
        return next((m for m in self.candidates if m.recipe == "fp32"), None)

    @property
    def failed_stages(self) -> list:
        return [s for s in self.stages if not s.passed]

    def to_dict(self) -> dict:
        base = self.baseline
        return {
            "ok": self.goal_met and self.tracking_error is None,
            "artifact": str(self.artifact),
            "plot": str(self.plot) if self.plot else None,
            "name": self.manifest["name"],
            "version": self.manifest["version"],
            "chosen": self.chosen.recipe,
            "artifact_bytes": self.artifact_bytes,
            "goal_met": self.goal_met,
            "max_accuracy_drop": self.max_accuracy_drop,
            "float_accuracy": self.float_accuracy,
            "stages": [s.to_dict(base) for s in self.stages],
            "candidates": [m.to_dict(base) for m in self.candidates],
            **({"mlflow": self.mlflow} if self.mlflow is not None else {}),
            **({"tracking_error": self.tracking_error} if self.tracking_error else {}),
        }


def optimize(config: OptimizeConfig, on_step: Callable[[str], None] = lambda s: None) -> OptimizeResult:
    """Run the whole job; raise AccuracyGoalNotMet (after writing) when a stage or the result misses its goal."""
    from edgeml.core.artifact import write_artifact
    from edgeml.core.selftest import build_selftest
    from edgeml.core.signing import load_private_key
    from edgeml.core.stats import baseline_stats, output_stats

    from .manifest import build_manifest
    from .report import plot_candidates

    config.check()
    plan = config.plan
    private_key = load_private_key(config.key)  # fail on a bad key before any heavy work
    labels_list = _read_labels(config.labels)
    preprocessing = _read_json(config.preprocessing, "--preprocessing")

    on_step("loading model")
    workdir = tempfile.TemporaryDirectory(prefix="edgeml-stages-")
    source_lineage = None
    model_path = config.model
    if config.is_mlflow_source:
        from edgeml.tracking.sources import resolve_model

        model_path, source_lineage = resolve_model(config.model, Path(workdir.name) / "mlflow-source")
    source = user_source = load_source(model_path)
    fmt = config.format or source.default_format
    _check_plan(config, source, fmt)
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
    train_ds = None
    if plan.trains:
        train_ds = match_inputs(load_data(config.train, seed=config.seed, role="training"), source.inputs, "training")

    on_step("running the float model")
    reference = run_dataset(source.reference, eval_ds)
    kinds = _kinds(reference, source, eval_ds, config)
    _warn_if_degenerate(reference, kinds)
    float_acc = None
    if eval_ds.labels is not None:
        float_acc = accuracy(np.asarray(reference[source.outputs[0].name]), eval_ds.labels)
    options = BuildOptions(seed=config.seed, min_agreement=max(0.99, 1.0 - config.max_accuracy_drop), kinds=kinds,
                           threshold=parse_metric(config.metric).threshold)

    run = _start_run(config, source_lineage, user_source, eval_ds, calib_ds, train_ds)

    stage_results, original = [], None
    if plan.trains:
        from . import stages

        stages.validate(plan, source.model, train_ds, config.train)  # every check before training
        on_step("measuring the original model")
        original = (reference, float_acc)
        first = _measure(backend.build(source, "fp32", None, options), source, eval_ds, reference, float_acc, config)

        def measure(model, name):
            stage_source = _save_and_load(model, Path(workdir.name) / f"{name}.keras")
            ds = rename_inputs(eval_ds, source.inputs, stage_source.inputs)
            m = _measure(backend.build(stage_source, "fp32", None, options), stage_source, ds, reference, float_acc,
                         config)
            return stage_source, m, m.eval_outputs

        stage_results = stages.run(plan, source, first, source.model, train_ds, eval_ds, measure, config.seed,
                                   on_step)
        final = stages.accepted(stage_results)
        if final.stage != "original":
            eval_ds = rename_inputs(eval_ds, source.inputs, final.source.inputs)
            calib_ds = calib_ds and rename_inputs(calib_ds, source.inputs, final.source.inputs)
            source = final.source
            reference = run_dataset(source.reference, eval_ds)
            if eval_ds.labels is not None:
                float_acc = accuracy(np.asarray(reference[source.outputs[0].name]), eval_ds.labels)

    recipes = _recipes_for(config, calib_ds is not None, fmt)
    measured: List[Measured] = []
    for recipe in recipes:
        on_step(f"building and measuring {recipe}")
        try:
            cand = _build(backend, source, recipe, calib_ds, eval_ds, reference, config, options)
            measured.append(_measure(cand, source, eval_ds, reference, float_acc, config, original))
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
    fp32 = next(m for m in built if m.recipe == "fp32")
    chosen, quantize_ok = choose(eligible, config.max_accuracy_drop, baseline=fp32 if config.recipe == "auto" else None)
    if chosen is fp32:
        log.warning("auto keeps fp32: no candidate within the goal is smaller or faster than it")
        chosen.notes.append("kept by auto: no quantized candidate within the goal was smaller or faster")
    elif not pays(chosen, fp32):
        log.warning("%s is no smaller and no faster than fp32 (%.3fx the zstd bytes, %.2fx the latency): the "
                    "quantizer left most of the model in float", chosen.recipe, size(chosen) / size(fp32),
                    chosen.latency.median_ms / fp32.latency.median_ms)
    goal_met = quantize_ok and all(s.passed for s in stage_results)

    on_step("writing the artifact")
    runner = load_runner(chosen.candidate.model, fmt)
    st = build_selftest(runner, eval_ds, model_zstd_bytes=chosen.zstd_bytes, samples=SELFTEST_SAMPLES)
    baseline = baseline_stats((calib_ds or eval_ds).inputs)
    baseline["source"] = "calibration" if calib_ds is not None else "eval"
    # predicted classes and confidence (or output values) on eval, on the device runtime
    baseline["outputs"] = output_stats(chosen.eval_outputs or {}, options.kinds)
    everything = [s.measured for s in stage_results] + built
    manifest = build_manifest(
        config=config, source=user_source, chosen=chosen, measured=measured, goal_met=goal_met,
        float_accuracy=float_acc, eval_ds=eval_ds, calib_ds=calib_ds, labels=labels_list,
        preprocessing=preprocessing, selftest=st.meta,
        frontier=[_label(m, stage_results) for m in frontier(everything)], stages=stage_results,
        train_ds=train_ds,
    )
    if source_lineage is not None:  # where the model came from, without the server's address
        manifest["lineage"]["source"]["mlflow"] = {k: v for k, v in source_lineage.items() if k != "tracking_uri"}
    artifact = write_artifact(config.output, model=chosen.candidate.model, model_format=fmt, manifest=manifest,
                              selftest_inputs=st.inputs, selftest_outputs=st.outputs, baseline=baseline,
                              private_key=private_key)
    result = OptimizeResult(config.output, chosen, measured, goal_met, config.max_accuracy_drop,
                            float_acc, manifest, stages=stage_results, artifact_bytes=artifact.size)
    if config.plot:
        result.plot = plot_candidates(result, config.output.with_suffix(".candidates.png"))
    if run is not None:
        on_step("recording the run in MLflow")
        _finish_run(run, result, config, Path(workdir.name))
    workdir.cleanup()
    if not goal_met:
        if result.tracking_error:
            log.error("%s", result.tracking_error)
        raise AccuracyGoalNotMet(_goal_message(result, config), result)
    if result.tracking_error:
        from edgeml.tracking import TrackingError

        raise TrackingError(result.tracking_error, result)
    return result


def _run_params(config: OptimizeConfig, lineage, source: SourceModel, eval_ds, calib_ds, train_ds) -> dict:
    data = {"eval": eval_ds, "calibration": calib_ds, "train": train_ds}
    return {
        "source": config.model if lineage else str(source.path), "source_sha256": source.sha256,
        "source_kind": source.kind, "recipe": config.recipe, "format": config.format or source.default_format,
        "max_accuracy_drop": config.max_accuracy_drop, "seed": config.seed, "name": config.artifact_name,
        "version": config.version, "tuner": config.tuner or "", "plan": config.plan.to_dict(),
        **{f"data.{k}": ds.provenance for k, ds in data.items() if ds is not None},
        **({"source_version": lineage["version"]} if lineage and lineage.get("version") else {}),
    }


def _start_run(config: OptimizeConfig, lineage, source: SourceModel, eval_ds, calib_ds, train_ds):
    """The MLflow run, opened with its parameters before the build (None without --mlflow)."""
    if not config.mlflow:
        return None
    from edgeml.tracking.runs import OptimizeRun

    run = OptimizeRun(_run_params(config, lineage, source, eval_ds, calib_ds, train_ds),
                      f"edgeml {config.artifact_name} v{config.version}", config.experiment, config.register,
                      parent_run_id=(lineage or {}).get("run_id"))
    run.start()
    return run


def _finish_run(run, result: OptimizeResult, config: OptimizeConfig, workdir: Path) -> None:
    """Metrics, tags, the artifact, the plot and the report in MLflow; a failure is kept on the
    result (the artifact is written either way)."""
    from rich.console import Console

    from edgeml.tracking import TrackingError

    from .report import candidates_table, stages_table

    report = workdir / "optimize.json"
    report.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    text = workdir / "candidates.txt"
    with text.open("w", encoding="utf-8") as f:
        console = Console(file=f, width=160, color_system=None)
        if result.stages:
            console.print(stages_table(result))
        console.print(candidates_table(result))
    files = [report, text] + ([result.plot] if result.plot else [])
    try:
        result.mlflow = run.finish(result.to_dict(), config.output, files, result.goal_met)
    except TrackingError as exc:
        result.tracking_error = str(exc)
        result.mlflow = {"tracking_uri": run.uri, "run_id": run.run_id}


def _kinds(reference, source: SourceModel, eval_ds: Dataset, config: OptimizeConfig) -> dict:
    """Each output's task metric (edgeml.optimizer.metrics), from --metric or read off the float outputs."""
    return output_kinds(reference, parse_metric(config.metric), [s.name for s in source.inputs],
                        labels_given=eval_ds.labels is not None)


def _warn_if_degenerate(reference, kinds: dict) -> None:
    """A reference that predicts one class for every eval sample makes agreement meaningless."""
    for name, y in reference.items():
        y = np.asarray(y)
        if kinds.get(name) in ("agreement", "accuracy") and y.ndim == 2 and y.shape[-1] > 1 and len(y) > 1:
            classes = np.unique(y.argmax(-1))
            if len(classes) == 1:
                log.warning("the float model predicts class %d for every eval sample on output '%s': comparisons "
                            "against it say little; check the eval data and its preprocessing", int(classes[0]), name)


def _check_plan(config: OptimizeConfig, source: SourceModel, fmt: str) -> None:
    if config.tuner == "inc" and fmt != "onnx":
        raise UsageError("--tuner inc tunes ONNX models; add --format onnx")
    if config.tuner == "inc":
        from .inc.tuner import check_inc_env

        check_inc_env()  # a missing or broken INC environment fails now, not after the other builds
    if config.plan.trains and source.kind != "keras":
        raise UsageError(
            f"{' and '.join(config.plan.stages()[:-1])} train the model, which needs a Keras 3 .keras file; "
            f"{source.path.name} is a {source.kind.replace('_', ' ')} model, so use quantize-only recipes for it"
        )


def _build(backend, source, recipe, calib_ds, eval_ds, reference, config, options) -> Candidate:
    if recipe == "int8" and config.tuner == "inc":
        from .inc.tuner import tune_int8

        return tune_int8(source.onnx_bytes(), calib_ds, eval_ds, reference, config.max_accuracy_drop, seed=config.seed)
    return backend.build(source, recipe, calib_ds, options)


def _save_and_load(model, path: Path) -> SourceModel:
    from .sources.tensorflow import load_keras

    model.save(path)  # a plain .keras file: what a user would get, zeros and all
    return load_keras(path)


def _label(m: Measured, stage_results) -> str:
    for s in stage_results:
        if s.measured is m:
            return f"{s.stage}:fp32"
    return m.recipe


def _goal_message(result: OptimizeResult, config: OptimizeConfig) -> str:
    chosen = result.chosen
    failed = result.failed_stages
    if failed:
        s = failed[0]
        return (f"stage {s.stage} lost {s.drop:.4f} of accuracy, over its limit {s.max_drop:g}, so its model was not "
                f"used: wrote {chosen.recipe} of the model before it to {config.output}; train longer, ask for less "
                f"(smaller --prune or a wider student), or allow a larger drop in the recipe")
    return (f"no candidate is within --max-accuracy-drop {config.max_accuracy_drop:g}: wrote the best one "
            f"({chosen.recipe}, drop {chosen.quality.drop:.4f}) to {config.output}; allow a larger drop, "
            "give more calibration data, or use --recipe fp32")


def _recipes_for(config: OptimizeConfig, have_calibration: bool, fmt: str) -> List[str]:
    if config.recipe == "auto":
        wanted = ["fp32", *(r for r in AUTO_RECIPES if fmt == "onnx" or r not in ONNX_ONLY)]
        if not have_calibration:
            log.warning("auto without --calibration skips the int8 candidate")
            wanted.remove("int8")
        return wanted
    return ["fp32"] if config.recipe == "fp32" else ["fp32", config.recipe]


def _measure(cand: Candidate, source: SourceModel, eval_ds: Dataset, reference, float_acc, config,
             original=None) -> Measured:
    """Run a built candidate on eval; ``original`` = (reference, accuracy) of the user's model, if trained since."""
    runner = load_runner(cand.model, cand.format)
    missing = [s.name for s in source.outputs if s.name not in {o.name for o in runner.outputs}]
    if missing:
        raise ConversionError(
            f"the {cand.recipe} model lost outputs {missing} (it has {[o.name for o in runner.outputs]}); "
            "this is a bug in the converter step, please report it"
        )
    outputs = run_dataset(runner.run, eval_ds)
    kinds, metric = _kinds(reference, source, eval_ds, config), parse_metric(config.metric)
    quality = compare(reference, {k: outputs[k] for k in reference}, eval_ds.labels, float_acc, kinds, metric)
    latency = measure_latency(runner.run, eval_ds, runs=config.latency_runs)
    total = None
    if original is not None:
        total = compare(original[0], {k: outputs[k] for k in original[0]}, eval_ds.labels, original[1],
                        _kinds(original[0], source, eval_ds, config), metric)
    return Measured(cand.recipe, cand.format, len(cand.model), transfer.compressed_size(cand.model), quality, total,
                    latency, list(cand.notes), dict(cand.details), cand, list(runner.inputs), list(runner.outputs),
                    outputs)


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
