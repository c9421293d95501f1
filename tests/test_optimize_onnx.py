"""edgeml optimize on real pretrained ONNX models from packages, through the CLI and the API."""
from __future__ import annotations

import json

import numpy as np
import pretrained
import pytest

import edgeml
from edgeml.cli import main
from edgeml.core.artifact import verify_artifact
from edgeml.core.errors import DataError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    edgeml.generate_keys(out)
    return out


def test_ppocr_classifier_through_the_cli(tmp_path, keys, capsys):
    """Weights in Constant nodes, dynamic axes: the CLI builds, measures and signs the result."""
    model = pretrained.model_path(*pretrained.PPOCR_CLS)
    x_cal, _ = pretrained.ppocr_cls_crops(48, seed=1)
    x_eval, y_eval = pretrained.ppocr_cls_crops(96, seed=2)
    np.savez(tmp_path / "calib.npz", x=x_cal)
    np.savez(tmp_path / "eval.npz", x=x_eval)
    out = tmp_path / "cls.edgeml"
    code = main(["optimize", str(model), "-o", str(out), "--calibration", str(tmp_path / "calib.npz"),
                 "--eval", str(tmp_path / "eval.npz"), "--key", str(keys / "signing.key"), "--recipe", "auto",
                 "--max-accuracy-drop", "0.03", "--latency-runs", "10", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["ok"], doc
    by_recipe = {c["recipe"]: c for c in doc["candidates"]}
    assert set(by_recipe) == {"fp32", "float16", "dynamic", "int8"}
    assert by_recipe["fp32"]["quality"]["agreement"] == 1.0  # prepared graph == original
    kept = by_recipe[doc["chosen"]]
    assert kept["quality"]["drop_kind"] == "agreement" and kept["quality"]["drop"] <= 0.03
    assert kept["bytes"] < 0.6 * by_recipe["fp32"]["bytes"]
    art = verify_artifact(out, keys / "signing.pub")
    assert art.model_format == "onnx" and art.manifest["inputs"][0]["name"] == "x"
    assert edgeml.run_selftest(art).ok


def _silero_data(path, n, seed):
    chunks = pretrained.silero_chunks(n, seed=seed)
    np.savez(path, input=chunks[:, None, :], state=np.zeros((n, 2, 1, 128), np.float32),
             sr=np.full(n, 16000, np.int64))


def test_silero_control_flow_with_state_and_scalar_inputs(tmp_path, keys):
    """An If-branching recurrent model whose inputs have no leading batch axis: data is given as
    whole inputs, one extra leading axis; weights inside the If branch are quantized."""
    _silero_data(tmp_path / "cal.npz", 32, seed=1)
    _silero_data(tmp_path / "eval.npz", 64, seed=2)
    out = tmp_path / "vad.edgeml"
    result = edgeml.optimize(edgeml.OptimizeConfig(
        model=pretrained.model_path(*pretrained.SILERO), output=out, key=keys / "signing.key",
        calibration=str(tmp_path / "cal.npz"), eval=str(tmp_path / "eval.npz"), recipe="auto",
        max_accuracy_drop=0.01, latency_runs=10, plot=False))
    by_recipe = {m.recipe: m for m in result.candidates}
    assert by_recipe["dynamic"].candidate is not None
    assert by_recipe["dynamic"].bytes < by_recipe["fp32"].bytes
    assert result.chosen.quality.drop_kind == "cosine" and result.chosen.quality.drop <= 0.01
    art = verify_artifact(out, keys / "signing.pub")
    assert art.manifest["selftest"]["whole_samples"] is True
    assert art.selftest_inputs["sr"].shape == (8,)
    assert edgeml.run_selftest(art).ok


def test_mixed_batched_and_whole_inputs_are_refused(tmp_path):
    from edgeml.core.data import load_data, match_inputs
    from edgeml.optimizer.sources.onnx import load_onnx

    source = load_onnx(pretrained.model_path(*pretrained.SILERO))
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 512), np.float32), state=np.zeros((4, 2, 1, 128), np.float32),
             sr=np.full(4, 16000, np.int64))
    with pytest.raises(DataError, match="whole inputs \\(one extra leading axis\\)"):
        match_inputs(load_data(str(tmp_path / "d.npz")), source.inputs, "eval")


def test_external_data_beside_the_file_is_read_in(tmp_path):
    """torch's exporter and MLflow's onnx flavor keep weights in a file beside the .onnx, even for
    small models: it is read into the model; a missing one or one outside the folder is one line."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeml.core.errors import InputError
    from edgeml.optimizer.sources.onnx import load_onnx

    w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size == w.nbytes
    source = load_onnx(path)
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(source.reference({"x": x})["y"], x @ w, rtol=1e-5)
    assert not onnx.load_model_from_string(source.onnx_bytes()).graph.initializer[0].external_data  # one file now

    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InputError, match="m.onnx.data, which is missing"):
        load_onnx(path)
    for t in model.graph.initializer:
        t.data_location, t.raw_data = TensorProto.EXTERNAL, b""
        del t.external_data[:]
        t.external_data.add(key="location", value="../outside.data")
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="outside its folder"):
        load_onnx(path)
