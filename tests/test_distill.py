"""Distillation of the digits CNN into a half-width student with keras.distillation.

The digits teacher outputs probabilities (a softmax); ``logits_teacher`` is the same network with
that softmax dropped, so both kinds of teacher are distilled.
"""
from dataclasses import replace

import keras
import numpy as np
import pytest

from edgeml.core.data import Dataset, load_data
from edgeml.core.errors import DataError, InputError, UsageError
from edgeml.optimizer.training.distill import DistillSettings, _distiller, distill, make_student
from edgeml.optimizer.training.keras_train import KeepBest, TrainSettings, count_params, output_kind, score

# what the product should default to: reaches the teacher on digits in ~15 epochs
TRAIN = TrainSettings(epochs=30, batch_size=64, learning_rate=2e-3, patience=5)
SHORT = replace(TRAIN, epochs=5)  # enough to tell a teacher that helps from one that hurts, in seconds


@pytest.fixture(scope="module")
def teacher(digits_dir):
    return keras.saving.load_model(digits_dir / "digits.keras")


@pytest.fixture(scope="module")
def data(digits_dir):
    return load_data(str(digits_dir / "train.npz")), load_data(str(digits_dir / "eval.npz"))


@pytest.fixture(scope="module")
def distilled(teacher, data):
    weights = [w.copy() for w in teacher.get_weights()]
    flags = [layer.trainable for layer in teacher._flatten_layers()]
    epochs = []
    settings = DistillSettings(student_width=0.5, train=TRAIN, baseline=False)  # the distilled student alone
    result = distill(teacher, *data, settings, on_epoch=lambda *a: epochs.append(a))
    same_weights = all(np.array_equal(a, b) for a, b in zip(weights, teacher.get_weights()))
    teacher_untouched = same_weights and flags == [layer.trainable for layer in teacher._flatten_layers()]
    return result, epochs, teacher_untouched


def _classifier(input_shape=(8, 8, 1), classes=10, name="image"):
    inputs = keras.Input(input_shape, name=name)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def test_make_student_halves_the_widths_with_fresh_weights(teacher, data):
    student = make_student(teacher, 0.5)
    assert [t.shape for t in student.inputs] == [t.shape for t in teacher.inputs]
    assert [t.shape for t in student.outputs] == [t.shape for t in teacher.outputs]
    assert count_params(student) <= 0.3 * count_params(teacher)
    probs = student.predict(data[1].inputs["image"], verbose=0)
    assert output_kind(probs) == "probabilities" and score(student, data[1]) < 0.5  # untrained


def test_make_student_keeps_the_layer_that_sizes_the_output_and_refuses_what_cannot_narrow():
    layers = [keras.Input((4,)), keras.layers.Dense(32), keras.layers.Dense(3), keras.layers.Activation("softmax")]
    seq = keras.Sequential(layers)
    assert [layer.get_config().get("units") for layer in make_student(seq, 0.5).layers] == [16, 3, None]
    inputs = keras.Input((4,))
    x = keras.layers.Reshape((8, 8))(keras.layers.Dense(64)(inputs))
    fixed_reshape = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    with pytest.raises(UsageError, match="--student"):
        make_student(fixed_reshape, 0.5)


def test_distilled_half_width_student_is_within_two_points_of_the_teacher(distilled):
    result, epochs, teacher_untouched = distilled
    assert result.student_params <= 0.3 * result.teacher_params
    assert result.student_score >= result.teacher_score - 0.02
    assert result.kept == "distilled" and list(result.runs) == ["distilled"]
    assert result.student_score == max(result.history["eval_score"])
    assert len(epochs) == result.epochs_run == len(result.history["eval_score"])
    assert epochs[0] == (1, TRAIN.epochs, result.history["eval_score"][0])
    assert 1 <= result.best_epoch <= result.epochs_run
    assert teacher_untouched


def test_distilled_student_reloads_without_custom_objects(distilled, teacher, data, tmp_path):
    student = distilled[0].student
    student.save(tmp_path / "student.keras")
    reloaded = keras.saving.load_model(tmp_path / "student.keras")
    x = data[1].inputs["image"][:64]
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-6)
    assert output_kind(reloaded.predict(x, verbose=0)) == "probabilities"
    assert [t.name for t in reloaded.inputs] == [t.name for t in teacher.inputs]


@pytest.fixture(scope="module")
def logits_teacher(teacher):
    """The digits teacher without its final softmax: the same predictions, as class scores."""
    last = teacher.layers[-1]
    scores = keras.layers.Dense.from_config({**last.get_config(), "activation": "linear", "name": "scores"})
    model = keras.Model(teacher.inputs, scores(teacher.layers[-2].output))
    scores.set_weights(last.get_weights())
    return model


@pytest.fixture(scope="module")
def from_logits(logits_teacher, data):
    return distill(logits_teacher, *data, DistillSettings(student_width=0.5, train=SHORT))


def _labels_only(teacher, data, train: TrainSettings) -> float:
    """The half-width student trained on the labels alone, as one would without a teacher: its eval score."""
    from edgeml.optimizer.training.keras_train import deterministic

    train_ds, eval_ds = data
    with deterministic(train.seed):
        student = make_student(teacher, 0.5)
        logits = output_kind(student.predict(eval_ds.inputs["image"][:8], verbose=0)) == "logits"
        student.compile(optimizer=keras.optimizers.Adam(train.learning_rate),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
        keeper = KeepBest(student, lambda: score(student, eval_ds), train.patience)
        student.fit(train_ds.inputs["image"], train_ds.labels, epochs=train.epochs, batch_size=train.batch_size,
                    shuffle=True, verbose=0, callbacks=[keeper.callback()])
        keeper.restore()
        return score(student, eval_ds)


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_the_distillation_loss_is_the_tempered_kl_divergence(kind, teacher, logits_teacher, data):
    """T**2 * KL(softmax(t / T) || softmax(s / T)) on the class scores (log-probabilities of a softmax)."""
    source = logits_teacher if kind == "logits" else teacher
    own = keras.models.clone_model(source)  # the Distiller freezes its teacher; keep the fixtures trainable
    own.set_weights(source.get_weights())
    keras.utils.set_random_seed(0)
    student = make_student(own, 0.5)
    x, y = data[0].inputs["image"][:128], data[0].labels[:128]
    t, s = (m.predict(x, verbose=0).astype(np.float64) for m in (own, student))
    assert output_kind(t) == kind
    if kind == "probabilities":
        t, s = np.log(t), np.log(s)
    temperature = 4.0

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    expected = temperature**2 * np.mean(np.sum(np.exp(log_softmax(t)) * (log_softmax(t) - log_softmax(s)), -1))
    settings = DistillSettings(student_width=0.5, temperature=temperature, alpha=0.0)  # the teacher's term only
    distiller = _distiller(own, student, kind == "probabilities", "classes", settings)
    loss = float(distiller.compute_loss(x=x, y=y, y_pred=distiller(x)))
    assert expected > 1.0  # an untrained student is far from the teacher
    assert loss == pytest.approx(expected, rel=1e-3)


def test_from_a_logits_teacher_the_student_is_at_least_as_good_as_on_labels_alone(from_logits, logits_teacher, data):
    alone = _labels_only(logits_teacher, data, SHORT)
    result = from_logits
    assert result.student_score >= alone
    assert result.runs["labels"].score == alone  # the stage trained that same student itself, same seed
    distilled = result.runs["distilled"].score
    assert result.kept == ("labels" if alone > distilled else "distilled")
    assert result.details() == {"kept": result.kept, "distilled_score": distilled, "labels_only_score": alone}
    assert f"{distilled:.4f}" in result.summary() and f"{alone:.4f}" in result.summary()
    assert result.epochs_run <= SHORT.epochs and result.history is result.runs[result.kept].history


def test_from_a_softmax_teacher_the_student_is_at_least_as_good_as_on_labels_alone(teacher, data):
    epochs = []
    result = distill(teacher, *data, DistillSettings(student_width=0.5, train=SHORT),
                     on_epoch=lambda *a: epochs.append(a))
    alone = _labels_only(teacher, data, SHORT)
    assert result.student_score >= alone
    assert result.runs["labels"].score == alone
    assert output_kind(result.student.predict(data[1].inputs["image"][:8], verbose=0)) == "probabilities"
    # both runs report their epochs, numbered on from one to the next
    ran = sum(run.epochs_run for run in result.runs.values())
    assert [e[:2] for e in epochs] == [(i + 1, 2 * SHORT.epochs) for i in range(ran)]


def test_the_same_seed_gives_the_same_student_with_op_determinism(from_logits, logits_teacher, data):
    from tensorflow.python.framework import config as tf_config

    before, during = tf_config.is_op_determinism_enabled(), []
    again = distill(logits_teacher, *data, DistillSettings(student_width=0.5, train=SHORT),
                    on_epoch=lambda *a: during.append(tf_config.is_op_determinism_enabled()))
    assert during and all(during)  # every epoch ran with TensorFlow's op determinism
    assert tf_config.is_op_determinism_enabled() == before  # and the process got its previous state back
    x = data[1].inputs["image"]
    np.testing.assert_array_equal(again.student.predict(x, verbose=0), from_logits.student.predict(x, verbose=0))
    assert all(np.array_equal(a, b) for a, b in zip(again.student.get_weights(), from_logits.student.get_weights()))
    assert again.kept == from_logits.kept and again.details() == from_logits.details()


def test_a_user_student_is_trained_with_inputs_matched_by_position(teacher, data, tmp_path):
    _classifier(name="pixels").save(tmp_path / "mine.keras")
    settings = DistillSettings(student=tmp_path / "mine.keras", train=replace(TRAIN, epochs=3))
    result = distill(teacher, *data, settings)
    assert result.epochs_run == 3 and result.student.inputs[0].name == "pixels"
    assert result.student_score > 0.5


@pytest.fixture
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        pytest.fail("training started before the input was checked")

    monkeypatch.setattr(keras.Model, "fit", fit)


def _saved(model, tmp_path):
    model.save(tmp_path / "student.keras")
    return tmp_path / "student.keras"


@pytest.mark.parametrize("change, match", [
    (dict(student="x.keras", student_width=0.5), "exactly one"),
    (dict(student_width=None), "exactly one"),
    (dict(student_width=0.0), "between 0 and 1"),
    (dict(student_width=1.5), "between 0 and 1"),
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
])
def test_bad_settings_are_refused_before_training(change, match, teacher, data, no_training):
    with pytest.raises(UsageError, match=match):
        distill(teacher, *data, replace(DistillSettings(student_width=0.5), **change))


@pytest.mark.parametrize("student, match", [
    (dict(input_shape=(8, 8, 3)), r"input .*\(8, 8, 3\).*\(8, 8, 1\)"),
    (dict(classes=5), r"output .*\(5,\).*\(10,\)"),
])
def test_incompatible_students_are_refused_before_training(student, match, teacher, data, tmp_path, no_training):
    with pytest.raises(UsageError, match=match):
        distill(teacher, *data, DistillSettings(student=_saved(_classifier(**student), tmp_path)))


def test_a_regression_teacher_is_refused_before_training(no_training):
    inputs = keras.Input((4,), name="x")
    teacher = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(8)(inputs)))
    ds = Dataset({"x": np.ones((16, 4), np.float32)}, np.linspace(0, 1, 16, dtype=np.float32)[:, None])
    with pytest.raises(UsageError, match="regression"):
        distill(teacher, ds, ds, DistillSettings(student_width=0.5))


def test_training_data_without_labels_is_refused_before_training(teacher, data, no_training):
    unlabeled = Dataset(data[0].inputs)
    with pytest.raises(DataError, match="no labels"):
        distill(teacher, unlabeled, data[1], DistillSettings(student_width=0.5))


def test_an_unreadable_student_file_is_refused_before_training(teacher, data, tmp_path, no_training):
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    for path in (tmp_path / "broken.keras", tmp_path / "missing.keras"):
        with pytest.raises(InputError):
            distill(teacher, *data, DistillSettings(student=path))
