"""Content hashes of files and folders, for lineage and data provenance (standard library only)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files in sorted order (for SavedModels)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
