"""``edgeml fleet feedback pull``: the labelled samples devices kept (their feedback reservoirs),
asked for over MQTT and merged into one ``.npz`` that ``edgeml optimize --train/--eval`` takes
as it is: one array per model input, ``y`` the labels, and ``_device``, ``_version``,
``_prediction`` beside them (names with a leading "_" are not inputs: data loaders skip them). Every device asked answers (an empty reservoir when feedback is off);
one that does not answer before the deadline is named, never waited for without end.
"""
from __future__ import annotations

import io
import logging
import threading
import uuid
from typing import Dict, List, Sequence

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeml.core import mqtt_contract as contract
from edgeml.core import transfer
from edgeml.core.errors import InputError, UsageError

from .collector import _set_tls, parse_broker_url

log = logging.getLogger("edgeml.fleet")

MAX_RESERVOIR_BYTES = 1 << 30  # a device's answer, decompressed, at most
EXTRA = ("y", "prediction", "version", "seen")


def pull(broker_url: str, fleet: str, devices: Sequence[str], *, timeout_s: float = 30.0, username=None,
         password=None, ca_file=None, cert_file=None, key_file=None) -> dict:
    """Ask each device for its reservoir; ``{"arrays": merged, "answered": [...], "missing": [...]}``."""
    if not devices:
        raise UsageError(f"no devices to ask in fleet {fleet!r}: none is online (see edgeml fleet devices)")
    host, port, tls = parse_broker_url(broker_url)
    request = uuid.uuid4().hex[:16]
    answers: Dict[str, bytes] = {}
    done = threading.Event()
    state: dict = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeml-feedback-{request}", protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if tls:
        _set_tls(client, ca_file, cert_file, key_file)

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            state["refused"] = f"{reason_code}"
            done.set()
            return
        c.subscribe([(f"{contract.PREFIX}/{fleet}/+/feedback", SubscribeOptions(qos=1))])

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            state["refused"] = "the broker refused the subscription to the devices' feedback topics (check the ACL)"
            done.set()
            return
        for device in devices:
            c.publish(contract.topic(fleet, device, "feedback/req"), f'{{"request": "{request}"}}'.encode(), qos=1)

    def on_message(c, userdata, message):
        try:
            _, device, _ = contract.parse_topic(message.topic)
        except ValueError:
            return
        props = dict(getattr(message.properties, "UserProperty", None) or [])
        if props.get("request") != request or device not in devices:
            return
        answers[device] = message.payload
        if len(answers) == len(devices):
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise InputError(f"cannot reach the broker {broker_url}: {exc}") from exc
    client.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    if "refused" in state:
        raise InputError(f"broker {broker_url}: {state['refused']}")
    arrays, counts = merge({d: _read(d, answers[d]) for d in sorted(answers)})
    return {"arrays": arrays, "answered": sorted(answers), "missing": sorted(set(devices) - set(answers)),
            "samples": counts}


def _read(device: str, payload: bytes) -> Dict[str, np.ndarray]:
    if not payload:
        return {}
    try:
        data = transfer.decompress(payload, MAX_RESERVOIR_BYTES)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # one device's bad answer must not cost the others'
        log.warning("feedback: %s sent a reservoir that does not read (%s); left out", device, exc)
        return {}


def merge(reservoirs: Dict[str, Dict[str, np.ndarray]]) -> tuple:
    """One set of arrays from every device's (devices whose inputs differ in names or shapes from
    the first are left out, with a warning); and the samples each device gave."""
    merged: Dict[str, List[np.ndarray]] = {}
    devices: List[str] = []
    counts: Dict[str, int] = {}
    layout = None
    for device, arrays in reservoirs.items():
        n = len(arrays.get("y", ()))
        counts[device] = n
        if not n:
            continue
        inputs = {k: v.shape[1:] for k, v in arrays.items() if k not in EXTRA}
        if layout is None:
            layout = inputs
        elif inputs != layout:
            log.warning("feedback: %s's samples have inputs %s, not %s; left out", device, inputs, layout)
            counts[device] = 0
            continue
        for k, v in arrays.items():
            if k != "seen":
                # what is about the samples gets a leading "_": data loaders skip those names
                merged.setdefault(f"_{k}" if k in ("prediction", "version") else k, []).append(v)
        devices += [device] * n
    out = {k: np.concatenate(v) for k, v in merged.items()}
    if devices:
        out["_device"] = np.asarray(devices)
    return out, counts


def online_devices(store, fleet: str) -> List[str]:
    return [d["device"] for d in store.devices() if d["fleet"] == fleet and d["presence"] == "online"]


def write_npz(arrays: Dict[str, np.ndarray], path) -> None:
    from edgeml.core.atomic import write_atomic

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())
