"""The training stages of a recipe (distill, then prune) and their accuracy gates.

Every check that can fail (settings, the student's fit to the teacher, N:M against each layer,
labels) runs before the first epoch. Each stage's model is saved as a plain ``.keras`` file,
reloaded as an edgeml source and measured like any candidate: its fp32 build in the target
format gives bytes, zstd bytes and latency, and its outputs on eval give the accuracy. A stage
whose drop against its own input exceeds its gate is rejected: the chain goes on from the
stage's input and the run ends with exit code 9 after writing the artifact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from edgeml.core.data import Dataset
from edgeml.core.errors import UsageError

from .evaluate import compare
from .training.keras_train import (
    TrainSettings,
    check_labels_fit,
    count_nonzero,
    count_params,
    first_output,
    keras_x,
    output_kind,
    require_labels,
)

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str  # "original" | "distill" | "prune"
    measured: object  # optimizer.Measured of the stage model's fp32 build
    params: int
    nonzero_params: int
    drop: float = 0.0  # against the stage's input model (what the gate checks)
    max_drop: Optional[float] = None
    passed: bool = True
    details: dict = field(default_factory=dict)
    source: object = field(default=None, repr=False)  # the stage model as an edgeml source

    def to_dict(self, baseline=None) -> dict:
        return {
            "stage": self.stage,
            **{k: v for k, v in self.measured.to_dict(baseline).items() if k not in ("recipe", "notes")},
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "drop_vs_input": self.drop,
            "max_accuracy_drop": self.max_drop,
            "passed": self.passed,
            "details": self.details,
        }


def validate(plan, teacher_model, train_ds: Dataset, train_spec: str) -> None:
    """All checks of the training stages, before any training (the student is built to check it)."""
    labels = require_labels(train_ds, "training", train_spec)
    y_pred = first_output(teacher_model, _head(teacher_model, train_ds))
    check_labels_fit(labels, y_pred, "training")
    student = None
    if plan.distill is not None:
        from .training.distill import check_compatible, check_settings, load_student, make_student

        settings = distill_settings(plan.distill)
        check_settings(settings)
        if output_kind(y_pred) == "regression":
            raise UsageError("distillation needs a classifier (class scores or probabilities as the first output); "
                             "this model's output is not one, so drop the distill stage")
        student = load_student(settings.student, teacher_model) if settings.student else \
            make_student(teacher_model, settings.student_width)
        check_compatible(teacher_model, student)
    if plan.prune is not None:
        from .training.pruning import plan as plan_pruning

        plan_pruning(student if student is not None else teacher_model, prune_settings(plan.prune))


def run(plan, original, original_measured, teacher_model, train_ds: Dataset, eval_ds: Dataset,
        measure: Callable, seed: int, on_step: Callable[[str], None]) -> List[StageResult]:
    """Train the stages in order; ``measure(model, name)`` returns ``(source, Measured, outputs)``.

    ``distill`` builds its student again from the settings (``validate`` only proved it can)."""
    results = [StageResult("original", original_measured, count_params(teacher_model), count_nonzero(teacher_model),
                           source=original)]
    current_model, current = teacher_model, results[0]
    if plan.distill is not None:
        from .training.distill import distill

        settings = distill_settings(plan.distill, seed)
        done = distill(teacher_model, train_ds, eval_ds, settings, on_epoch=_progress(on_step, "distilling"))
        stage = _stage_result("distill", done.student, current, measure, plan.distill.max_accuracy_drop, eval_ds, {
            "student": "file" if settings.student else f"width {settings.student_width}",
            "temperature": settings.temperature, "alpha": settings.alpha, "epochs_run": done.epochs_run,
            "best_epoch": done.best_epoch, "teacher_params": done.teacher_params,
            "student_params": done.student_params, **done.details(),
        })
        results.append(stage)
        if stage.passed:
            current_model, current = done.student, stage
    if plan.prune is not None:
        from .training.pruning import prune

        settings = prune_settings(plan.prune, seed)
        done = prune(current_model, train_ds, eval_ds, settings, on_epoch=_progress(on_step, "pruning"))
        stage = _stage_result("prune", done.model, current, measure, plan.prune.max_accuracy_drop, eval_ds, {
            "sparsity": plan.prune.sparsity, "schedule": plan.prune.schedule, "structured": done.structured,
            "epochs_run": done.epochs_run, "best_epoch": done.best_epoch, "layers": done.layers,
        })
        results.append(stage)
    return results


def accepted(results: List[StageResult]) -> StageResult:
    """The stage the quantize step starts from: the last one that passed its gate."""
    return [r for r in results if r.passed][-1]


def distill_settings(stage, seed: int = 0):
    from .training.distill import DistillSettings

    return DistillSettings(student=Path(stage.student) if stage.student else None, student_width=stage.student_width,
                           temperature=stage.temperature, alpha=stage.alpha, train=_train(stage, seed))


def prune_settings(stage, seed: int = 0):
    from .training.pruning import PruneSettings

    return PruneSettings(sparsity=stage.sparsity, schedule=stage.schedule, structured=stage.structured,
                         layers=dict(stage.layers), ramp=stage.ramp, frequency=stage.frequency,
                         train=_train(stage, seed))


def _train(stage, seed: int) -> TrainSettings:
    return TrainSettings(epochs=stage.epochs, batch_size=stage.batch_size, learning_rate=stage.learning_rate,
                         patience=stage.patience, seed=seed, loss=stage.loss)


def _stage_result(name: str, model, parent: StageResult, measure, max_drop: float, eval_ds: Dataset,
                  details: dict) -> StageResult:
    source, measured, outputs = measure(model, name)
    vs_parent = compare(parent.measured.eval_outputs, outputs, eval_ds.labels, parent.measured.quality.accuracy)
    passed = vs_parent.drop <= max_drop + 1e-12
    if not passed:
        log.warning("%s: accuracy drop %.4f against its input is over the stage's limit %.4f; "
                    "going on from its input", name, vs_parent.drop, max_drop)
    details = {**details, "sha256": source.sha256}  # of the stage's .keras file
    return StageResult(name, measured, count_params(model), count_nonzero(model), vs_parent.drop, max_drop,
                       passed, details, source)


def _head(model, ds: Dataset, n: int = 64):
    return keras_x(model, ds.head(n))


def _progress(on_step: Callable[[str], None], what: str):
    def hook(epoch: int, epochs: int, value: float) -> None:
        on_step(f"{what}: epoch {epoch}/{epochs}, eval {value:.4f}")

    return hook
