"""Magnitude pruning for Keras 3: fine-tune under masks, return the same architecture with real zeros.

tensorflow-model-optimization only works with Keras 2, so this re-implements the part of its
``prune_low_magnitude`` we need: every prunable kernel gets a mask that zeroes its smallest
weights, raised along a schedule during fine-tuning and re-applied after every batch, optionally
N:M structured (at most N nonzeros in each group of M along the input channels, the pattern that
sparse tensor cores and some NPUs run faster). There are no wrapper layers: the result saves and
converts exactly like the model it came from, its pruned weights stored as zeros.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgeml.core.data import Dataset
from edgeml.core.errors import DataError, UsageError, first_line

from .keras_train import (
    EpochHook,
    KeepBest,
    TrainSettings,
    check_labels_fit,
    count_nonzero,
    count_params,
    first_output,
    keras_x,
    loss_for,
    output_kind,
    require_labels,
    score,
)

SCHEDULES = ("constant", "polynomial")
UPDATES_PER_EPOCH = 4  # mask updates per epoch when settings.frequency is 0
COUNT_SLACK = 1e-6  # so 0.5 of 4096 weights counts 2048 even when the float product lands a hair below


@dataclass
class PruneSettings:
    sparsity: Optional[float] = None  # target fraction of zeros per prunable kernel, in [0, 1)
    schedule: str = "polynomial"  # "constant" | "polynomial"
    structured: Optional[str] = None  # "N:M", e.g. "2:4": at most N nonzeros in each group of M
    layers: Dict[str, float] = field(default_factory=dict)  # per-layer targets by layer name; 0 leaves a layer dense
    ramp: float = 0.6  # polynomial: fraction of the training steps over which sparsity ramps up
    frequency: int = 0  # steps between mask updates; 0 = about 4 per epoch
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class LayerPlan:
    """One prunable layer: its weight and what it is pruned to."""

    name: str  # the layer's name, as in PruneSettings.layers
    path: str  # the pruned weight's path, e.g. "dense/kernel"
    target: float  # final fraction of zeros; 0 leaves the layer as it is
    n_m: Optional[Tuple[int, int]]  # (N, M) when the layer is N:M structured
    shape: Tuple[int, ...]
    axis: Optional[int]  # the reduction (input-channel) axis N:M groups run along; None for Embedding


@dataclass
class PruneResult:
    model: object  # keras.Model: the input's layers (no wrappers) and compile config, with real zeros
    layers: Dict[str, dict]  # sparsity_by_layer of the result
    target: Dict[str, float]  # layer -> final sparsity asked for
    structured: Optional[str]
    epochs_run: int
    best_epoch: int  # 1-based, like on_epoch's epoch; the model holds this epoch's weights
    score_before: float  # keras_train.score on eval
    score_after: float
    history: dict  # per epoch: eval_score, sparsity (zeros over the pruned kernels) and Keras' losses
    params: int
    nonzero_params: int


def parse_structured(text: str) -> Tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise UsageError(
            f"structured sparsity {text!r} is not N:M; write it like 2:4 (at most 2 nonzeros in each group of 4)"
        ) from None
    if not 0 < n < m:
        raise UsageError(f"structured sparsity {text!r} needs 0 < N < M; 2:4 keeps 2 weights in every 4")
    return n, m


def polynomial_sparsity(step, total_ramp_steps, final, initial=0.0, power=3) -> float:
    """TF-MOT's PolynomialDecay: ``initial`` at step 0 to ``final`` at ``total_ramp_steps``, then held.

    It prunes fast while many small weights are left and slowly near the end, when each one hurts.
    """
    if total_ramp_steps <= 0:
        return float(final)
    progress = min(1.0, max(0.0, step / total_ramp_steps))
    return float(final + (initial - final) * (1.0 - progress) ** power)


def plan(model, settings: PruneSettings) -> List[LayerPlan]:
    """Every prunable layer with its target; refuses settings that cannot work on ``model``."""
    _check_settings(settings)
    outputs = getattr(model, "outputs", None)  # subclassed models have no graph to copy
    if outputs is None:
        raise UsageError(f"pruning needs a Functional or Sequential Keras model, not the subclassed "
                         f"{type(model).__name__}; build it as keras.Model(inputs, outputs)")
    if len(outputs) != 1:
        raise UsageError(f"pruning fine-tunes against one set of labels, so it needs a model with one output; "
                         f"this one has {len(outputs)}")
    n_m = parse_structured(settings.structured) if settings.structured else None
    found = _prunable(model)
    if not found:
        raise UsageError(
            "the model has no layer to prune (Dense, Conv1D/2D/3D, Conv*Transpose, SeparableConv, Embedding); "
            "drop the prune stage"
        )
    names = [layer.name for layer, _, _ in found]
    unknown = sorted(set(settings.layers) - set(names))
    if unknown:
        raise UsageError(f"no prunable layer is named {', '.join(map(repr, unknown))}; the prunable layers are "
                         f"{', '.join(names)}")
    default = _default_target(settings, n_m)
    plans = []
    for layer, weight, axis in found:
        target = float(settings.layers.get(layer.name, default))
        structure = n_m if n_m and target > 0 else None
        if structure:
            target = _structured_target(layer.name, target, n_m, tuple(weight.shape), axis)
        plans.append(LayerPlan(layer.name, weight.path, target, structure, tuple(weight.shape), axis))
    if not any(p.target > 0 for p in plans):
        raise UsageError("nothing to prune: every layer's target is 0; set a sparsity (e.g. 0.75), "
                         "a structured N:M pattern or a per-layer target above 0")
    return plans


def prune(model, train_ds: Dataset, eval_ds: Dataset, settings: PruneSettings,
          on_epoch: Optional[EpochHook] = None) -> PruneResult:
    """Fine-tune a copy of ``model`` under magnitude masks; ``model`` itself is left as it was."""
    import keras

    plans = plan(model, settings)
    task, kind = _check_data(model, train_ds, eval_ds)
    train = settings.train
    work = _copy(model)
    keras.utils.set_random_seed(train.seed)
    work.compile(optimizer=keras.optimizers.Adam(train.learning_rate), loss=loss_for(task, kind, train.loss))

    steps_per_epoch = math.ceil(len(train_ds) / train.batch_size)
    total = steps_per_epoch * train.epochs
    ramp_steps = 0 if settings.schedule == "constant" else min(total - 1, round(settings.ramp * total))
    masks = _Masks(work, plans, ramp_steps, settings.frequency or max(1, steps_per_epoch // UPDATES_PER_EPOCH))
    keeper = KeepBest(work, lambda: score(work, eval_ds), train.patience,
                      eligible=lambda epoch: masks.at_final, on_epoch=on_epoch, epochs=train.epochs)
    fit = work.fit(keras_x(work, train_ds), train_ds.labels, epochs=train.epochs, batch_size=train.batch_size,
                   shuffle=True, verbose=0, callbacks=[masks.callback(), keeper.callback()])
    keeper.restore()
    masks.finish()  # "strip": the final masks, recomputed on the restored weights, applied for good

    result = _copy(model)  # compiled as the caller's was, with fresh optimizer state, not this run's
    result.set_weights(work.get_weights())
    return PruneResult(
        model=result,
        layers=sparsity_by_layer(result),
        target={p.name: p.target for p in plans},
        structured=settings.structured,
        epochs_run=len(keeper.history),
        best_epoch=keeper.best_epoch + 1,
        score_before=score(model, eval_ds),
        score_after=score(result, eval_ds),
        history={"eval_score": keeper.history, "sparsity": masks.epoch_sparsity, **fit.history},
        params=count_params(result),
        nonzero_params=count_nonzero(result),
    )


def sparsity_by_layer(model) -> Dict[str, dict]:
    """Zeros in each prunable layer's pruned weight: ``{layer: {"weights", "zeros", "sparsity"}}``."""
    out = {}
    for layer, weight, _ in _prunable(model):
        values = np.asarray(weight)
        zeros = int(values.size - np.count_nonzero(values))
        out[layer.name] = {"weights": int(values.size), "zeros": zeros, "sparsity": zeros / values.size}
    return out


def _kinds():
    """(layer classes, name of the weight pruned, its reduction axis) for the layers we prune.

    DepthwiseConv2D is left out: each of its filters has only kernel-size weights (9 for 3x3) and
    holds a small share of a model's parameters, so zeroing some saves little and costs accuracy,
    and sparse inference kernels (XNNPACK's) speed up 1x1 convolutions and matrix products only.
    """
    import keras

    L = keras.layers
    return (
        ((L.Dense,), "kernel", 0),  # (inputs, units)
        ((L.Conv1D, L.Conv2D, L.Conv3D), "kernel", -2),  # (*window, inputs, filters)
        ((L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose), "kernel", -1),  # (*window, filters, inputs)
        ((L.SeparableConv1D, L.SeparableConv2D), "pointwise_kernel", -2),  # the 1x1 half; the depthwise half is left, see above
        ((L.Embedding,), "embeddings", None),  # a lookup table: nothing is summed over
    )


def _prunable(model) -> list:
    """``(layer, weight, reduction axis)`` of every prunable layer, nested models included, in weight order."""
    kinds = _kinds()
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # Keras 3's walk into nested models
        for classes, weight_name, axis in kinds:
            if isinstance(layer, classes):
                weight = next((w for w in layer.weights if w.name == weight_name), None)
                if weight is not None:  # an unbuilt layer has no weights yet
                    found.append((layer, weight, None if axis is None else axis % len(weight.shape)))
                break
    order = {id(w): i for i, w in enumerate(model.weights)}
    found.sort(key=lambda item: order[id(item[1])])
    names = [layer.name for layer, _, _ in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"several prunable layers are named {', '.join(map(repr, twice))} (in nested models); "
                         "give them unique names so each can have its own target")
    return found


def _check_settings(settings: PruneSettings) -> None:
    if settings.sparsity is not None:
        _check_fraction(settings.sparsity, "sparsity")
    for name, value in settings.layers.items():
        _check_fraction(value, f"the sparsity for layer {name!r}")
    if settings.schedule not in SCHEDULES:
        raise UsageError(f"unknown prune schedule {settings.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0.0 < settings.ramp <= 1.0:
        raise UsageError(f"prune ramp must be in (0, 1] (the share of training spent ramping up), got {settings.ramp}")
    if not isinstance(settings.frequency, int) or settings.frequency < 0:
        raise UsageError(f"prune frequency must be 0 (automatic) or a number of steps, got {settings.frequency!r}")
    for key in ("epochs", "batch_size"):
        if getattr(settings.train, key) < 1:
            raise UsageError(f"prune {key} must be at least 1, got {getattr(settings.train, key)}")


def _check_fraction(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UsageError(f"{what} must be a fraction of zeros in [0, 1) (0.75 zeroes three weights in four), "
                         f"got {value!r}")


def _default_target(settings: PruneSettings, n_m) -> float:
    """The target of layers without their own: the global sparsity, else what N:M alone gives, else 0."""
    if settings.sparsity is not None:
        if n_m and settings.sparsity < 1 - n_m[0] / n_m[1] - 1e-9:
            raise UsageError(f"sparsity {settings.sparsity} is below what {settings.structured} already gives "
                             f"({1 - n_m[0] / n_m[1]:g}); ask for at least that, or leave sparsity unset")
        return float(settings.sparsity)
    return 1 - n_m[0] / n_m[1] if n_m else 0.0


def _structured_target(name: str, target: float, n_m, shape, axis) -> float:
    """Check that ``name``'s weight can be N:M sparse at ``target``; return the target."""
    n, m = n_m
    base = 1 - n / m
    exclude = f"exclude it with a per-layer target of 0 (--layer-sparsity {name}=0, or {name} = 0 in [prune.layers])"
    if axis is None:
        raise UsageError(f"layer {name!r} is an Embedding: N:M sparsity speeds up sums over input channels and "
                         f"a lookup has none; {exclude}")
    if shape[axis] % m:
        raise UsageError(f"layer {name!r} has {shape[axis]} input channels, not a multiple of {m}, so it cannot "
                         f"be {n}:{m} sparse; {exclude}")
    if target < base - 1e-9:
        raise UsageError(f"the sparsity {target} for layer {name!r} is below what {n}:{m} already gives "
                         f"({base:g}); ask for at least that, or 0 to leave the layer dense")
    return max(target, base)  # a target typed as 0.6667 for 1:3 must not count one zero short


def _check_data(model, train_ds: Dataset, eval_ds: Dataset) -> Tuple[str, str]:
    """Both sets can train and score ``model``; return the label task and output kind for the loss."""
    labels = require_labels(train_ds, "training")
    require_labels(eval_ds, "evaluation")
    for role, ds in (("training", train_ds), ("evaluation", eval_ds)):
        if ds.whole:
            raise DataError(f"{role} data holds whole inputs, one per sample; pruning trains on batches, so "
                            "give arrays whose first axis is the model's batch axis")
    y_pred = first_output(model, keras_x(model, train_ds))
    task = check_labels_fit(labels, y_pred, "training")
    check_labels_fit(eval_ds.labels, first_output(model, keras_x(model, eval_ds)), "evaluation")
    return task, output_kind(y_pred)


def _copy(model):
    """A new model with ``model``'s layers and weights (clone_model compiles it if ``model`` was)."""
    import keras

    try:
        copy = keras.models.clone_model(model)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UsageError(f"cannot copy the model to prune it ({first_line(exc)}); pruning needs a Functional "
                         "or Sequential Keras model") from exc
    copy.set_weights(model.get_weights())
    return copy


def _count(fraction: float, size: int) -> int:
    return int(math.floor(fraction * size + COUNT_SLACK))


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """True at exactly ``k`` of the smallest entries (ties broken arbitrarily)."""
    chosen = np.zeros(values.size, dtype=bool)
    if k > 0:
        chosen[np.argpartition(values, k - 1, axis=None)[:k]] = True
    return chosen.reshape(values.shape)


def _outside_n_m(magnitude: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """True for the weights that are not among the N largest of their group of M along ``axis``."""
    moved = np.moveaxis(magnitude, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (-1, m))
    out = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(out, np.argsort(groups, axis=-1)[..., : m - n], True, axis=-1)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)


def _pruned(weights: np.ndarray, p: LayerPlan, sparsity: float) -> np.ndarray:
    """Which weights are zero at ``sparsity`` (up to p.target): by magnitude, exact counts.

    With N:M, the final set is the N:M zeros plus the smallest survivors up to the target; on the
    way there the smallest of that set go first, so the masks grow into exactly the final one.
    """
    magnitude = np.abs(weights)
    if not p.n_m:
        return _smallest(magnitude, _count(sparsity, magnitude.size))
    structured = _outside_n_m(magnitude, *p.n_m, p.axis)
    more = max(0, _count(p.target, magnitude.size) - int(structured.sum()))
    final = structured | _smallest(np.where(structured, np.inf, magnitude), more)
    return _smallest(np.where(final, magnitude, np.inf), _count(sparsity, magnitude.size))


class _Masks:
    """The masks of the model in training: recomputed on the schedule, applied after every batch."""

    def __init__(self, model, plans: List[LayerPlan], ramp_steps: int, frequency: int):
        weights = {layer.name: weight for layer, weight, _ in _prunable(model)}
        self.layers = [(p, weights[p.name]) for p in plans if p.target > 0]  # a 0 target stays untouched
        self.ramp_steps, self.frequency = ramp_steps, frequency
        self.step = 0
        self.masks = []
        self.at_final = False  # the masks have every layer's final sparsity
        self.epoch_sparsity = []

    def begin_batch(self) -> None:
        # the update at ramp_steps lands the final target even when frequency does not divide it
        if self.step % self.frequency == 0 or self.step == self.ramp_steps:
            self._recompute(self.step)
            self.apply()
        self.step += 1

    def apply(self) -> None:
        for weight, mask in self.masks:
            weight.assign(weight * mask)

    def finish(self) -> None:
        self._recompute(max(self.step, self.ramp_steps))
        self.apply()

    def sparsity(self) -> float:
        values = [np.asarray(weight) for _, weight in self.layers]
        return 1.0 - sum(np.count_nonzero(v) for v in values) / sum(v.size for v in values)

    def callback(self):
        import keras

        masks = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                masks.begin_batch()

            def on_train_batch_end(self, batch, logs=None):
                masks.apply()  # the optimizer just moved the pruned weights off zero

            def on_epoch_end(self, epoch, logs=None):
                masks.epoch_sparsity.append(masks.sparsity())

        return _Callback()

    def _recompute(self, step: int) -> None:
        import keras

        self.masks = []
        for p, weight in self.layers:
            sparsity = polynomial_sparsity(step, self.ramp_steps, p.target)
            keep = ~_pruned(np.asarray(weight), p, sparsity)
            self.masks.append((weight, keras.ops.cast(keep, weight.dtype)))
        self.at_final = step >= self.ramp_steps
