"""Registered edgeml artifacts as what ``fleet push`` sends: ``models:/NAME/VERSION`` (or
``@ALIAS``) resolved to the signed .edgeml file, and the registry told which fleet runs it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Tuple

from edgeml.core.errors import InputError

from .client import TrackingError, client, describe
from .sources import download, loading, registered_version


def fetch_artifact(uri: str, dst: Path) -> Tuple[Path, dict]:
    """The .edgeml file registered as ``uri`` (downloaded into ``dst``) and the version it resolved to."""
    if not uri.startswith("models:/"):
        raise InputError(f"{uri}: fleet push takes a registered artifact, models:/NAME/VERSION or models:/NAME@ALIAS")
    with loading(uri):
        name, _, mv = registered_version(client(), uri)
        local = download(f"models:/{name}/{mv.version}", dst)
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
