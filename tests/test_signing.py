"""Ed25519 key files: generate, load, fingerprint, and a one-line KeyFileError for every bad key."""
from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edgeml.core.errors import KeyFileError
from edgeml.core.signing import (
    PASSWORD_ENV,
    generate_keys,
    key_id,
    load_private_key,
    load_public_key,
)

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8, SPKI = serialization.PrivateFormat.PKCS8, serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_private(path, key, encryption=None, encoding=PEM, fmt=PKCS8):
    path.write_bytes(key.private_bytes(encoding, fmt, encryption or serialization.NoEncryption()))
    return path


def write_public(path, key, encoding=PEM, fmt=SPKI):
    path.write_bytes(key.public_key().public_bytes(encoding, fmt))
    return path


def key_error(func, *args) -> str:
    with pytest.raises(KeyFileError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_generate_writes_a_working_pair(tmp_path):
    private_path, public_path = generate_keys(tmp_path / "keys")
    assert (private_path.name, public_path.name) == ("signing.key", "signing.pub")
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["signing.key", "signing.pub"]  # no temp files

    private, public = load_private_key(private_path), load_public_key(public_path)
    signature = private.sign(b"manifest bytes")
    public.verify(signature, b"manifest bytes")  # raises InvalidSignature if the halves do not match


def test_key_id_is_a_stable_fingerprint_of_the_raw_key(tmp_path):
    _, public_path = generate_keys(tmp_path)
    public = load_public_key(public_path)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    kid = key_id(public)
    assert kid == hashlib.sha256(raw).hexdigest()[:16]
    assert kid == key_id(load_public_key(public_path)) == key_id(load_private_key(tmp_path / "signing.key"))
    assert len(kid) == 16 and int(kid, 16) >= 0
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert key_id(other) != kid
    with pytest.raises(TypeError):
        key_id(b"not a key")


def test_generate_refuses_to_overwrite_without_force(tmp_path):
    private_path, public_path = generate_keys(tmp_path)
    before = private_path.read_bytes(), public_path.read_bytes()
    message = key_error(generate_keys, tmp_path)
    assert "use --force to replace them" in message
    assert (private_path.read_bytes(), public_path.read_bytes()) == before

    public_path.unlink()  # half a pair is still something to protect
    assert "signing.key" in key_error(generate_keys, tmp_path)
    assert private_path.read_bytes() == before[0]


def test_generate_with_force_replaces_both(tmp_path):
    private_path, public_path = generate_keys(tmp_path)
    old_id = key_id(load_public_key(public_path))
    generate_keys(tmp_path, force=True)
    new_id = key_id(load_public_key(public_path))
    assert new_id != old_id
    assert key_id(load_private_key(private_path)) == new_id
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_other_encodings_of_ed25519_keys_load(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    der = write_private(tmp_path / "k.der", key, encoding=DER)
    ssh = write_private(tmp_path / "k.ssh", key, fmt=serialization.PrivateFormat.OpenSSH)
    ssh_pub = write_public(tmp_path / "k.ssh.pub", key, encoding=serialization.Encoding.OpenSSH,
                           fmt=serialization.PublicFormat.OpenSSH)
    der_pub = write_public(tmp_path / "k.pub.der", key, encoding=DER)
    assert key_id(load_private_key(der)) == key_id(load_private_key(ssh)) == kid
    assert key_id(load_public_key(ssh_pub)) == key_id(load_public_key(der_pub)) == kid


def test_missing_folder_and_junk_files(tmp_path):
    for loader in (load_private_key, load_public_key):
        assert "does not exist" in key_error(loader, tmp_path / "nope.key")
        assert "is a folder" in key_error(loader, tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a key\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    for path in (text, empty, junk):
        assert "is not a key file" in key_error(load_private_key, path)
        assert "is not a key file" in key_error(load_public_key, path)


def test_rsa_and_ec_keys_are_named(tmp_path, rsa_key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = [(rsa_key, "RSA (2048-bit)"), (ec_key, "EC (secp256r1)"), (ed448.Ed448PrivateKey.generate(), "Ed448")]
    for key, name in cases:
        private = write_private(tmp_path / "other.key", key)
        public = write_public(tmp_path / "other.pub", key)
        message = key_error(load_private_key, private)
        assert name in message and "Ed25519" in message
        message = key_error(load_public_key, public)
        assert name in message and "Ed25519" in message


def test_public_and_private_swapped(tmp_path):
    private_path, public_path = generate_keys(tmp_path)
    message = key_error(load_private_key, public_path)
    assert "is the public key; pass signing.key" in message
    message = key_error(load_public_key, private_path)
    assert "is the private key; pass signing.pub" in message
    # the same for DER files, where no PEM label gives the answer away
    key = load_private_key(private_path)
    assert "is the private key" in key_error(load_public_key, write_private(tmp_path / "k.der", key, encoding=DER))


def test_encrypted_private_key_uses_the_password_variable(tmp_path, monkeypatch):
    key = ed25519.Ed25519PrivateKey.generate()
    path = write_private(tmp_path / "enc.key", key, serialization.BestAvailableEncryption(b"s3cret"))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    message = key_error(load_private_key, path)
    assert "encrypted" in message and PASSWORD_ENV in message
    # it is still recognised as a private key where a public one is wanted
    assert "is the private key" in key_error(load_public_key, path)

    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert "does not decrypt" in key_error(load_private_key, path)

    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    assert key_id(load_private_key(path)) == key_id(key.public_key())
    # a password in the environment does not stop unencrypted keys from loading
    plain = write_private(tmp_path / "plain.key", key)
    assert key_id(load_private_key(plain)) == key_id(key.public_key())
