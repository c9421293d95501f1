"""The device's MQTT connection: presence, state, telemetry from the durable queue, and the
messages the host sends it (telemetry acks; the update engine subscribes to its own).

Topics and payloads are ``edgeml.core.mqtt_contract``'s. MQTT 5, QoS 1, a persistent session
(``edgeml-{fleet}-{device}``) and a retained will that says offline when the device vanishes.

Telemetry is delivered end to end. A publisher thread sends batches in seq order and waits for
each PUBACK, but a PUBACK only means the broker has the batch: records are deleted when the
host's retained ``ack`` says it committed them. When no ack moves for ``ack_timeout`` (doubling
up to ``ack_timeout_max`` while nothing moves), the publisher goes back to the oldest queued
record and sends again what the broker took and lost (a broker killed before it handed the
batch on); the collector's (fleet, device, seq) key makes a second copy harmless. At most
``max_unacked_records`` records are in flight, so a host that is away does not fill the broker.

Reconnection is ours, not paho's (fixed delays, no jitter): exponential backoff with full
jitter, so a fleet that lost its broker does not come back in lockstep.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import ssl
import threading
import time
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeml.core import mqtt_contract as contract

from .telemetry.queue import TelemetryQueue

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our session (in-flight batches) through long outages
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK: accepted, but no subscription matched
STABLE_S = 10.0  # a connection that lasted this long resets the backoff; a flapping one does not
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (attempt 0 is the first retry)."""
    return rng.uniform(0.0, min(cap, base * 2 ** min(attempt, 32)))


def parse_url(url: str):
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"broker url {url!r} must be mqtt://host[:port] or mqtts://host[:port]")
    return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts"


def tls_context(ca_file=None, cert_file=None, key_file=None, insecure=False) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (else the system CAs); a client certificate for
    mutual TLS; ``insecure`` skips only the host name check (as mosquitto_pub --insecure)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if insecure:
        ctx.check_hostname = False
    return ctx


def _properties(packet_type, **values) -> Properties:
    props = Properties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


class MqttLink:
    """``start()`` connects in the background and keeps reconnecting; ``status()`` says how it
    goes; ``state`` returns the dict published (retained) on the state topic at each connect."""

    def __init__(self, url: str, fleet: str, device: str, queue: TelemetryQueue, *,
                 username: Optional[str] = None, password: Optional[str] = None,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 insecure: bool = False, keepalive: int = 30, backoff_min: float = 0.5, backoff_max: float = 60.0,
                 batch_records: int = 500, batch_bytes: int = 256 << 10,
                 ack_timeout: float = 30.0, ack_timeout_max: float = 600.0, max_unacked_records: int = 20_000,
                 state: Optional[Callable[[], dict]] = None, poll_s: float = 0.2):
        self.host, self.port, tls = parse_url(url)
        self.fleet, self.device = contract.check_id(fleet, "fleet"), contract.check_id(device, "device")
        self.queue = queue
        self.keepalive, self.backoff_min, self.backoff_max = keepalive, backoff_min, backoff_max
        self.batch_records, self.batch_bytes = batch_records, batch_bytes
        self._state = state
        self.ack_timeout, self.ack_timeout_max = ack_timeout, ack_timeout_max
        self.max_unacked_records = max_unacked_records
        self.poll_s = poll_s  # how often idle threads look up (stop, reconnect); messages wake them at once
        self._sub_lock = threading.Lock()
        self._subscribed = False  # this connection has subscribed to the handlers' channels
        self._topics = {c: contract.topic(fleet, device, c) for c in contract.CHANNELS}
        self._handlers: Dict[str, Callable[[bytes, object], None]] = {"ack": self._on_ack}
        self.client_id = f"edgeml-{fleet}-{device}"
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls:
            self._client.tls_set_context(tls_context(ca_file, cert_file, key_file, insecure))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._acks = threading.Condition()
        self._acked = {}  # mid -> (serial, reason code) from on_publish; one entry per mid at most
        self._serial = itertools.count(1)
        self._status = {"last_error": None, "published_batches": 0, "published_records": 0, "resent_records": 0}
        self._threads = []
        self._connected_at: Optional[float] = None
        self._stop_by = 0.0
        self._refused = False  # the last telemetry batch was refused
        self._refused_connect = False  # this session's CONNACK was a refusal
        self._cursor: Optional[int] = None  # the last seq the broker took in this pass (None: start at the oldest)
        self._host_seq = 0  # the host's watermark for this queue's epoch
        self._progress_at = time.monotonic()  # when the watermark last moved (or we last went back)
        self._resend_after = ack_timeout

    # -- public ------------------------------------------------------------------------------

    def start(self) -> "MqttLink":
        for target, name in ((self._run_network, "edgeml-mqtt"), (self._run_publisher, "edgeml-mqtt-publish")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def status(self) -> dict:
        return {**self._status, "connected": self._connected.is_set(), "acked_through": self._host_seq}

    def subscribe(self, channel: str, handler: Callable[[bytes, object], None]) -> None:
        """Call ``handler(payload, properties)`` for every message on this device's ``channel``
        (subscribed at each connect, QoS 1). Handlers run on the network thread: hand work off."""
        with self._sub_lock:  # on_connect subscribes what is registered; later ones subscribe here
            self._handlers[channel] = handler
            if self._subscribed:
                self._client.subscribe(self._topics[channel], qos=1)

    def publish(self, channel: str, payload: bytes, retain: bool = False, **properties) -> bool:
        """Publish on this device's ``channel`` (QoS 1); False when not connected (nothing is queued)."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(self._topics[channel], payload, qos=1, retain=retain,
                                    properties=_properties(PacketTypes.PUBLISH, **properties) if properties else None)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_state(self) -> None:
        """Publish the state again (retained), e.g. after the model changed."""
        if self._state is None:
            return
        try:
            payload = json.dumps(self._state())
        except Exception:  # a broken state provider must not take the connection down
            log.exception("mqtt: cannot build the state to publish")
            return
        self._client.publish(self._topics["state"], payload, qos=1, retain=True,
                             properties=_properties(PacketTypes.PUBLISH, ContentType="application/json"))

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Hand what is queued to the broker (while connected, within ``flush_timeout``), say offline,
        disconnect. Records stay in the queue until the host acknowledges them, also across restarts."""
        self._stop_by = time.monotonic() + flush_timeout
        while (self._connected.is_set() and self.queue.has_records_after(self._cursor)
               and time.monotonic() < self._stop_by):
            time.sleep(0.02)
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=max(self._stop_by - time.monotonic(), 0.0) + 5.0)

    # -- connection: connecting, the network loop and leaving all run on the network thread ------

    def _presence(self, status: str, **extra) -> bytes:
        return contract.presence(status, self.fleet, self.device, time.time(), **extra)

    def _run_network(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._connected_at, self._refused_connect = None, False
            try:
                self._session()
            except Exception as exc:  # never let the agent lose its link for good: retry like a lost connection
                log.exception("mqtt: network loop failed")
                self._error(f"network loop failed: {exc!r}")
                self._connected.clear()
            if self._stopping.is_set():
                return
            if self._connected_at is not None and time.monotonic() - self._connected_at >= STABLE_S:
                attempt = 0
            self._stopping.wait(backoff_delay(attempt, self.backoff_min, self.backoff_max))
            attempt += 1

    def _session(self) -> None:
        """Connect, run until the connection ends or stop(); on stop, leave cleanly."""
        self._client.will_set(self._topics["presence"], self._presence("offline", reason="lost"), qos=1, retain=True)
        try:
            self._client.connect(self.host, self.port, self.keepalive, clean_start=False,
                                 properties=_properties(PacketTypes.CONNECT, SessionExpiryInterval=SESSION_EXPIRY_S))
        except OSError as exc:  # refused, unreachable, TLS handshake or certificate
            self._error(f"cannot connect to {self.host}:{self.port}: {exc}")
            return
        while not self._stopping.is_set():
            if self._client.loop(timeout=self.poll_s / 2) != mqtt.MQTT_ERR_SUCCESS:
                return
        self._leave()

    def _leave(self) -> None:
        """Retained offline presence (waiting for its PUBACK), then DISCONNECT, so no will fires."""
        if self._connected.is_set():
            info = self._client.publish(self._topics["presence"], self._presence("offline", reason="stopped"),
                                        qos=1, retain=True)
            until = max(self._stop_by, time.monotonic() + 1.0)
            while (self._connected.is_set() and info.rc == mqtt.MQTT_ERR_SUCCESS and not info.is_published()
                   and time.monotonic() < until and self._client.loop(timeout=0.05) == mqtt.MQTT_ERR_SUCCESS):
                pass
        self._client.disconnect()
        for _ in range(20):  # writes DISCONNECT, then reports the closed socket
            if self._client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break

    def _error(self, message: str) -> None:
        if message != self._status["last_error"]:  # one line per new reason, not one per retry
            log.warning("mqtt: %s", message)
        self._status["last_error"] = message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._refused_connect = reason_code.is_failure
        if self._refused_connect:
            self._error(f"broker {self.host}:{self.port} refused the connection: {reason_code}")
            return
        log.info("mqtt: connected to %s:%d as %s", self.host, self.port, self.client_id)
        if not self._refused:  # a refused batch stays the news until a batch goes through
            self._status["last_error"] = None
        self._connected_at = time.monotonic()
        with self._sub_lock:
            client.subscribe([(self._topics[channel], 1) for channel in self._handlers])
            self._subscribed = True
        client.publish(self._topics["presence"], self._presence("online"), qos=1, retain=True)
        self.publish_state()
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._sub_lock:
            self._subscribed = False
        if not self._stopping.is_set():
            if self._connected.is_set():
                self._error(f"connection to {self.host}:{self.port} lost: {reason_code}")
            elif self._connected_at is None and not self._refused_connect:  # e.g. our TLS client certificate refused
                self._error(f"broker {self.host}:{self.port} closed the connection before accepting it: {reason_code}")
        self._connected.clear()

    def _on_message(self, client, userdata, message) -> None:
        try:
            channel = contract.parse_topic(message.topic)[2]
            handler = self._handlers.get(channel)
            if handler is not None:
                handler(message.payload, message.properties)
        except Exception:  # a bad message or a handler's bug must not take the connection down
            log.exception("mqtt: cannot handle a message on %s", getattr(message, "topic", "?"))

    def _on_ack(self, payload: bytes, properties) -> None:
        """The host committed our telemetry up to a seq: delete it here."""
        if not payload:
            return  # a retained ack being cleared
        epoch, seq = contract.decode_ack(payload)
        if epoch != self.queue.epoch:
            log.debug("mqtt: ignoring an ack for queue epoch %s (ours is %s)", epoch, self.queue.epoch)
            return
        if seq > self._host_seq:
            self._host_seq = seq
            self.queue.delete_through(seq)
            self._progress_at = time.monotonic()
            self._resend_after = self.ack_timeout

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acks:
            self._acked[mid] = (next(self._serial), reason_code)
            self._acks.notify_all()

    # -- telemetry -------------------------------------------------------------------------------

    def _run_publisher(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            if not self._connected.wait(self.poll_s):
                continue
            self._go_back_if_unacknowledged()
            if self._cursor is not None and self.queue.count_through(self._cursor) >= self.max_unacked_records:
                self._stopping.wait(self.poll_s)  # the host is behind: wait for its acks (or the resend timeout)
                continue
            if not self.queue.wait_for_records(self.poll_s, after=self._cursor):
                continue
            try:
                ok = self._publish_batch(*self.queue.peek_after(self._cursor, self.batch_records, self.batch_bytes))
            except Exception:  # a bug or a broken disk must not end telemetry for good
                log.exception("mqtt: publishing telemetry failed")
                ok = False
            failures = 0 if ok else failures + 1
            if failures:
                self._stopping.wait(backoff_delay(failures - 1, self.backoff_min, self.backoff_max))

    def _go_back_if_unacknowledged(self) -> None:
        """Records the broker took long ago and the host never confirmed were lost on the way
        (or the host is away): send them again from the oldest, and wait twice as long next time."""
        if self._cursor is None or time.monotonic() - self._progress_at < self._resend_after:
            return
        waiting = self.queue.count_through(self._cursor)
        if waiting:
            log.info("mqtt: no ack from the host for %.0f s; sending %d records again", self._resend_after, waiting)
            self._status["resent_records"] += waiting
            self._cursor = None
            self._resend_after = min(self._resend_after * 2, self.ack_timeout_max)
        self._progress_at = time.monotonic()

    def _publish_batch(self, after: Optional[int], records: list) -> bool:
        """Publish one batch and wait for its PUBACK (across reconnects); the records stay queued
        until the host acks them. False when the broker refused it (e.g. not authorized)."""
        if not records:
            return True
        payload = contract.encode_batch(self.fleet, self.device, records, epoch=self.queue.epoch, after=after)
        with self._acks:
            since = next(self._serial)
        info = self._client.publish(self._topics["telemetry"], payload, qos=1,
                                    properties=_properties(PacketTypes.PUBLISH,
                                                           ContentType=contract.TELEMETRY_CONTENT_TYPE))
        reason = self._wait_ack(info.mid, since)
        if reason is None:  # stopping: the records stay queued
            return True
        self._refused = reason.is_failure
        if self._refused:
            self._error(f"broker refused a telemetry batch: {reason}")
            return False
        if reason.value == NO_MATCHING_SUBSCRIBERS:
            # The broker took the batch but nobody will get it: no collector has subscribed (or
            # a restarted broker lost their sessions). Keep the records and try again later.
            self._error("no collector is subscribed to telemetry; keeping the records and retrying")
            return False
        self._status["last_error"] = None
        if self._cursor is None or self._host_seq >= self._cursor:
            self._progress_at = time.monotonic()  # nothing was waiting for an ack: the timeout starts now
        self._cursor = records[-1]["seq"]
        self._status["published_batches"] += 1
        self._status["published_records"] += len(records)
        return True

    def _wait_ack(self, mid: int, since: int):
        """The PUBACK reason code for ``mid`` published after serial ``since``; None when stopping."""
        with self._acks:
            while not self._stopping.is_set():
                serial, reason = self._acked.get(mid, (0, None))
                if serial > since:
                    del self._acked[mid]
                    return reason
                self._acks.wait(0.2)
        return None
