"""distill → prune → quantize through ``edgeml optimize``: stages, gates, transfer size, bad input.

The modules themselves are tested in test_pruning.py and test_distill.py; here the chain runs
end to end on the real digits CNN, from the Python API and from the CLI.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgeml
from edgeml.core import transfer
from edgeml.core.artifact import read_artifact, verify_artifact
from edgeml.core.errors import AccuracyGoalNotMet


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list:
    """What is left of stderr once the progress lines ('... step') are set aside."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("... ")]


def _common(d):
    return ["--train", d / "train.npz", "--eval", d / "eval.npz", "--calibration", d / "calib.npz",
            "--key", d / "keys" / "signing.key"]


@pytest.fixture(scope="module")
def pruned(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "pruned.edgeml"
    result = edgeml.optimize(edgeml.OptimizeConfig(
        model=digits_dir / "digits.keras", output=out, key=digits_dir / "keys" / "signing.key",
        train=str(digits_dir / "train.npz"), calibration=str(digits_dir / "calib.npz"),
        eval=str(digits_dir / "eval.npz"), prune=0.75, epochs=4, recipe="int8", latency_runs=10))
    return result


def test_pruned_int8_artifact_carries_real_zeros_and_ships_small(pruned, digits_dir):
    assert [s.stage for s in pruned.stages] == ["original", "prune"] and all(s.passed for s in pruned.stages)
    original, stage = pruned.stages
    assert stage.nonzero_params <= 0.27 * original.params  # 75% of the kernels, biases untouched
    assert stage.details["epochs_run"] >= 1 and stage.drop <= 0.01
    art = verify_artifact(pruned.artifact, digits_dir / "keys" / "signing.pub")
    weights = np.frombuffer(art.model, np.int8)
    assert np.mean(weights == 0) > 0.6  # the int8 .tflite itself is mostly zero bytes: masks were stripped
    # zstd turns those zeros into savings: well under the dense int8 quarter, and the file is what ships
    assert pruned.chosen.zstd_bytes < 0.15 * original.measured.bytes
    assert pruned.artifact.stat().st_size == pruned.artifact_bytes == art.size < len(art.model)
    assert pruned.chosen.total is not None and pruned.chosen.total.drop <= 0.01
    assert edgeml.run_selftest(art).ok


def test_manifest_and_json_describe_every_stage(pruned):
    m = read_artifact(pruned.artifact).manifest
    assert [s["stage"] for s in m["stages"]] == ["original", "prune"]
    prune = m["stages"][1]
    assert prune["zstd_bytes"] < prune["bytes"] and prune["passed"] and prune["details"]["schedule"] == "polynomial"
    assert m["transfer"] == {"encoding": "zstd", "level": transfer.LEVEL, "model_bytes": pruned.chosen.zstd_bytes}
    assert m["metrics"]["zstd_bytes"] == pruned.chosen.zstd_bytes and m["metrics"]["fp32_bytes"] == pruned.baseline.bytes
    assert m["lineage"]["recipe"]["plan"]["prune"]["sparsity"] == 0.75
    assert m["lineage"]["data"]["train"]["sha256"]
    doc = pruned.to_dict()
    assert [s["stage"] for s in doc["stages"]] == ["original", "prune"]
    assert doc["candidates"][-1]["ratio_to_fp32"]["zstd_bytes"] < 0.15
    assert pruned.plot is not None and pruned.plot.stat().st_size > 10_000


def test_cli_recipe_file_distill_prune_quantize(digits_dir, tmp_path):
    """The example recipe, shortened with flags (which override the file), through the real CLI."""
    out = tmp_path / "chain.edgeml"
    proc = _cli("optimize", digits_dir / "digits.keras", "-o", out, *_common(digits_dir),
                "--recipe-file", "examples/digits/recipe.toml", "--epochs", "6", "--prune", "0.5",
                "--latency-runs", "10", "--json")
    assert proc.returncode in (0, 9), proc.stderr
    doc = json.loads(proc.stdout)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert list(stages) == ["original", "distill", "prune"]
    assert stages["distill"]["params"] <= 0.3 * stages["original"]["params"]  # width 0.5 from the file
    assert stages["distill"]["details"]["epochs_run"] <= 6  # --epochs overrode the file's 30
    assert stages["prune"]["details"]["sparsity"] == 0.5  # --prune overrode the file's 0.75
    assert doc["chosen"] == "int8" and doc["artifact_bytes"] == out.stat().st_size
    assert proc.returncode == (0 if doc["goal_met"] else 9)


def test_a_stage_over_its_gate_is_skipped_and_reported(digits_dir, tmp_path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text("[prune]\nsparsity = 0.98\nschedule = \"constant\"\nepochs = 1\nmax_accuracy_drop = 0.0\n"
                      "[quantize]\nrecipe = \"dynamic\"\n")
    out = tmp_path / "strict.edgeml"
    with pytest.raises(AccuracyGoalNotMet, match="stage prune lost .* over its limit 0") as info:
        edgeml.optimize(edgeml.OptimizeConfig(
            model=digits_dir / "digits.keras", output=out, key=digits_dir / "keys" / "signing.key",
            train=str(digits_dir / "train.npz"), eval=str(digits_dir / "eval.npz"), recipe_file=recipe,
            latency_runs=5, plot=False))
    result = info.value.result
    assert [s.passed for s in result.stages] == [True, False]
    assert result.chosen.recipe == "dynamic" and out.exists()
    # the chain went on from the unpruned model: the artifact's weights are dense
    assert read_artifact(out).manifest["stages"][1]["passed"] is False
    assert result.chosen.total is None or result.chosen.total.drop <= 0.01


@pytest.mark.parametrize("extra, code, message", [
    (["--structured", "2:4"], 2, r"not a multiple of 4.*--layer-sparsity conv2d(_\d+)?=0"),
    (["--prune", "1.0"], 2, "must be in \\[0, 1\\)"),
    (["--prune", "0.5", "--layer-sparsity", "no_such_layer=0.5"], 2, "no_such_layer"),
])
def test_bad_pruning_input_is_refused_before_training(digits_dir, tmp_path, extra, code, message):
    import re

    out = tmp_path / "bad.edgeml"
    proc = _cli("optimize", digits_dir / "digits.keras", "-o", out, *_common(digits_dir), *extra)
    assert proc.returncode == code, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert re.search(message, errors[0]) and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "epoch" not in proc.stderr


def test_training_data_without_labels_exit_4(digits_dir, tmp_path):
    out = tmp_path / "bad.edgeml"
    proc = _cli("optimize", digits_dir / "digits.keras", "-o", out, "--train", digits_dir / "calib.npz",
                "--eval", digits_dir / "eval.npz", "--key", digits_dir / "keys" / "signing.key", "--prune", "0.5")
    assert proc.returncode == 4, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "has no labels" in errors[0]
    assert not out.exists()


def test_a_student_that_does_not_fit_the_teacher(digits_dir, tmp_path):
    import keras

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Flatten()(inputs)
    student = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))  # 5 classes, not 10
    student.save(tmp_path / "student.keras")
    out = tmp_path / "bad.edgeml"
    proc = _cli("optimize", digits_dir / "digits.keras", "-o", out, *_common(digits_dir),
                "--student", tmp_path / "student.keras")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(_error_lines(proc.stderr)) == 1
    assert "student output" in proc.stderr and "(5,)" in proc.stderr and "(10,)" in proc.stderr
    assert not out.exists()


def test_training_stages_refuse_models_that_cannot_be_trained(digits_dir, tmp_path):
    from edgeml.optimizer.sources.tensorflow import load_keras

    onnx_path = tmp_path / "digits.onnx"
    onnx_path.write_bytes(load_keras(digits_dir / "digits.keras").onnx_bytes())
    proc = _cli("optimize", onnx_path, "-o", tmp_path / "o.edgeml", *_common(digits_dir), "--prune", "0.5")
    assert proc.returncode == 2 and "needs a Keras 3 .keras file" in proc.stderr, proc.stderr
