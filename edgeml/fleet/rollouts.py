"""Rollouts as a library: push a signed artifact to a fleet in waves, roll back by signed order,
pause, resume, abort, list and show. The commands in ``edgeml fleet`` are thin layers over these.

``push`` does the build machine's part and writes the rollout into the store; a running
``edgeml fleet serve`` (the controller) carries it out. So push checks everything up front:
the signature against the fleet's key (recorded at the fleet's first push), that no target
device runs a higher version (or the same version with other content), that no target is in
another active rollout, and it prepares what the controller will send: block hashes of the
artifact, zstd patches from the models devices hold now (when smaller than the artifact), and a
signed rollback order that lets the devices return to their current models if the rollout is
aborted after they committed.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from edgeml.core import update_contract as uc
from edgeml.core.errors import InputError, UsageError, VerificationError
from edgeml.core.mqtt_contract import check_id

from .store import Store

log = logging.getLogger("edgeml.fleet")

DONE = ("committed", "unobserved", "failed", "rolled_back", "refused", "timed_out", "skipped", "cancelled",
        "returned", "stays")
# where a shadow rollout's device has got to once it runs the candidate beside its model; the
# shadow goes on (the rollout stays active) until it is promoted or aborted
SHADOWING = "shadowing"
FAILED = ("failed", "rolled_back", "refused")
ORDER_LIFETIME_S = 14 * 86400
# A patch must save at least a tenth of the artifact to be sent instead of it: applying one costs the
# device the base in memory and a step that can fail, and a model retrained from scratch patches
# to 99% of its size (benchmarks/results/delta.md).
DELTA_WORTH = 0.9


def _id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _read_signed(path, key) -> tuple:
    """(artifact, file bytes, private key, public key PEM) for a file signed by ``key``."""
    from cryptography.hazmat.primitives import serialization

    from edgeml.core.artifact import verify_artifact
    from edgeml.core.signing import key_id, load_private_key

    private = load_private_key(key)
    art = verify_artifact(path, private.public_key())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return art, Path(path).read_bytes(), private, pem, key_id(private.public_key())


def _check_fleet_key(store: Store, fleet: str, key_id: str, pem: str) -> None:
    known = store.fleet_key(fleet)
    if known is None:
        store.set_fleet_key(fleet, key_id, pem)
    elif known["key_id"] != key_id:
        raise VerificationError(f"fleet {fleet} trusts key {known['key_id']}; this artifact is signed by {key_id}, "
                                "which its devices would refuse")


def resolve_targets(store: Store, fleet: str, devices: Optional[Sequence[str]], group: Optional[str]) -> List[str]:
    if devices and group:
        raise UsageError("give --devices or --group, not both")
    if group:
        members = store.groups(fleet).get(group)
        if not members:
            raise UsageError(f"group {group!r} of fleet {fleet} has no devices; add them with "
                             f"`edgeml fleet group add {group} DEVICE... --fleet {fleet}`")
        return sorted(members)
    if devices:
        return sorted({check_id(d, "device") for d in devices})
    known = [d["device"] for d in store.known_devices(fleet)]
    if not known:
        raise UsageError(f"fleet {fleet} has no devices the collector has seen; start `edgeml fleet serve` and the "
                         "agents first, or name them with --devices")
    return known


def _health_plan(abort_on: str, health_window, wave_timeout) -> tuple:
    """The rules, the health window and the wave timeout (default: 2 x window + 10 min, at least
    10 min) of a push or a rollback; a malformed one is a UsageError."""
    try:
        rules = uc.parse_rules(abort_on)
        window = uc.parse_duration(health_window)
        timeout = uc.parse_duration(wave_timeout) if wave_timeout is not None else max(600.0, 2 * window + 600.0)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return rules, window, timeout


def push_registered(store: Store, uri: str, **options) -> dict:
    """``push`` of an artifact registered in MLflow (``models:/NAME/VERSION`` or ``@ALIAS``); the
    registered version is then tagged with the fleet and the rollout (``edgeml.fleet.F``)."""
    import tempfile

    from edgeml.tracking import TrackingError
    from edgeml.tracking.registry import fetch_artifact, record_rollout

    with tempfile.TemporaryDirectory(prefix="edgeml-push-") as tmp:
        path, info = fetch_artifact(uri, Path(tmp))
        result = push(store, path, **options)  # the store keeps its own copy of the bytes
    result["mlflow"] = info
    try:
        record_rollout(info, result["fleet"], result["rollout"])
    except TrackingError as exc:
        log.warning("%s", exc)
        info["tag_error"] = str(exc)
    return result


def push(store: Store, artifact_path, *, fleet: str, key, devices: Optional[Sequence[str]] = None,
         group: Optional[str] = None, waves: str = "1,10%,50%,100%", health_window="5m", min_requests: int = 0,
         abort_on: str = uc.DEFAULT_RULES, wave_timeout=None, latency_budget: float = 5.0,
         block_size: int = uc.BLOCK_SIZE, url: Optional[str] = None, delta_bases: Iterable = (),
         delta: bool = True, shadow: Optional[float] = None, promote_from: Optional[str] = None) -> dict:
    """Check and record a rollout of ``artifact_path`` to ``fleet``; the controller carries it out.

    ``shadow`` (a share of requests, 0-1]: deliver, verify and self-test the candidate on every
    target at once and run it beside the active model on that share of live requests, without
    switching (``fleet shadow`` reports how the two agree). ``promote_from``: the shadow rollout
    this one promotes (``promote``), ended in the same transaction."""
    check_id(fleet, "fleet")
    if shadow is not None:
        if not 0 < shadow <= 1:
            raise UsageError(f"--sample {shadow:g} must be above 0 and at most 1 (a share of the requests)")
        waves = "100%"  # a shadow never answers a request: every target runs it at once
    rules, window, timeout = _health_plan(abort_on, health_window, wave_timeout)
    try:
        wave_spec = uc.parse_waves(waves)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not uc.MIN_BLOCK_SIZE <= block_size <= uc.MAX_BLOCK_SIZE:
        raise UsageError(f"--block-size must be between {uc.MIN_BLOCK_SIZE} and {uc.MAX_BLOCK_SIZE} bytes")
    if min_requests < 0 or latency_budget <= 0:
        raise UsageError("--min-requests must be 0 or more and --latency-budget above 0")
    if url is not None and not url.startswith(("http://", "https://")):
        raise UsageError(f"--url {url!r} must be an http:// or https:// URL")
    art, data, private, pem, key_id = _read_signed(artifact_path, key)
    name, version = art.manifest["name"], art.manifest["version"]
    rollout_id = _id("r")
    with store.transaction():
        _check_fleet_key(store, fleet, key_id, pem)
        targets = resolve_targets(store, fleet, devices, group)
        known = {d["device"]: d for d in store.known_devices(fleet)}
        _check_versions(targets, known, name, version, art.content_sha256)
        busy = store.busy_devices(fleet, exclude=promote_from or rollout_id)
        taken = sorted(d for d in targets if d in busy)
        if taken:
            what = ("promote it (`edgeml fleet promote`) or abort it" if (store.rollout(busy[taken[0]]) or {}).get(
                "kind") == "shadow" else "abort it or wait for it to finish")
            raise UsageError(f"{', '.join(taken[:5])} {'is' if len(taken) == 1 else 'are'} in rollout {busy[taken[0]]}; "
                             f"{what}")
        store.put_artifact(art, data)
    bases = _register_bases(store, delta_bases, private.public_key(), key_id)
    from_models = {d: known.get(d, {}) for d in targets}
    deltas = _prepare_deltas(store, art, data, block_size, {m.get("content_sha256") for m in from_models.values()}
                             | set(bases), delta)
    allow = sorted({(m["model_version"], m["content_sha256"]) for m in from_models.values()
                    if m.get("model_name") == name and m.get("content_sha256") and m.get("model_version") is not None})
    signed_order = None
    if allow:
        from edgeml.core.orders import make_order

        signed_order = make_order(private, fleet=fleet, devices=targets, name=name, allow=allow,
                                  expires_in=ORDER_LIFETIME_S)
    full = uc.Transfer.of(data, "full", block_size, url=url.replace("{sha256}", art.sha256) if url else None)
    plan = {
        "target": {"name": name, "version": version, "sha256": art.sha256, "content_sha256": art.content_sha256,
                   "size": art.size, "format": art.model_format},
        "full": full.to_dict(), "deltas": deltas,
        "health": {"window_s": window, "min_requests": min_requests, "rules": uc.rules_text(rules),
                   "latency_budget": latency_budget},
        "waves": uc.wave_sizes(wave_spec, len(targets)), "wave_spec": waves, "wave_timeout_s": timeout,
    }
    if shadow is not None:
        plan["shadow"] = {"sample": float(shadow)}
    if promote_from is not None:
        plan["promoted_from"] = promote_from
    assignments = _assign(rollout_id, targets, plan["waves"], from_models)
    with store.transaction():
        if promote_from is not None:  # the shadow ends as its promotion begins, never neither or both
            shadow_rollout = store.lock_rollout(promote_from)
            if shadow_rollout is None or shadow_rollout["state"] not in ("running", SHADOWING):
                raise UsageError(f"shadow rollout {promote_from} is {(shadow_rollout or {}).get('state', 'gone')}; "
                                 "only a running shadow can be promoted")
            store.update_rollout(promote_from, state="promoted", reason=f"promoted by rollout {rollout_id}")
        store.create_rollout({"id": rollout_id, "fleet": fleet, "kind": "shadow" if shadow is not None else "update",
                              "artifact": art.content_sha256, "plan": plan, "signed_order": signed_order}, assignments)
    log.info("rollout %s: %s v%s to %d devices of %s %s", rollout_id, name, version, len(targets), fleet,
             f"as a shadow on {shadow:.0%} of requests" if shadow is not None else f"in {len(plan['waves'])} waves")
    return {"ok": True, "rollout": rollout_id, "fleet": fleet, "name": name, "version": version,
            "kind": "shadow" if shadow is not None else "update", "shadow": plan.get("shadow"),
            "promoted_from": promote_from,
            "devices": len(targets), "waves": plan["waves"], "artifact_bytes": len(data),
            "deltas": {b[:12]: d["size"] for b, d in deltas.items()}, "rollback_order": signed_order is not None,
            "controllers": store.controllers_since(30.0)}


def promote(store: Store, *, fleet: str, key, shadow_version: int, **options) -> dict:
    """Turn the running shadow of version ``shadow_version`` into a staged rollout of the same
    artifact to the same devices (those where the shadow failed are left out: they would refuse
    it). The devices hold the file and the loaded candidate already: nothing is downloaded again."""
    import tempfile

    check_id(fleet, "fleet")
    found = [r for r in store.rollouts(fleet) if r["kind"] == "shadow" and r["state"] in ("running", SHADOWING)
             and r["plan"]["target"]["version"] == shadow_version]
    if not found:
        running = sorted({r["plan"]["target"]["version"] for r in store.rollouts(fleet)
                          if r["kind"] == "shadow" and r["state"] in ("running", SHADOWING)})
        raise UsageError(f"fleet {fleet} runs no shadow of version {shadow_version}"
                         + (f" (shadows running: {', '.join(f'v{v}' for v in running)})" if running else
                            "; start one with `edgeml fleet push ARTIFACT --fleet F --shadow`"))
    r = found[0]
    with store.transaction(write=False):
        assignments = store.assignments(r["id"])
    targets = sorted(a["device"] for a in assignments if a["state"] not in FAILED + ("skipped", "timed_out"))
    if not targets:
        raise UsageError(f"no device of shadow rollout {r['id']} runs the candidate; nothing to promote")
    if options.get("devices") or options.get("group"):
        raise UsageError("a promotion goes to the shadow's devices; give no --devices or --group")
    info = store.artifact_info(r["artifact"])
    with tempfile.TemporaryDirectory(prefix="edgeml-promote-") as tmp:
        path = Path(tmp) / "candidate.edgeml"
        path.write_bytes(store.blob(info["sha256"]))
        result = push(store, path, fleet=fleet, key=key, devices=targets, delta=False, promote_from=r["id"],
                      **options)
    return result


def rollback(store: Store, *, fleet: str, key, to: int, name: Optional[str] = None, artifact=None,
             devices: Optional[Sequence[str]] = None, group: Optional[str] = None, waves: str = "100%",
             health_window="30s", min_requests: int = 0, abort_on: str = "", wave_timeout=None,
             expires="7d") -> dict:
    """A rollout back to version ``to``, with a signed order that lets devices go below the
    highest version they committed. The artifact must be known to the store (pushed before, or
    given as ``artifact``)."""
    from edgeml.core.orders import make_order

    check_id(fleet, "fleet")
    from edgeml.core.signing import load_private_key

    private = load_private_key(key)
    if artifact is not None:
        art, data, private, pem, key_id = _read_signed(artifact, key)
        with store.transaction():
            _check_fleet_key(store, fleet, key_id, pem)
            store.put_artifact(art, data)
        info = store.artifact_info(art.content_sha256)
    else:
        names = {d["model_name"] for d in store.known_devices(fleet) if d["model_name"]}
        name = name or (names.pop() if len(names) == 1 else None)
        if name is None:
            raise UsageError(f"fleet {fleet} runs several models ({', '.join(sorted(names))}); give --name")
        info = store.find_artifact(name, to)
        if info is None:
            raise InputError(f"{name} v{to} was never pushed to this store; pass its file with --artifact")
    if info["version"] != to:
        raise UsageError(f"--artifact is v{info['version']}, not v{to}")
    rules, window, timeout = _health_plan(abort_on, health_window, wave_timeout)
    try:
        lifetime = uc.parse_duration(expires)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    rollout_id = _id("b")
    with store.transaction():
        fleet_key = store.fleet_key(fleet)
        from edgeml.core.signing import key_id

        if fleet_key is not None and fleet_key["key_id"] != key_id(private.public_key()):
            raise VerificationError(f"fleet {fleet} trusts key {fleet_key['key_id']}; --key is "
                                    f"{key_id(private.public_key())}")
        targets = resolve_targets(store, fleet, devices, group)
        busy = store.busy_devices(fleet, exclude=rollout_id)
        taken = sorted(d for d in targets if d in busy)
        if taken:
            raise UsageError(f"{', '.join(taken[:5])} {'is' if len(taken) == 1 else 'are'} in rollout {busy[taken[0]]}; "
                             f"abort it first (`edgeml fleet rollout abort {busy[taken[0]]}`)")
        known = {d["device"]: d for d in store.known_devices(fleet)}
    data = store.blob(info["sha256"])
    order = make_order(private, fleet=fleet, devices=targets, name=info["name"],
                       allow=[(info["version"], info["content_sha256"])], expires_in=lifetime)
    plan = {
        "target": {k: info[k] for k in ("name", "version", "sha256", "content_sha256", "size", "format")},
        "full": uc.Transfer.of(data, "full").to_dict(), "deltas": {}, "order": order,
        "health": {"window_s": window, "min_requests": min_requests, "rules": uc.rules_text(rules),
                   "latency_budget": 100.0},
        "waves": uc.wave_sizes(uc.parse_waves(waves), len(targets)), "wave_spec": waves, "wave_timeout_s": timeout,
    }
    from_models = {d: known.get(d, {}) for d in targets}
    store.create_rollout({"id": rollout_id, "fleet": fleet, "kind": "rollback", "artifact": info["content_sha256"],
                          "plan": plan, "signed_order": None}, _assign(rollout_id, targets, plan["waves"], from_models))
    return {"ok": True, "rollout": rollout_id, "fleet": fleet, "name": info["name"], "version": to,
            "devices": len(targets), "order_expires": order["order"]["expires"],
            "controllers": store.controllers_since(30.0)}


def set_state(store: Store, rollout_id: str, action: str) -> dict:
    """``pause`` (no new wave starts; devices updating go on), ``resume`` or ``abort`` (stop, and
    send the devices already updated back to the model they had)."""
    r = _find(store, rollout_id)
    allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused", SHADOWING)}[action]
    if r["state"] not in allowed:
        raise UsageError(f"rollout {r['id']} is {r['state']}; {action} needs it {' or '.join(allowed)}")
    with store.transaction():
        if action == "pause":
            store.update_rollout(r["id"], state="paused", reason="paused by the operator")
        elif action == "resume":
            # stragglers a timed-out wave waited for no longer hold it up; a wave paused by the
            # operator within its time goes on waiting for its devices (they are still updating)
            timed_out = r["wave_started"] is not None and time.time() - r["wave_started"] >= r["plan"]["wave_timeout_s"]
            for a in store.assignments(r["id"]) if timed_out else []:
                if a["wave"] <= r["wave"] and a["state"] not in DONE:
                    detail = dict(a["detail"], note="the wave was resumed without it")
                    store.update_assignment(r["id"], a["device"], state="timed_out", detail=detail)
            store.update_rollout(r["id"], state="running", reason=None, wave_started=time.time())
        else:
            from .controller import start_abort

            start_abort(store, r["id"], "aborted by the operator")
    return {"ok": True, "rollout": r["id"], "state": {"pause": "paused", "resume": "running",
                                                      "abort": "aborting"}[action]}


def show(store: Store, rollout_id: str) -> dict:
    r = _find(store, rollout_id)
    with store.transaction(write=False):
        assignments = store.assignments(r["id"])
        status = store.device_status(r["fleet"], [a["device"] for a in assignments])
    out = describe(r, assignments, status, store.events(r["id"], limit=50))
    if r["kind"] == "shadow":  # how the candidate compares so far (`fleet shadow --rollout ID` per device)
        from .shadow import shadow_report

        out["shadow"] = {**r["plan"]["shadow"], **shadow_report(store, r["fleet"], rollout=r["id"])["fleet_wide"]}
    return out


def list_rollouts(store: Store, fleet: Optional[str] = None) -> dict:
    out = []
    for r in store.rollouts(fleet):
        with store.transaction(write=False):
            assignments = store.assignments(r["id"])
        out.append(summary(r, assignments))
    return {"ok": True, "rollouts": out}


def _find(store: Store, rollout_id: str) -> dict:
    r = store.rollout(rollout_id)
    if r is None:
        raise InputError(f"no rollout {rollout_id!r}; `edgeml fleet rollouts` lists them")
    return r


def counts(assignments: List[dict]) -> dict:
    out: dict = {}
    for a in assignments:
        out[a["state"]] = out.get(a["state"], 0) + 1
    return out


def summary(r: dict, assignments: List[dict]) -> dict:
    t = r["plan"]["target"]
    return {"id": r["id"], "fleet": r["fleet"], "kind": r["kind"], "name": t["name"], "version": t["version"],
            "state": r["state"], "wave": r["wave"], "waves": len(r["plan"]["waves"]), "devices": len(assignments),
            "counts": counts(assignments), "reason": r["reason"], "created": r["created"], "updated": r["updated"]}


def describe(r: dict, assignments: List[dict], status: dict, events: List[dict]) -> dict:
    plan = r["plan"]
    waiting = []
    if r["state"] in ("running", "paused") and r["wave"] and r["wave_started"]:
        left = r["wave_started"] + plan["wave_timeout_s"] - time.time()
        pending = [a["device"] for a in assignments if a["wave"] <= r["wave"] and a["state"] not in DONE]
        if pending:
            waiting.append({"wave": r["wave"], "devices": pending, "timeout_in_s": round(left, 1),
                            "offline": [d for d in pending if (status.get(d) or {}).get("presence") != "online"]})
    devices = []
    for a in assignments:
        s = status.get(a["device"]) or {}
        devices.append({"device": a["device"], "wave": a["wave"], "state": a["state"],
                        "presence": s.get("presence"), "model_version": s.get("model_version"),
                        "from_version": a["from_version"], **a["detail"]})
    return {"ok": True, **summary(r, assignments), "plan": {k: plan[k] for k in ("health", "waves", "wave_spec",
                                                                                "wave_timeout_s")},
            "target": plan["target"], "rollback_order": r["signed_order"] is not None or "order" in plan,
            "waiting": waiting, "devices": devices, "events": events}


def _check_versions(targets, known, name, version, content) -> None:
    """Refuse what devices would refuse: a version at or below what a target runs (unless it is this very artifact)."""
    for device in targets:
        d = known.get(device) or {}
        if d.get("model_name") != name or d.get("model_version") is None:
            continue
        if d["model_version"] > version or (d["model_version"] == version and d.get("content_sha256") != content):
            raise UsageError(f"{device} runs {name} v{d['model_version']}; push a version above it "
                             f"(this artifact is v{version}), or roll back with `edgeml fleet rollback`")
    if all((known.get(d) or {}).get("content_sha256") == content for d in targets):
        raise UsageError(f"every target already runs {name} v{version}; nothing to push")


def _register_bases(store: Store, paths, public_key, key_id) -> List[str]:
    from edgeml.core.artifact import verify_artifact

    found = []
    for path in paths:
        art = verify_artifact(path, public_key)
        with store.transaction():
            store.put_artifact(art, Path(path).read_bytes())
        found.append(art.content_sha256)
    return found


def _prepare_deltas(store: Store, art, data: bytes, block_size: int, bases, enabled: bool) -> dict:
    """{base content: transfer} for each base the store has, when the patch is smaller than the artifact."""
    from edgeml.core.artifact.reader import unpacked
    from edgeml.core.delta import make_patch

    if not enabled:
        return {}
    target = unpacked(data)
    out = {}
    for base in sorted(b for b in bases if b and b != art.content_sha256):
        known = store.deltas_to(art.content_sha256).get(base)
        if known is None:
            info = store.artifact_info(base)
            if info is None:
                continue
            patch = make_patch(unpacked(store.blob(info["sha256"])), target)
            sha = hashlib.sha256(patch).hexdigest()
            with store.transaction():
                store.put_delta(base, art.content_sha256, sha, patch)
        patch = store.blob(store.deltas_to(art.content_sha256)[base]["sha256"])
        if len(patch) < DELTA_WORTH * len(data):
            out[base] = uc.Transfer.of(patch, "delta", block_size, base=base).to_dict()
        else:
            log.info("the patch from %s is %d bytes, %.0f%% of the artifact's %d: sending the artifact",
                     base[:12], len(patch), 100 * len(patch) / len(data), len(data))
    return out


def _assign(rollout_id: str, targets: List[str], waves: List[int], from_models: dict) -> List[dict]:
    """Waves by a stable shuffle (hash of rollout and device), so wave 1 is not always the same device."""
    order = sorted(targets, key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())
    out = []
    for i, device in enumerate(order):
        wave = next(k for k, size in enumerate(waves, start=1) if i < size)
        m = from_models.get(device) or {}
        out.append({"device": device, "wave": wave, "from_name": m.get("model_name"),
                    "from_version": m.get("model_version"), "from_content": m.get("content_sha256"),
                    "from_sha256": m.get("sha256")})
    return out
