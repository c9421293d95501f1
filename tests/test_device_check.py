"""edgeml-agent check: what a device does before it serves an artifact, with device deps only."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import pytest

from edgeml.core import transfer


@pytest.fixture(scope="module")
def int8_artifact(digits_int8_artifact):
    return digits_int8_artifact


def _agent(*args):
    code = ("import sys, json; from device_agent.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnx') if m in sys.modules]; "
            "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    tail = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc, tail


def test_check_passes_without_loading_tensorflow(int8_artifact, digits_dir):
    proc, tail = _agent("check", int8_artifact, "--public-key", digits_dir / "keys" / "signing.pub", "--json")
    assert proc.returncode == 0 and tail["heavy"] == []
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["format"] == "tflite" and doc["selftest"]["ok"] and doc["selftest"]["samples"] == 8


def test_check_refuses_a_model_that_does_not_reproduce_its_outputs(int8_artifact, digits_dir, tmp_path):
    """Re-sign an artifact whose reference outputs are wrong: signature fine, self-test must fail."""
    import numpy as np

    from edgeml.core.artifact import read_artifact, write_artifact

    art = read_artifact(int8_artifact)
    bad_outputs = {k: np.roll(v, 1, axis=-1) for k, v in art.selftest_outputs.items()}
    manifest = {k: v for k, v in art.manifest.items() if k not in ("members", "schema_version", "format", "model_member")}
    bad = tmp_path / "bad.edgeml"
    write_artifact(bad, model=art.model, model_format=art.model_format, manifest=manifest,
                   selftest_inputs=art.selftest_inputs, selftest_outputs=bad_outputs, baseline=art.baseline,
                   private_key=digits_dir / "keys" / "signing.key")
    proc, tail = _agent("check", bad, "--public-key", digits_dir / "keys" / "signing.pub")
    assert proc.returncode == 8 and "self-test failed" in proc.stderr and "Traceback" not in proc.stderr
    assert tail["heavy"] == []


def test_check_refuses_a_tampered_artifact(int8_artifact, digits_dir, tmp_path):
    bad = tmp_path / "t.edgeml"
    raw = bytearray(transfer.decompress(int8_artifact.read_bytes(), 1 << 30))
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo("model.tflite")
    raw[info.header_offset + 200] ^= 0xFF  # a byte inside the model's data
    bad.write_bytes(transfer.compress(bytes(raw)))  # repacked, so only the content is wrong
    proc, _ = _agent("check", bad, "--public-key", digits_dir / "keys" / "signing.pub")
    assert proc.returncode == 8 and proc.stderr.startswith("error: ")
