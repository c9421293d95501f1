"""Crash-safe file writes (standard library only; the device side uses them too)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a part.

    Temp file in the same folder (so the rename cannot cross file systems), exact ``mode``,
    fsync, rename over ``path``, fsync the folder. On failure the temp file is removed and
    OSError propagates; an existing ``path`` is untouched.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; set the mode wanted
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; the rename is enough there
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
