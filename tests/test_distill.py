"""Distillation of the digits CNN into a half-width student with keras.distillation."""
from dataclasses import replace

import keras
import numpy as np
import pytest

from edgeml.core.data import Dataset, load_data
from edgeml.core.errors import DataError, InputError, UsageError
from edgeml.optimizer.training.distill import DistillSettings, distill, make_student
from edgeml.optimizer.training.keras_train import TrainSettings, count_params, output_kind, score

# what the product should default to: reaches the teacher on digits in ~15 epochs
TRAIN = TrainSettings(epochs=30, batch_size=64, learning_rate=2e-3, patience=5)


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
    settings = DistillSettings(student_width=0.5, train=TRAIN)
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
