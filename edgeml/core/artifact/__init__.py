"""The ``.edgeml`` artifact: one signed file holding a model and what a device needs to trust it."""
from __future__ import annotations

from .reader import (
    BASELINE,
    MANIFEST,
    MAX_ARTIFACT_BYTES,
    MAX_JSON_BYTES,
    MODEL_MEMBERS,
    SCHEMA_VERSION,
    SELFTEST,
    SIGNATURE,
    Artifact,
    canonical_json,
    read_artifact,
    verify_artifact,
    write_artifact,
)

__all__ = ["Artifact", "BASELINE", "MANIFEST", "MAX_ARTIFACT_BYTES", "MAX_JSON_BYTES", "MODEL_MEMBERS",
           "SCHEMA_VERSION", "SELFTEST", "SIGNATURE", "canonical_json", "read_artifact", "verify_artifact",
           "write_artifact"]
