"""Ed25519 keys for signing artifacts (standard library + cryptography only; the device imports it).

``generate_keys`` writes ``signing.key`` (PEM PKCS8, unencrypted, mode 0600) and ``signing.pub``
(PEM SubjectPublicKeyInfo). The host signs with the private key; devices hold only the public one.

Loading accepts PEM or DER, plus OpenSSH-format Ed25519 keys. An encrypted private key is
decrypted with the password in the environment variable ``EDGEML_KEY_PASSWORD`` (an environment
variable, not an option, so the password never shows up in shell history or ``ps``); without it
the loader says so. Every failure is a one-line ``KeyFileError`` that says what to pass instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Tuple, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from .atomic import write_atomic
from .errors import KeyFileError

logger = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"
PASSWORD_ENV = "EDGEML_KEY_PASSWORD"

PathLike = Union[str, os.PathLike]


def generate_keys(out_dir: PathLike, *, force: bool = False) -> Tuple[Path, Path]:
    """Create a new Ed25519 key pair in ``out_dir``; returns (private key path, public key path)."""
    out = Path(out_dir)
    private_path, public_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    existing = [p.name for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"{' and '.join(existing)} already exist in {out}; use --force to replace them "
            "(artifacts signed with the old key will no longer verify with the new one)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create the key folder {out}: {exc.strerror}") from exc
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Private key first: a public key without its private half is useless, the reverse is not.
    _write_atomic(private_path, private_pem, 0o600)
    _write_atomic(public_path, public_pem, 0o644)
    logger.info("wrote key pair %s (key id %s)", out, key_id(key.public_key()))
    return private_path, public_path


def load_private_key(path: PathLike) -> ed25519.Ed25519PrivateKey:
    """Read an Ed25519 private key (``signing.key``) for signing."""
    path = Path(path)
    data = _read_key_file(path, "private")
    if _looks_public(data):
        raise KeyFileError(f"{path} is the public key; pass {PRIVATE_KEY_NAME} (the private key) to sign")
    key = _parse_private(path, data)
    if key is None:
        raise KeyFileError(
            f"{path} is not a key file; pass the {PRIVATE_KEY_NAME} made by `edgeml keys generate`"
        )
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} is an {describe_key_type(key)} private key; edgeml signs with Ed25519 only, "
            "make one with `edgeml keys generate`"
        )
    return key


def load_public_key(path: PathLike) -> ed25519.Ed25519PublicKey:
    """Read an Ed25519 public key (``signing.pub``) for verifying."""
    path = Path(path)
    data = _read_key_file(path, "public")
    if b"PRIVATE KEY" in data or _parse_private(path, data, quiet=True) is not None:
        raise KeyFileError(
            f"{path} is the private key; pass {PUBLIC_KEY_NAME} to verify (the private key never "
            "needs to leave the build machine)"
        )
    key = _parse_public(data)
    if key is None:
        raise KeyFileError(
            f"{path} is not a key file; pass the {PUBLIC_KEY_NAME} made by `edgeml keys generate`"
        )
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(
            f"{path} is an {describe_key_type(key)} public key; edgeml verifies Ed25519 signatures "
            f"only, pass the {PUBLIC_KEY_NAME} made by `edgeml keys generate`"
        )
    return key


def key_id(public_key) -> str:
    """Short fingerprint: the first 16 hex digits of sha256 over the raw 32-byte public key."""
    if isinstance(public_key, ed25519.Ed25519PrivateKey):
        public_key = public_key.public_key()
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise TypeError(f"key_id needs an Ed25519 public key, got {type(public_key).__name__}")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def describe_key_type(key) -> str:
    """A human name for a key object's algorithm, e.g. 'RSA (2048-bit)' or 'EC (secp256r1)'."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA ({key.key_size}-bit)"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC ({key.curve.name})"
    names = [
        ((ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey), "Ed25519"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "Ed448"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "X25519"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "X448"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "DSA"),
    ]
    for classes, name in names:
        if isinstance(key, classes):
            return name
    return type(key).__name__


# -- internals ----------------------------------------------------------------------------------


def private_key_of(private_key) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 private key object, or the path of signing.key -> the key; KeyFileError for anything else."""
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


def public_key_of(public_key_or_path) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key object, or the path of signing.pub -> the key; KeyFileError for anything else."""
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


def _read_key_file(path: Path, kind: str) -> bytes:
    name = PRIVATE_KEY_NAME if kind == "private" else PUBLIC_KEY_NAME
    if not path.exists():
        raise KeyFileError(f"{path} does not exist; pass the {name} made by `edgeml keys generate`")
    if path.is_dir():
        raise KeyFileError(f"{path} is a folder; pass the {name} file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > 1 << 20:  # keys are a few hundred bytes; do not parse a model by mistake
        raise KeyFileError(f"{path} is not a key file ({len(data)} bytes); pass {name}")
    return data


def _looks_public(data: bytes) -> bool:
    return b"PUBLIC KEY-----" in data or data.lstrip().startswith(b"ssh-")


_ENCRYPTED = object()  # "a private key, but encrypted": enough to know which file it is


def _parse_private(path: Path, data: bytes, quiet: bool = False):
    """The private key in ``data``, or None when it holds none. Decrypts with PASSWORD_ENV.

    With ``quiet`` it never raises: an encrypted key comes back as ``_ENCRYPTED``.
    """
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        loader = serialization.load_ssh_private_key
    elif b"-----BEGIN" in data:
        loader = serialization.load_pem_private_key
    else:
        loader = serialization.load_der_private_key
    try:
        return loader(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        pass
    except ValueError:
        return None
    except UnsupportedAlgorithm as exc:
        if quiet:
            return None
        raise KeyFileError(f"{path} uses a key type this machine cannot read: {exc}") from exc
    if quiet:
        return _ENCRYPTED
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise KeyFileError(
            f"{path} is encrypted; set {PASSWORD_ENV} to its password, or use an unencrypted "
            "PKCS8 key such as the one `edgeml keys generate` writes"
        )
    try:
        return loader(data, password=password.encode())
    except (TypeError, ValueError) as exc:
        raise KeyFileError(f"{PASSWORD_ENV} does not decrypt {path}; set it to the key's password") from exc
    except UnsupportedAlgorithm as exc:
        raise KeyFileError(f"cannot decrypt {path} on this machine: {exc}") from exc


def _parse_public(data: bytes):
    if data.lstrip().startswith(b"ssh-"):
        loader = serialization.load_ssh_public_key
    elif b"-----BEGIN" in data:
        loader = serialization.load_pem_public_key
    else:
        loader = serialization.load_der_public_key
    try:
        return loader(data)
    except (ValueError, UnsupportedAlgorithm):
        return None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
