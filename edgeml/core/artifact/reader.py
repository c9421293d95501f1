"""Reading an artifact: every check from the outside in (frame, ZIP, names, schema, member table,
hashes, signature, the container rebuilt byte for byte), failing at the first with one line that
says what to do."""
from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from .. import transfer
from ..errors import InputError, VerificationError
from . import selftest_data
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
    PathLike,
    canonical_json,
    sha256,
    zip_stored,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519


def read_artifact(path: PathLike) -> Artifact:
    """Read an artifact and check its integrity (structure, member hashes and sizes), not its signature."""
    path = Path(path)
    return parse(_read_file(path), path, None)


def verify_artifact(path: PathLike, public_key_or_path) -> Artifact:
    """Read an artifact and check its integrity and its Ed25519 signature against the given key."""
    path = Path(path)
    from ..signing import public_key_of

    public_key = public_key_of(public_key_or_path)
    return parse(_read_file(path), path, public_key)


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


def parse(raw: bytes, path: Path, public_key: Optional["ed25519.Ed25519PublicKey"]) -> Artifact:
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
        if sha256(contents[name]) != entry["sha256"]:
            raise _changed(path, name, "its sha256 differs from the manifest")
    signature_bytes = _read_member(zf, SIGNATURE, path, MAX_JSON_BYTES)
    signer, signature = _parse_signature(signature_bytes, path)
    if public_key is not None:
        _check_signature(manifest_bytes, signer, signature, public_key, path)
    order = [(MANIFEST, manifest_bytes), (SIGNATURE, signature_bytes)] + [(n, contents[n]) for n in members]
    if zip_stored(order) != data:
        raise VerificationError(
            f"{path}: the members check out but the ZIP container around them was changed "
            "(repacked or edited); do not deploy it, get the file edgeml wrote"
        )
    inputs, outputs, references = _load_selftest(contents[SELFTEST], manifest, path)
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
        sha256=sha256(raw),
        verified=public_key is not None,
        content_size=len(data),
        compressed=raw is not data,
        content_sha256=sha256(data),
        selftest_references=references,
    )


def unpacked(raw: bytes, path: Path = Path("artifact")) -> bytes:
    """The ZIP inside an artifact file's bytes (the bytes themselves when stored uncompressed)."""
    return _unwrap(raw, path)


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
    if version in READABLE_VERSIONS and type(version) is int:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise VerificationError(
            f"{path} has schema_version {version}, this edgeml reads up to {SCHEMA_VERSION}; upgrade edgeml to read it"
        )
    raise VerificationError(
        f"{path} has unsupported schema_version {version!r} (this edgeml reads "
        f"{', '.join(map(str, READABLE_VERSIONS))}); "
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


def _load_selftest(data: bytes, manifest: dict, path: Path):
    """Decoded inputs, full references and compact references (see ``selftest_data``)."""
    arrays = {"input": {}, "output": {}, "reference": {}}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            if any(i.compress_type != zipfile.ZIP_STORED for i in inner.infolist()):
                raise ValueError("compressed arrays")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                kind, _, name = key.partition("/")
                if kind == "reference":
                    part, _, name = name.partition("/")
                    arrays[kind].setdefault(part, {})[name] = npz[key]
                elif kind in arrays and name:
                    arrays[kind][name] = npz[key]
                else:
                    raise ValueError(f"unexpected array {key!r}")
                if not name:
                    raise ValueError(f"unexpected array {key!r}")
        meta = selftest_data.section(manifest)
        unpacked = selftest_data.unpack(arrays, meta)
        if manifest["schema_version"] == 1 and selftest_data.is_compact(meta):
            raise ValueError("its manifest has schema_version 1 but describes compact storage")
        return unpacked
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise VerificationError(f"{path}: {SELFTEST} cannot be read ({exc}); the file is damaged") from exc


def _changed(path: Path, name: str, how: str) -> VerificationError:
    return VerificationError(
        f"{path}: {name} was changed after signing ({how}); do not deploy it, get a fresh copy or rebuild it"
    )
