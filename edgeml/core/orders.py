"""Signed rollback orders: the only way a device accepts a model version below the highest it has
ever accepted (TUF's rollback rule).

A device keeps, outside its model slots, the highest version it committed and never lowers it;
a replayed old desired message, or a broker that lies, cannot take it back to an older (perhaps
vulnerable) model. The host can, with the fleet's signing key: an order names the fleet, the
devices (or ``"*"``), the model, the exact (version, content_sha256) pairs it allows, when it was
issued and when it expires. A device accepts an order only with a valid signature, before its
expiry, and issued after the last order it accepted (so an old order cannot be replayed either).

Signing and verifying load ``cryptography``; the device agent does it in a short-lived child
process (``device_agent.verifier``), as it does for artifacts.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Iterable, Optional, Sequence, Tuple

from .artifact.layout import canonical_json
from .errors import VerificationError

KIND = "rollback"
MAX_LIFETIME_S = 30 * 86400


def make_order(private_key, *, fleet: str, devices, name: str, allow: Iterable[Tuple[int, str]],
               expires_in: float = 7 * 86400, issued: Optional[float] = None) -> dict:
    """A signed order letting ``devices`` (a list, or ``"*"``) of ``fleet`` go to any of the
    ``allow`` (version, content_sha256) pairs of model ``name`` until it expires."""
    from .signing import key_id, private_key_of

    key = private_key_of(private_key)
    if not 0 < expires_in <= MAX_LIFETIME_S:
        raise ValueError(f"an order must expire within {MAX_LIFETIME_S // 86400} days")
    issued = time.time() if issued is None else issued
    body = {"kind": KIND, "id": uuid.uuid4().hex, "fleet": fleet,
            "devices": "*" if devices == "*" else sorted(devices), "name": name,
            "allow": sorted([int(v), str(c)] for v, c in allow), "issued": issued, "expires": issued + expires_in}
    return {"order": body, "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(canonical_json(body))).decode("ascii")}


def verify_order(signed: dict, public_key_or_path) -> dict:
    """The order's body if its signature checks out against the fleet's key; VerificationError otherwise."""
    from cryptography.exceptions import InvalidSignature

    from .signing import key_id, public_key_of

    key = public_key_of(public_key_or_path)
    if not (isinstance(signed, dict) and isinstance(signed.get("order"), dict)
            and isinstance(signed.get("signature"), str) and isinstance(signed.get("key_id"), str)):
        raise VerificationError("the rollback order is malformed: it needs order, key_id and signature")
    if signed["key_id"] != key_id(key):
        raise VerificationError(f"the rollback order is signed by key {signed['key_id']}, not the fleet's key "
                                f"{key_id(key)}")
    try:
        key.verify(base64.b64decode(signed["signature"], validate=True), canonical_json(signed["order"]))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise VerificationError("the rollback order's signature does not match it: it was changed or forged") from exc
    return signed["order"]


def refusal(order: dict, *, fleet: str, device: str, name: str, version: int, content_sha256: str,
            last_issued: float, now: Optional[float] = None) -> Optional[str]:
    """Why a verified order does not allow this device to go to (name, version, content), or None."""
    now = time.time() if now is None else now
    allow: Sequence = order.get("allow") or []
    if order.get("kind") != KIND:
        return f"the order is a {order.get('kind')!r}, not a rollback order"
    if order.get("fleet") != fleet:
        return f"the order is for fleet {order.get('fleet')!r}, not {fleet!r}"
    if order.get("devices") != "*" and device not in (order.get("devices") or []):
        return f"the order does not name device {device!r}"
    if order.get("name") != name:
        return f"the order is for model {order.get('name')!r}, not {name!r}"
    if [version, content_sha256] not in [list(a) for a in allow]:
        return f"the order does not allow {name} v{version} ({content_sha256[:12]})"
    if not isinstance(order.get("expires"), (int, float)) or now > order["expires"]:
        return "the order has expired"
    if not isinstance(order.get("issued"), (int, float)) or order["issued"] <= last_issued:
        return "the order is not newer than the last order this device accepted (a replay)"
    return None
