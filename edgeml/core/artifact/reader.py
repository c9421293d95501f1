"""The ``.edgeml`` artifact: one signed file holding a model and what a device needs to trust it.

Light on purpose (standard library, numpy, zstandard; cryptography only where a signature is
made or checked): the device agent imports it, and reads artifacts without loading cryptography.

The container is an ordinary ZIP file (``unzip -l`` lists it) with these members, in this order::

    manifest.json    canonical JSON: the caller's manifest plus schema_version, format,
                     model_member and members {name: {sha256, size}} of the three below
    signature.json   {"algorithm": "ed25519", "key_id": ..., "signature": base64}
                     Ed25519 over exactly the bytes of manifest.json
    baseline.json    canonical JSON: input statistics for drift monitoring
    selftest.npz     arrays "input/<name>" and "output/<name>" (reference outputs)
    model.tflite | model.onnx

Every member is stored uncompressed with fixed timestamps and attributes, written by the small
ZIP writer below rather than by ``zipfile``. So the same content always gives the same bytes, on
any Python or zlib version, and a reader can rebuild the exact ZIP from its members: any byte
changed anywhere in it is caught, not only bytes inside members.

The file on disk is that ZIP inside one zstd frame (``edgeml.core.transfer``): pruned and int8
weights compress well, and the compressed size is what shipping costs. The frame states its
content size and carries a checksum; a reader refuses frames that would unpack to more than
``MAX_ARTIFACT_BYTES`` (no zstd bombs) and then checks the ZIP exactly as above. Uncompressed
artifacts (``compress=False``, e.g. for ``unzip``) are read as well.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .. import transfer
from ..atomic import write_atomic
from ..errors import InputError, KeyFileError, VerificationError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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
    selftest_inputs: Dict[str, np.ndarray] = field(repr=False)
    selftest_outputs: Dict[str, np.ndarray] = field(repr=False)
    baseline: dict = field(repr=False)
    key_id: str
    size: int  # of the file as stored and shipped (compressed unless written with compress=False)
    sha256: str  # of the whole file: what a rollout announces and a download is checked against
    verified: bool = False
    content_size: int = 0  # of the ZIP inside
    compressed: bool = False


def canonical_json(obj) -> bytes:
    """The one byte form of a JSON value: sorted keys, compact separators, UTF-8.

    Raises ValueError for NaN or infinity (JSON has no form for them) and for anything that
    would not read back to the same bytes (e.g. non-string keys). numpy scalars and arrays are
    turned into plain numbers and lists.
    """
    _check_keys(obj)
    return _dumps(obj).encode("utf-8")


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

    ``private_key`` is an Ed25519 private key object or the path of ``signing.key``. Bad
    arguments (unknown format, NaN in the manifest or baseline, object arrays) raise ValueError;
    a key that is not Ed25519 raises KeyFileError. ``compress`` wraps the ZIP in a zstd frame. On any error nothing is left at ``path`` (an
    existing file there stays untouched) and no temporary file remains.
    """
    path = Path(path)
    from ..signing import key_id

    key = _private_key(private_key)
    if model_format not in MODEL_MEMBERS:
        raise ValueError(f"model_format must be one of {sorted(MODEL_MEMBERS)}, not {model_format!r}")
    if not isinstance(manifest, dict) or not isinstance(baseline, dict):
        raise ValueError("manifest and baseline must be dicts")
    model_member = MODEL_MEMBERS[model_format]
    payload = {
        BASELINE: _json_member(baseline, BASELINE),
        SELFTEST: _npz_bytes(selftest_inputs, selftest_outputs),
        model_member: bytes(model),
    }
    full = dict(manifest)
    full.update(
        schema_version=SCHEMA_VERSION,
        format=model_format,
        model_member=model_member,
        members={n: {"sha256": _sha256(b), "size": len(b)} for n, b in payload.items()},
    )
    manifest_bytes = _json_member(full, MANIFEST)
    signature = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    data = _zip_stored([(MANIFEST, manifest_bytes), (SIGNATURE, canonical_json(signature))] + list(payload.items()))
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ValueError(f"the artifact would be {len(data)} bytes; edgeml reads at most {MAX_ARTIFACT_BYTES}")
    shipped = transfer.compress(data) if compress else data
    # Read back what we are about to publish, so a file that does not verify is never written.
    artifact = _parse(shipped, path, key.public_key())
    _publish(path, shipped)
    logger.info("wrote %s (%d bytes, %d unpacked, key id %s)", path, len(shipped), len(data), artifact.key_id)
    return artifact


def read_artifact(path: PathLike) -> Artifact:
    """Read an artifact and check its integrity (structure, member hashes and sizes), not its signature."""
    path = Path(path)
    return _parse(_read_file(path), path, None)


def verify_artifact(path: PathLike, public_key_or_path) -> Artifact:
    """Read an artifact and check its integrity and its Ed25519 signature against the given key."""
    path = Path(path)
    public_key = _public_key(public_key_or_path)
    return _parse(_read_file(path), path, public_key)


# -- reading ------------------------------------------------------------------------------------


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path} does not exist; pass the path of a .edgeml artifact")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass the path of a .edgeml artifact")
    try:
        size = path.stat().st_size
        if size > MAX_ARTIFACT_BYTES:
            raise InputError(f"{path} is {size} bytes, more than the {MAX_ARTIFACT_BYTES} an artifact may have")
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse(raw: bytes, path: Path, public_key: Optional["ed25519.Ed25519PublicKey"]) -> Artifact:
    """Check ``raw`` (the file's bytes) from the outside in; raise at the first check that fails."""
    data = _unwrap(raw, path)
    zf = _open_zip(data, path)
    names = [info.filename for info in zf.infolist()]
    _check_names(names, path, damaged_edgeml=data[30:30 + len(MANIFEST)] == MANIFEST.encode())
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise VerificationError(
                f"{path}: member {info.filename!r} is compressed, edgeml stores members as they are; "
                "the file was repacked or damaged, re-create it with edgeml"
            )
    manifest_bytes = _read_member(zf, MANIFEST, path, MAX_JSON_BYTES)
    manifest = _parse_json(manifest_bytes, MANIFEST, path)
    _check_schema(manifest, path)
    members = _check_member_table(manifest, path)
    _check_member_set(names, members, path)
    contents = {}
    for name, entry in members.items():
        if zf.getinfo(name).file_size != entry["size"]:
            raise _changed(path, name, f"{zf.getinfo(name).file_size} bytes where the manifest says {entry['size']}")
        contents[name] = _read_member(zf, name, path, entry["size"])
        if _sha256(contents[name]) != entry["sha256"]:
            raise _changed(path, name, "its sha256 differs from the manifest")
    signature_bytes = _read_member(zf, SIGNATURE, path, MAX_JSON_BYTES)
    signer, signature = _parse_signature(signature_bytes, path)
    if public_key is not None:
        _check_signature(manifest_bytes, signer, signature, public_key, path)
    order = [(MANIFEST, manifest_bytes), (SIGNATURE, signature_bytes)] + [(n, contents[n]) for n in members]
    if _zip_stored(order) != data:
        raise VerificationError(
            f"{path}: the members check out but the ZIP container around them was changed "
            "(repacked or edited); do not deploy it, get the file edgeml wrote"
        )
    inputs, outputs = _load_npz(contents[SELFTEST], path)
    return Artifact(
        path=path,
        manifest=manifest,
        model=contents[manifest["model_member"]],
        model_format=manifest["format"],
        selftest_inputs=inputs,
        selftest_outputs=outputs,
        baseline=_parse_json(contents[BASELINE], BASELINE, path),
        key_id=signer,
        size=len(raw),
        sha256=_sha256(raw),
        verified=public_key is not None,
        content_size=len(data),
        compressed=raw is not data,
    )


def _unwrap(raw: bytes, path: Path) -> bytes:
    if not transfer.is_compressed(raw):
        return raw
    try:
        return transfer.decompress(raw, MAX_ARTIFACT_BYTES)
    except ValueError as exc:
        raise VerificationError(f"{path} cannot be unpacked: {exc}; get a fresh copy of the artifact") from exc


def _open_zip(data: bytes, path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        if data.startswith(b"PK\x03\x04"):  # it was a ZIP file once: damaged, not the wrong file
            raise VerificationError(f"{path} is a damaged ZIP file ({exc}); get a fresh copy of the artifact") from exc
        raise InputError(f"{path} is not an edgeml artifact (not a ZIP file); pass a .edgeml file") from exc


def _check_names(names: List[str], path: Path, damaged_edgeml: bool) -> None:
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts or ":" in name or "\\" in name:
            raise VerificationError(
                f"{path} has a member named {name!r} that points outside the artifact; "
                "do not unpack or deploy it, it was not written by edgeml"
            )
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise VerificationError(
            f"{path} holds {duplicates[0]!r} more than once, so readers may disagree on its content; "
            "do not deploy it, get the file edgeml wrote"
        )
    if MANIFEST not in names:
        known = {MANIFEST, SIGNATURE, BASELINE, SELFTEST, *MODEL_MEMBERS.values()}
        # Our first member is manifest.json: if its local header is still there, the central
        # directory is what got damaged, and that is a verification failure, not a wrong file.
        if not known.intersection(names) and not damaged_edgeml:
            raise InputError(f"{path} is a ZIP file but not an edgeml artifact (no {MANIFEST}); pass a .edgeml file")
        raise VerificationError(f"{path} has no {MANIFEST}; the file is damaged, get a fresh copy")


def _check_schema(manifest: dict, path: Path) -> None:
    version = manifest.get("schema_version")
    if version == SCHEMA_VERSION and type(version) is int:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise VerificationError(
            f"{path} has schema_version {version}, this edgeml reads {SCHEMA_VERSION}; upgrade edgeml to read it"
        )
    raise VerificationError(
        f"{path} has unsupported schema_version {version!r} (this edgeml reads {SCHEMA_VERSION}); "
        "re-create the artifact with this edgeml"
    )


def _check_member_table(manifest: dict, path: Path) -> Dict[str, dict]:
    fmt, model_member, members = manifest.get("format"), manifest.get("model_member"), manifest.get("members")
    if fmt not in MODEL_MEMBERS or model_member != MODEL_MEMBERS[fmt]:
        raise VerificationError(f"{path}: manifest format {fmt!r} / model_member {model_member!r} are not valid")
    ok = isinstance(members, dict) and set(members) == {BASELINE, SELFTEST, model_member}
    ok = ok and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("size")) is int and e["size"] >= 0
        for e in members.values()
    )
    if not ok:
        raise VerificationError(
            f"{path}: the manifest's members table must list {BASELINE}, {SELFTEST} and {model_member} "
            "with sha256 and size; the file is damaged"
        )
    return {name: members[name] for name in (BASELINE, SELFTEST, model_member)}


def _check_member_set(names: List[str], members: Dict[str, dict], path: Path) -> None:
    expected = {MANIFEST, SIGNATURE, *members}
    extra = sorted(set(names) - expected)
    if extra:
        raise VerificationError(
            f"{path} has unexpected member {extra[0]!r}; something was added after signing, do not deploy it"
        )
    if SIGNATURE not in names:
        raise VerificationError(f"{path} is not signed (no {SIGNATURE}); sign it with edgeml before deploying it")
    missing = sorted(expected - set(names))
    if missing:
        raise VerificationError(f"{path} lacks member {missing[0]!r} listed in the manifest; get a fresh copy")


def _read_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise VerificationError(f"{path}: {name} is {info.file_size} bytes, more than the {limit} allowed")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, OSError, EOFError) as exc:
        raise VerificationError(f"{path}: {name} is damaged ({exc}); get a fresh copy of the artifact") from exc
    if len(data) > limit:
        raise VerificationError(f"{path}: {name} is larger than the {limit} bytes allowed")
    return data


def _parse_json(data: bytes, name: str, path: Path) -> dict:
    def no_constants(token):
        raise ValueError(f"{token} is not JSON")

    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=no_constants)
        canonical = isinstance(obj, dict) and canonical_json(obj) == data
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"{path}: {name} is not valid JSON ({exc}); the file is damaged") from exc
    if not canonical:
        raise VerificationError(f"{path}: {name} is not in canonical form, so it was edited; do not deploy it")
    return obj


def _parse_signature(data: bytes, path: Path) -> Tuple[str, bytes]:
    sig = _parse_json(data, SIGNATURE, path)
    if sig.get("algorithm") != "ed25519" or not isinstance(sig.get("key_id"), str):
        raise VerificationError(f"{path}: {SIGNATURE} must name algorithm ed25519 and a key_id; the file is damaged")
    try:
        raw = base64.b64decode(sig.get("signature", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise VerificationError(f"{path}: the signature in {SIGNATURE} is not base64; the file is damaged") from exc
    if len(raw) != 64:
        raise VerificationError(f"{path}: the signature in {SIGNATURE} is not 64 bytes long; the file is damaged")
    return sig["key_id"], raw


def _check_signature(manifest_bytes: bytes, signer: str, signature: bytes, public_key, path: Path) -> None:
    from cryptography.exceptions import InvalidSignature

    from ..signing import key_id

    given = key_id(public_key)
    if signer != given:
        raise VerificationError(
            f"{path} is signed by key {signer}, not by the given key {given}; pass the matching signing.pub"
        )
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise VerificationError(
            f"{path}: the signature does not match {MANIFEST}, so the manifest or signature was changed "
            "after signing; do not deploy it, rebuild and sign it again"
        ) from exc


def _load_npz(data: bytes, path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    arrays = {"input": {}, "output": {}}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            if any(i.compress_type != zipfile.ZIP_STORED for i in inner.infolist()):
                raise ValueError("compressed arrays")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                kind, _, name = key.partition("/")
                if kind not in arrays or not name:
                    raise ValueError(f"unexpected array {key!r}")
                arrays[kind][name] = npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise VerificationError(f"{path}: {SELFTEST} cannot be read ({exc}); the file is damaged") from exc
    return arrays["input"], arrays["output"]


def _changed(path: Path, name: str, how: str) -> VerificationError:
    return VerificationError(
        f"{path}: {name} was changed after signing ({how}); do not deploy it, get a fresh copy or rebuild it"
    )


# -- writing ------------------------------------------------------------------------------------


def _dumps(obj) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )


def _check_keys(obj) -> None:
    """json.dumps would quietly turn 1 into "1": a value that reads back different. Refuse it."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"not canonical JSON: dict key {key!r} is not a string")
            _check_keys(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_keys(value)


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_member(obj: dict, name: str) -> bytes:
    try:
        return canonical_json(obj)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc} (NaN and infinity have no JSON form; store null instead)") from exc


def _npz_bytes(inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray]) -> bytes:
    """An .npz that np.load reads, built by our own ZIP writer so its bytes are deterministic."""
    members = []
    for kind, arrays in (("input", inputs), ("output", outputs)):
        for name in sorted(arrays):  # sorted: the same arrays in any dict order give the same bytes
            if not isinstance(name, str) or not name:
                raise ValueError(f"self-test {kind} names must be non-empty strings, not {name!r}")
            array = np.asarray(arrays[name])
            if array.dtype.hasobject:
                raise ValueError(f"self-test {kind} {name!r} has dtype object; use numeric arrays")
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, allow_pickle=False)
            members.append((f"{kind}/{name}.npy", buf.getvalue()))
    return _zip_stored(members)


_DOS_TIME, _DOS_DATE = 0, (1 << 5) | 1  # 1980-01-01 00:00, the earliest time a ZIP can hold
_UNIX_FILE_0644 = 0o100644 << 16


def _zip_stored(members: List[Tuple[str, bytes]]) -> bytes:
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


def _private_key(private_key) -> "ed25519.Ed25519PrivateKey":
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from ..signing import describe_key_type, load_private_key

    if isinstance(private_key, (str, os.PathLike)):
        return load_private_key(private_key)
    if isinstance(private_key, ed25519.Ed25519PublicKey):
        raise KeyFileError("this is the public key; pass signing.key (the private key) to sign")
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(
            f"artifacts are signed with an Ed25519 private key, not an {describe_key_type(private_key)} key; "
            "pass the signing.key made by `edgeml keys generate`"
        )
    return private_key


def _public_key(public_key_or_path) -> "ed25519.Ed25519PublicKey":
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from ..signing import describe_key_type, load_public_key

    if isinstance(public_key_or_path, (str, os.PathLike)):
        return load_public_key(public_key_or_path)
    if isinstance(public_key_or_path, ed25519.Ed25519PrivateKey):
        raise KeyFileError("this is the private key; pass signing.pub (the public key) to verify")
    if not isinstance(public_key_or_path, ed25519.Ed25519PublicKey):
        raise KeyFileError(
            f"verifying needs an Ed25519 public key, not an {describe_key_type(public_key_or_path)} key "
            "object; pass signing.pub"
        )
    return public_key_or_path


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
