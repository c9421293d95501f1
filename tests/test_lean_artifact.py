"""Lean artifacts: what a file carries beyond its model's zstd bytes (self-test, manifest, signature,
baseline) stays within max(5% of them, 32 KiB), and the self-test stays strict: compact references
still pass the right model on the device runtime and fail a different one."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pretrained
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_artifact import keys  # noqa: F401  (a fixture: private path, public path, private key, public key)

from edgeml.cli import main
from edgeml.core import transfer
from edgeml.core.artifact import overhead, read_artifact, verify_artifact, write_artifact
from edgeml.core.data import Dataset
from edgeml.core.errors import VerificationError
from edgeml.core.runtime import load_runner
from edgeml.core.selftest import build_selftest, run_selftest
from edgeml.core.stats import baseline_stats, output_stats

KIB = 1024


def budget(model_zstd: int) -> float:
    return max(0.05 * model_zstd, 32 * KIB)


def photo_crops(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``[n, 3, size, size]`` float32 in [0, 1]: crops of scikit-learn's two bundled photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        r, c = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[r:r + size, c:c + size].transpose(2, 0, 1).astype(np.float32) / 255.0)
    return np.stack(crops)


def onnx_model(nodes, output: str, output_shape, weights: dict) -> bytes:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 64, 64])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cnn() -> bytes:
    """A 3x64x64 image classifier (two convolutions, ten classes), weights seeded."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32),
               "w2": rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32),
               "w3": rng.normal(0, 0.2, (32, 10)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w3"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    return onnx_model(nodes, "probs", [None, 10], weights)


def dense_map(scale: float = 1.0) -> bytes:
    """A probability map per pixel ([N, 4, 64, 64]): an output no top-k describes, only a projection."""
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32) * np.float32(scale)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["map"])]
    return onnx_model(nodes, "map", [None, 4, 64, 64], {"w": w})


def perturbed(model: bytes, scale: float, seed: int = 0) -> bytes:
    """The same graph with every large float weight multiplied by (1 + scale * noise)."""
    proto = onnx.load_from_string(model)
    rng = np.random.default_rng(seed)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size >= 100:
            noisy = (w.astype(np.float32) * (1 + scale * rng.standard_normal(w.shape))).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return proto.SerializeToString()


def write_lean(path, model: bytes, inputs: dict, private_key, name: str = "m"):
    """What ``edgeml optimize`` writes: the self-test chosen by build_selftest, the optimizer's
    transfer figures and baseline; returns the SelfTestSet and the model's zstd bytes."""
    runner = load_runner(model, "onnx")
    zstd = transfer.compressed_size(model)
    st = build_selftest(runner, Dataset(inputs), model_zstd_bytes=zstd)
    baseline = baseline_stats(inputs)
    baseline["outputs"] = output_stats(runner.run(inputs))
    write_artifact(path, model=model, model_format="onnx", private_key=private_key, baseline=baseline,
                   manifest={"name": name, "version": 1, "selftest": st.meta,
                             "transfer": {"encoding": "zstd", "level": transfer.LEVEL, "model_bytes": zstd}},
                   selftest_inputs=st.inputs, selftest_outputs=st.outputs)
    return st, zstd


def agent_check(path, public_key):
    """``edgeml-agent check`` as a device runs it; also says whether anything heavy was imported."""
    code = ("import sys, json; from device_agent.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnx') if m in sys.modules]; "
            "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "check", str(path), "--public-key", str(public_key), "--json"],
                          capture_output=True, text=True, timeout=120)
    return proc, json.loads(proc.stderr.strip().splitlines()[-1])


# -- the PP-OCR text recognizer as float16 (outputs 40 x 6625 class scores per line) ---------------


@pytest.fixture(scope="module")
def rec(keys, tmp_path_factory):  # noqa: F811
    from edgeml.optimizer.backends import BuildOptions, get_backend
    from edgeml.optimizer.sources.onnx import load_onnx

    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_REC))
    model = get_backend("onnx").build(source, "float16", None, BuildOptions(seed=0, min_agreement=0.99)).model
    lines, _ = pretrained.ppocr_cls_crops(8, seed=3)  # text lines 48 high, padded on the right as rapidocr does
    x = np.pad(lines, ((0, 0), (0, 0), (0, 0), (0, 320 - lines.shape[-1])))
    path = tmp_path_factory.mktemp("rec") / "rec.edgeml"
    st, zstd = write_lean(path, model, {"x": x}, keys[2], name="ppocr_rec")
    return path, model, st, zstd


def test_ppocr_rec_float16_artifact_stays_within_its_budget_and_passes_on_the_device(rec, keys):  # noqa: F811
    path, model, st, zstd = rec
    extra = path.stat().st_size - zstd
    assert extra <= budget(zstd), f"{extra} bytes beyond the model's {zstd} zstd bytes"
    art = verify_artifact(path, keys[1])
    meta = art.manifest["selftest"]
    assert art.manifest["schema_version"] == 2
    (name, ref), = meta["references"].items()
    assert ref["kind"] == "topk+projection" and ref["shape"][1:] == [40, 6625]
    assert meta["inputs"]["x"] == {"dtype": "float32", "stored": "float16"}
    assert 2 <= meta["samples"] <= 8 and art.selftest_outputs == {}
    assert art.selftest_inputs["x"].dtype == np.float32  # decoded as the model takes it
    np.testing.assert_array_equal(art.selftest_inputs["x"], st.inputs["x"])
    proc, tail = agent_check(path, keys[1])
    assert proc.returncode == 0 and tail["heavy"] == [], proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["selftest"]["ok"] and doc["selftest"]["references"] == {name: "topk+projection"}


def test_a_different_model_fails_the_compact_selftest(rec, keys, tmp_path):  # noqa: F811
    """The artifact's model replaced by the same network with its weights moved by 1%: signed, so
    only the self-test can tell, and its compact references do, on the device's runtime."""
    path, model, st, _ = rec
    art = read_artifact(path)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("members", "schema_version", "format", "model_member")}
    bad = tmp_path / "bad.edgeml"
    write_artifact(bad, model=perturbed(model, 0.01), model_format="onnx", manifest=manifest, baseline=art.baseline,
                   selftest_inputs=st.inputs, selftest_outputs=st.outputs, private_key=keys[2])
    proc, tail = agent_check(bad, keys[1])
    assert proc.returncode == 8 and tail["heavy"] == []
    assert "self-test failed on output 'softmax_11.tmp_0'" in proc.stderr and "topk+projection" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- a small image CNN through edgeml optimize, and what inspect says about it ----------------------------


@pytest.fixture(scope="module")
def cnn_artifact(keys, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("cnn")
    (folder / "cnn.onnx").write_bytes(cnn())
    np.savez(folder / "eval.npz", x=photo_crops(32))
    out = folder / "cnn.edgeml"
    code = main(["optimize", str(folder / "cnn.onnx"), "-o", str(out), "--eval", str(folder / "eval.npz"),
                 "--key", str(keys[0]), "--recipe", "fp32", "--latency-runs", "3", "--no-plot", "--json"])
    assert code == 0
    return out


def test_small_cnn_artifact_is_at_most_32_kib_over_its_model(cnn_artifact, keys, capsys):  # noqa: F811
    art = verify_artifact(cnn_artifact, keys[1])
    zstd = transfer.compressed_size(art.model)
    assert art.size - zstd <= 32 * KIB, f"{art.size - zstd} bytes beyond the model's {zstd} zstd bytes"
    assert art.manifest["selftest"]["samples"] >= 2
    result = run_selftest(art)
    assert result.ok and result.samples >= 2 and result.references == {"probs": "full"}


def test_inspect_reports_the_overhead(cnn_artifact, capsys):
    art = read_artifact(cnn_artifact)
    zstd = transfer.compressed_size(art.model)
    capsys.readouterr()
    assert main(["inspect", str(cnn_artifact), "--json"]) == 0
    o = json.loads(capsys.readouterr().out)["overhead"]
    assert o["file_bytes"] == art.size and o["model_zstd_bytes"] == zstd
    assert o["overhead_bytes"] == art.size - zstd and o["within_budget"] and o["budget_bytes"] == 32 * KIB
    assert o["overhead_percent"] == pytest.approx(100 * (art.size - zstd) / zstd, abs=0.01)
    assert 0 < o["metadata_bytes"] < o["selftest_bytes"] <= o["overhead_bytes"]
    assert o["selftest_samples"] == art.manifest["selftest"]["samples"] and o["references"] == {"probs": "full"}
    assert main(["inspect", str(cnn_artifact)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"overhead {o['overhead_bytes']} bytes on top of the model's {zstd} zstd bytes" in text
    assert f"self-test {o['selftest_bytes']}" in text


# -- projections: the bound a correct model meets and a wrong one does not ----------------------------------


class Shifted:
    """A runner that gives the reference outputs plus ``shift(reference)``."""

    def __init__(self, model: bytes, shift):
        self.inner, self.shift = load_runner(model, "onnx"), shift
        self.outputs = self.inner.outputs

    def run(self, feed):
        return {k: v + self.shift(v) for k, v in self.inner.run(feed).items()}


@pytest.fixture(scope="module")
def map_artifact(keys, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("map") / "map.edgeml"
    write_lean(path, dense_map(), {"x": photo_crops(8, seed=1)}, keys[2], name="map")
    return path


def test_a_projected_reference_passes_errors_within_atol_and_fails_real_ones(map_artifact, keys):  # noqa: F811
    art = verify_artifact(map_artifact, keys[1])
    ref = art.manifest["selftest"]["references"]["map"]
    assert ref["kind"] == "projection" and art.manifest["schema_version"] == 2
    assert art.size - transfer.compressed_size(art.model) <= 32 * KIB
    atol = art.manifest["selftest"]["atol"]
    model = dense_map()
    rng = np.random.default_rng(0)
    within = {  # what another CPU may do: every entry within atol
        "random": lambda y: rng.uniform(-atol, atol, y.shape).astype(y.dtype),
        "all at +atol": lambda y: np.full_like(y, atol * 0.999),
        "signs of the map": lambda y: (np.sign(y - 0.5) * atol * 0.999).astype(y.dtype),
    }
    for what, shift in within.items():
        result = run_selftest(art, Shifted(model, shift))
        assert result.ok and result.max_abs_error <= atol, what
    assert run_selftest(art).ok
    beyond = {  # a different model, and errors a full comparison would catch
        "weights moved by 2%": None,
        "one pixel off by 0.5": lambda y: np.where(np.arange(y.size).reshape(y.shape) == 1234, 0.5, 0).astype(y.dtype),
        "every entry off by 3 atol": lambda y: (3 * atol * rng.choice([-1, 1], y.shape)).astype(y.dtype),
    }
    for what, shift in beyond.items():
        runner = load_runner(perturbed(model, 0.02), "onnx") if shift is None else Shifted(model, shift)
        result = run_selftest(art, runner)
        assert not result.ok and result.failed_output == "map", what
        with pytest.raises(VerificationError, match="projection reference"):
            result.require_ok("do not serve it")


def test_the_manifest_and_the_stored_references_must_agree(map_artifact, keys, tmp_path):  # noqa: F811
    """A reference whose description does not fit its arrays is refused as damaged, even when signed."""
    art = read_artifact(map_artifact)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("members", "schema_version", "format", "model_member")}
    outputs = load_runner(art.model, "onnx").run(art.selftest_inputs)
    with pytest.raises(ValueError, match="shape"):  # the writer: outputs of another shape than described
        write_artifact(tmp_path / "x.edgeml", model=art.model, model_format="onnx", manifest=manifest, baseline={},
                       selftest_inputs={"x": art.selftest_inputs["x"][:1]}, selftest_outputs={"map": outputs["map"][:1]},
                       private_key=keys[2])
    with pytest.raises(ValueError, match="float16"):  # inputs the references were not computed on
        write_artifact(tmp_path / "y.edgeml", model=art.model, model_format="onnx", manifest=manifest, baseline={},
                       selftest_inputs={"x": art.selftest_inputs["x"] + np.float32(1e-4)}, selftest_outputs=outputs,
                       private_key=keys[2])
    assert list(tmp_path.iterdir()) == []
