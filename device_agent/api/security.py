"""Who may use the agent's API: bearer tokens from a file, and TLS (optionally mutual).

Tokens: one per line in a file the operator controls (blank lines and ``#`` comments skipped),
re-read on SIGHUP so a token can be rotated without a restart. Every token is compared in
constant time, and all of them are compared whatever matches, so the time taken says nothing
about how much of a guess was right.
"""
from __future__ import annotations

import hmac
import logging
import ssl
import threading
from pathlib import Path
from typing import List, Optional

from edgeml.core.errors import InputError, UsageError

log = logging.getLogger("edgeml-agent.api")
MIN_TOKEN_CHARS = 16


class Tokens:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._tokens: List[bytes] = self._read()

    def _read(self) -> List[bytes]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read token_file {self.path}: {exc.strerror or exc}") from exc
        tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not tokens:
            raise UsageError(f"token_file {self.path} holds no token; put one per line (e.g. openssl rand -hex 24)")
        short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
        if short:
            raise UsageError(f"token_file {self.path}: a token of {len(short[0])} characters; use at least "
                             f"{MIN_TOKEN_CHARS} (e.g. openssl rand -hex 24)")
        return [t.encode("utf-8") for t in tokens]

    def reload(self) -> bool:
        """Read the file again; on a bad file keep the tokens in use and say why. True if re-read."""
        try:
            tokens = self._read()
        except (InputError, UsageError) as exc:
            log.error("api tokens not reloaded, the previous ones stay in force: %s", exc)
            return False
        with self._lock:
            self._tokens = tokens
        log.info("api tokens reloaded from %s (%d)", self.path, len(tokens))
        return True

    def check(self, authorization: Optional[str]) -> Optional[str]:
        """None when ``authorization`` (the header) carries a valid bearer token, else why not
        (``missing`` or ``invalid``)."""
        if not authorization:
            return "missing"
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "invalid"
        given_b = given.strip().encode("utf-8", "replace")
        with self._lock:
            tokens = self._tokens
        ok = False
        for token in tokens:  # no early exit: every token costs the same time
            ok |= hmac.compare_digest(given_b, token)
        return None if ok else "invalid"


def server_context(cert_file: Path, key_file: Path, client_ca_file: Optional[Path] = None) -> ssl.SSLContext:
    """TLS 1.2+ for the API; with ``client_ca_file``, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"cannot use tls_cert_file {cert_file} with tls_key_file {key_file}: "
                         f"{getattr(exc, 'reason', None) or exc}") from exc
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(str(client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"cannot read tls_client_ca_file {client_ca_file}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
