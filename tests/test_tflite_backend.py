"""The Keras/SavedModel source and the TFLite backend, on real models and the real runtimes.

The digits CNN is trained once per module (tests/models.py); every recipe is converted once and
run through edgeml.core.runtime, the LiteRT runner a device uses.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from models import accuracy, train_digits_cnn

from edgeml.core.data import Dataset
from edgeml.core.errors import InputError, UnsupportedModelError, UsageError
from edgeml.core.runtime import load_runner
from edgeml.optimizer.backends import BuildOptions, get_backend
from edgeml.optimizer.sources.base import load_source
from edgeml.optimizer.sources.tensorflow import import_tensorflow, load_keras, load_saved_model

RECIPES = ("fp32", "float16", "dynamic", "int8")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    model, splits = train_digits_cnn(epochs=8, seed=0)
    path = tmp_path_factory.mktemp("digits") / "digits.keras"
    model.save(path)
    return model, splits, path


@pytest.fixture(scope="module")
def source(digits):
    return load_keras(digits[2])


@pytest.fixture(scope="module")
def calibration(digits):
    return Dataset({"image": digits[1]["calibration"][0]})


@pytest.fixture(scope="module")
def candidates(source, calibration):
    backend = get_backend("tflite")
    return {r: backend.build(source, r, calibration, BuildOptions(seed=0)) for r in RECIPES}


@pytest.fixture(scope="module")
def eval_feed(digits):
    x, y = digits[1]["eval"]
    return {"image": x}, y


def test_keras_source_describes_the_model(source, digits):
    assert source.kind == "keras"
    assert source.default_format == "tflite"
    assert len(source.sha256) == 64
    assert [(s.name, s.dtype, s.shape) for s in source.inputs] == [("image", "float32", (None, 8, 8, 1))]
    assert [(s.name, s.dtype, s.shape) for s in source.outputs] == [("output_0", "float32", (None, 10))]


def test_reference_equals_keras_predict(source, digits, eval_feed):
    feed, _ = eval_feed
    ref = source.reference(feed)["output_0"]  # 400 samples: more than one reference batch
    keras_out = digits[0].predict(feed["image"], verbose=0)
    np.testing.assert_allclose(ref, keras_out, atol=1e-5)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_with_the_source_names_and_keeps_accuracy(recipe, candidates, source, eval_feed):
    feed, labels = eval_feed
    cand = candidates[recipe]
    assert (cand.recipe, cand.format) == (recipe, "tflite")
    runner = load_runner(cand.model, "tflite")
    assert [s.name for s in runner.inputs] == [s.name for s in source.inputs]
    assert [s.name for s in runner.outputs] == [s.name for s in source.outputs]
    probs = runner.run(feed)["output_0"]
    float_acc = accuracy(source.reference(feed)["output_0"], labels)
    assert float_acc > 0.9
    assert abs(accuracy(probs, labels) - float_acc) <= 0.01


def test_fp32_equals_the_keras_reference(candidates, source, eval_feed):
    feed, _ = eval_feed
    out = load_runner(candidates["fp32"].model, "tflite").run(feed)["output_0"]
    np.testing.assert_allclose(out, source.reference(feed)["output_0"], atol=1e-5)
    assert candidates["fp32"].details["converter"]["optimizations"] == []


def test_int8_is_a_quarter_of_fp32_with_int8_io(candidates, calibration):
    fp32, int8 = candidates["fp32"], candidates["int8"]
    assert len(int8.model) <= 0.27 * len(fp32.model)
    runner = load_runner(int8.model, "tflite")
    (inp,), (out,) = runner.inputs, runner.outputs
    assert inp.dtype == "int8" and out.dtype == "int8"
    assert inp.scale > 0 and out.scale > 0
    conv = int8.details["converter"]
    assert conv["supported_ops"] == ["TFLITE_BUILTINS_INT8"]
    assert conv["inference_input_type"] == "int8" and conv["calibration_samples"] == len(calibration)
    expected = {"dtype": "int8", "scale": inp.scale, "zero_point": inp.zero_point}
    assert int8.details["input_quantization"]["image"] == expected
    assert int8.details["output_quantization"]["output_0"]["scale"] == out.scale


def test_float16_and_dynamic_shrink_the_weights(candidates):
    fp32 = len(candidates["fp32"].model)
    assert len(candidates["float16"].model) <= 0.55 * fp32
    assert len(candidates["dynamic"].model) <= 0.3 * fp32
    assert candidates["float16"].details["converter"]["supported_types"] == ["float16"]
    # dynamic range keeps float I/O
    runner = load_runner(candidates["dynamic"].model, "tflite")
    assert runner.inputs[0].dtype == "float32" and runner.inputs[0].scale is None


def test_int8_calibration_is_seeded(source, calibration, candidates):
    again = get_backend("tflite").build(source, "int8", calibration, BuildOptions(seed=0))
    assert again.model == candidates["int8"].model


def test_int8_without_calibration_is_a_usage_error(source):
    with pytest.raises(UsageError, match="--calibration"):
        get_backend("tflite").build(source, "int8", None, BuildOptions())


def test_onnx_source_is_a_usage_error(source, tmp_path):
    pytest.importorskip("edgeml.optimizer.sources.onnx")
    path = tmp_path / "digits.onnx"
    path.write_bytes(source.onnx_bytes())
    with pytest.raises(UsageError, match="drop --format tflite"):
        get_backend("tflite").build(load_source(path), "fp32", None, BuildOptions())


def test_onnx_export_has_the_same_names_and_outputs(source, eval_feed):
    import onnxruntime as ort

    feed, _ = eval_feed
    model = source.onnx_bytes()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["output_0"]
    out = load_runner(model, "onnx").run(feed)["output_0"]
    np.testing.assert_allclose(out, source.reference(feed)["output_0"], atol=1e-5)


def test_saved_model_from_keras_export_loads_and_converts(digits, source, eval_feed, tmp_path):
    feed, _ = eval_feed
    export_dir = tmp_path / "digits_sm"
    digits[0].export(str(export_dir), verbose=False)
    sm = load_source(export_dir)
    assert sm.kind == "saved_model"
    assert [(s.name, s.shape) for s in sm.inputs] == [(s.name, s.shape) for s in source.inputs]
    assert [(s.name, s.shape) for s in sm.outputs] == [(s.name, s.shape) for s in source.outputs]
    ref = sm.reference(feed)["output_0"]
    np.testing.assert_allclose(ref, source.reference(feed)["output_0"], atol=1e-5)
    cand = get_backend("tflite").build(sm, "fp32", None, BuildOptions())
    out = load_runner(cand.model, "tflite").run(feed)["output_0"]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    onnx_out = load_runner(sm.onnx_bytes(), "onnx").run(feed)["output_0"]
    np.testing.assert_allclose(onnx_out, ref, atol=1e-5)


def _two_input_model(dict_outputs: bool):
    import keras

    keras.utils.set_random_seed(1)
    a = keras.Input((4,), name="features")
    b = keras.Input((3,), name="context")
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    score = keras.layers.Dense(1, name="score")(h)
    klass = keras.layers.Dense(5, activation="softmax", name="klass")(h)
    outputs = {"score": score, "klass": klass} if dict_outputs else [score, klass]
    return keras.Model([a, b], outputs)


@pytest.mark.parametrize("dict_outputs,names", [(False, ["output_0", "output_1"]), (True, ["klass", "score"])])
def test_two_input_model_names_both_inputs(dict_outputs, names, tmp_path):
    path = tmp_path / "two.keras"
    _two_input_model(dict_outputs).save(path)
    src = load_source(path)
    assert sorted(s.name for s in src.inputs) == ["context", "features"]
    assert [s.name for s in src.outputs] == names
    rng = np.random.default_rng(0)
    feed = {
        "features": rng.normal(size=(64, 4)).astype(np.float32),
        "context": rng.normal(size=(64, 3)).astype(np.float32),
    }
    ref = src.reference(feed)
    for recipe in ("fp32", "int8"):
        cand = get_backend("tflite").build(src, recipe, Dataset(feed), BuildOptions())
        runner = load_runner(cand.model, "tflite")
        assert sorted(s.name for s in runner.inputs) == ["context", "features"]
        assert sorted(s.name for s in runner.outputs) == sorted(names)
        out = runner.run(feed)
        for name in names:
            tol = 1e-5 if recipe == "fp32" else 0.1
            np.testing.assert_allclose(out[name], ref[name], atol=tol)
    onnx_out = load_runner(src.onnx_bytes(), "onnx").run(feed)
    for name in names:
        np.testing.assert_allclose(onnx_out[name], ref[name], atol=1e-5)


def test_integer_ids_stay_integer_in_int8(tmp_path):
    import keras

    ids = keras.Input((6,), dtype="int64", name="ids")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8)(ids))
    keras.Model(ids, keras.layers.Dense(3)(x)).save(tmp_path / "emb.keras")
    src = load_source(tmp_path / "emb.keras")
    data = np.random.default_rng(0).integers(0, 50, (100, 6))
    cand = get_backend("tflite").build(src, "int8", Dataset({"ids": data}), BuildOptions())
    runner = load_runner(cand.model, "tflite")
    assert runner.inputs[0].dtype == "int64" and runner.outputs[0].dtype == "int8"
    assert cand.details["input_quantization"] == {}
    out = runner.run({"ids": data})["output_0"]
    np.testing.assert_allclose(out, src.reference({"ids": data})["output_0"], atol=0.02)


def _saved_model_with(tmp_path, op):
    tf = import_tensorflow()

    class UsesOp(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": op(tf, x)}

    module = UsesOp()
    path = tmp_path / "uses_op"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def test_op_without_tflite_kernel_is_named(tmp_path, capfd):
    path = _saved_model_with(tmp_path, lambda tf, x: tf.math.igamma(x + 1.0, x + 2.0))
    src = load_saved_model(path)
    capfd.readouterr()
    with pytest.raises(UnsupportedModelError) as info:
        get_backend("tflite").build(src, "fp32", None, BuildOptions())
    message = str(info.value)
    assert "tf.Igamma" in message and "--format onnx" in message and "\n" not in message
    # the converter's pages of MLIR diagnostics stay out of the user's terminal
    captured = capfd.readouterr()
    assert "loc(" not in captured.err and "Igamma" not in captured.err
    # tf2onnx would copy the op into the ONNX graph unchanged; the export names it instead
    with pytest.raises(UnsupportedModelError, match="Igamma"):
        src.onnx_bytes()


def test_saved_model_without_serving_signature(tmp_path):
    tf = import_tensorflow()

    class NoSignature(tf.Module):
        @tf.function
        def f(self, x):
            return 2 * x

    tf.saved_model.save(NoSignature(), str(tmp_path / "nosig"))
    with pytest.raises(InputError, match="serving_default"):
        load_source(tmp_path / "nosig")


def test_damaged_keras_files_are_input_errors(digits, tmp_path):
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(digits[2].read_bytes()[:700])
    for load in (load_source, load_keras):
        with pytest.raises(InputError) as info:
            load(truncated)
        assert "\n" not in str(info.value)


def test_unregistered_custom_layer_says_how_to_register(tmp_path):
    import keras

    class Doubler(keras.layers.Layer):  # defined here, never registered: loading cannot find it
        def call(self, x):
            return 2 * x

    inp = keras.Input((4,), name="v")
    keras.Model(inp, Doubler()(inp)).save(tmp_path / "custom.keras")
    with pytest.raises(InputError, match="register_keras_serializable") as info:
        load_source(tmp_path / "custom.keras")
    assert "Doubler" in str(info.value)


def _median_ms(runner, feed, runs=30):
    for _ in range(3):
        runner.run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def test_mobilenetv2_converts_to_int8_and_runs(tmp_path, record_property):
    """The benchmark's second model; sizes and latencies are reported, not asserted."""
    import keras

    keras.utils.set_random_seed(0)
    path = tmp_path / "mobilenetv2.keras"
    keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3)).save(path)
    src = load_source(path)
    name = src.inputs[0].name
    rng = np.random.default_rng(0)
    calibration = Dataset({name: rng.uniform(-1, 1, (32, 96, 96, 3)).astype(np.float32)})
    one = {name: rng.uniform(-1, 1, (1, 96, 96, 3)).astype(np.float32)}
    ref = src.reference(one)["output_0"]
    backend = get_backend("tflite")
    report = {}
    for recipe in ("fp32", "dynamic", "int8"):
        cand = backend.build(src, recipe, calibration, BuildOptions())
        runner = load_runner(cand.model, "tflite", num_threads=1)
        out = runner.run(one)["output_0"]
        assert out.shape == (1, 1000) and np.all(np.isfinite(out))
        if recipe == "int8":
            assert runner.inputs[0].dtype == "int8"
            # untrained: a near-uniform softmax (0.001 each), within an output step or two of float
            assert np.abs(out - ref).max() <= 2 * runner.outputs[0].scale
        else:
            np.testing.assert_allclose(out, ref, atol=1e-3)
        report[recipe] = {"bytes": len(cand.model), "median_ms_1_thread": round(_median_ms(runner, one), 2)}
    assert report["int8"]["bytes"] < 0.3 * report["fp32"]["bytes"]
    record_property("mobilenetv2_96", report)
    print("MobileNetV2 96x96:", report)
