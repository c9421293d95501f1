"""Writing an artifact: sign the manifest, pack the members, read the result back, publish it atomically."""
from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Dict

import numpy as np

from .. import transfer
from ..atomic import write_atomic
from ..errors import InputError
from . import selftest_data
from .layout import (
    BASELINE,
    MANIFEST,
    MAX_ARTIFACT_BYTES,
    MODEL_MEMBERS,
    SCHEMA_VERSION,
    SELFTEST,
    SIGNATURE,
    Artifact,
    PathLike,
    canonical_json,
    json_member,
    sha256,
    zip_stored,
)
from .reader import parse

logger = logging.getLogger(__name__)


def write_artifact(
    path: PathLike,
    *,
    model: bytes,
    model_format: str,
    manifest: dict,
    selftest_inputs: Dict[str, np.ndarray],
    selftest_outputs: Dict[str, np.ndarray],
    baseline: dict,
    private_key,
    compress: bool = True,
) -> Artifact:
    """Write a signed artifact atomically and return it (already verified against the key).

    ``manifest`` is the caller's part (name, version, metrics, lineage, inputs/outputs, ...);
    this function sets ``schema_version``, ``format``, ``model_member`` and ``members`` in it,
    replacing any value the caller gave them. Self-test arrays are stored under sorted names.

    ``selftest_inputs`` are the inputs as the model takes them and ``selftest_outputs`` the full
    outputs on them. The manifest's ``selftest`` section may say that inputs are stored narrower
    and outputs as compact references (``selftest_data``; ``edgeml.core.selftest.build_selftest``
    chooses that within the size budget); the artifact then has schema version 2, else 1.

    ``private_key`` is an Ed25519 private key object or the path of ``signing.key``. Bad
    arguments (unknown format, NaN in the manifest or baseline, object arrays) raise ValueError;
    a key that is not Ed25519 raises KeyFileError. ``compress`` wraps the ZIP in a zstd frame. On any error nothing is left at ``path`` (an
    existing file there stays untouched) and no temporary file remains.
    """
    path = Path(path)
    from ..signing import key_id, private_key_of

    key = private_key_of(private_key)
    if model_format not in MODEL_MEMBERS:
        raise ValueError(f"model_format must be one of {sorted(MODEL_MEMBERS)}, not {model_format!r}")
    if not isinstance(manifest, dict) or not isinstance(baseline, dict):
        raise ValueError("manifest and baseline must be dicts")
    model_member = MODEL_MEMBERS[model_format]
    meta = selftest_data.section(manifest)
    payload = {
        BASELINE: json_member(baseline, BASELINE),
        SELFTEST: selftest_data.pack(selftest_inputs, selftest_outputs, meta),
        model_member: bytes(model),
    }
    full = dict(manifest)
    full.update(
        schema_version=SCHEMA_VERSION if selftest_data.is_compact(meta) else 1,
        format=model_format,
        model_member=model_member,
        members={n: {"sha256": sha256(b), "size": len(b)} for n, b in payload.items()},
    )
    manifest_bytes = json_member(full, MANIFEST)
    signature = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    data = zip_stored([(MANIFEST, manifest_bytes), (SIGNATURE, canonical_json(signature))] + list(payload.items()))
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ValueError(f"the artifact would be {len(data)} bytes; edgeml reads at most {MAX_ARTIFACT_BYTES}")
    shipped = transfer.compress(data) if compress else data
    # Read back what we are about to publish, so a file that does not verify is never written.
    artifact = parse(shipped, path, key.public_key())
    _publish(path, shipped)
    logger.info("wrote %s (%d bytes, %d unpacked, key id %s)", path, len(shipped), len(data), artifact.key_id)
    return artifact


def _publish(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a file name such as model.edgeml")
    try:
        write_atomic(path, data, 0o644)  # an artifact is public
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
