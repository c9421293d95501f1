"""What an artifact costs on top of its model: the overhead budget and where the bytes go."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

from .. import transfer
from . import selftest_data
from .layout import BASELINE, MANIFEST, SELFTEST, SIGNATURE, PathLike

OVERHEAD_SHARE = 0.05  # of the model's zstd bytes ...
OVERHEAD_FLOOR = 32 << 10  # ... or this many bytes, whichever is more


def overhead_budget(model_zstd_bytes: int) -> int:
    """The most an artifact file may hold beyond its model's zstd bytes: self-test, manifest, signature, baseline."""
    return max(int(OVERHEAD_SHARE * model_zstd_bytes), OVERHEAD_FLOOR)


def overhead(path: PathLike) -> dict:
    """Where an artifact file's bytes go, each part compressed as the file is (integrity checked).

    ``overhead_bytes`` is the file minus the model compressed on its own, the cost of everything
    else; ``selftest_bytes`` and ``metadata_bytes`` (manifest, signature, baseline) are those
    members compressed on their own, so they add up to about the overhead (the ZIP's headers and
    the zstd frame make the rest).
    """
    from .reader import _read_file, parse, unpacked

    path = Path(path)
    raw = _read_file(path)
    artifact = parse(raw, path, None)
    model_zstd = _model_zstd_bytes(artifact)
    with zipfile.ZipFile(io.BytesIO(unpacked(raw, path))) as zf:
        selftest = transfer.compressed_size(zf.read(SELFTEST))
        metadata = transfer.compressed_size(b"".join(zf.read(n) for n in (MANIFEST, SIGNATURE, BASELINE)))
    extra = artifact.size - model_zstd
    budget = overhead_budget(model_zstd)
    compact = selftest_data.section(artifact.manifest).get("references", {})
    return {
        "file_bytes": artifact.size,
        "model_zstd_bytes": model_zstd,
        "overhead_bytes": extra,
        "overhead_percent": round(100.0 * extra / model_zstd, 2) if model_zstd else None,
        "selftest_bytes": selftest,
        "metadata_bytes": metadata,
        "budget_bytes": budget,
        "within_budget": extra <= budget,
        "selftest_samples": len(next(iter(artifact.selftest_inputs.values()), ())),
        "references": {**{n: "full" for n in artifact.selftest_outputs},
                       **{n: spec["kind"] for n, spec in compact.items()}},
    }


def _model_zstd_bytes(artifact) -> int:
    """The optimizer records the model's zstd bytes (compressed as the file is); measure them otherwise."""
    told = artifact.manifest.get("transfer")
    if isinstance(told, dict) and told.get("encoding") == "zstd" and told.get("level") == transfer.LEVEL \
            and type(told.get("model_bytes")) is int and told["model_bytes"] > 0:
        return told["model_bytes"]
    return transfer.compressed_size(artifact.model)
