"""The CLI as a user meets it: --json purity, one-line errors, exit codes, nothing half-written."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from edgeml.cli import main
from edgeml.core import transfer


def _run(*args, cwd=None):
    """The real console entry point in a fresh process, as a user runs it."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def _optimize_args(d, out, *extra):
    return ["optimize", d / "digits.keras", "-o", out, "--calibration", d / "calib.npz",
            "--eval", d / "eval.npz", "--key", d / "keys" / "signing.key", "--latency-runs", "10", *extra]


@pytest.fixture(scope="module")
def artifact(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits.edgeml"
    proc = _run(*_optimize_args(digits_dir, out, "--recipe", "auto", "--name", "digits", "--version", "3",
                                "--labels", digits_dir / "labels.txt", "--json"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is one JSON object and nothing else
    assert doc["ok"] and doc["artifact"] == str(out) and doc["version"] == 3
    assert (out.parent / "digits.candidates.png").is_file()
    return out


def test_inspect_verify_bench_json(artifact, digits_dir):
    inspect = _run("inspect", artifact, "--json")
    assert inspect.returncode == 0
    info = json.loads(inspect.stdout)
    assert info["manifest"]["name"] == "digits" and info["manifest"]["labels"] == [str(d) for d in range(10)]
    verify = _run("verify", artifact, "--public-key", digits_dir / "keys" / "signing.pub", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["selftest"]["ok"] is True
    bench = _run("bench", artifact, "--data", digits_dir / "eval.npz", "--runs", "20", "--json")
    assert bench.returncode == 0
    b = json.loads(bench.stdout)
    assert b["accuracy"] == pytest.approx(info["manifest"]["metrics"]["accuracy"])
    assert b["latency_ms"]["runs"] == 20 and b["model_bytes"] == info["model_bytes"]


def test_human_output_is_a_table(artifact, digits_dir, capsys):
    assert main(["inspect", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "digits v3" in out and "image" in out and "float32" in out and "measured" in out
    assert main(["verify", str(artifact), "--public-key", str(digits_dir / "keys" / "signing.pub")]) == 0
    assert "OK: digits v3" in capsys.readouterr().out


def test_tampered_artifact_fails_verify_with_exit_8(artifact, digits_dir, tmp_path):
    bad = tmp_path / "tampered.edgeml"
    inner = io.BytesIO(transfer.decompress(artifact.read_bytes(), 1 << 30))
    with zipfile.ZipFile(inner) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "model.tflite":
                data = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
            dst.writestr(item, data)
    proc = _run("verify", bad, "--public-key", digits_dir / "keys" / "signing.pub")
    assert proc.returncode == 8
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_keys_generate_refuses_overwrite(tmp_path, capsys):
    assert main(["keys", "generate", "--out", str(tmp_path / "k"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["key_id"]) == 16
    assert main(["keys", "generate", "--out", str(tmp_path / "k")]) == 7
    assert "--force" in capsys.readouterr().err


def _bad(tmp_path, digits_dir, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, code, message", [
    ("missing model", 3, "model not found"),
    ("not a model", 3, "cannot tell what kind of model"),
    ("calibration names", 4, "model's inputs are \\['image'\\]"),
    ("calibration shape", 4, "expects \\(8,8,1\\)"),
    ("calibration dtype", 4, "expects float32"),
    ("public key as key", 7, "public key"),
    ("text as key", 7, "not"),
    ("no output folder", 2, "does not exist"),
    ("int8 without calibration", 2, "needs --calibration"),
    ("labels that do not fit", 2, "--labels has 9 labels but .* has 10 classes"),
    ("string labels", 4, "labels 'y' are <U1 values, not class indices"),
    ("labels out of range", 4, "labels 'y' range over 0..12 but the model has 10 classes"),
    ("NaN in eval", 4, "eval array 'image' holds NaN at sample 1 "),
    ("infinity in calibration", 4, "calibration array 'image' holds infinity at sample 0 "),
    ("raw uint8 pixels", 4, "'image' is uint8 .*x / 255"),
    ("empty eval", 4, "eval data .* has no samples"),
    ("version too big", 2, "--version must be a whole number from 1 to 2\\*\\*53"),
])
def test_bad_input_one_line_exit_code_nothing_written(case, code, message, digits_dir, tmp_path, capsys):
    d = digits_dir
    out = tmp_path / "out.edgeml"
    args = _optimize_args(d, out, "--recipe", "int8")
    idx = {a: i for i, a in enumerate(args)}
    if case == "missing model":
        args[1] = tmp_path / "nope.keras"
    elif case == "not a model":
        args[1] = tmp_path / "model.txt"
        args[1].write_text("hello")
    elif case == "calibration names":
        args[idx["--calibration"] + 1] = _bad(tmp_path, d, "c.npz", pixels=np.zeros((4, 8, 8, 1), np.float32))
    elif case == "calibration shape":
        args[idx["--calibration"] + 1] = _bad(tmp_path, d, "c.npz", image=np.zeros((4, 8, 8), np.float32))
    elif case == "calibration dtype":
        args[idx["--calibration"] + 1] = _bad(tmp_path, d, "c.npz", image=np.zeros((4, 8, 8, 1), "U1"))
    elif case == "public key as key":
        args[idx["--key"] + 1] = d / "keys" / "signing.pub"
    elif case == "text as key":
        args[idx["--key"] + 1] = tmp_path / "k.key"
        args[idx["--key"] + 1].write_text("not a key\n")
    elif case == "no output folder":
        args[idx["-o"] + 1] = tmp_path / "missing" / "out.edgeml"
    elif case == "int8 without calibration":
        i = idx["--calibration"]
        del args[i:i + 2]
    elif case in ("string labels", "labels out of range", "NaN in eval", "raw uint8 pixels", "empty eval"):
        with np.load(d / "eval.npz") as data:
            x, y = data["image"][:20].copy(), data["y"][:20].copy()
        if case == "string labels":
            y = np.array([str(v) for v in y])
        elif case == "labels out of range":
            y[3] = 12
        elif case == "NaN in eval":
            x[1, 4, 4, 0] = np.nan
        elif case == "raw uint8 pixels":
            x = (x * 255).astype(np.uint8)
        else:
            x, y = x[:0], y[:0]
        args[idx["--eval"] + 1] = _bad(tmp_path, d, "e.npz", image=x, y=y)
    elif case == "infinity in calibration":
        with np.load(d / "calib.npz") as data:
            x = data["image"][:20].copy()
        x[0, 0, 0, 0] = np.inf
        args[idx["--calibration"] + 1] = _bad(tmp_path, d, "c.npz", image=x)
    elif case == "version too big":
        args += ["--version", "99999999999999999999"]
    elif case == "labels that do not fit":
        (tmp_path / "labels.txt").write_text("".join(f"{n}\n" for n in range(9)))
        args += ["--labels", tmp_path / "labels.txt"]
    assert main([str(a) for a in args]) == code
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()  # progress lines may come first; the error is one line, the last
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    assert "Traceback" not in err
    assert re.search(message, lines[-1]), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "edgeml" in p.name] == []


def test_read_only_output_folder_is_refused_before_any_work(digits_dir, tmp_path, capsys):
    """As root (as here) permission bits do not stop a write; a read-only mount does."""
    folder = tmp_path / "ro"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip()}); needs root")
    try:
        assert main([str(a) for a in _optimize_args(digits_dir, folder / "out.edgeml", "--recipe", "int8")]) == 3
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(f"error: cannot write to the output folder {folder}: Read-only file system")
        assert not any(line.startswith("... loading") for line in lines)  # refused before loading anything
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_json_error_object_and_usage_exit_code(tmp_path):
    proc = _run("optimize", tmp_path / "nope.keras", "-o", tmp_path / "o.edgeml", "--eval", "e.npz",
                "--key", tmp_path / "missing.key", "--json")
    assert proc.returncode == 7  # the key is checked before any heavy work
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["error"]["exit_code"] == proc.returncode
    proc = _run("optimize", "--recipe", "int4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_import_and_help_do_not_load_tensorflow():
    code = ("import sys, edgeml, edgeml.cli; from edgeml.cli import cli; "
            "bad = [m for m in ('tensorflow', 'keras', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "print(','.join(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == ""
    assert _run("--help").returncode == 0


def test_unsupported_op_exits_5_before_anything_is_written(tmp_path, digits_dir):
    """A SavedModel using tf.math.igamma (no LiteRT kernel) and an ONNX model with a custom op."""
    import onnx
    import tensorflow as tf
    from onnx import TensorProto, helper

    class UsesIgamma(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.math.igamma(x + 1.0, x + 2.0)}

    module = UsesIgamma()
    tf.saved_model.save(module, str(tmp_path / "igamma"), signatures={"serving_default": module.serve})
    node = helper.make_node("FancyGelu", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
              tmp_path / "custom.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((8, 4)).astype(np.float32))
    for model, op in ((tmp_path / "igamma", "Igamma"), (tmp_path / "custom.onnx", "FancyGelu")):
        out = tmp_path / f"{model.stem}.edgeml"
        proc = _run("optimize", model, "-o", out, "--recipe", "fp32", "--eval", tmp_path / "d.npz",
                    "--key", digits_dir / "keys" / "signing.key")
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 5 and last.startswith("error: ") and op in last, proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()


def test_module_function_data_through_the_cli(digits_dir, tmp_path):
    """Data that does not fit in memory: a generator named module:function, found from the cwd."""
    (tmp_path / "stream_digits.py").write_text(
        "import numpy as np\n"
        f"_CAL = np.load({str(digits_dir / 'calib.npz')!r})['image']\n"
        f"_EVAL = np.load({str(digits_dir / 'eval.npz')!r})\n"
        "def calibration():\n"
        "    for i in range(0, len(_CAL), 50):\n"
        "        yield {'image': _CAL[i:i + 50]}\n"
        "def evaluation():\n"
        "    x, y = _EVAL['image'], _EVAL['y']\n"
        "    for i in range(0, len(x), 64):\n"
        "        yield {'image': x[i:i + 64], 'y': y[i:i + 64]}\n")
    out = tmp_path / "s.edgeml"
    proc = _run("optimize", digits_dir / "digits.keras", "-o", out, "--recipe", "int8",
                "--calibration", "stream_digits:calibration", "--eval", "stream_digits:evaluation",
                "--calibration-samples", "120", "--key", digits_dir / "keys" / "signing.key",
                "--latency-runs", "10", "--no-plot", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from edgeml.core.artifact import read_artifact

    lineage = read_artifact(out).manifest["lineage"]["data"]
    assert lineage["calibration"]["source"] == "stream_digits:calibration"
    assert lineage["calibration"]["samples"] == 120 and lineage["calibration"]["streamed_samples"] == 200
    assert lineage["eval"]["samples"] == 400 and json.loads(proc.stdout)["ok"] is True
