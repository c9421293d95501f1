"""``edgeml fleet serve``: one process runs the telemetry collector, the rollout controller and the
artifact server (MQTT blocks, and HTTP Range requests with ``--http``).

Everything it knows is in the store, so it can be killed and restarted at any time, and several
can run against one PostgreSQL and one broker: telemetry and events come through the collectors'
shared subscription, block requests through the controllers' one, and each rollout is advanced
by one controller at a time (see ``controller``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeml.core import mqtt_contract as contract
from edgeml.core.errors import InputError, UsageError, first_line

from .alerting import AlertWebhook, check_webhook_url, fleet_metrics
from .blocks import BlockServer, HttpArtifacts
from .collector import FATAL_CONNACK, Collector, _set_tls, parse_broker_url
from .controller import Controller
from .store import open_store

log = logging.getLogger("edgeml.fleet")

CONTROLLER_GROUP = "controllers"
HEARTBEAT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0


class ControlLink:
    """The controller's MQTT connection: publishes desired messages (retained, confirmed) and blocks,
    and takes block requests through the controllers' shared subscription."""

    def __init__(self, broker_url: str, *, on_request: Callable[[str, str, bytes], None], username=None,
                 password=None, ca_file=None, cert_file=None, key_file=None, client_id: Optional[str] = None):
        host, port, tls = parse_broker_url(broker_url)
        self.broker_url, self.on_request = broker_url, on_request
        self.client_id = client_id or f"edgeml-controller-{socket.gethostname()}-{os.getpid()}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            _set_tls(self.client, ca_file, cert_file, key_file)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_inflight_messages_set(200)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.fatal: Optional[str] = None
        self.client.connect_async(host, port, keepalive=30, clean_start=True)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if reason_code.value in FATAL_CONNACK:
                self.fatal = f"broker {self.broker_url} refused the controller: {reason_code}"
            log.warning("broker %s refused the controller: %s", self.broker_url, reason_code)
            return
        requests = f"$share/{CONTROLLER_GROUP}/{contract.PREFIX}/+/+/chunks/req"
        client.subscribe([(requests, SubscribeOptions(qos=1))])
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            fleet, device, channel = contract.parse_topic(message.topic)
        except ValueError:
            return
        if channel == "chunks/req":
            self.on_request(fleet, device, message.payload)

    def publish(self, name: str, payload: bytes, *, retain: bool = False, content_type: Optional[str] = None,
                user_properties=None) -> bool:
        """Publish at QoS 1 without waiting (blocks); False when not connected."""
        if not self.connected.is_set() or not self.client.is_connected():
            return False
        props = None
        if content_type or user_properties:
            props = Properties(PacketTypes.PUBLISH)
            if content_type:
                props.ContentType = content_type
            if user_properties:
                props.UserProperty = list(user_properties)
        return self.client.publish(name, payload, qos=1, retain=retain, properties=props).rc == mqtt.MQTT_ERR_SUCCESS

    def publish_confirmed(self, messages) -> list:
        """Publish ``(topic, payload)`` messages retained at QoS 1 (desired messages), then wait for
        the broker's PUBACKs; whether each was confirmed within PUBLISH_TIMEOUT_S."""
        if not self.client.is_connected():
            return [False] * len(messages)
        infos = [self.client.publish(name, payload, qos=1, retain=True) for name, payload in messages]
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        confirmed = []
        for info in infos:
            try:
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
            confirmed.append(info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published())
        return confirmed

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def serve_fleet(broker_url: str, db_url: str, stop: threading.Event, *, http: Optional[str] = None,
                username=None, password=None, ca_file=None, cert_file=None, key_file=None,
                group: str = contract.SHARED_GROUP, client_id: Optional[str] = None, tick_s: float = 0.5,
                alert_webhook: Optional[str] = None, http_token: Optional[str] = None, signing_key=None,
                on_progress: Optional[Callable[[dict], None]] = None, on_ready: Optional[Callable[[dict], None]] = None
                ) -> dict:
    """Collector, controller and artifact server until ``stop`` is set; their figures. With
    ``http``, also the dashboard at ``/`` (live by ``/events``), rollout actions at
    ``/api/rollouts/ID/{pause,resume,abort,promote}`` and ``/metrics`` (Prometheus text: devices,
    alerts, rollouts, records); ``http_token`` guards them (required off loopback; actions always);
    ``signing_key`` lets the dashboard promote a shadow (a promotion signs a rollback order); with
    ``alert_webhook``, every alert devices raise or clear is posted there as JSON."""
    tls = dict(username=username, password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    if alert_webhook:
        check_webhook_url(alert_webhook)
    if http:
        check_http_binding(http, http_token)
    # collector, controller, block server, alert webhook: one connection each
    stores = [open_store(db_url) for _ in range(4 if alert_webhook else 3)]
    collector = Collector(broker_url, stores[0], group=group, client_id=client_id, **tls)
    blocks = BlockServer(stores[2], lambda *a, **k: link.publish(*a, **k))
    link = ControlLink(broker_url, on_request=blocks.handle, **tls)
    controller = Controller(stores[1], link.publish_confirmed)
    web = None
    webhook = AlertWebhook(stores[3], alert_webhook) if alert_webhook else None
    errors: list = []
    stats = {"desired_published": 0}

    def collect():
        try:
            collector.run(stop)
        except Exception as exc:  # refused credentials and the like: stop everything, say why
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=collect, name="edgeml-collector", daemon=True)]
    try:
        if http:
            host, _, port = http.rpartition(":")
            try:
                web = _web(stores[2], host or "127.0.0.1", int(port), http_token, signing_key)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot serve HTTP on {http}: {first_line(exc)}") from exc
        threads[0].start()
        controller_id = link.client_id
        if on_ready:
            on_ready({"controller": controller_id, "collector": collector.client_id,
                      "http": f"http://{web.httpd.server_address[0]}:{web.port}" if web else None})
        beat = 0.0
        while not stop.is_set():
            if link.fatal:
                raise InputError(f"{link.fatal}; check --username, --password-file and the broker's ACL")
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                stores[1].controller_seen(controller_id)
            if link.connected.is_set():
                try:
                    stats["desired_published"] += controller.tick()
                except Exception as exc:  # the store or the broker failing: the next pass repeats this one
                    log.warning("controller pass failed (%s); retrying", first_line(exc))
                    stop.wait(2.0)
            if on_progress:
                on_progress({**collector.stats(), **stats, **{f"blocks_{k}": v for k, v in blocks.stats.items()}})
            stop.wait(tick_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        blocks.stop()
        if webhook:
            webhook.stop()
        link.stop()
        if web:
            web.stop()
        for store in stores:
            store.close()
    if errors:
        raise errors[0]
    webhook_stats = {f"webhook_{k}": v for k, v in webhook.stats.items()} if webhook else {}
    return {**collector.stats(), **stats, **{f"blocks_{k}": v for k, v in blocks.stats.items()}, **webhook_stats}


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
EVENT_INTERVAL_S = 1.0


def check_http_binding(http: str, token: Optional[str]) -> None:
    host = http.rpartition(":")[0] or "127.0.0.1"
    if host not in LOOPBACK and not token:
        raise UsageError(f"--http {http} listens beyond loopback: the dashboard and its actions need a token there; "
                         "pass --http-token-file FILE (or bind 127.0.0.1)")


def _web(store, host: str, port: int, token: Optional[str], signing_key=None) -> HttpArtifacts:
    """The artifact server with the dashboard, its live events, rollout actions and /metrics."""
    from urllib.parse import parse_qs, urlsplit

    from . import dashboard
    from .rollouts import set_state

    def given(h) -> Optional[str]:
        auth = h.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):].strip()
        query = parse_qs(urlsplit(h.path).query).get("token")
        if query:
            return query[0]
        for part in (h.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == dashboard.COOKIE:
                return value
        return None

    def guard(h):
        action = h.command == "POST"
        if token is None and not action:
            return None  # loopback without a token: the page is open
        if token is None:
            return 403, "actions need a token: start fleet serve with --http-token-file", None
        if dashboard.token_ok(given(h), token):
            return None
        return 401, "a token is needed: Authorization: Bearer TOKEN (or ?token=TOKEN once)", {"WWW-Authenticate": "Bearer"}

    def home(h):
        headers = None
        if token is not None and parse_qs(urlsplit(h.path).query).get("token"):
            headers = {"Set-Cookie": f"{dashboard.COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"}
        return "text/html; charset=utf-8", dashboard.page(store), headers

    def events(h, closing) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            while not closing.is_set():
                try:
                    h.wfile.write(dashboard.event(store))
                except (BrokenPipeError, ConnectionResetError):
                    return
                except Exception as exc:  # the store away: tell the page, try again
                    log.warning("dashboard events: %s", first_line(exc))
                    h.wfile.write(b"event: error\ndata: {}\n\n")
                h.wfile.flush()
                closing.wait(EVENT_INTERVAL_S)
        except (BrokenPipeError, ConnectionResetError, OSError):
            return

    def action(h, m):
        try:
            result = set_state(store, m[1], m[2]) if m[2] != "promote" else promote_shadow(m[1])
        except UsageError as exc:
            return 409 if "no rollout" not in str(exc) else 404, {"error": str(exc)}
        except InputError as exc:
            return 404, {"error": str(exc)}
        return 200, result

    def promote_shadow(rollout_id: str) -> dict:
        """The dashboard's promote: the shadow's devices in the default waves and health window."""
        from .rollouts import _find, promote

        r = _find(store, rollout_id)
        if r["kind"] != "shadow":
            raise UsageError(f"rollout {r['id']} is not a shadow; only a shadow is promoted")
        if signing_key is None:
            raise UsageError("promoting signs a rollback order: start fleet serve with --signing-key, or run "
                             f"`edgeml fleet promote --fleet {r['fleet']} --shadow-version "
                             f"{r['plan']['target']['version']} --key KEY`")
        return promote(store, fleet=r["fleet"], key=signing_key, shadow_version=r["plan"]["target"]["version"])

    return HttpArtifacts(store, host, port, guard=guard,
                         pages={"/": home, "/metrics": lambda h: ("text/plain; version=0.0.4", fleet_metrics(store))},
                         streams={"/events": events},
                         posts={r"^/api/rollouts/([^/]+)/(pause|resume|abort|promote)$": action})
