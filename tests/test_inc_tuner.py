"""--tuner inc: real Intel Neural Compressor runs in the separate .venv-inc (NumPy 1), driven from
this NumPy 2 environment, on the digits CNN (exported to ONNX) and on magika's pretrained model.

`make test` creates .venv-inc first; without it the INC runs are skipped, with the reason.
"""
from __future__ import annotations

import ast
import importlib.util
import sys

import numpy as np
import pretrained
import pytest

from edgeml.core.data import Dataset, run_dataset
from edgeml.core.errors import DataError, UsageError
from edgeml.core.runtime import load_runner
from edgeml.optimizer.evaluate import accuracy
from edgeml.optimizer.inc import tuner as inc_tuner

MAX_DROP = 0.01
INT8_MARKERS = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def inc_env():
    try:
        return inc_tuner.inc_python()
    except UsageError as exc:
        pytest.skip(f"no INC environment ({exc})")


@pytest.fixture(scope="module")
def digits(digits_dir):
    """(float ONNX bytes, calibration, eval with labels, float reference outputs on eval)."""
    from edgeml.optimizer.sources.tensorflow import load_keras

    source = load_keras(digits_dir / "digits.keras")
    name = source.inputs[0].name
    with np.load(digits_dir / "calib.npz") as c, np.load(digits_dir / "eval.npz") as e:
        calib = Dataset({name: c[name]})
        eval_ds = Dataset({name: e[name]}, e["y"])
    return source.onnx_bytes(), calib, eval_ds, run_dataset(source.reference, eval_ds)


@pytest.fixture(scope="module")
def magika():
    """magika's 3 MB model on features of real files; no labels, so trials are scored by agreement."""
    from edgeml.optimizer.sources.onnx import load_onnx

    b = pretrained.magika_inputs(400, seed=1)
    source = load_onnx(pretrained.model_path(*pretrained.MAGIKA))
    eval_ds = Dataset({"bytes": b[64:]})
    return source.onnx_bytes(), Dataset({"bytes": b[:64]}), eval_ds, run_dataset(source.reference, eval_ds)


@pytest.fixture(scope="module")
def digits_tuned(inc_env, digits):
    model, calib, eval_ds, reference = digits
    return inc_tuner.tune_int8(model, calib, eval_ds, reference, MAX_DROP, seed=0)


def op_types(model: bytes) -> set:
    import onnx

    return {n.op_type for n in onnx.load_model_from_string(model).graph.node}


def is_int8(model: bytes) -> bool:
    ops = op_types(model)
    return any(op in ops for op in INT8_MARKERS) or any(op.startswith("QLinear") for op in ops)


def outputs_of(model: bytes, eval_ds: Dataset) -> dict:
    return run_dataset(load_runner(model, "onnx", num_threads=1).run, eval_ds)


def agreement(reference: dict, outputs: dict) -> float:
    return float(np.mean([np.mean(ref.argmax(-1) == outputs[k].argmax(-1)) for k, ref in reference.items()]))


# --- the tuned models ------------------------------------------------------------------------------------


def test_digits_int8_meets_the_goal(digits, digits_tuned):
    model, _, eval_ds, reference = digits
    cand = digits_tuned
    assert (cand.recipe, cand.format) == ("int8", "onnx")
    assert is_int8(cand.model) and len(cand.model) < len(model) / 2
    d = cand.details
    assert d["tuner"] == "inc" and d["inc_version"] == "1.0" and d["metric"] == "accuracy"
    assert d["goal_met"] is True
    assert 1 <= d["trials"] == len(d["trial_scores"]) == len(d["trial_configs"])
    assert d["quantized_ops"].get("Conv") == 2 and isinstance(d["float_nodes"], list)
    # measured here, in edgeml's runtime, not taken from the worker's word
    float_acc = accuracy(outputs_of(model, eval_ds)[cand_output(reference)], eval_ds.labels)
    int8_acc = accuracy(outputs_of(cand.model, eval_ds)[cand_output(reference)], eval_ds.labels)
    assert d["float_score"] == pytest.approx(float_acc, abs=1 / len(eval_ds))
    assert int8_acc == pytest.approx(d["score"], abs=1e-9)
    assert int8_acc >= float_acc - MAX_DROP - 1e-9
    assert any("Neural Compressor" in n for n in cand.notes)


def cand_output(reference: dict) -> str:
    return next(iter(reference))  # the model's first output: the class probabilities


def test_magika_int8_keeps_its_top1(inc_env, magika):
    model, calib, eval_ds, reference = magika
    cand = inc_tuner.tune_int8(model, calib, eval_ds, reference, MAX_DROP, seed=0)
    d = cand.details
    assert d["metric"] == "agreement" and d["float_score"] == 1.0
    assert is_int8(cand.model) and len(cand.model) < len(model) / 2
    assert {"Conv", "MatMul", "Gemm"} <= set(d["quantized_ops"]) or not d["goal_met"]
    got = agreement(reference, outputs_of(cand.model, eval_ds))
    assert got == pytest.approx(d["score"], abs=1e-9)
    if d["goal_met"]:
        assert got >= 1.0 - MAX_DROP


def test_ppocr_classifier_with_unnamed_nodes(inc_env):
    """PP-OCR's direction classifier: after preparation some nodes have no name, which INC's
    per-node configuration cannot tell apart (the worker names them); it needs layers in float."""
    from edgeml.optimizer.sources.onnx import load_onnx

    x, _ = pretrained.ppocr_cls_crops(330, seed=0)
    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_CLS))
    calib, eval_ds = Dataset({"x": x[:90]}), Dataset({"x": x[90:]})
    reference = run_dataset(source.reference, eval_ds)
    cand = inc_tuner.tune_int8(source.onnx_bytes(), calib, eval_ds, reference, MAX_DROP, max_trials=6)
    d = cand.details
    assert is_int8(cand.model) and len(cand.model) < len(source.onnx_bytes()) / 2
    got = agreement(reference, outputs_of(cand.model, eval_ds))
    assert got == pytest.approx(d["score"], abs=1e-9)
    assert d["score"] == max(d["trial_scores"]) or d["goal_met"]
    if d["goal_met"]:
        assert got >= d["float_score"] - MAX_DROP - 1e-9


def test_an_impossible_goal_still_returns_the_best_trial(inc_env, digits):
    """Calibrated on one blank image, every activation range is zero: no trial can match float
    accuracy exactly, so every trial runs and the best-scoring model comes back, flagged."""
    model, calib, eval_ds, reference = digits
    name = next(iter(calib.inputs))
    blank = Dataset({name: np.zeros_like(calib.inputs[name][:1])})
    cand = inc_tuner.tune_int8(model, blank, eval_ds, reference, 0.0, seed=0, max_trials=8)
    d = cand.details
    assert d["goal_met"] is False
    assert d["trials"] == len(d["trial_scores"]) >= 3  # INC's configs, then layers kept in float
    assert d["score"] == max(s for s in d["trial_scores"] if s is not None) < d["float_score"]
    assert any(c["float_nodes"] for c in d["trial_configs"])  # the fallback trials ran
    assert is_int8(cand.model)
    got = accuracy(outputs_of(cand.model, eval_ds)[cand_output(reference)], eval_ds.labels)
    assert got == pytest.approx(d["score"], abs=1e-9)
    assert any("no trial met the goal" in n for n in cand.notes)


def test_eval_data_that_does_not_fit_is_a_data_error(inc_env, digits):
    model, calib, eval_ds, reference = digits
    name = next(iter(calib.inputs))
    wrong = Dataset({name: eval_ds.inputs[name][:, :4, :4]}, eval_ds.labels)
    with pytest.raises(DataError, match="float model does not run on the eval data") as err:
        inc_tuner.tune_int8(model, calib, wrong, reference, MAX_DROP)
    assert "\n" not in str(err.value)


def test_the_inc_environment_is_isolated(inc_env):
    versions = inc_tuner.check_inc_env(inc_env)
    assert versions["onnx_neural_compressor"] == "1.0"
    assert versions["numpy"].startswith("1.")  # INC's pin, while this process runs NumPy 2
    assert np.__version__.startswith("2.")


# --- without the environment -------------------------------------------------------------------------


def tiny_classifier() -> tuple:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["p"], axis=-1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    data = Dataset({"x": np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)})
    return model, data, outputs_of(model, data)


def test_a_python_without_inc_is_a_usage_error_with_the_how_to(monkeypatch):
    if importlib.util.find_spec("onnx_neural_compressor") is not None:
        pytest.skip("this environment has onnx_neural_compressor itself")
    model, data, reference = tiny_classifier()
    monkeypatch.setenv(inc_tuner.ENV_VAR, sys.executable)
    with pytest.raises(UsageError) as err:
        inc_tuner.tune_int8(model, data, data, reference, MAX_DROP)
    message = str(err.value)
    assert "\n" not in message and "onnx_neural_compressor" in message
    assert "make inc" in message and "requirements-inc.txt" in message and inc_tuner.ENV_VAR in message
    assert err.value.exit_code == 2


def test_no_environment_at_all_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.delenv(inc_tuner.ENV_VAR, raising=False)
    monkeypatch.setattr(inc_tuner, "project_root", lambda: tmp_path)
    with pytest.raises(UsageError, match="make inc.*requirements-inc.txt.*EDGEML_INC_PYTHON"):
        inc_tuner.inc_python()
    monkeypatch.setenv(inc_tuner.ENV_VAR, str(tmp_path / "missing" / "python"))
    with pytest.raises(UsageError, match="is not a file"):
        inc_tuner.inc_python()


def test_the_worker_imports_nothing_from_edgeml():
    """It runs in the other venv, where edgeml is not installed."""
    files = sorted(inc_tuner.WORKER.glob("*.py"))
    siblings = {f.stem for f in files}  # the folder runs as a script: its modules import each other by name
    assert "__main__" in siblings
    for file in files:
        tree = ast.parse(file.read_text())
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), file.name
        assert modules <= set(sys.stdlib_module_names) | {"numpy", "onnx", "onnxruntime", "onnx_neural_compressor"} | siblings


# --- through `edgeml optimize` ------------------------------------------------------------------------


def _optimize(digits_dir, out, *extra, env=None):
    import os
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "edgeml.cli", "optimize", str(digits_dir / "digits.keras"), "-o", str(out),
         "--calibration", str(digits_dir / "calib.npz"), "--eval", str(digits_dir / "eval.npz"),
         "--key", str(digits_dir / "keys" / "signing.key"), "--latency-runs", "10", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )


def test_cli_tuner_inc_writes_the_tuned_int8(inc_env, digits_dir, tmp_path):
    import json

    from edgeml.core.artifact import read_artifact

    out = tmp_path / "inc.edgeml"
    proc = _optimize(digits_dir, out, "--format", "onnx", "--recipe", "int8", "--tuner", "inc", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["chosen"] == "int8" and doc["goal_met"]
    manifest = read_artifact(out).manifest
    details = manifest["lineage"]["recipe"]["details"]
    assert details["tuner"] == "inc" and details["goal_met"] and details["trials"] >= 1
    assert manifest["lineage"]["recipe"]["plan"]["quantize"]["tuner"] == "inc"
    assert is_int8(read_artifact(out).model)


def test_cli_tuner_inc_without_its_environment_fails_fast(digits_dir, tmp_path):
    out = tmp_path / "inc.edgeml"
    proc = _optimize(digits_dir, out, "--format", "onnx", "--recipe", "int8", "--tuner", "inc",
                     env={inc_tuner.ENV_VAR: sys.executable})  # this NumPy 2 python has no INC
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if not line.startswith("... ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "make inc" in errors[0]
    assert "building" not in proc.stderr and not out.exists()


def test_cli_tuner_inc_needs_onnx(digits_dir, tmp_path):
    proc = _optimize(digits_dir, tmp_path / "x.edgeml", "--recipe", "int8", "--tuner", "inc")
    assert proc.returncode == 2 and "--format onnx" in proc.stderr
