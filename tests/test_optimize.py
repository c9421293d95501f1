"""edgeml optimize end to end on a real trained model: each recipe, auto, the goal, the artifact."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeml
from edgeml.cli import main
from edgeml.core.artifact import read_artifact, verify_artifact


def _config(d, out, **kw):
    base = dict(model=d / "digits.keras", output=out, key=d / "keys" / "signing.key",
                calibration=str(d / "calib.npz"), eval=str(d / "eval.npz"), latency_runs=20)
    base.update(kw)
    return edgeml.OptimizeConfig(**base)


@pytest.fixture(scope="module")
def recipes(digits_dir, tmp_path_factory):
    """One optimize run per explicit recipe, shared by the tests below."""
    out = tmp_path_factory.mktemp("recipes")
    results = {}
    for recipe in ("fp32", "float16", "dynamic", "int8"):
        results[recipe] = edgeml.optimize(_config(digits_dir, out / f"{recipe}.edgeml", recipe=recipe,
                                                  name="digits", version=3, plot=False))
    return results


def test_each_recipe_writes_a_verified_measured_artifact(recipes, digits_dir):
    for recipe, result in recipes.items():
        art = verify_artifact(result.artifact, digits_dir / "keys" / "signing.pub")
        m = art.manifest
        assert (m["name"], m["version"], m["recipe"], m["format"]) == ("digits", 3, recipe, "tflite")
        assert m["metrics"]["bytes"] == len(art.model) == result.chosen.bytes
        assert m["metrics"]["accuracy"] > 0.9 and m["metrics"]["float_accuracy"] > 0.9
        assert m["metrics"]["latency_ms"]["median_ms"] > 0
        assert m["lineage"]["source"]["sha256"] and m["lineage"]["tools"]["tensorflow"]
        assert m["lineage"]["data"]["eval"]["seed"] == 0
        assert edgeml.run_selftest(art).ok
        assert set(art.selftest_inputs) == {"image"} and len(art.selftest_inputs["image"]) == 8


def test_int8_is_small_accurate_and_takes_float(recipes):
    fp32, int8 = recipes["fp32"].chosen, recipes["int8"].chosen
    assert fp32.quality.drop < 1e-6  # the fp32 conversion matches the Keras model
    assert int8.bytes <= 0.27 * fp32.bytes
    assert int8.quality.drop <= 0.01
    art = read_artifact(recipes["int8"].artifact)
    (spec,) = art.manifest["inputs"]
    assert spec["dtype"] == "int8" and spec["scale"] > 0  # quantized I/O, described for the device
    assert art.manifest["lineage"]["data"]["calibration"]["samples"] == 200


def test_float16_halves_and_dynamic_quarters_the_bytes(recipes):
    fp32 = recipes["fp32"].chosen.bytes
    assert recipes["float16"].chosen.bytes < 0.6 * fp32
    assert recipes["dynamic"].chosen.bytes < 0.35 * fp32


def test_auto_keeps_the_least_bytes_times_latency_within_goal_and_plots(digits_dir, tmp_path):
    result = edgeml.optimize(_config(digits_dir, tmp_path / "auto.edgeml", recipe="auto"))
    recipes = [m.recipe for m in result.candidates]
    assert recipes == ["fp32", "float16", "dynamic", "int8"]
    passing = [m for m in result.candidates if m.recipe != "fp32" and m.quality.drop <= 0.01]
    assert result.goal_met and result.chosen in passing
    cost = result.chosen.bytes * result.chosen.latency.median_ms
    assert all(cost <= m.bytes * m.latency.median_ms for m in passing)
    assert result.chosen.bytes < 0.3 * result.baseline.bytes  # dynamic or int8 on this model
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = read_artifact(result.artifact).manifest
    assert m["name"] == "digits" and m["version"] == 1  # defaults: model file stem, 1
    assert [c["recipe"] for c in m["candidates"]] == recipes


def test_goal_not_met_still_writes_best_and_exits_9(digits_dir, tmp_path, capsys):
    # Calibration data of zeros gives int8 an input range of nothing: accuracy collapses.
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, image=np.zeros((50, 8, 8, 1), np.float32))
    out = tmp_path / "bad.edgeml"
    code = main(["optimize", str(digits_dir / "digits.keras"), "-o", str(out), "--recipe", "int8",
                 "--calibration", str(zeros), "--eval", str(digits_dir / "eval.npz"),
                 "--key", str(digits_dir / "keys" / "signing.key"), "--max-accuracy-drop", "0.01",
                 "--latency-runs", "10", "--json"])
    captured = capsys.readouterr()
    assert code == 9
    doc = json.loads(captured.out)
    assert doc["ok"] is False and doc["goal_met"] is False and doc["chosen"] == "int8"
    assert "no candidate is within --max-accuracy-drop 0.01" in captured.err
    assert read_artifact(out).manifest["metrics"]["goal_met"] is False


def test_savedmodel_source(digits_dir, tmp_path):
    import keras

    sm = tmp_path / "sm"
    keras.saving.load_model(digits_dir / "digits.keras").export(sm, format="tf_saved_model", verbose=False)
    result = edgeml.optimize(_config(digits_dir, tmp_path / "sm.edgeml", model=sm, recipe="dynamic", plot=False))
    assert result.chosen.quality.drop <= 0.01
    assert read_artifact(result.artifact).manifest["lineage"]["source"]["kind"] == "saved_model"


def test_keras_to_onnx_format(digits_dir, tmp_path):
    result = edgeml.optimize(_config(digits_dir, tmp_path / "o.edgeml", recipe="int8", format="onnx", plot=False))
    art = read_artifact(result.artifact)
    assert art.model_format == "onnx" and art.model[:2] != b"PK"
    assert result.chosen.quality.drop <= 0.01
    # a quarter, plus whatever nodes the int8 repair keeps in float for this run's weights
    assert result.chosen.bytes <= 0.4 * result.baseline.bytes
    assert edgeml.run_selftest(art).ok
