"""MLflow: optimize from the registry and from runs, every run tracked, artifacts registered and
pushed, against a real tracking server (SQLite backend, served artifacts) on a free port."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from mlflow_server import MlflowServer

import edgeml
from edgeml.cli import main
from edgeml.core.artifact import read_artifact, verify_artifact

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


@pytest.fixture()
def tracking(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    return server.url


@pytest.fixture(scope="module")
def logged(server, digits_dir, tmp_path_factory):
    """What a training team has: the digits CNN logged with the keras flavor and registered as
    digits@champion; an ONNX export logged with the onnx flavor and as a plain file; a scikit-learn
    model registered as skl."""
    import keras
    import numpy as np
    import onnx
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("logged")
    onnx_artifact = edgeml.optimize(edgeml.OptimizeConfig(
        model=digits_dir / "digits.keras", output=folder / "digits-onnx.edgeml", key=digits_dir / "keys" / "signing.key",
        eval=str(digits_dir / "eval.npz"), recipe="fp32", format="onnx", latency_runs=3, plot=False)).artifact
    onnx_path = folder / "digits.onnx"
    onnx_path.write_bytes(read_artifact(onnx_artifact).model)

    mlflow.set_tracking_uri(server.url)
    client = mlflow.MlflowClient(server.url)
    mlflow.set_experiment("training")
    with mlflow.start_run() as keras_run:
        cnn = keras.models.load_model(digits_dir / "digits.keras")
        mlflow.keras.log_model(cnn, name="model", registered_model_name="digits")
        mlflow.tensorflow.log_model(cnn, name="tf-model")
    client.set_registered_model_alias("digits", "champion", "1")
    with mlflow.start_run() as onnx_run:
        mlflow.onnx.log_model(onnx.load(onnx_path), name="onnx-model")
        mlflow.log_artifact(str(onnx_path))
    with mlflow.start_run():
        x = np.random.default_rng(0).random((40, 4))
        mlflow.sklearn.log_model(LogisticRegression().fit(x, np.arange(40) % 2), name="skl", registered_model_name="skl")
    return {"keras_run": keras_run.info.run_id, "onnx_run": onnx_run.info.run_id, "client": client}


def _optimize(capsys, digits_dir, *args):
    capsys.readouterr()
    code = main(["optimize", *map(str, args), "--key", str(digits_dir / "keys" / "signing.key"),
                 "--eval", str(digits_dir / "eval.npz"), "--latency-runs", "5", "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def _error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_from_the_registry_tracked_registered_and_pushed(tracking, logged, digits_dir, tmp_path, capsys):
    client = logged["client"]
    out = tmp_path / "digits.edgeml"
    code, result, err = _optimize(capsys, digits_dir, "models:/digits@champion", "-o", out, "--recipe", "int8",
                                  "--calibration", digits_dir / "calib.npz", "--mlflow", "--register", "digits-edge")
    assert code == 0, err
    assert result["ok"] and result["chosen"] == "int8" and result["name"] == "digits"

    # lineage: the URI, the version it resolved to and the run that logged it
    source = read_artifact(out).manifest["lineage"]["source"]["mlflow"]
    assert source == {"uri": "models:/digits@champion", "registered_model": "digits", "version": 1, "alias": "champion",
                      "run_id": logged["keras_run"], "flavor": "keras"}

    # the run: nested under the source model's run, in its experiment, with every candidate's figures
    run = client.get_run(result["mlflow"]["run_id"])
    parent = client.get_run(logged["keras_run"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == parent.info.experiment_id
    assert run.data.tags["mlflow.parentRunId"] == logged["keras_run"]
    assert run.data.tags["edgeml.chosen"] == "int8" and run.data.tags["edgeml.goal_met"] == "true"
    p = run.data.params
    assert p["source"] == "models:/digits@champion" and p["source_version"] == "1" and p["recipe"] == "int8"
    assert p["seed"] == "0" and p["max_accuracy_drop"] == "0.01"
    assert json.loads(p["data.eval"])["sha256"] == hashlib.sha256((digits_dir / "eval.npz").read_bytes()).hexdigest()
    m = run.data.metrics
    for cand in result["candidates"]:
        r = cand["recipe"]
        assert m[f"{r}.bytes"] == cand["bytes"] and m[f"{r}.zstd_bytes"] == cand["zstd_bytes"]
        assert m[f"{r}.latency_p50_ms"] == pytest.approx(cand["latency_ms"]["median_ms"])
        assert m[f"{r}.latency_p95_ms"] == pytest.approx(cand["latency_ms"]["p95_ms"])
        assert m[f"{r}.accuracy"] == pytest.approx(cand["quality"]["accuracy"])
        assert m[f"{r}.drop"] == pytest.approx(cand["quality"]["drop"])
    assert m["artifact_bytes"] == result["artifact_bytes"]
    files = {f.path for d in ("edgeml", "report") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"edgeml/digits.edgeml", "report/optimize.json", "report/candidates.txt",
            "report/digits.candidates.png"} <= files

    # the registry: a new version with the artifact's identity, resolvable and verifiable
    reg = result["mlflow"]["registered"]
    assert reg == {"name": "digits-edge", "version": 1, "uri": "models:/digits-edge/1"}
    mv = client.get_model_version("digits-edge", "1")
    art = read_artifact(out)
    assert mv.run_id == run.info.run_id
    assert mv.tags["sha256"] == art.sha256 and mv.tags["key_id"] == art.key_id
    assert mv.tags["edgeml_version"] == edgeml.__version__
    mlflow.artifacts.download_artifacts(artifact_uri="models:/digits-edge/1", dst_path=str(tmp_path / "dl"))
    got = verify_artifact(next((tmp_path / "dl").rglob("*.edgeml")), digits_dir / "keys" / "signing.pub")
    assert got.sha256 == art.sha256

    # fleet push takes the registered version, and the registry shows where it went
    capsys.readouterr()
    code = main(["fleet", "push", "models:/digits-edge/1", "--fleet", "f1", "--devices", "dev1,dev2",
                 "--key", str(digits_dir / "keys" / "signing.key"), "--db", f"sqlite:///{tmp_path / 'fleet.db'}",
                 "--json"])
    pushed = json.loads(capsys.readouterr().out)
    assert code == 0 and pushed["version"] == art.manifest["version"] and pushed["devices"] == 2
    assert pushed["mlflow"] == {"name": "digits-edge", "version": 1, "uri": "models:/digits-edge/1"}
    tag = client.get_model_version("digits-edge", "1").tags["edgeml.fleet.f1"]
    assert tag.startswith(f"rollout {pushed['rollout']} pushed ")


@pytest.mark.parametrize("run, path, flavor, kind", [("onnx_run", "onnx-model", "onnx", "onnx"),
                                                     ("onnx_run", "digits.onnx", "artifact", "onnx"),
                                                     ("keras_run", "tf-model", "tensorflow", "keras")])
def test_from_a_run_in_each_flavor(tracking, logged, digits_dir, tmp_path, capsys, run, path, flavor, kind):
    out = tmp_path / "d.edgeml"
    uri = f"runs:/{logged[run]}/{path}"
    code, result, err = _optimize(capsys, digits_dir, uri, "-o", out, "--recipe", "dynamic")
    assert code == 0, err
    assert "mlflow" not in result  # without --mlflow nothing is recorded
    lineage = read_artifact(out).manifest["lineage"]["source"]
    assert lineage["kind"] == kind and lineage["mlflow"] == {"uri": uri, "run_id": logged[run], "flavor": flavor}


def test_missing_uris_and_unsupported_flavors_are_one_line(tracking, logged, digits_dir, tmp_path, capsys):
    out = tmp_path / "x.edgeml"
    for uri, words in [("models:/nope/1", "cannot load models:/nope/1"),
                       ("models:/digits@nobody", "cannot load models:/digits@nobody"),
                       ("runs:/0123456789abcdef0123456789abcdef/model", "cannot load runs:/"),
                       ("models:/skl/1", "flavor sklearn"),
                       ("models:/digits", "not a model URI")]:
        code, result, err = _optimize(capsys, digits_dir, uri, "-o", out, "--recipe", "fp32")
        lines = _error_lines(err)
        assert code == 3 and len(lines) == 1 and words in lines[0], (uri, err)
        assert "Traceback" not in err and not out.exists()


def test_mlflow_needs_a_tracking_uri(digits_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, result, err = _optimize(capsys, digits_dir, digits_dir / "digits.keras", "-o", tmp_path / "x.edgeml",
                                  "--recipe", "fp32", "--register", "digits-edge")
    assert code == 2 and "MLFLOW_TRACKING_URI" in _error_lines(err)[0]


def test_recipe_file_turns_tracking_on(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    recipe = tmp_path / "r.toml"

    def config(text):
        recipe.write_text(text)
        return edgeml.OptimizeConfig(model=digits_dir / "digits.keras", output=tmp_path / "x.edgeml", recipe_file=recipe,
                                     key=digits_dir / "keys" / "signing.key", eval=str(digits_dir / "eval.npz")).check()

    c = config('[mlflow]\nexperiment = "edge-builds"\nregister = "digits-edge"\n')
    assert (c.mlflow, c.experiment, c.register) == (True, "edge-builds", "digits-edge")
    assert config("[mlflow]\nenabled = false\n").mlflow is False
    with pytest.raises(edgeml.UsageError, match="true or false"):
        config('[mlflow]\nenabled = "yes"\n')


def test_server_down_or_stopped_mid_run_keeps_the_artifact(digits_dir, tmp_path, capsys, monkeypatch):
    # nothing listens: the build goes on, the artifact is written, one error line, exit 10
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    out = tmp_path / "down.edgeml"
    code, result, err = _optimize(capsys, digits_dir, digits_dir / "digits.keras", "-o", out, "--recipe", "fp32",
                                  "--mlflow")
    lines = _error_lines(err)
    assert code == 10 and len(lines) == 1 and "the artifact is fine" in lines[0], err
    assert result["ok"] is False and result["tracking_error"] and result["chosen"] == "fp32"
    verify_artifact(out, digits_dir / "keys" / "signing.pub")

    # a server that took the run's start and died during the build
    server = MlflowServer(tmp_path / "dying").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    out = tmp_path / "mid.edgeml"
    steps = []

    def on_step(step):
        steps.append(step)
        if step.startswith("building and measuring"):
            server.stop()

    try:
        with pytest.raises(edgeml.EdgemlError) as caught:
            edgeml.optimize(edgeml.OptimizeConfig(
                model=digits_dir / "digits.keras", output=out, key=digits_dir / "keys" / "signing.key",
                eval=str(digits_dir / "eval.npz"), recipe="fp32", latency_runs=3, mlflow=True), on_step=on_step)
    finally:
        server.stop()
    exc = caught.value
    assert exc.exit_code == 10 and exc.result.mlflow["run_id"]  # the run was opened before the build
    assert "recording run" in str(exc) and "\n" not in str(exc)
    verify_artifact(out, digits_dir / "keys" / "signing.pub")


def test_import_edgeml_does_not_import_mlflow():
    code = "import sys, edgeml, edgeml.tracking; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_metrics_per_candidate_and_per_training_stage():
    from edgeml.tracking.runs import candidate_metrics

    result = {"artifact_bytes": 1000, "float_accuracy": 0.98, "candidates": [
        {"recipe": "fp32", "bytes": 4000, "zstd_bytes": 3600, "quality": {"accuracy": 0.98, "drop": 0.0,
         "drop_kind": "accuracy", "cosine": None}, "latency_ms": {"median_ms": 0.5, "p95_ms": 0.7}},
        {"recipe": "int8", "failed": True, "notes": ["failed: ..."]}],
        "stages": [{"stage": "prune", "bytes": 4000, "zstd_bytes": 900, "params": 1000, "nonzero_params": 250,
                    "drop_vs_input": 0.004, "quality": {"accuracy": 0.976, "drop": 0.004},
                    "latency_ms": {"median_ms": 0.5, "p95_ms": 0.6}, "ratio_to_fp32": {"zstd_bytes": 0.25}}]}
    m = candidate_metrics(result)
    assert m["fp32.bytes"] == 4000 and m["fp32.latency_p95_ms"] == 0.7 and "fp32.cosine" not in m
    assert not any(k.startswith("int8.") for k in m)  # a candidate that failed has no figures
    assert m["stage.prune.nonzero_params"] == 250 and m["stage.prune.ratio_zstd_bytes"] == 0.25
    assert m["stage.prune.drop_vs_input"] == 0.004 and m["artifact_bytes"] == 1000
