"""Certificates for TLS tests, made on the spot with ``cryptography``: a CA, a server certificate
for 127.0.0.1 signed by it, a client certificate (mutual TLS), and another CA nobody trusts."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert, key) -> tuple:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca_cert, ca_key, usage, san=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_certs(folder: Path) -> dict:
    """Paths: ca, server (cert, key), client (cert, key), other_ca (a CA that signed nothing here)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("edgeml test CA")
    ca_path, _ = _write(folder, "ca", ca_cert, ca_key)
    server = _write(folder, "server", *_leaf("127.0.0.1", ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                                             [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                              x509.DNSName("localhost")]))
    client = _write(folder, "client", *_leaf("camera-7", ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH))
    other_cert, other_key = _ca("somebody else's CA")
    other_path, _ = _write(folder, "other-ca", other_cert, other_key)
    return {"ca": ca_path, "server": server, "client": client, "other_ca": other_path}
