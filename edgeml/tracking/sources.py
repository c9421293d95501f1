"""A model from MLflow as a local file the optimizer reads: ``models:/name/version``,
``models:/name@alias`` and ``runs:/run_id/path``, logged with MLflow's keras, tensorflow or onnx
flavor, or a plain .keras / .onnx file (or SavedModel folder) logged as an artifact."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Tuple

from edgeml.core.errors import InputError

from .client import client, describe, stdout_to_stderr, tracking_uri

MODEL_FILES = (".keras", ".onnx", ".h5")
READABLE = "keras, tensorflow and onnx"


def parse_model_uri(uri: str) -> Tuple[str, str, str]:
    """``models:/name/version`` or ``models:/name@alias`` -> (name, version, alias)."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, "", alias
    parts = rest.split("/")
    if len(parts) == 2 and parts[0] and parts[1].isdigit():
        return parts[0], parts[1], ""
    raise InputError(f"{uri} is not a model URI edgeml reads; give models:/NAME/VERSION, models:/NAME@ALIAS "
                     "or runs:/RUN_ID/PATH")


def resolve_model(uri: str, dst: Path) -> Tuple[Path, dict]:
    """Download the model ``uri`` names into ``dst``; its local path and its lineage (the URI, the
    registered name and resolved version, the run that logged it)."""
    c = client()
    lineage = {"uri": uri, "tracking_uri": tracking_uri()}
    with loading(uri):
        if uri.startswith("models:/"):
            name, alias, mv = registered_version(c, uri)
            lineage.update(registered_model=name, version=int(mv.version), run_id=mv.run_id or None)
            if alias:
                lineage["alias"] = alias
            where = f"models:/{name}/{mv.version}"  # the version resolved now, even if the alias moves
        else:
            run_id, _, path = uri[len("runs:/"):].partition("/")
            if not run_id or not path:
                raise InputError(f"{uri} names no artifact; give runs:/RUN_ID/PATH (say runs:/{run_id or 'ID'}/model)")
            c.get_run(run_id)
            lineage["run_id"] = run_id
            where = uri
        local = download(where, dst)
    path, flavor = model_file(local, uri)
    lineage["flavor"] = flavor
    return path, lineage


def registered_version(c, uri: str):
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` as it stands now: (name, alias, ModelVersion)."""
    name, version, alias = parse_model_uri(uri)
    return name, alias, (c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version))


def download(where: str, dst: Path) -> Path:
    """MLflow's artifacts at ``where`` in ``dst`` (its progress bar on stderr, its notes off stdout)."""
    import mlflow.artifacts

    dst.mkdir(parents=True, exist_ok=True)
    with stdout_to_stderr():
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(dst),
                                                        tracking_uri=tracking_uri()))


@contextlib.contextmanager
def loading(uri: str):
    """MLflow's errors while reading ``uri`` as one InputError line (exit 3)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise InputError(f"cannot load {uri} from MLflow at {tracking_uri()}: {describe(exc)}") from exc


def model_file(local: Path, uri: str) -> Tuple[Path, str]:
    """The file (or SavedModel folder) inside a downloaded MLflow model, and its flavor."""
    if local.is_file():
        if local.suffix in MODEL_FILES:
            return local, "artifact"
        raise InputError(f"{uri} is a {local.suffix or 'suffix-less'} file; edgeml reads .keras, .onnx and "
                         "SavedModel models")
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavors = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors") or {}
        if "onnx" in flavors:
            return local / flavors["onnx"].get("data", "model.onnx"), "onnx"
        for flavor in ("keras", "tensorflow"):  # a .keras file (Keras 3), or a SavedModel folder
            conf = flavors.get(flavor)
            if conf is None:
                continue
            for root in {local / conf.get("data", "data"), local / conf.get("saved_model_dir", "tf2model")}:
                if root.is_dir():
                    found = sorted(root.rglob("*.keras")) or sorted(p.parent for p in root.rglob("saved_model.pb"))
                    if found:
                        return found[0], flavor
        others = sorted(f for f in flavors if f != "python_function") or ["python_function"]
        raise InputError(f"{uri} is an MLflow model of flavor {', '.join(others)}; edgeml reads {READABLE} models "
                         "(log yours with mlflow.keras or mlflow.onnx, or log a .keras or .onnx file as an artifact)")
    if (local / "saved_model.pb").is_file():
        return local, "artifact"
    files = [p for p in sorted(local.iterdir()) if p.suffix in MODEL_FILES]
    if len(files) == 1:
        return files[0], "artifact"
    raise InputError(f"{uri} is a folder without an MLmodel file and with {len(files)} model files; point the URI "
                     "at the .keras or .onnx file itself")
