"""What the training stages (distill, prune) share: Keras-shaped data, the loss, scoring on eval.

A training stage gets its data as edgeml ``Dataset`` objects whose input names are the Keras
model's (``match_inputs`` against the source's inputs did that) and whose labels are required.
Everything here runs on Keras 3 with the TensorFlow backend; import it only on the host.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from edgeml.core.data import Dataset
from edgeml.core.errors import DataError

EpochHook = Callable[[int, int, float], None]  # (epoch, epochs, eval score) -> None


@dataclass
class TrainSettings:
    """How a stage trains: the same knobs for distillation and pruning fine-tuning."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 3  # epochs without a better eval score before stopping
    seed: int = 0
    loss: Optional[str] = None  # a Keras loss name; default: inferred from the labels and outputs


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed Python, NumPy, TensorFlow and Keras with ``seed`` and run TensorFlow's ops deterministically inside.

    Seeds alone leave some kernels free to sum in any order (on GPUs above all), so the same seed could
    give another model; ``tf.config.experimental.enable_op_determinism`` pins them. TensorFlow has no
    public switch back, so the previous state is restored through its internal ``config`` module (when
    that module is missing, determinism stays on for the rest of the process).
    """
    import keras

    from ..sources.tensorflow import import_tensorflow

    tf = import_tensorflow()
    try:
        from tensorflow.python.framework import config as tf_config  # no public getter or off switch
        was_on = tf_config.is_op_determinism_enabled()
    except (ImportError, AttributeError):
        tf_config, was_on = None, True
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def require_labels(ds: Dataset, role: str, spec: str = "") -> np.ndarray:
    """Training needs labels; say so before any epoch runs."""
    if ds.labels is None:
        where = f" {spec}" if spec else ""
        raise DataError(
            f"{role} data{where} has no labels; add the targets as an array named 'y' "
            "(one label per sample) so the model can be trained"
        )
    if len(ds.labels) != len(ds):
        raise DataError(f"{role} data has {len(ds.labels)} labels for {len(ds)} samples; give one label per sample")
    return ds.labels


def keras_x(model, ds: Dataset):
    """The inputs as ``model.fit`` / ``model.predict`` take them (array, list or dict)."""
    from ..sources.tensorflow import _keras_input_names

    names, style = _keras_input_names(model)
    missing = [n for n in names if n not in ds.inputs]
    if missing:
        raise DataError(f"data lacks the model inputs {missing}; it has {sorted(ds.inputs)}")
    if style == "dict":
        return {n: ds.inputs[n] for n in names}
    arrays = [ds.inputs[n] for n in names]
    return arrays[0] if len(arrays) == 1 else arrays


def first_output(model, x, batch_size: int = 256) -> np.ndarray:
    out = model.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(out, dict):
        out = out[sorted(out)[0]]
    elif isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out)


def output_kind(y_pred: np.ndarray) -> str:
    """``probabilities`` (rows of a softmax), ``logits`` (class scores) or ``regression``."""
    if y_pred.dtype.kind != "f" or y_pred.ndim < 2 or y_pred.shape[-1] < 2:
        return "regression"
    sums = y_pred.sum(axis=-1)
    if np.all(y_pred >= -1e-6) and np.all(y_pred <= 1 + 1e-6) and np.allclose(sums, 1.0, atol=1e-3):
        return "probabilities"
    return "logits"


def check_labels_fit(labels: np.ndarray, y_pred: np.ndarray, role: str) -> str:
    """Return the task (``classes``, ``onehot`` or ``regression``); refuse labels that can't train the output."""
    kind = output_kind(y_pred)
    if kind == "regression":
        if labels.shape[1:] != y_pred.shape[1:]:
            raise DataError(
                f"{role} labels have shape {labels.shape[1:]} per sample but the model outputs {y_pred.shape[1:]}; "
                "give targets shaped like the output"
            )
        return "regression"
    classes = y_pred.shape[-1]
    if labels.ndim == y_pred.ndim and labels.shape[-1] == classes and labels.dtype.kind == "f":
        return "onehot"
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
        raise DataError(f"{role} labels must be class indices (integers) for a classifier, got dtype {labels.dtype}")
    if labels.shape[1:] != y_pred.shape[1:-1]:
        raise DataError(
            f"{role} labels have shape {labels.shape[1:]} per sample; a classifier with output "
            f"{y_pred.shape[1:]} needs one class index per sample (shape {y_pred.shape[1:-1]})"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"{role} labels range over {lo}..{hi} but the model has {classes} classes (0..{classes - 1})")
    return "classes"


def loss_for(task: str, kind: str, override: Optional[str] = None):
    import keras

    if override:
        return keras.losses.get(override)
    logits = kind == "logits"
    if task == "classes":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    if task == "onehot":
        return keras.losses.CategoricalCrossentropy(from_logits=logits)
    return keras.losses.MeanSquaredError()


def score(model, ds: Dataset, batch_size: int = 256) -> float:
    """Higher is better: accuracy for classifiers, minus the mean squared error otherwise."""
    labels = ds.labels
    y_pred = first_output(model, keras_x(model, ds), batch_size)
    if output_kind(y_pred) == "regression":
        return -float(np.mean((y_pred - labels) ** 2))
    target = labels.argmax(-1) if labels.ndim == y_pred.ndim else labels
    return float(np.mean(y_pred.argmax(-1) == target))


def count_params(model) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


def count_nonzero(model) -> int:
    return int(sum(int(np.count_nonzero(np.asarray(w))) for w in model.weights))


class KeepBest:
    """Keeps the weights of the best epoch on eval and stops after ``patience`` epochs without one.

    ``eligible(epoch)`` says whether an epoch may count (pruning: only once the final sparsity
    is reached, so a restored model never has fewer zeros than asked for).
    """

    def __init__(self, model, eval_fn: Callable[[], float], patience: int,
                 eligible: Callable[[int], bool] = lambda epoch: True,
                 on_epoch: Optional[EpochHook] = None, epochs: int = 0):
        self.model, self.eval_fn, self.patience = model, eval_fn, patience
        self.eligible, self.on_epoch, self.epochs = eligible, on_epoch, epochs
        self.best_score = -math.inf
        self.best_weights = None
        self.best_epoch = -1
        self.waited = 0
        self.history = []

    def end_epoch(self, epoch: int) -> bool:
        """Record the epoch; return True when training should stop."""
        value = self.eval_fn()
        self.history.append(value)
        if self.on_epoch:
            self.on_epoch(epoch + 1, self.epochs, value)
        if not self.eligible(epoch):
            return False
        if value > self.best_score + 1e-9:
            self.best_score, self.best_epoch, self.waited = value, epoch, 0
            self.best_weights = [np.array(w) for w in self.model.get_weights()]
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def callback(self):
        """A Keras callback that calls ``end_epoch`` and stops training when it says so."""
        import keras

        keeper = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if keeper.end_epoch(epoch):
                    self.model.stop_training = True

        return _Callback()
