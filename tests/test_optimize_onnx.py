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
    assert set(by_recipe) == {"fp32", "float16", "dynamic", "int8", "int8-weights"}
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


def test_doc_strings_and_metadata_do_not_ship(tmp_path, keys):
    """torch's dynamo exporter writes a stack trace with the build machine's paths into every
    node's metadata; none of it reaches the artifact, the names do, and lineage keeps the file's hash."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    secret = "/home/builder/secret-project/train.py"
    w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/head/MatMul", doc_string=f"File {secret}, line 7")
    node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f"File {secret}, line 7, in forward")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(w, "w")], doc_string=secret)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=secret)
    helper.set_model_props(model, {"exported_from": secret})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "e.npz", x=np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32))
    result = edgeml.optimize(edgeml.OptimizeConfig(model=path, output=tmp_path / "m.edgeml", key=keys / "signing.key",
                                                   eval=str(tmp_path / "e.npz"), recipe="fp32", latency_runs=3,
                                                   plot=False))
    art = verify_artifact(result.artifact, keys / "signing.pub")
    assert secret.encode() not in art.model and b"secret-project" not in art.model
    shipped = onnx.load_model_from_string(art.model)
    assert [n.op_type for n in shipped.graph.node] == ["MatMul"]
    assert [i.name for i in shipped.graph.input] == ["x"] and [o.name for o in shipped.graph.output] == ["y"]
    assert art.manifest["lineage"]["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_auto_keeps_fp32_when_quantizing_changes_nothing(tmp_path, keys):
    """A model without weights: float16, dynamic and int8 are the same bytes at the same speed, so
    auto keeps fp32 and says so, instead of reporting a quantized model that is not one."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "add.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    result = edgeml.optimize(edgeml.OptimizeConfig(
        model=tmp_path / "add.onnx", output=tmp_path / "add.edgeml", key=keys / "signing.key",
        eval=str(tmp_path / "d.npz"), calibration=str(tmp_path / "d.npz"), latency_runs=5, plot=False))
    assert result.chosen.recipe == "fp32" and result.goal_met
    assert "kept by auto" in " ".join(result.chosen.notes)


def test_a_reference_that_predicts_one_class_everywhere_is_flagged(tmp_path, keys, caplog):
    """Eval data the model was not made for (say, unscaled): every sample gets the same class."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.array([5.0, 0.0, 0.0], np.float32), "b")
    w = numpy_helper.from_array(np.zeros((4, 3), np.float32) + 1e-3, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["l"]),
                               helper.make_node("Softmax", ["l"], ["probs"], axis=-1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3])], [w, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32))
    with caplog.at_level("WARNING"):
        edgeml.optimize(edgeml.OptimizeConfig(model=tmp_path / "c.onnx", output=tmp_path / "c.edgeml", recipe="fp32",
                                              key=keys / "signing.key", eval=str(tmp_path / "d.npz"), latency_runs=3,
                                              plot=False))
    assert any("predicts class 0 for every eval sample" in r.getMessage() for r in caplog.records)


def test_torch_dynamo_export_as_a_user_makes_it(tmp_path, keys):
    """torch 2.13's default exporter writes m.onnx + m.onnx.data even for a small model, with a
    stack trace of the build machine in every node: it is read, and none of that ships."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 256), torch.nn.Linear(256, 10)

        def forward(self, x):
            return torch.softmax(self.b(torch.relu(self.a(x))), -1)

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(4, 64),), str(path), dynamic_shapes={"x": {0: "batch"}})
    assert (tmp_path / "m.onnx.data").is_file()  # what the issue saw: external data for a 78 KB model
    assert b"stack_trace" in path.read_bytes()
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = edgeml.optimize(edgeml.OptimizeConfig(model=path, output=tmp_path / "m.edgeml", key=keys / "signing.key",
                                                   eval=str(tmp_path / "d.npz"), calibration=str(tmp_path / "d.npz"),
                                                   recipe="int8", latency_runs=5, plot=False))
    art = verify_artifact(result.artifact, keys / "signing.pub")
    assert result.goal_met and art.manifest["lineage"]["source"]["kind"] == "onnx"
    for leak in (b"stack_trace", str(tmp_path).encode(), b"test_optimize_onnx.py", b"site-packages"):
        assert leak not in art.model, leak


def test_scikit_learn_models_as_skl2onnx_converts_them(tmp_path, keys, capsys):
    """skl2onnx's defaults: a ZipMap output (a sequence of maps) and an int64 label output. The
    maps become a score tensor, the labels are scored as labels (accuracy equals scikit-learn's
    own), and what ONNX Runtime cannot quantize is said plainly."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    from device_agent.serving import ModelService
    from edgeml.cli import main

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    np.savez(tmp_path / "eval.npz", X=x[1200:], y=y[1200:])
    np.savez(tmp_path / "calib.npz", X=x[:300])
    lr = LogisticRegression(max_iter=500).fit(x[:1200], y[:1200])
    (tmp_path / "lr.onnx").write_bytes(to_onnx(lr, x[:1]).SerializeToString())
    result = edgeml.optimize(edgeml.OptimizeConfig(
        model=tmp_path / "lr.onnx", output=tmp_path / "lr.edgeml", key=keys / "signing.key",
        eval=str(tmp_path / "eval.npz"), calibration=str(tmp_path / "calib.npz"), latency_runs=5, plot=False))
    assert result.chosen.recipe == "fp32"  # float16 is the same model, dynamic and int8 have nothing to quantize
    assert result.float_accuracy == pytest.approx(lr.score(x[1200:], y[1200:]))
    notes = {m.recipe: " ".join(m.notes) for m in result.candidates}
    assert "nothing to quantize" in notes["dynamic"] and "nothing to quantize" in notes["int8"]
    service = ModelService.load(result.artifact, keys / "signing.pub")
    out = service.infer({"X": x[1200:1205]})
    assert out["output_probability"].shape == (5, 10) and out["output_label"].dtype == np.int64
    np.testing.assert_array_equal(out["output_label"], lr.predict(x[1200:1205]))

    rf = RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0).fit(x[:1200], y[:1200])
    (tmp_path / "rf.onnx").write_bytes(to_onnx(rf, x[:1]).SerializeToString())
    capsys.readouterr()
    code = main(["optimize", str(tmp_path / "rf.onnx"), "-o", str(tmp_path / "rf.edgeml"), "--recipe", "int8",
                 "--key", str(keys / "signing.key"), "--eval", str(tmp_path / "eval.npz"),
                 "--calibration", str(tmp_path / "calib.npz")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 5 and len(lines) == 1 and "nothing to quantize" in lines[0] and "TreeEnsemble" in lines[0]
