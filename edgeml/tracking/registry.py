"""Registered edgeml artifacts as what ``fleet push`` sends: ``models:/NAME/VERSION`` (or
``@ALIAS``) resolved to the signed .edgeml file, and the registry told which fleet runs it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Tuple

from edgeml.core.errors import InputError

from .client import TrackingError, client, describe, stdout_to_stderr, tracking_uri
from .sources import parse_model_uri


def fetch_artifact(uri: str, dst: Path) -> Tuple[Path, dict]:
    """The .edgeml file registered as ``uri`` (downloaded into ``dst``) and the version it resolved to."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise InputError(f"{uri}: fleet push takes a registered artifact, models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = parse_model_uri(uri)
    c = client()
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
        dst.mkdir(parents=True, exist_ok=True)
        with stdout_to_stderr():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                             dst_path=str(dst), tracking_uri=tracking_uri()))
    except MlflowException as exc:
        raise InputError(f"cannot load {uri} from MLflow at {tracking_uri()}: {describe(exc)}") from exc
    files = [local] if local.is_file() else sorted(local.rglob("*.edgeml"))
    files = [f for f in files if f.suffix == ".edgeml"]
    if len(files) != 1:
        raise InputError(f"{uri} (version {mv.version}) holds {len(files)} .edgeml files, not one; register the "
                         "artifact with edgeml optimize --register NAME")
    return files[0], {"name": name, "version": int(mv.version), "uri": uri}


def record_rollout(info: dict, fleet: str, rollout: str) -> None:
    """Tag the registered version with the fleet and rollout it went to (``edgeml.fleet.F``)."""
    try:
        client().set_model_version_tag(info["name"], str(info["version"]), f"edgeml.fleet.{fleet}",
                                       f"rollout {rollout} pushed {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    except Exception as exc:  # noqa: BLE001
        raise TrackingError(f"rollout {rollout} is recorded and will go ahead, but tagging {info['uri']} in MLflow "
                            f"failed: {describe(exc)}") from exc
