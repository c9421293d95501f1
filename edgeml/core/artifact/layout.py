"""What an artifact is made of: member names, limits, the ``Artifact`` a reader returns, canonical
JSON and the deterministic ZIP writer (see the package docstring for the format)."""
from __future__ import annotations

import binascii
import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

SCHEMA_VERSION = 2  # the newest this edgeml reads and writes; see READABLE_VERSIONS
# 1: self-test inputs and reference outputs stored as they are. 2: the manifest's selftest section
# may say that inputs are stored narrower and references compactly (``selftest_data``). The writer
# writes 1 whenever the self-test is stored as is, so older readers still read those artifacts.
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
BASELINE = "baseline.json"
SELFTEST = "selftest.npz"
MODEL_MEMBERS = {"tflite": "model.tflite", "onnx": "model.onnx"}
# Below the ZIP64 limits, so the plain ZIP layout always suffices.
MAX_ARTIFACT_BYTES = 2 << 30
MAX_JSON_BYTES = 16 << 20

PathLike = Union[str, os.PathLike]


@dataclass(eq=False)
class Artifact:
    """A read (and possibly verified) artifact; ``verified`` says whether its signature was checked."""

    path: Path
    manifest: dict
    model: bytes = field(repr=False)
    model_format: str
    selftest_inputs: Dict[str, np.ndarray] = field(repr=False)  # decoded: as the model takes them
    selftest_outputs: Dict[str, np.ndarray] = field(repr=False)  # the references stored in full
    baseline: dict = field(repr=False)
    key_id: str
    size: int  # of the file as stored and shipped (compressed unless written with compress=False)
    sha256: str  # of the whole file: what a rollout announces and a download is checked against
    verified: bool = False
    content_size: int = 0  # of the ZIP inside
    compressed: bool = False
    content_sha256: str = ""  # of the ZIP inside: what the signature covers, whatever the packing
    # compact references {output: {part: array}} (selftest_data); outputs not in selftest_outputs
    selftest_references: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict, repr=False)


def canonical_json(obj) -> bytes:
    """The one byte form of a JSON value: sorted keys, compact separators, UTF-8.

    Raises ValueError for NaN or infinity (JSON has no form for them) and for anything that
    would not read back to the same bytes (e.g. non-string keys). numpy scalars and arrays are
    turned into plain numbers and lists.
    """
    check_keys(obj)
    return dumps(obj).encode("utf-8")


def dumps(obj) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )


def check_keys(obj) -> None:
    """json.dumps would quietly turn 1 into "1": a value that reads back different. Refuse it."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"not canonical JSON: dict key {key!r} is not a string")
            check_keys(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            check_keys(value)


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_member(obj: dict, name: str) -> bytes:
    try:
        return canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc} (NaN and infinity have no JSON form; store null instead)") from exc


def npz_bytes(inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray],
              references: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> bytes:
    """An .npz that np.load reads, built by our own ZIP writer so its bytes are deterministic.

    Arrays ``input/<name>``, ``output/<name>``, then ``reference/<part>/<name>`` for compact references.
    """
    groups = [("input", inputs), ("output", outputs)]
    by_part: Dict[str, Dict[str, np.ndarray]] = {}
    for name, parts in (references or {}).items():
        for part, array in parts.items():
            by_part.setdefault(part, {})[name] = array
    groups += [(f"reference/{part}", by_part[part]) for part in sorted(by_part)]
    members = []
    for kind, arrays in groups:
        for name in sorted(arrays):  # sorted: the same arrays in any dict order give the same bytes
            if not isinstance(name, str) or not name:
                raise ValueError(f"self-test {kind} names must be non-empty strings, not {name!r}")
            array = np.asarray(arrays[name])
            if array.dtype.hasobject:
                raise ValueError(f"self-test {kind} {name!r} has dtype object; use numeric arrays")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, allow_pickle=False)
            members.append((f"{kind}/{name}.npy", buf.getvalue()))
    return zip_stored(members)


_DOS_TIME, _DOS_DATE = 0, (1 << 5) | 1  # 1980-01-01 00:00, the earliest time a ZIP can hold
_UNIX_FILE_0644 = 0o100644 << 16


def zip_stored(members: List[Tuple[str, bytes]]) -> bytes:
    """A ZIP file of uncompressed members, fully determined by the names, contents and order."""
    parts, central, offset = [], [], 0
    for name, data in members:
        raw_name = name.encode("utf-8")
        flags = 0 if name.isascii() else 0x800  # bit 11: the name is UTF-8
        crc, size = binascii.crc32(data), len(data)
        header = struct.pack(
            "<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, flags, 0, _DOS_TIME, _DOS_DATE, crc, size, size, len(raw_name), 0
        )
        central.append(
            struct.pack(
                "<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, flags, 0, _DOS_TIME, _DOS_DATE,
                crc, size, size, len(raw_name), 0, 0, 0, 0, _UNIX_FILE_0644, offset,
            )
            + raw_name
        )
        parts += [header, raw_name, data]
        offset += len(header) + len(raw_name) + size
    directory = b"".join(central)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), offset, 0)
    return b"".join(parts) + directory + end


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
