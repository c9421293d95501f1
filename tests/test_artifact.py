"""The .edgeml artifact: round trip with real models, determinism, ZIP compatibility, and tampering."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pretrained import MAGIKA, magika_inputs, model_path

from edgeml.core import transfer
from edgeml.core.artifact import (
    SCHEMA_VERSION,
    canonical_json,
    read_artifact,
    verify_artifact,
    write_artifact,
)
from edgeml.core.errors import InputError, KeyFileError, VerificationError
from edgeml.core.runtime import load_runner
from edgeml.core.signing import generate_keys, key_id, load_private_key, load_public_key

MEMBER_ORDER = ["manifest.json", "signature.json", "baseline.json", "selftest.npz", "model.onnx"]


# -- fixtures: keys, a tiny ONNX model, a pretrained one, a TFLite one -----------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private_path, public_path = generate_keys(folder)
    return private_path, public_path, load_private_key(private_path), load_public_key(public_path)


@pytest.fixture(scope="module")
def tiny_onnx() -> bytes:
    """A 4 -> 3 softmax classifier built with onnx.helper: small enough to flip every byte of."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def tiny_tflite() -> bytes:
    import tensorflow as tf

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            w = tf.constant(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
            return {"y": tf.nn.softmax(tf.matmul(x, w))}

    module = Classifier()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    return converter.convert()


def selftest_for(model: bytes, model_format: str, inputs: dict):
    runner = load_runner(model, model_format)
    return inputs, runner.run(inputs)


def manifest_for(name="tiny"):
    return {
        "name": name,
        "version": 3,
        "metrics": {"accuracy": 0.875, "size_bytes": 1234, "latency_ms": {"p50": 0.12, "p95": 0.2}},
        "lineage": {"source_sha256": "ab" * 32, "recipe": "int8", "seed": 0},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "labels": ["zéro", "un", "deux"],
    }


@pytest.fixture(scope="module")
def tiny_selftest(tiny_onnx):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    return selftest_for(tiny_onnx, "onnx", {"x": x})


def baseline_for(inputs):
    return {name: {"mean": a.mean(axis=0).tolist(), "std": a.std(axis=0).tolist()} for name, a in inputs.items()}


def write_tiny(path, tiny_onnx, tiny_selftest, private_key, manifest=None, baseline=None, compress=False):
    """Uncompressed unless asked: most tests here are about the ZIP inside the zstd frame."""
    inputs, outputs = tiny_selftest
    return write_artifact(
        path,
        model=tiny_onnx,
        model_format="onnx",
        manifest=manifest if manifest is not None else manifest_for(),
        selftest_inputs=inputs,
        selftest_outputs=outputs,
        baseline=baseline if baseline is not None else baseline_for(inputs),
        private_key=private_key,
        compress=compress,
    )


@pytest.fixture()
def tiny_artifact(tmp_path, tiny_onnx, tiny_selftest, keys):
    path = tmp_path / "tiny.edgeml"
    write_tiny(path, tiny_onnx, tiny_selftest, keys[2])
    return path


def unpacked(path) -> bytes:
    return transfer.decompress(path.read_bytes(), 1 << 30)


def rezip(src, dst, replace=None, drop=(), add=(), compression=zipfile.ZIP_STORED):
    """Rebuild an artifact with Python's zipfile, the way someone editing it by hand would.

    With no changes this gives back the very same bytes (test_python_zipfile_rebuilds_the_same_bytes).
    """
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        entries = [(i.filename, zin.read(i)) for i in zin.infolist() if i.filename not in drop]
        for name, data in entries + list(add):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr, info.create_system, info.compress_type = 0o100644 << 16, 3, compression
            zout.writestr(info, replace.get(name, data))
    return dst


def member(path, name) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def flip(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def verification_error(func, *args) -> str:
    with pytest.raises(VerificationError) as info:
        func(*args)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_keeps_every_part(tmp_path, tiny_onnx, tiny_selftest, keys):
    _, public_path, private, public = keys
    path = tmp_path / "tiny.edgeml"
    written = write_tiny(path, tiny_onnx, tiny_selftest, private)
    assert written.verified and written.path == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.edgeml"]  # no temp file left

    read = read_artifact(path)
    verified = verify_artifact(path, public_path)
    assert verify_artifact(str(path), public).verified
    assert not read.verified and verified.verified

    data = path.read_bytes()
    for artifact in (written, read, verified):
        assert artifact.model == tiny_onnx and artifact.model_format == "onnx"
        assert artifact.key_id == key_id(public)
        assert artifact.size == len(data) == path.stat().st_size
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.baseline == baseline_for(tiny_selftest[0])
        for mine, theirs in ((artifact.selftest_inputs, tiny_selftest[0]), (artifact.selftest_outputs, tiny_selftest[1])):
            assert mine.keys() == theirs.keys()
            for name in mine:
                assert mine[name].dtype == theirs[name].dtype
                np.testing.assert_array_equal(mine[name], theirs[name])

    manifest = verified.manifest
    assert manifest == written.manifest == read.manifest
    for key, value in manifest_for().items():
        assert manifest[key] == value
    assert manifest["schema_version"] == 1 < SCHEMA_VERSION  # stored as is: older readers read it too
    assert (manifest["format"], manifest["model_member"]) == ("onnx", "model.onnx")
    assert set(manifest["members"]) == {"model.onnx", "selftest.npz", "baseline.json"}
    for name, entry in manifest["members"].items():
        stored = member(path, name)
        assert entry == {"sha256": hashlib.sha256(stored).hexdigest(), "size": len(stored)}
    assert member(path, "manifest.json") == canonical_json(manifest)

    signature = json.loads(member(path, "signature.json"))
    assert signature["algorithm"] == "ed25519" and signature["key_id"] == key_id(public)
    public.verify(base64.b64decode(signature["signature"]), member(path, "manifest.json"))


def test_a_device_can_run_the_pretrained_model_it_reads(tmp_path, keys):
    """magika's real 3 MB model: what a device reads back runs and reproduces the self-test outputs."""
    model = model_path(*MAGIKA).read_bytes()
    inputs, outputs = selftest_for(model, "onnx", {"bytes": magika_inputs(4)})
    path = tmp_path / "magika.edgeml"
    write_artifact(
        path, model=model, model_format="onnx", manifest=manifest_for("magika"),
        selftest_inputs=inputs, selftest_outputs=outputs, baseline=baseline_for(inputs), private_key=keys[0],
    )  # the key given as a path this time
    artifact = verify_artifact(path, keys[1])
    assert artifact.selftest_inputs["bytes"].dtype == np.int32
    rerun = load_runner(artifact.model, artifact.model_format).run(artifact.selftest_inputs)
    for name, expected in artifact.selftest_outputs.items():
        np.testing.assert_allclose(rerun[name], expected, rtol=1e-5, atol=1e-6)
    assert np.argmax(rerun[next(iter(rerun))], axis=-1).tolist() == np.argmax(outputs[next(iter(outputs))], axis=-1).tolist()
    assert artifact.compressed and artifact.size < artifact.content_size
    with zipfile.ZipFile(io.BytesIO(unpacked(path))) as zf:  # stored: the ZIP adds only its headers
        assert artifact.content_size - sum(i.file_size for i in zf.infolist()) < 1024


def test_tflite_round_trip(tmp_path, tiny_tflite, keys):
    inputs, outputs = selftest_for(tiny_tflite, "tflite", {"x": np.eye(4, dtype=np.float32)})
    path = tmp_path / "tiny_tflite.edgeml"
    write_artifact(
        path, model=tiny_tflite, model_format="tflite", manifest={"name": "t", "version": 1},
        selftest_inputs=inputs, selftest_outputs=outputs, baseline={}, private_key=keys[2], compress=False,
    )
    artifact = verify_artifact(path, keys[3])
    assert artifact.model_format == "tflite" and artifact.manifest["model_member"] == "model.tflite"
    with zipfile.ZipFile(path) as zf:
        assert "model.tflite" in zf.namelist() and "model.onnx" not in zf.namelist()
    rerun = load_runner(artifact.model, "tflite").run(artifact.selftest_inputs)
    np.testing.assert_allclose(rerun["y"], artifact.selftest_outputs["y"], rtol=1e-6)


# -- the compressed form (what optimize writes and devices download) ------------------------------


@pytest.fixture()
def packed_artifact(tmp_path, tiny_onnx, tiny_selftest, keys):
    path = tmp_path / "packed.edgeml"
    write_tiny(path, tiny_onnx, tiny_selftest, keys[2], compress=True)
    return path


def test_compressed_artifact_is_the_same_zip_in_a_zstd_frame(packed_artifact, tmp_path, tiny_onnx, tiny_selftest, keys):
    plain = tmp_path / "plain.edgeml"
    write_tiny(plain, tiny_onnx, tiny_selftest, keys[2])
    data = packed_artifact.read_bytes()
    assert data[:4] == transfer.MAGIC and unpacked(packed_artifact) == plain.read_bytes()
    artifact = verify_artifact(packed_artifact, keys[3])
    assert artifact.compressed and artifact.size == len(data) < artifact.content_size == plain.stat().st_size
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()  # of what is shipped
    assert not verify_artifact(plain, keys[3]).compressed


def test_every_single_byte_flip_in_the_compressed_file_is_caught_or_harmless(packed_artifact, tmp_path, keys):
    """zstd can encode one content in several ways, so a flip may (rarely) still decode to the very
    same ZIP; then nothing changed that matters. Any flip that changes the content is caught."""
    data = packed_artifact.read_bytes()
    content = unpacked(packed_artifact)
    target = tmp_path / "flipped.edgeml"
    passed = []
    for index in range(len(data)):
        target.write_bytes(flip(data, index))
        try:
            verify_artifact(target, keys[3])
            passed.append(index)
        except (VerificationError, InputError) as exc:
            assert "\n" not in str(exc)
    assert len(passed) < len(data) // 100
    for index in passed:
        target.write_bytes(flip(data, index))
        assert unpacked(target) == content


def test_truncated_padded_and_bomb_frames_are_refused(packed_artifact, tmp_path, keys, monkeypatch):
    import zstandard

    data = packed_artifact.read_bytes()
    bad = tmp_path / "bad.edgeml"
    for damaged, reason in ((data[:-10], "damaged"), (data + b"\0" * 8, "damaged")):
        bad.write_bytes(damaged)
        with pytest.raises(VerificationError, match=f"cannot be unpacked: .*{reason}"):
            verify_artifact(bad, keys[3])
    no_size = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bad.write_bytes(no_size.compress(unpacked(packed_artifact)) + no_size.flush())
    with pytest.raises(VerificationError, match="does not state its size"):
        verify_artifact(bad, keys[3])
    bad.write_bytes(transfer.compress(bytes(4 << 20), level=1))  # 4 MiB of zeros in a few hundred bytes
    monkeypatch.setattr("edgeml.core.artifact.reader.MAX_ARTIFACT_BYTES", 1 << 20)
    with pytest.raises(VerificationError, match="more than the 1048576 allowed"):
        verify_artifact(bad, keys[3])


# -- determinism and ZIP compatibility -------------------------------------------------------------


def test_same_content_gives_the_same_bytes(tmp_path, tiny_onnx, tiny_selftest, keys):
    first = write_tiny(tmp_path / "a.edgeml", tiny_onnx, tiny_selftest, keys[2], compress=True)
    # the same dicts in a different insertion order, written a moment later
    reordered_manifest = dict(reversed(list(manifest_for().items())))
    inputs, outputs = tiny_selftest
    second = write_artifact(
        tmp_path / "b.edgeml", model=tiny_onnx, model_format="onnx", manifest=reordered_manifest,
        selftest_inputs=dict(inputs), selftest_outputs=dict(outputs),
        baseline=dict(reversed(list(baseline_for(inputs).items()))), private_key=keys[2],
    )
    assert (tmp_path / "a.edgeml").read_bytes() == (tmp_path / "b.edgeml").read_bytes()
    assert first.sha256 == second.sha256
    changed = write_tiny(tmp_path / "c.edgeml", tiny_onnx, tiny_selftest, keys[2], manifest={**manifest_for(), "version": 4})
    assert changed.sha256 != first.sha256


def test_ordinary_zip_tools_open_it(tiny_artifact, tiny_selftest):
    with zipfile.ZipFile(tiny_artifact) as zf:
        assert zf.namelist() == MEMBER_ORDER
        assert zf.testzip() is None
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
        with np.load(io.BytesIO(zf.read("selftest.npz"))) as npz:
            assert sorted(npz.files) == ["input/x", "output/y"]
            np.testing.assert_array_equal(npz["input/x"], tiny_selftest[0]["x"])
    if shutil.which("unzip") is None:
        pytest.skip("no unzip command on this machine")
    listing = subprocess.run(["unzip", "-l", str(tiny_artifact)], capture_output=True, text=True, check=True).stdout
    for name in MEMBER_ORDER:
        assert name in listing
    tested = subprocess.run(["unzip", "-t", str(tiny_artifact)], capture_output=True, text=True)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout


def test_python_zipfile_rebuilds_the_same_bytes(tiny_artifact, tmp_path):
    """The layout is plain ZIP: zipfile, given the same members, writes the very same file."""
    rebuilt = rezip(tiny_artifact, tmp_path / "rebuilt.edgeml")
    assert rebuilt.read_bytes() == tiny_artifact.read_bytes()


# -- tampering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "selftest.npz", "baseline.json"])
def test_a_changed_member_is_caught(tiny_artifact, tmp_path, keys, name):
    original = member(tiny_artifact, name)
    tampered = rezip(tiny_artifact, tmp_path / "t.edgeml", replace={name: flip(original, len(original) // 2)})
    message = verification_error(verify_artifact, tampered, keys[1])
    assert name in message and "changed after signing" in message
    verification_error(read_artifact, tampered)  # hashes alone catch it

    # the same flip made directly in the file: the ZIP CRC notices first
    with zipfile.ZipFile(tiny_artifact) as zf:
        info = zf.getinfo(name)
    data = tiny_artifact.read_bytes()
    start = info.header_offset + 30 + len(name)  # local header, then the name, then the data
    assert data[start:start + len(original)] == original
    raw = tmp_path / "raw.edgeml"
    raw.write_bytes(flip(data, start + len(original) // 2))
    assert name in verification_error(verify_artifact, raw, keys[1])


def test_a_changed_manifest_fails_the_signature(tiny_artifact, tmp_path, keys):
    manifest = json.loads(member(tiny_artifact, "manifest.json"))
    manifest["metrics"]["accuracy"] = 0.999  # still valid and canonical, so only the signature knows
    tampered = rezip(tiny_artifact, tmp_path / "t.edgeml", replace={"manifest.json": canonical_json(manifest)})
    assert read_artifact(tampered).manifest["metrics"]["accuracy"] == 0.999  # integrity only: not signed
    message = verification_error(verify_artifact, tampered, keys[1])
    assert "signature does not match manifest.json" in message

    # a flipped byte that breaks the canonical form is caught without a key
    raw = member(tiny_artifact, "manifest.json")
    broken = rezip(tiny_artifact, tmp_path / "b.edgeml", replace={"manifest.json": raw.replace(b'"version":3', b'"version": 3')})
    assert "manifest.json" in verification_error(read_artifact, broken)


def test_a_changed_signature_is_caught(tiny_artifact, tmp_path, keys):
    signature = json.loads(member(tiny_artifact, "signature.json"))
    raw = base64.b64decode(signature["signature"])
    signature["signature"] = base64.b64encode(flip(raw, 10)).decode()
    tampered = rezip(tiny_artifact, tmp_path / "t.edgeml", replace={"signature.json": canonical_json(signature)})
    assert "signature does not match" in verification_error(verify_artifact, tampered, keys[1])


def test_every_single_byte_flip_in_the_file_is_caught(tiny_artifact, tmp_path, keys):
    """Headers, names, CRCs, the central directory: no byte of the file can change unnoticed."""
    data = tiny_artifact.read_bytes()
    target = tmp_path / "flipped.edgeml"
    passed = []
    for index in range(len(data)):
        target.write_bytes(flip(data, index))
        try:
            verify_artifact(target, keys[3])
            passed.append(index)
        except VerificationError as exc:
            assert "\n" not in str(exc)
    assert passed == []
    assert len(data) > 1000  # the sweep covered a real artifact


def test_wrong_public_key(tiny_artifact, tmp_path, keys):
    _, other_public = generate_keys(tmp_path / "other")
    message = verification_error(verify_artifact, tiny_artifact, other_public)
    mine, theirs = key_id(keys[3]), key_id(load_public_key(other_public))
    assert f"signed by key {mine}, not by the given key {theirs}" in message
    assert "pass the matching signing.pub" in message

    with pytest.raises(KeyFileError, match="is the private key"):  # private where the public one belongs
        verify_artifact(tiny_artifact, keys[0])
    with pytest.raises(KeyFileError, match="is the private key"):
        verify_artifact(tiny_artifact, keys[2])
    with pytest.raises(KeyFileError, match="RSA"):
        verify_artifact(tiny_artifact, rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())


def test_missing_signature(tiny_artifact, tmp_path, keys):
    unsigned = rezip(tiny_artifact, tmp_path / "u.edgeml", drop={"signature.json"})
    assert "not signed" in verification_error(verify_artifact, unsigned, keys[1])
    assert "not signed" in verification_error(read_artifact, unsigned)


def test_missing_extra_and_duplicate_members(tiny_artifact, tmp_path, keys):
    extra = rezip(tiny_artifact, tmp_path / "x.edgeml", add=[("notes.txt", b"hi")])
    assert "unexpected member 'notes.txt'" in verification_error(verify_artifact, extra, keys[1])
    missing = rezip(tiny_artifact, tmp_path / "m.edgeml", drop={"baseline.json"})
    assert "baseline.json" in verification_error(read_artifact, missing)
    with pytest.warns(UserWarning, match="Duplicate name"):
        duplicate = rezip(tiny_artifact, tmp_path / "d.edgeml", add=[("model.onnx", b"another model")])
    assert "more than once" in verification_error(verify_artifact, duplicate, keys[1])


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "..\\evil"])
def test_path_traversal_names(tiny_artifact, tmp_path, keys, name):
    evil = rezip(tiny_artifact, tmp_path / "e.edgeml", add=[(name, b"payload")])
    assert "outside the artifact" in verification_error(verify_artifact, evil, keys[1])


def test_repacked_with_compression(tiny_artifact, tmp_path, keys):
    repacked = rezip(tiny_artifact, tmp_path / "r.edgeml", compression=zipfile.ZIP_DEFLATED)
    assert "compressed" in verification_error(verify_artifact, repacked, keys[1])


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_unsupported_schema_version(tiny_artifact, tmp_path, keys, version):
    manifest = json.loads(member(tiny_artifact, "manifest.json"))
    manifest["schema_version"] = version
    manifest_bytes = canonical_json(manifest)
    signature = json.loads(member(tiny_artifact, "signature.json"))
    signature["signature"] = base64.b64encode(keys[2].sign(manifest_bytes)).decode()  # properly signed
    future = rezip(tiny_artifact, tmp_path / "f.edgeml",
                   replace={"manifest.json": manifest_bytes, "signature.json": canonical_json(signature)})
    message = verification_error(verify_artifact, future, keys[1])
    assert "schema_version" in message
    if version == SCHEMA_VERSION + 1:
        assert "upgrade edgeml" in message


def test_files_that_are_not_artifacts(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_artifact(tmp_path / "missing.edgeml")
    with pytest.raises(InputError, match="is a folder"):
        read_artifact(tmp_path)
    text = tmp_path / "model.edgeml"
    text.write_text("just text\n")
    empty = tmp_path / "empty.edgeml"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(InputError, match="not a ZIP file"):
            read_artifact(path)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("README.md", "hello")
    with pytest.raises(InputError, match="not an edgeml artifact") as info:
        read_artifact(other_zip)
    assert "\n" not in str(info.value)


# -- atomic writes ---------------------------------------------------------------------------------


def test_failed_writes_leave_nothing_behind(tmp_path, tiny_onnx, tiny_selftest, keys):
    path = tmp_path / "out.edgeml"
    with pytest.raises(ValueError, match="NaN"):
        write_tiny(path, tiny_onnx, tiny_selftest, keys[2], manifest={**manifest_for(), "metrics": {"accuracy": float("nan")}})
    with pytest.raises(ValueError):
        write_tiny(path, tiny_onnx, tiny_selftest, keys[2], baseline={"x": {"max": float("inf")}})
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeyFileError, match="RSA"):
        write_tiny(path, tiny_onnx, tiny_selftest, rsa_key)
    for public in (keys[1], keys[3]):  # the public key, as a file and as an object
        with pytest.raises(KeyFileError, match="is the public key"):
            write_tiny(path, tiny_onnx, tiny_selftest, public)
    with pytest.raises(ValueError, match="model_format"):
        write_artifact(path, model=tiny_onnx, model_format="pt", manifest={}, selftest_inputs={},
                       selftest_outputs={}, baseline={}, private_key=keys[2])
    with pytest.raises(InputError, match="does not exist"):
        write_tiny(tmp_path / "no" / "such" / "out.edgeml", tiny_onnx, tiny_selftest, keys[2])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_existing_artifact(tmp_path, tiny_onnx, tiny_selftest, keys):
    path = tmp_path / "out.edgeml"
    write_tiny(path, tiny_onnx, tiny_selftest, keys[2])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_tiny(path, tiny_onnx, tiny_selftest, keys[2], manifest={"name": "x", "score": float("nan")})
    with pytest.raises(ValueError, match="dtype object"):
        write_artifact(path, model=tiny_onnx, model_format="onnx", manifest={}, selftest_inputs={"x": np.array([{}, 1])},
                       selftest_outputs={}, baseline={}, private_key=keys[2])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.edgeml"]
    # a successful write replaces it in place, with an artifact's usual mode
    write_tiny(path, tiny_onnx, tiny_selftest, keys[2], manifest={**manifest_for(), "version": 9})
    assert verify_artifact(path, keys[3]).manifest["version"] == 9
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["out.edgeml"]


# -- canonical JSON and light imports --------------------------------------------------------------


def test_canonical_json():
    assert canonical_json({"b": 1, "a": [1.5, "é", None, True]}) == '{"a":[1.5,"é",null,true],"b":1}'.encode()
    assert canonical_json({"x": np.float32(0.5), "n": np.int64(3), "v": np.arange(2)}) == b'{"n":3,"v":[0,1],"x":0.5}'
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            canonical_json({"a": bad})
    with pytest.raises(ValueError):
        canonical_json({1: "int keys would not read back the same"})


def test_device_side_imports_stay_light():
    code = (
        "import sys, edgeml.core.artifact, edgeml.core.signing, edgeml.core.transfer\n"
        "heavy = [m for m in ('tensorflow', 'onnx', 'onnxruntime', 'keras', 'tf2onnx', 'ai_edge_litert') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
