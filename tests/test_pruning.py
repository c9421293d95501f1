"""Magnitude pruning on the digits CNN: schedules, exact zero counts, N:M groups, refusals before training."""
from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edgeml.core.data import Dataset  # noqa: E402
from edgeml.core.errors import DataError, UsageError  # noqa: E402
from edgeml.optimizer.training.keras_train import TrainSettings, score  # noqa: E402
from edgeml.optimizer.training.pruning import (  # noqa: E402
    PruneSettings,
    parse_structured,
    plan,
    polynomial_sparsity,
    prune,
    sparsity_by_layer,
)

QUICK = TrainSettings(epochs=2, batch_size=64)  # for tests that check structure, not accuracy
SMALL_TRAIN = 256  # samples, same reason


def _dataset(path) -> Dataset:
    with np.load(path) as npz:
        return Dataset({"image": npz["image"]}, npz["y"])


@pytest.fixture(scope="module")
def digits(digits_dir):
    """(model, train, eval, names): names maps "conv1", "conv2", "dense", "probs" to the real layer names."""
    model = keras.saving.load_model(digits_dir / "digits.keras")
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    names = {"conv1": convs[0], "conv2": convs[1], "dense": dense[0], "probs": dense[1]}
    return model, _dataset(digits_dir / "train.npz"), _dataset(digits_dir / "eval.npz"), names


@pytest.fixture(scope="module")
def pruned75(digits):
    model, train, eval_ds, _ = digits
    before = [np.array(w) for w in model.get_weights()]
    epochs = []
    settings = PruneSettings(sparsity=0.75, train=TrainSettings(epochs=4, batch_size=64))
    result = prune(model, train, eval_ds, settings, on_epoch=lambda *args: epochs.append(args))
    return result, before, epochs


def _quick(digits, **kwargs):
    model, train, eval_ds, _ = digits
    return prune(model, train.head(SMALL_TRAIN), eval_ds, PruneSettings(train=QUICK, **kwargs))


def _kernels(model) -> dict:
    return {layer.name: np.array(layer.weights[0]) for layer in model.layers if layer.weights}


def test_polynomial_schedule_ramps_cubically_then_holds():
    values = [polynomial_sparsity(step, 100, 0.8) for step in range(151)]
    assert values[0] == 0.0 and values[100] == pytest.approx(0.8) and values[150] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[50] == pytest.approx(0.8 * (1 - 0.5 ** 3))  # TF-MOT's PolynomialDecay, power 3
    assert polynomial_sparsity(5, 0, 0.8) == 0.8  # no ramp: the target from the start


@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_schedule_decides_when_the_target_is_reached(digits, schedule):
    result = _quick(digits, sparsity=0.5, schedule=schedule)
    first, last = result.history["sparsity"][0], result.history["sparsity"][-1]
    assert last == pytest.approx(0.5, abs=1e-4)
    if schedule == "constant":
        assert first == pytest.approx(0.5, abs=1e-4)
    else:
        assert first < 0.5


def test_parse_structured():
    assert parse_structured("2:4") == (2, 4) and parse_structured(" 1:8 ") == (1, 8)
    for bad in ("2-4", "2:4:8", "a:b", "", "4:4", "0:4", "3:2"):
        with pytest.raises(UsageError, match="N:M|0 < N < M"):
            parse_structured(bad)


def test_75_percent_has_exact_zeros_and_keeps_accuracy(digits, pruned75):
    model, _, eval_ds, _ = digits
    result, _, epochs = pruned75
    for name, layer in result.layers.items():
        assert layer["zeros"] >= math.floor(0.75 * layer["weights"]), name
    assert set(result.target) == set(result.layers) and set(result.target.values()) == {0.75}
    assert result.nonzero_params < 0.3 * result.params
    assert result.score_before == score(model, eval_ds)
    assert result.score_after >= result.score_before - 0.01, (result.score_before, result.score_after)
    assert [e[:2] for e in epochs] == [(i + 1, 4) for i in range(result.epochs_run)]
    assert 1 <= result.best_epoch <= result.epochs_run
    for layer in result.model.layers:  # biases are never pruned
        if len(layer.weights) == 2:
            assert np.count_nonzero(np.array(layer.weights[1])) > 0


def test_pruned_model_saves_as_the_plain_architecture(digits, pruned75, tmp_path):
    model = digits[0]
    result = pruned75[0]
    result.model.save(tmp_path / "pruned.keras")
    reloaded = keras.saving.load_model(tmp_path / "pruned.keras")
    assert [(type(layer), layer.name) for layer in reloaded.layers] == \
        [(type(layer), layer.name) for layer in model.layers]
    assert [w.path for w in reloaded.weights] == [w.path for w in model.weights]
    assert sparsity_by_layer(reloaded) == result.layers


def test_caller_model_is_unchanged(digits, pruned75):
    model = digits[0]
    before = pruned75[1]
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    assert pruned75[0].model is not model


def test_per_layer_targets_override_the_global_one(digits):
    model, _, _, names = digits
    result = _quick(digits, sparsity=0.75, layers={names["dense"]: 0.5, names["conv1"]: 0})
    assert result.target == {names["conv1"]: 0.0, names["conv2"]: 0.75, names["dense"]: 0.5, names["probs"]: 0.75}
    assert result.layers[names["dense"]]["zeros"] == math.floor(0.5 * result.layers[names["dense"]]["weights"])
    assert result.layers[names["conv2"]]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    conv1 = model.get_layer(names["conv1"]).weights[0]
    assert result.layers[names["conv1"]]["zeros"] == np.size(conv1) - np.count_nonzero(np.array(conv1))


def _max_nonzero_per_group(kernel: np.ndarray, m: int, axis: int) -> int:
    moved = np.moveaxis(kernel, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (-1, m))
    return int(np.count_nonzero(groups, axis=-1).max())


@pytest.mark.parametrize("sparsity", [None, 0.75])
def test_structured_2_of_4_along_the_input_channels(digits, sparsity):
    names = digits[3]
    result = _quick(digits, structured="2:4", sparsity=sparsity, layers={names["conv1"]: 0})
    kernels = _kernels(result.model)
    expected = 0.5 if sparsity is None else sparsity
    for key, axis in (("conv2", -2), ("dense", 0), ("probs", 0)):
        name = names[key]
        assert _max_nonzero_per_group(kernels[name], 4, axis) <= 2, name
        assert result.layers[name]["zeros"] >= math.floor(expected * kernels[name].size), name
    assert result.layers[names["conv1"]]["zeros"] == 0
    assert result.structured == "2:4"


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(keras.Model, "fit", fail)


BAD_SETTINGS = [
    (lambda n: {"sparsity": 1.0}, "sparsity must be a fraction"),
    (lambda n: {"sparsity": -0.1}, "sparsity must be a fraction"),
    (lambda n: {"sparsity": 0.5, "layers": {n["dense"]: 1.5}}, "layer '.*' must be a fraction"),
    (lambda n: {"sparsity": 0.5, "schedule": "cubic"}, "unknown prune schedule 'cubic'"),
    (lambda n: {"sparsity": 0.5, "ramp": 0.0}, "ramp"),
    (lambda n: {"sparsity": 0.5, "frequency": -1}, "frequency"),
    (lambda n: {"structured": "4:2"}, "0 < N < M"),
    (lambda n: {"structured": "2/4"}, "not N:M"),
    (lambda n: {"structured": "2:4"}, r"has 1 input channels, not a multiple of 4.*per-layer target of 0"),
    (lambda n: {"structured": "2:4", "sparsity": 0.4, "layers": {n["conv1"]: 0}}, r"2:4 already gives \(0.5\)"),
    (lambda n: {"structured": "2:4", "layers": {n["conv1"]: 0, n["dense"]: 0.3}}, r"below what 2:4 already gives"),
    (lambda n: {"sparsity": 0.5, "layers": {"nope": 0.5}}, r"no prunable layer is named 'nope'.*probs"),
    (lambda n: {}, "nothing to prune"),
    (lambda n: {"layers": {n["dense"]: 0}}, "nothing to prune"),
]


@pytest.mark.parametrize("make, message", BAD_SETTINGS)
def test_bad_settings_are_refused_before_training(digits, no_training, make, message):
    model, train, eval_ds, names = digits
    with pytest.raises(UsageError, match=message):
        prune(model, train, eval_ds, PruneSettings(**make(names)))


@pytest.mark.parametrize("role", ["train", "eval"])
def test_data_without_labels_is_refused_before_training(digits, no_training, role):
    model, train, eval_ds, _ = digits
    data = {"train": train, "eval": eval_ds}
    data[role] = Dataset(data[role].inputs)
    with pytest.raises(DataError, match="no labels"):
        prune(model, data["train"], data["eval"], PruneSettings(sparsity=0.5))


def test_model_without_prunable_layers_is_refused(digits, no_training):
    inputs = keras.Input((8, 8, 1), name="image")
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Flatten()(inputs)))
    with pytest.raises(UsageError, match="no layer to prune"):
        prune(model, digits[1], digits[2], PruneSettings(sparsity=0.5))


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_models_it_cannot_train_are_refused():
    inputs = keras.Input((3,))
    two_heads = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(UsageError, match="one output; this one has 2"):
        plan(two_heads, PruneSettings(sparsity=0.5))
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(UsageError, match="Functional or Sequential"):
        plan(subclassed, PruneSettings(sparsity=0.5))


def _zoo():
    """Every prunable kind plus a depthwise conv, in one two-input model."""
    L = keras.layers
    image = keras.Input((8, 8, 4), name="image")
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(image)
    x = L.SeparableConv2D(8, 3, padding="same", name="separable")(x)
    x = L.Conv2DTranspose(4, 3, name="transpose")(x)
    t = L.Embedding(50, 4, name="embedding")(tokens)
    t = L.Conv1D(8, 3, name="conv1d")(t)
    head = keras.Sequential([L.Dense(8, name="inner")], name="nested")  # a model inside the model
    x = L.Concatenate()([L.Flatten()(x), L.Flatten()(t)])
    return keras.Model([image, tokens], L.Dense(2, name="out")(head(x)))


def test_plan_finds_each_kind_and_its_input_axis():
    plans = {p.name: p for p in plan(_zoo(), PruneSettings(sparsity=0.5))}
    assert {name: p.axis for name, p in plans.items()} == {
        "separable": 2, "transpose": 3, "embedding": None, "conv1d": 1, "inner": 0, "out": 0,
    }  # no depthwise: see pruning._kinds
    assert plans["separable"].path.endswith("pointwise_kernel")
    with pytest.raises(UsageError, match="'embedding' is an Embedding.*per-layer target of 0"):
        plan(_zoo(), PruneSettings(structured="2:4"))
    with pytest.raises(UsageError, match="no prunable layer is named 'depthwise'"):
        plan(_zoo(), PruneSettings(sparsity=0.5, layers={"depthwise": 0.5}))


def test_nested_model_is_pruned_inside():
    model = _zoo()
    rng = np.random.default_rng(0)
    x = {"image": rng.random((64, 8, 8, 4), dtype=np.float32), "tokens": rng.integers(0, 50, (64, 6))}
    data = Dataset(x, rng.integers(0, 2, 64))
    result = prune(model, data, data, PruneSettings(sparsity=0.5, train=TrainSettings(epochs=1, batch_size=32)))
    assert result.layers["inner"]["zeros"] == result.layers["inner"]["weights"] // 2
    assert isinstance(result.model.get_layer("nested"), keras.Sequential)
