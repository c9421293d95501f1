"""The ``.edgeml`` artifact: one signed file holding a model and what a device needs to trust it.

Light on purpose (standard library, numpy, zstandard; cryptography only where a signature is
made or checked): the device agent imports it, and reads artifacts without loading cryptography.

The container is an ordinary ZIP file (``unzip -l`` lists it) with these members, in this order::

    manifest.json    canonical JSON: the caller's manifest plus schema_version, format,
                     model_member and members {name: {sha256, size}} of the three below
    signature.json   {"algorithm": "ed25519", "key_id": ..., "signature": base64}
                     Ed25519 over exactly the bytes of manifest.json
    baseline.json    canonical JSON: input statistics for drift monitoring
    selftest.npz     arrays "input/<name>", "output/<name>" (full reference outputs) and, from
                     schema version 2, "reference/<part>/<name>" (compact references); the
                     manifest's "selftest" section says how each is stored (``selftest_data``)
    model.tflite | model.onnx

Every member is stored uncompressed with fixed timestamps and attributes, written by the small
ZIP writer in ``layout`` rather than by ``zipfile``. So the same content always gives the same bytes, on
any Python or zlib version, and a reader can rebuild the exact ZIP from its members: any byte
changed anywhere in it is caught, not only bytes inside members.

The file on disk is that ZIP inside one zstd frame (``edgeml.core.transfer``): pruned and int8
weights compress well, and the compressed size is what shipping costs. The frame states its
content size and carries a checksum; a reader refuses frames that would unpack to more than
``MAX_ARTIFACT_BYTES`` (no zstd bombs) and then checks the ZIP exactly as above. Uncompressed
artifacts (``compress=False``, e.g. for ``unzip``) are read as well.

Everything beyond the model (self-test, manifest, signature, baseline) is kept within
``overhead_budget``: 5% of the model's zstd bytes or 32 KiB, whichever is more (``sizes``).
"""

from .layout import (
    BASELINE,
    MANIFEST,
    MAX_ARTIFACT_BYTES,
    MAX_JSON_BYTES,
    MODEL_MEMBERS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    SELFTEST,
    SIGNATURE,
    Artifact,
    canonical_json,
)
from .reader import read_artifact, verify_artifact
from .sizes import overhead, overhead_budget
from .writer import write_artifact

__all__ = ["Artifact", "BASELINE", "MANIFEST", "MAX_ARTIFACT_BYTES", "MAX_JSON_BYTES", "MODEL_MEMBERS",
           "READABLE_VERSIONS", "SCHEMA_VERSION", "SELFTEST", "SIGNATURE", "canonical_json", "overhead",
           "overhead_budget", "read_artifact", "verify_artifact", "write_artifact"]
