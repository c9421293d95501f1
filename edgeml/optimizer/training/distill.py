"""Knowledge distillation: train a smaller student to match a Keras teacher, with keras.distillation.

The student is a user's ``.keras`` file or the teacher's architecture with narrower layers.
Training uses Keras 3's ``Distiller`` with ``LogitsDistillation`` (Hinton et al.): the loss is
``alpha * hard-label loss + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))``.
``LogitsDistillation`` divides its inputs by T and applies the softmax itself, so it needs class
scores (logits): a softmax output is trained through log-probabilities, which give the same
tempered softmax (softmax(log p / T) == softmax(z / T)). Every check runs before the first epoch.

A teacher does not always help: one no better than what the student reaches alone pulls it down
to its own level. So, unless told not to, the stage also trains the same student (architecture,
initial weights, seed, epochs, optimizer) on the labels alone and keeps whichever scores higher on
eval, saying which. Both runs are seeded and run with TensorFlow's op determinism, so a seed gives
the same student every time.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from edgeml.core.data import Dataset
from edgeml.core.errors import InputError, UsageError, first_line

from ..sources.tensorflow import _keras_input_names, load_keras
from .keras_train import (
    EpochHook,
    KeepBest,
    TrainSettings,
    check_labels_fit,
    count_params,
    deterministic,
    first_output,
    keras_x,
    loss_for,
    output_kind,
    require_labels,
    score,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

WIDTH_KEYS = ("filters", "units", "output_dim")  # config keys that set a layer's output width
LOG_FLOOR = 1e-30  # keeps log(p) finite where a float32 softmax underflows, far below any class that matters


@dataclass
class DistillSettings:
    student: Optional[Path] = None  # a Keras 3 .keras file, or
    student_width: Optional[float] = None  # a width multiplier in (0, 1) applied to the teacher's architecture
    temperature: float = 4.0
    alpha: float = 0.1  # weight of the hard-label loss; the distillation loss gets 1 - alpha
    baseline: bool = True  # also train the student on labels alone and keep the better of the two on eval
    train: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=30))


@dataclass
class TrainingRun:
    """One way the student was trained: ``distilled`` (teacher and labels) or ``labels`` (labels alone)."""

    score: float  # keras_train.score on eval of its best epoch, which it was restored to
    epochs_run: int
    best_epoch: int  # 1-based, like on_epoch's epoch
    history: dict  # per epoch: eval_score and Keras' losses


@dataclass
class DistillResult:
    student: "keras.Model"  # a plain model with the teacher's inputs and outputs: the kept run's
    teacher_params: int
    student_params: int
    teacher_score: float  # keras_train.score on eval: accuracy
    student_score: float  # the kept student's
    kept: str  # "distilled", or "labels" when the student trained on labels alone scored higher
    runs: Dict[str, TrainingRun]  # "distilled" and, with settings.baseline, "labels"

    @property
    def epochs_run(self) -> int:
        return self.runs[self.kept].epochs_run

    @property
    def best_epoch(self) -> int:  # the student holds this epoch's weights
        return self.runs[self.kept].best_epoch

    @property
    def history(self) -> dict:
        return self.runs[self.kept].history

    def details(self) -> dict:
        """What a report shows: which student was kept and both scores (``labels`` is None without a baseline)."""
        labels = self.runs.get("labels")
        return {"kept": self.kept, "distilled_score": self.runs["distilled"].score,
                "labels_only_score": labels.score if labels else None}

    def summary(self) -> str:
        distilled, labels = self.runs["distilled"].score, self.runs.get("labels")
        if labels is None:
            return f"distilled student: eval {distilled:.4f} (no label-only baseline trained)"
        if self.kept == "labels":
            return (f"kept the student trained on labels alone (eval {labels.score:.4f}): the distilled one scored "
                    f"{distilled:.4f}, so the teacher did not help this student")
        return f"kept the distilled student (eval {distilled:.4f}; the same student on labels alone: {labels.score:.4f})"


def check_settings(settings: DistillSettings) -> None:
    if (settings.student is None) == (settings.student_width is None):
        raise UsageError("pass exactly one of --student (a .keras file) and --student-width (e.g. 0.5)")
    width = settings.student_width
    if width is not None and not 0 < width < 1:
        raise UsageError(f"--student-width must be between 0 and 1 (exclusive), got {width}; 0.5 halves every layer")
    if not settings.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {settings.temperature}; 2 to 5 is usual")
    if not 0 <= settings.alpha <= 1:
        raise UsageError(
            f"--alpha must be between 0 and 1, got {settings.alpha}; it weighs the label loss against the teacher's"
        )
    if settings.train.loss:
        raise UsageError(
            "distillation chooses its label loss itself (cross-entropy on class scores); "
            f"drop the loss '{settings.train.loss}'"
        )


def check_compatible(teacher, student) -> None:
    """Inputs match by position in shape (batch aside) and dtype; outputs in count and shape."""
    for side in ("inputs", "outputs"):
        ours, theirs = getattr(teacher, side), getattr(student, side)
        if len(ours) != len(theirs):
            raise UsageError(
                f"the student has {len(theirs)} {side} but the teacher has {len(ours)}; "
                "give the student the teacher's inputs and outputs"
            )
        for t, s in zip(ours, theirs):
            same_dtype = side == "outputs" or t.dtype == s.dtype
            if tuple(t.shape[1:]) != tuple(s.shape[1:]) or not same_dtype:
                raise UsageError(
                    f"student {side[:-1]} '{s.name}' is {s.dtype} {tuple(s.shape[1:])} but the teacher's "
                    f"'{t.name}' is {t.dtype} {tuple(t.shape[1:])}; give the student the teacher's inputs and outputs"
                )


def load_student(path, teacher):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"student model not found: {path}; pass a Keras 3 .keras file to --student")
    student = load_keras(path).model
    check_compatible(teacher, student)
    return student


def make_student(teacher, width: float):
    """The teacher's architecture with every width (filters, units) times ``width``, fresh weights.

    Layers that set an output's size keep it, so the student has the teacher's inputs and outputs.
    """
    import keras

    fixed = _output_width_layers(teacher)
    narrowed = []

    def clone(layer):
        config = layer.get_config()
        if id(layer) not in fixed:
            for key in WIDTH_KEYS:
                if isinstance(config.get(key), int):
                    config[key] = max(1, round(config[key] * width))
                    narrowed.append(layer.name)
        return layer.__class__.from_config(config)

    try:
        student = keras.models.clone_model(teacher, clone_function=clone, recursive=True)
    except Exception as exc:  # Keras raises many kinds when a narrowed graph no longer fits together
        raise UsageError(
            f"cannot narrow the teacher's layers by {width} ({first_line(exc)}); pass --student with a smaller model"
        ) from exc
    if not narrowed:
        raise UsageError("the teacher has no layer with filters or units to narrow; pass --student with a smaller model")
    try:
        check_compatible(teacher, student)
    except UsageError as exc:
        raise UsageError(f"narrowing the teacher changed its outputs ({exc}); pass --student with a smaller model") from exc
    return student


def _output_width_layers(model) -> set:
    """ids of the layers whose width sets an output's size: the last layers with filters/units on the
    way back from each output (Dense before a Softmax, Conv before a Flatten), inside nested models too."""
    import keras

    # Keras keeps the graph on the symbolic tensors (_keras_history) and layers (_inbound_nodes)
    fixed, seen = set(), set()
    stack = [t._keras_history.operation for t in model.outputs]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.Model):
            stack.extend(t._keras_history.operation for t in layer.outputs)
        elif any(isinstance(layer.get_config().get(k), int) for k in WIDTH_KEYS):
            fixed.add(id(layer))
        else:
            stack.extend(t._keras_history.operation for node in layer._inbound_nodes for t in node.input_tensors)
    return fixed


def distill(teacher, train_ds: Dataset, eval_ds: Dataset, settings: DistillSettings,
            on_epoch: Optional[EpochHook] = None) -> DistillResult:
    """Train the student on ``train_ds`` against the frozen teacher; keep its best epoch on ``eval_ds``.

    With ``settings.baseline`` the same student is then trained on the labels alone, and the one of
    the two that scores higher on ``eval_ds`` is returned (the distilled one on a tie).
    ``on_epoch(epoch, epochs, eval_score)`` runs after each epoch of both runs, numbered on from
    one run to the next. The teacher is left as it was.
    """
    import keras

    check_settings(settings)
    train = settings.train
    with deterministic(train.seed):  # before the student is built: its fresh weights are seeded too
        student = _new_student(teacher, settings)
        kind, task = _check_data(teacher, student, train_ds, eval_ds)
        student_eval = _for_student(eval_ds, teacher, student)
        progress = _Progress(on_epoch, train.epochs * (2 if settings.baseline else 1))
        runs = {"distilled": _train_distilled(teacher, student, train_ds, student_eval, kind, task, settings,
                                              progress)}
        students = {"distilled": student}
        if settings.baseline:
            keras.utils.set_random_seed(train.seed)  # so it starts from the distilled student's initial weights
            students["labels"] = _new_student(teacher, settings)
            runs["labels"] = _train_on_labels(students["labels"], _for_student(train_ds, teacher, student),
                                              student_eval, kind, task, train, progress)
        kept = "labels" if "labels" in runs and runs["labels"].score > runs["distilled"].score else "distilled"
        result = DistillResult(
            student=students[kept],
            teacher_params=count_params(teacher),
            student_params=count_params(students[kept]),
            teacher_score=score(teacher, eval_ds),
            student_score=runs[kept].score,
            kept=kept,
            runs=runs,
        )
    (log.warning if kept == "labels" else log.info)("distill: %s", result.summary())
    return result


def _new_student(teacher, settings: DistillSettings):
    if settings.student is not None:
        return load_student(settings.student, teacher)
    return make_student(teacher, settings.student_width)


class _Progress:
    """Numbers the epochs of consecutive runs on from each other for ``on_epoch``."""

    def __init__(self, on_epoch: Optional[EpochHook], epochs: int):
        self.on_epoch, self.epochs, self.done = on_epoch, epochs, 0

    def hook(self) -> Optional[EpochHook]:
        if self.on_epoch is None:
            return None
        start = self.done
        return lambda epoch, _, value: self.on_epoch(start + epoch, self.epochs, value)

    def finished(self, keeper: KeepBest) -> None:
        self.done += len(keeper.history)


def _train_distilled(teacher, student, train_ds: Dataset, student_eval: Dataset, kind: str, task: str,
                     settings: DistillSettings, progress: _Progress) -> TrainingRun:
    train = settings.train
    # the callback's model is the Distiller; KeepBest keeps and restores the student's weights only
    keeper = KeepBest(student, lambda: score(student, student_eval), train.patience,
                      on_epoch=progress.hook(), epochs=train.epochs)
    with _restored_trainable(teacher):
        distiller = _distiller(teacher, student, kind == "probabilities", task, settings)
        fit = distiller.fit(
            _positional(keras_x(teacher, train_ds)), train_ds.labels, epochs=train.epochs,
            batch_size=train.batch_size, shuffle=True, verbose=0, callbacks=[keeper.callback()],
        )
    return _finished(keeper, student_eval, fit.history, progress)


def _train_on_labels(student, train_ds: Dataset, student_eval: Dataset, kind: str, task: str,
                     train: TrainSettings, progress: _Progress) -> TrainingRun:
    """The student as anyone would train it without a teacher: Adam, the label loss, the same epochs."""
    import keras

    # a view, so the student itself stays uncompiled like the distilled one (no optimizer state saved)
    view = _training_view(student, log_probs=False)
    view.compile(optimizer=keras.optimizers.Adam(train.learning_rate), loss=loss_for(task, kind))
    keeper = KeepBest(student, lambda: score(student, student_eval), train.patience,
                      on_epoch=progress.hook(), epochs=train.epochs)
    fit = view.fit(_positional(keras_x(student, train_ds)), train_ds.labels, epochs=train.epochs,
                   batch_size=train.batch_size, shuffle=True, verbose=0, callbacks=[keeper.callback()])
    return _finished(keeper, student_eval, fit.history, progress)


def _finished(keeper: KeepBest, student_eval: Dataset, history: dict, progress: _Progress) -> TrainingRun:
    keeper.restore()
    progress.finished(keeper)
    return TrainingRun(score=score(keeper.model, student_eval), epochs_run=len(keeper.history),
                       best_epoch=keeper.best_epoch + 1, history={"eval_score": keeper.history, **history})


def _distiller(teacher, student, log_probs: bool, task: str, settings: DistillSettings):
    import keras

    # the loss as an instance: given as the string "kl_divergence" (LogitsDistillation's default),
    # keras.losses.get returns the plain function, which LogitsDistillation does not recognise as KL, so
    # it skips the tempered softmax and T**2 and takes the KL of the raw scores clipped to [1e-7, 1]:
    # noise for logits, exactly 0 for log-probabilities (all below 0), i.e. no teacher at all
    distiller = keras.distillation.Distiller(
        teacher=_training_view(teacher, log_probs),
        student=_training_view(student, log_probs),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=settings.temperature, loss=keras.losses.KLDivergence()),
        student_loss_weight=settings.alpha,  # Keras weighs the distillation loss by 1 - this
    )
    # the views output logits (or log-probabilities), so the label loss takes them as logits
    distiller.compile(optimizer=keras.optimizers.Adam(settings.train.learning_rate), loss=loss_for(task, "logits"))
    return distiller


def _check_data(teacher, student, train_ds: Dataset, eval_ds: Dataset):
    """Return the teacher's output kind and the label task; refuse what logits distillation can't train."""
    if len(teacher.outputs) != 1:
        raise UsageError(f"distillation needs a model with one output (class scores); this one has {len(teacher.outputs)}")
    labels = require_labels(train_ds, "training")
    require_labels(eval_ds, "evaluation")
    y_pred = first_output(teacher, keras_x(teacher, train_ds))
    kind = output_kind(y_pred)
    task = None if kind == "regression" else check_labels_fit(labels, y_pred, "training")
    if kind == "regression" or (task == "onehot" and output_kind(labels.astype("float32")) != "probabilities"):
        raise UsageError(
            "distillation matches class scores, but the teacher's output is a regression "
            f"(shape {y_pred.shape[1:]}, labels {labels.shape[1:]}); use it on a classifier"
        )
    check_labels_fit(eval_ds.labels, first_output(teacher, keras_x(teacher, eval_ds)), "evaluation")
    student_kind = output_kind(first_output(student, keras_x(student, _for_student(eval_ds.head(32), teacher, student))))
    if student_kind != kind:
        raise UsageError(
            f"the teacher outputs {kind} but the student outputs {student_kind}; "
            "give the student the teacher's final activation"
        )
    return kind, task


def _for_student(ds: Dataset, teacher, student) -> Dataset:
    """The data under the student's input names (inputs correspond by position)."""
    renames = zip(_keras_input_names(teacher)[0], _keras_input_names(student)[0])
    return Dataset({s: ds.inputs[t] for t, s in renames}, ds.labels, ds.provenance, ds.whole)


def _positional(x):
    """keras_x's array, list or dict (in input order) as the training views take it."""
    return list(x.values()) if isinstance(x, dict) else x


def _training_view(model, log_probs: bool):
    """``model`` on positional inputs, its output as class logits: the log of a softmax output.

    Teacher and student may name (or structure) their inputs differently; both views take the same x.
    """
    import keras

    names, style = _keras_input_names(model)
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
    if style == "dict":
        out = model(dict(zip(names, inputs)))
    else:
        out = model(inputs if len(inputs) > 1 else inputs[0])
    out = keras.tree.flatten(out)[0]
    if log_probs:
        out = keras.layers.Lambda(lambda p: keras.ops.log(keras.ops.maximum(p, LOG_FLOOR)))(out)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], out)


@contextmanager
def _restored_trainable(model):
    """Distiller sets the teacher's trainable flags to False for good; put them back afterwards."""
    flags = [(layer, layer.trainable) for layer in model._flatten_layers()]
    try:
        yield
    finally:
        for layer, trainable in flags:
            layer.trainable = trainable
