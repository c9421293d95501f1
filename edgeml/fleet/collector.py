"""Collect a fleet's MQTT telemetry into a store, exactly once.

At-least-once delivery plus dedupe: the collector keeps a persistent MQTT 5 session (stable
client id, clean_start=False, a session expiry), so the broker queues QoS 1 telemetry while it
is away, and it acknowledges a message only after the transaction holding it has committed. A
crash between receiving and committing therefore means the broker sends the message again, and
the store's (fleet, device, seq) key turns the second copy into a no-op.

Telemetry comes through a shared subscription, so several collectors in one group split the
load; presence and state are plain subscriptions because brokers do not send retained messages
to shared ones. A malformed message is logged, counted as rejected and acknowledged: resending
it would not make it any better.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeml.core import mqtt_contract as contract
from edgeml.core.errors import InputError, UsageError, first_line

from .store import Store, check_records

log = logging.getLogger("edgeml.fleet")

SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps queuing for a collector that is away
RECEIVE_MAXIMUM = 500             # unacknowledged messages the broker may have in flight to us
WINDOW = 500                      # messages committed in one transaction at most ...
WINDOW_RECORDS = 20_000           # ... and records (give or take a batch): bounds memory
MAX_RETRY_S = 30.0
# CONNACK reasons that retrying cannot fix: bad protocol, client id, credentials, authorization
FATAL_CONNACK = {0x84, 0x85, 0x86, 0x87, 0x8C}
STAT_KEYS = ("received", "batches", "inserted", "duplicates", "rejected", "presence", "state", "events")

Op = Tuple[str, str, str, object]  # (what, fleet, device, data)


def parse_broker_url(url: str) -> Tuple[str, int, bool]:
    """(host, port, tls) of ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, AttributeError):
        parts, port = None, None
    if parts is None or parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"broker URL {url!r} is not mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port or (8883 if tls else 1883), tls


def default_client_id(group: str) -> str:
    """Stable across restarts, so the broker resumes the same session and hands over what it queued."""
    return f"edgeml-collector-{group}-{socket.gethostname()}"


class Collector:
    """Subscribe to every device's telemetry, presence and state and write them to ``store``."""

    def __init__(self, broker_url: str, store: Store, *, username: Optional[str] = None,
                 password: Optional[str] = None, ca_file=None, cert_file=None, key_file=None,
                 group: str = contract.SHARED_GROUP, client_id: Optional[str] = None,
                 session_expiry: int = SESSION_EXPIRY_S):
        self.host, self.port, tls = parse_broker_url(broker_url)
        if not contract.ID_RE.match(group or ""):
            raise UsageError(f"group {group!r} must be 1-64 letters, digits, '.', '_' or '-'")
        self.broker_url, self.store, self.group = broker_url, store, group
        self.client_id = client_id or default_client_id(group)
        self.session_expiry = session_expiry
        self._inbox: "queue.Queue[Tuple[int, mqtt.MQTTMessage]]" = queue.Queue()
        self._generation = 0  # bumped on every connect: acks only go to the connection that delivered
        self._connected_once = False
        self._fatal: Optional[str] = None
        self.subscribed = threading.Event()  # set while connected and subscribed
        self._stats = Counter({key: 0 for key in STAT_KEYS})
        self._stats_lock = threading.Lock()
        self._client = self._make_client(username, password, tls, ca_file, cert_file, key_file)

    # --- MQTT side (paho's network thread) ----------------------------------------------
    def _make_client(self, username, password, tls, ca_file, cert_file, key_file) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            _set_tls(client, ca_file, cert_file, key_file)
        elif ca_file or cert_file or key_file:
            raise UsageError("--ca-file, --cert-file and --key-file need an mqtts:// broker URL")
        client.reconnect_delay_set(min_delay=1, max_delay=int(MAX_RETRY_S))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if reason_code.value in FATAL_CONNACK and not self._connected_once:
                self._fatal = f"broker {self.broker_url} refused the collector: {reason_code}"
            log.warning("broker %s refused the connection: %s; retrying", self.broker_url, reason_code)
            return
        self._generation += 1
        self._connected_once = True
        log.info("connected to %s as %s (session %s)", self.broker_url, self.client_id,
                 "resumed" if flags.session_present else "new")
        # Retained presence/state only for a new subscription: a resumed session gets what it
        # missed from its queue, in order, instead of the retained copy possibly ahead of it.
        plain = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(contract.subscription("telemetry", shared=True, group=self.group), SubscribeOptions(qos=1)),
                          (contract.subscription("events", shared=True, group=self.group), SubscribeOptions(qos=1)),
                          (contract.subscription("presence"), plain), (contract.subscription("state"), plain)])

    def _on_connect_fail(self, client, userdata) -> None:
        log.warning("cannot reach broker %s; retrying", self.broker_url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.subscribed.clear()
        if reason_code.value != 0:
            log.warning("lost broker %s: %s; reconnecting", self.broker_url, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        for code in refused:
            log.warning("broker %s refused a subscription: %s", self.broker_url, code)
        if not refused:
            self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        self._inbox.put((self._generation, message))

    # --- store side (the thread in run()) -----------------------------------------------
    def run(self, stop_event: threading.Event, on_progress: Optional[Callable[[dict], None]] = None) -> dict:
        """Collect until ``stop_event`` is set; returns ``stats()``. What has arrived by then is
        committed and acknowledged; what could not be committed stays with the broker."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        try:
            while not stop_event.is_set():
                if self._fatal:
                    raise InputError(f"{self._fatal}; check --username, --password-file and the broker's ACL")
                items = self._take(timeout=0.2)
                if items and self._handle(items, stop_event) and on_progress:
                    on_progress(self.stats())
            items = self._take(timeout=0)
            if items:
                self._handle(items, stop_event)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
        return self.stats()

    def stats(self) -> dict:
        """Messages received; telemetry batches committed; records inserted and already stored;
        malformed messages rejected; presence and state updates."""
        with self._stats_lock:
            return dict(self._stats)

    def _take(self, timeout: float) -> List[Tuple[int, mqtt.MQTTMessage, Op]]:
        """The messages waiting, parsed (at least one, waiting up to ``timeout``), at most a window."""
        items, records = [], 0
        try:
            while len(items) < WINDOW and records < WINDOW_RECORDS:
                generation, message = (self._inbox.get(timeout=timeout) if timeout and not items
                                       else self._inbox.get_nowait())
                op = parse_message(message)
                items.append((generation, message, op))
                records += len(op[3]["records"]) if op[0] == "batches" else 1
        except queue.Empty:
            pass
        return items

    def _handle(self, items, stop_event: threading.Event) -> bool:
        """Commit, retrying a failing store with backoff, then acknowledge in arrival order (as
        MQTT requires). False when stopped before the commit: nothing acked, the broker resends."""
        ops = [op for _, _, op in items]
        delay = 1.0
        while True:
            try:
                changes = self._commit(ops)
                break
            except Exception as exc:  # the store's own errors vary by driver; all mean "not committed"
                if stop_event.is_set():
                    log.warning("store failed (%s); leaving %d messages with the broker", first_line(exc), len(items))
                    return False
                log.warning("store failed (%s); retrying in %.0f s", first_line(exc), delay)
                stop_event.wait(delay)
                delay = min(delay * 2, MAX_RETRY_S)
        acks = changes.pop("acks")
        changes["received"] = len(items)
        with self._stats_lock:
            self._stats.update(changes)
        for generation, message, _ in items:
            if generation == self._generation:
                self._client.ack(message.mid, message.qos)
        for (fleet, device), (epoch, seq) in acks.items():  # committed: now the devices may delete
            self._client.publish(contract.topic(fleet, device, "ack"), contract.encode_ack(epoch, seq, time.time()),
                                 qos=1, retain=True)
        return True

    def _commit(self, ops: List[Op]) -> Counter:
        """Store a window of messages in one transaction; ``changes["acks"]`` holds each device's
        telemetry watermark afterwards, to publish once the transaction has committed."""
        changes, acks = Counter(), {}
        with self.store.transaction():
            for what, fleet, device, data in ops:
                changes[what] += 1
                if what == "batches":
                    records = data["records"]
                    inserted = self.store.insert_records(fleet, device, records)
                    changes["inserted"] += inserted
                    changes["duplicates"] += len(records) - inserted
                    if data.get("epoch") is not None and records:
                        acks[(fleet, device)] = (data["epoch"], self.store.acknowledge(
                            fleet, device, data["epoch"], data.get("after"), records[-1]["seq"]))
                elif what == "presence":
                    self.store.upsert_presence(fleet, device, data["status"], data["ts"])
                elif what == "state":
                    self.store.upsert_state(fleet, device, data["model"], data["version"], data["sha256"], data["ts"],
                                            data["content_sha256"], data["update"])
                elif what == "events":
                    self.store.add_event(fleet, device, data)
        changes.pop("ignored", None)
        changes["acks"] = acks
        return changes


def parse_message(message) -> Op:
    """What a message asks the store to do; ("rejected", ...) for anything outside the contract."""
    try:
        fleet, device, channel = contract.parse_topic(message.topic)
        if channel == "telemetry":
            return "batches", fleet, device, _telemetry(fleet, device, message.payload)
        if not message.payload:
            return "ignored", fleet, device, None  # a retained message being cleared
        body = json.loads(message.payload)
        if not isinstance(body, dict):
            raise ValueError("payload is not a JSON object")
        if channel == "presence":
            return "presence", fleet, device, _presence(body)
        if channel == "state":
            return "state", fleet, device, _state(body)
        if channel == "events":
            _ts(body)
            return "events", fleet, device, body
        raise ValueError(f"the collector does not take {channel} messages")
    except Exception as exc:  # whatever a device sends, the collector must keep going
        log.warning("rejected a message on %r: %s", _topic(message), first_line(exc))
        return "rejected", "", "", None


def _topic(message) -> str:
    try:
        return message.topic
    except UnicodeDecodeError:
        return repr(message._topic)


def _telemetry(fleet: str, device: str, payload: bytes) -> dict:
    batch = contract.decode_batch(payload)
    if (batch.get("fleet"), batch.get("device")) != (fleet, device):
        raise ValueError(f"batch of {batch.get('fleet')}/{batch.get('device')} published on {fleet}/{device}'s topic")
    check_records(batch["records"])
    return batch


def _presence(body: dict) -> dict:
    if body.get("status") not in ("online", "offline"):
        raise ValueError(f"presence status {body.get('status')!r} is not online or offline")
    return {"status": body["status"], "ts": _ts(body)}


def _state(body: dict) -> dict:
    model, version, sha256 = body.get("model"), body.get("version"), body.get("sha256")
    content, update = body.get("content_sha256"), body.get("update")
    if not (model is None or isinstance(model, str)) or not (version is None or type(version) is int) \
            or not (sha256 is None or isinstance(sha256, str)) or not (content is None or isinstance(content, str)) \
            or not (update is None or isinstance(update, dict)):
        raise ValueError("state needs model (string), version (integer) and sha256 (string), or nulls")
    return {"model": model, "version": version, "sha256": sha256, "ts": _ts(body), "content_sha256": content,
            "update": update}


def _ts(body: dict) -> Optional[float]:
    ts = body.get("ts")
    if ts is None:
        return None
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise ValueError(f"ts {ts!r} is not unix seconds")
    return float(ts)


def _set_tls(client: mqtt.Client, ca_file, cert_file, key_file) -> None:
    for name, path in (("--ca-file", ca_file), ("--cert-file", cert_file), ("--key-file", key_file)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{name} {path} does not exist")
    try:
        client.tls_set(ca_certs=_str(ca_file), certfile=_str(cert_file), keyfile=_str(key_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise InputError(f"cannot use the TLS files: {first_line(exc)}; check --ca-file, --cert-file, --key-file") from exc


def _str(path) -> Optional[str]:
    return None if path is None else str(path)


def serve(collector: Collector, on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """``collector.run`` until SIGTERM or SIGINT (call from the main thread); returns its stats."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return collector.run(stop, on_progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
