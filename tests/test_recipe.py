"""Recipes as data: the TOML file, flags over it, and every bad value refused before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edgeml.core.errors import InputError, UsageError
from edgeml.optimizer.config import OptimizeConfig
from edgeml.optimizer.recipe import build_recipe, read_recipe_file

FULL = """
[train]
batch_size = 32
learning_rate = 0.002

[distill]
student = "models/student.keras"
temperature = 3
alpha = 0.2
epochs = 12

[prune]
sparsity = 0.75
schedule = "constant"
structured = "2:4"
layers = { conv2d = 0.0, dense = 0.5 }
max_accuracy_drop = 0.02

[quantize]
recipe = "int8"
format = "onnx"
tuner = "inc"
max_accuracy_drop = 0.005
"""


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_recipe_file(tmp_path):
    path = write(tmp_path, FULL)
    recipe = build_recipe(read_recipe_file(path), {}, str(path))
    assert recipe.stages() == ["distill", "prune", "quantize"]
    d, p, q = recipe.distill, recipe.prune, recipe.quantize
    assert d.student == str(tmp_path / "models" / "student.keras")  # relative to the file, not the cwd
    assert (d.temperature, d.alpha, d.epochs, d.batch_size, d.learning_rate) == (3, 0.2, 12, 32, 0.002)
    assert (p.sparsity, p.schedule, p.structured, p.layers) == (0.75, "constant", "2:4", {"conv2d": 0.0, "dense": 0.5})
    assert (p.epochs, p.batch_size, p.max_accuracy_drop) == (10, 32, 0.02)  # [train] fills what [prune] leaves out
    assert (q.recipe, q.format, q.tuner, q.max_accuracy_drop) == ("int8", "onnx", "inc", 0.005)
    assert recipe.to_dict()["prune"]["sparsity"] == 0.75


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, FULL)
    flags = {"prune": {"sparsity": 0.9}, "train": {"epochs": 2}, "quantize": {"recipe": "auto", "tuner": None}}
    recipe = build_recipe(read_recipe_file(path), {k: {a: b for a, b in v.items() if b is not None} for k, v in flags.items()})
    # a flag wins over the file, even over a stage's own value ([distill] epochs = 12)
    assert recipe.prune.sparsity == 0.9 and recipe.prune.epochs == 2 and recipe.distill.epochs == 2
    assert recipe.quantize.recipe == "auto" and recipe.quantize.tuner == "inc"


def test_config_merges_file_and_flags(tmp_path):
    path = write(tmp_path, "[prune]\nsparsity = 0.5\n[quantize]\nrecipe = \"int8\"\n")
    config = OptimizeConfig(model=tmp_path / "m.keras", output=tmp_path / "m.edgeml", key=tmp_path / "k", eval="e.npz",
                            calibration="c.npz", train="t.npz", recipe_file=path, prune=0.8, epochs=3)
    config.check()
    assert config.recipe == "int8" and config.max_accuracy_drop == 0.01
    assert config.plan.prune.sparsity == 0.8 and config.plan.prune.epochs == 3 and config.plan.distill is None


@pytest.mark.parametrize("text, message", [
    ("[prune]\nsparsty = 0.5\n", "unknown key 'sparsty' in \\[prune\\] \\(did you mean 'sparsity'\\?\\)"),
    ("[prunning]\nsparsity = 0.5\n", "unknown table \\[prunning\\] \\(did you mean 'prune'\\?\\)"),
    ("[prune]\nsparsity = \"most\"\n", "\\[prune\\] sparsity must be a number"),
    ("[train]\nepochs = 2.5\n", "\\[train\\] epochs must be a whole number"),
    ("[prune]\nlayers = { conv2d = \"all\" }\n", "layers must be a table of layer = sparsity"),
    ("prune = 0.5\n", "prune must be a table"),
    ("[prune\nsparsity = 0.5\n", "not valid TOML"),
])
def test_bad_recipe_files(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        read_recipe_file(write(tmp_path, text))


def test_a_missing_recipe_file(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        read_recipe_file(tmp_path / "nope.toml")


@pytest.mark.parametrize("flags, message", [
    ({"prune": {"sparsity": 1.0}}, "sparsity must be in \\[0, 1\\)"),
    ({"prune": {"sparsity": -0.1}}, "sparsity must be in \\[0, 1\\)"),
    ({"prune": {"sparsity": 0.5, "layers": {"dense": 1.5}}}, "layer 'dense' must be in \\[0, 1\\)"),
    ({"prune": {"sparsity": 0.5, "schedule": "cosine"}}, "unknown prune schedule 'cosine'"),
    ({"prune": {"schedule": "constant"}}, "without a target"),
    ({"distill": {"temperature": 2.0}}, "without a student"),
    ({"distill": {"student_width": 0.0}}, "--student-width must be in \\(0, 1\\)"),
    ({"distill": {"student_width": 1.5}}, "--student-width must be in \\(0, 1\\)"),
    ({"distill": {"student_width": 0.5, "student": "s.keras"}}, "not both"),
    ({"distill": {"student_width": 0.5, "temperature": 0.0}}, "--temperature must be above 0"),
    ({"distill": {"student_width": 0.5, "alpha": 1.5}}, "--alpha .* must be in \\[0, 1\\]"),
    ({"prune": {"sparsity": 0.5}, "train": {"epochs": 0}}, "prune epochs must be at least 1"),
    ({"prune": {"sparsity": 0.5}, "train": {"learning_rate": -1.0}}, "learning_rate must be a positive number"),
    ({"quantize": {"max_accuracy_drop": 1.0}}, "--max-accuracy-drop must be in \\[0, 1\\)"),
    ({"distill": {"student_width": 0.5, "loss": "mse"}}, "distillation sets its own losses"),
])
def test_bad_values(flags, message):
    with pytest.raises(UsageError, match=message):
        build_recipe(None, flags)


def test_training_stages_need_training_data(tmp_path):
    config = OptimizeConfig(model=tmp_path / "m.keras", output=tmp_path / "m.edgeml", key=tmp_path / "k",
                            eval="e.npz", prune=0.5)
    with pytest.raises(UsageError, match="pass --train data"):
        config.check()


def test_inc_needs_onnx_and_int8(tmp_path):
    base = dict(model=tmp_path / "m.keras", output=tmp_path / "m.edgeml", key=tmp_path / "k", eval="e.npz",
                calibration="c.npz", tuner="inc")
    with pytest.raises(UsageError, match="use --format onnx"):
        OptimizeConfig(**base, format="tflite").check()
    with pytest.raises(UsageError, match="tunes the int8 build"):
        OptimizeConfig(**base, recipe="float16").check()


def test_cli_refuses_a_bad_recipe_file_in_one_line(tmp_path):
    """Through the real command: exit 2, one line, no traceback, nothing written, before the model loads."""
    recipe = write(tmp_path, "[prune]\nsparsity = 0.5\nfrequncy = 10\n")
    out = tmp_path / "m.edgeml"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeml.cli", "optimize", str(tmp_path / "missing.keras"), "-o", str(out),
         "--recipe-file", str(recipe), "--train", "t.npz", "--eval", "e.npz", "--key", "k"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown key 'frequncy'" in proc.stderr and "did you mean 'frequency'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert list(tmp_path.iterdir()) == [recipe]


def test_cli_layer_sparsity_syntax(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeml.cli", "optimize", "m.keras", "-o", str(tmp_path / "m.edgeml"),
         "--prune", "0.5", "--layer-sparsity", "dense", "--train", "t.npz", "--eval", "e.npz", "--key", "k"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "should look like dense_1=0.5" in proc.stderr and "Traceback" not in proc.stderr


def test_the_stages_are_public_api():
    import edgeml
    from edgeml.optimizer.inc import tuner as inc_tuner
    from edgeml.optimizer.training import distill, keras_train, pruning

    assert edgeml.prune_model is pruning.prune and edgeml.PruneSettings is pruning.PruneSettings
    assert edgeml.distill_model is distill.distill and edgeml.DistillSettings is distill.DistillSettings
    assert edgeml.TrainSettings is keras_train.TrainSettings and edgeml.tune_int8 is inc_tuner.tune_int8
    assert set(edgeml.__all__) >= {"prune_model", "distill_model", "read_recipe_file", "tune_int8"}
