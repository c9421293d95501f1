"""The device's MQTT link against a real Mosquitto, observed by a real paho subscriber."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from waiting import wait_until

from device_agent import mqtt_link
from device_agent.mqtt_link import MqttLink, backoff_delay
from device_agent.telemetry import TelemetryQueue
from edgeml.core import mqtt_contract as contract

ROOT = Path(__file__).resolve().parent.parent
FLEET, DEVICE = "plant-1", "cam-07"


class Subscriber:
    """Collects what arrives on the device's topics. A ``client_id`` makes its session persistent,
    so messages published while it is away (or the broker restarts) are kept for it. With
    ``acking`` it plays the host: after each telemetry batch it publishes the watermark (the
    retained ``ack``) the way the collector does once it has committed a batch."""

    def __init__(self, port: int, client_id: str = "", username: str = None, password: str = None,
                 acking: bool = False):
        self.messages = []
        self.acking, self.watermark, self.pending = acking, 0, []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{contract.PREFIX}/{FLEET}/{DEVICE}/+", qos=1)
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if client_id else 0
        self.client.connect("127.0.0.1", port, clean_start=not client_id, properties=props)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.messages.append(msg)
        if self.acking and msg.topic == contract.topic(FLEET, DEVICE, "telemetry"):
            batch = contract.decode_batch(msg.payload)
            self.watermark, self.pending = contract.advance_watermark(
                self.watermark, self.pending, batch["after"], batch["records"][-1]["seq"])
            client.publish(contract.topic(FLEET, DEVICE, "ack"),
                           contract.encode_ack(batch["epoch"], self.watermark, time.time()), qos=1, retain=True)

    def on(self, channel: str) -> list:
        with self._lock:
            return [m for m in self.messages if m.topic == contract.topic(FLEET, DEVICE, channel)]

    def records(self) -> list:
        return [r for m in self.on("telemetry") for r in contract.decode_batch(m.payload)["records"]]

    def presence(self) -> list:
        return [(json.loads(m.payload)["status"], m.retain) for m in self.on("presence")]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def retained_presence(port: int) -> dict:
    """What a collector joining now learns: the retained presence."""
    sub = Subscriber(port)
    try:
        wait_until(lambda: sub.on("presence"), what="retained presence")
        msg = sub.on("presence")[-1]
        assert msg.retain
        return json.loads(msg.payload)
    finally:
        sub.close()


def records(n: int, start: int = 0) -> list:
    return [{"kind": "inference", "model": "digits", "version": 3, "latency_ms": 1.0 + i / 1000,
             "outputs": {"probs": {"top1": i % 10, "score": 0.5}}} for i in range(start, start + n)]


def link(url, queue, **options) -> MqttLink:
    options = {"backoff_min": 0.05, "backoff_max": 0.5, **options}
    return MqttLink(url, FLEET, DEVICE, queue, **options)


def test_records_arrive_exactly_as_queued_and_are_deleted_once_acked(mosquitto, tmp_path):
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    queue.append(records(1234))
    queued = queue.peek(10 ** 6, 1 << 40)
    sub = Subscriber(mosquitto.port, acking=True)
    agent = link(mosquitto.url, queue, batch_records=100, state=lambda: {"model": "digits", "version": 3}).start()
    wait_until(lambda: len(sub.records()) >= 1234, what="all records")
    assert sub.records() == queued
    batches = sub.on("telemetry")
    assert len(batches) == 13 and all(m.properties.ContentType == contract.TELEMETRY_CONTENT_TYPE for m in batches)
    decoded = [contract.decode_batch(m.payload) for m in batches]
    assert {(b["fleet"], b["device"]) for b in decoded} == {(FLEET, DEVICE)}
    wait_until(lambda: agent.status()["published_records"] == 1234, what="PUBACKs counted")
    wait_until(lambda: queue.stats()["records"] == 0, what="deleted once the host acked them")
    assert agent.status() == {"connected": True, "last_error": None, "published_batches": 13,
                              "published_records": 1234, "resent_records": 0, "acked_through": 1234}

    assert retained_presence(mosquitto.port)["status"] == "online"
    state = Subscriber(mosquitto.port)
    wait_until(lambda: state.on("state"), what="retained state")
    assert state.on("state")[0].retain and json.loads(state.on("state")[0].payload) == {"model": "digits", "version": 3}
    state.close()

    queue.append(records(50, start=1234))  # stop() publishes what is queued before leaving
    agent.stop(flush_timeout=5)
    assert [r["seq"] for r in sub.records()][-50:] == list(range(1235, 1285))
    assert queue.stats()["records"] <= 50  # deleted once acked, or kept for the next start
    assert retained_presence(mosquitto.port) | {"ts": 0} == {"status": "offline", "fleet": FLEET, "device": DEVICE,
                                                             "ts": 0, "reason": "stopped"}
    sub.close()
    queue.close()


def test_records_wait_for_a_subscriber(mosquitto, tmp_path):
    """PUBACK 'no matching subscribers' (e.g. a restarted broker that lost the collectors'
    sessions) is not delivery: the records stay queued until someone subscribes."""
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    queue.append(records(20))
    agent = link(mosquitto.url, queue, backoff_min=0.05, backoff_max=0.2).start()
    try:
        wait_until(lambda: "no collector" in (agent.status()["last_error"] or ""), what="the no-subscriber report")
        assert queue.stats()["records"] == 20 and agent.status()["published_records"] == 0
        sub = Subscriber(mosquitto.port, acking=True)
        wait_until(lambda: len(sub.records()) >= 20, what="the records, once subscribed")
        assert [r["seq"] for r in sub.records()][:20] == list(range(1, 21))
        wait_until(lambda: queue.stats()["records"] == 0, what="deleted after delivery")
        sub.close()
    finally:
        agent.stop(flush_timeout=1)
        queue.close()


def test_refused_batch_stays_queued(tmp_path):
    acl = f"user dev\ntopic write {contract.PREFIX}/{FLEET}/{DEVICE}/presence\n"  # telemetry not allowed
    broker = Mosquitto(tmp_path / "broker", users={"dev": "pw"}, acl=acl).start()
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    queue.append(records(10))
    agent = link(broker.url, queue, username="dev", password="pw").start()
    try:
        wait_until(lambda: "refused a telemetry batch: Not authorized" in (agent.status()["last_error"] or ""),
                   what="the refusal")
        assert queue.stats()["records"] == 10 and agent.status()["published_records"] == 0
    finally:
        agent.stop(flush_timeout=0)
        broker.stop()
        queue.close()


def test_broker_outage_loses_nothing(mosquitto, tmp_path, caplog):
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    sub = Subscriber(mosquitto.port, client_id="collector", acking=True)  # persistent: the broker keeps its messages
    agent = link(mosquitto.url, queue, batch_records=20).start()
    producing = threading.Event()
    producing.set()

    def produce():
        i = 0
        while producing.is_set():
            queue.append(records(3, start=i))
            i += 3
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        try:
            wait_until(lambda: len(sub.records()) > 100, what="records before the outage")
            mosquitto.stop()
            wait_until(lambda: not agent.status()["connected"], what="the link to notice")
            # said once, as a warning (last_error may already say the first reconnect was refused)
            wait_until(lambda: any("lost" in r.getMessage() for r in caplog.records), what="the outage reported")
            waiting = queue.stats()["records"]
            time.sleep(0.5)
            assert queue.stats()["records"] > waiting  # records keep coming, and stay queued
            mosquitto.start()
            wait_until(lambda: agent.status()["connected"], what="the reconnect")
            time.sleep(0.3)
        finally:
            producing.clear()
            producer.join()
        total = queue.stats()["next_seq"] - 1
        wait_until(lambda: {r["seq"] for r in sub.records()} >= set(range(1, total + 1)), timeout=20,
                   what="every record")
        assert {r["seq"] for r in sub.records()} == set(range(1, total + 1))  # duplicates possible, gaps not
        wait_until(lambda: queue.stats()["records"] == 0, what="the queue to drain")
    finally:
        agent.stop(flush_timeout=1)
        sub.close()
        queue.close()


AGENT = """
import sys, time
sys.path.insert(0, {root!r})
from device_agent.mqtt_link import MqttLink
from device_agent.telemetry import TelemetryQueue
agent = MqttLink({url!r}, {fleet!r}, {device!r}, TelemetryQueue({db!r}), state=lambda: {{"ready": True}}).start()
while not agent.status()["connected"]:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""


def test_presence_will_after_sigkill(mosquitto, tmp_path):
    script = AGENT.format(root=str(ROOT), url=mosquitto.url, fleet=FLEET, device=DEVICE, db=str(tmp_path / "q.db"))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "connected"
        assert retained_presence(mosquitto.port)["status"] == "online"
        sub = Subscriber(mosquitto.port)
        wait_until(lambda: sub.presence() == [("online", True)], what="online")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        wait_until(lambda: ("offline", False) in sub.presence(), what="the will")
        sub.close()
        presence = retained_presence(mosquitto.port)
        assert (presence["status"], presence["reason"]) == ("offline", "lost")
    finally:
        process.kill()
        process.wait()


def test_backoff_full_jitter_is_random_and_bounded():
    rng = random.Random(7)
    for attempt in range(12):
        bound = min(60.0, 0.5 * 2 ** attempt)
        delays = [backoff_delay(attempt, 0.5, 60.0, rng) for _ in range(400)]
        assert all(0.0 <= d <= bound for d in delays)
        assert len(set(delays)) == 400  # randomized, no two devices in step
        assert min(delays) < 0.1 * bound and max(delays) > 0.9 * bound  # full jitter: the whole range
        assert 0.4 * bound < sum(delays) / len(delays) < 0.6 * bound
    assert backoff_delay(10 ** 6, 0.5, 60.0, rng) <= 60.0  # no overflow after a very long outage


def test_wrong_password_is_reported_then_the_right_user_connects(tmp_path, monkeypatch, caplog):
    drawn = []

    def recording_delay(attempt, base, cap, rng=random):
        drawn.append((attempt, backoff_delay(attempt, base, cap, rng)))
        return drawn[-1][1]

    monkeypatch.setattr(mqtt_link, "backoff_delay", recording_delay)
    broker = Mosquitto(tmp_path / "broker", users={"admin": "admin-pw"}).start()
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    queue.append(records(5))
    agent = link(broker.url, queue, username="dev", password="dev-pw", backoff_min=0.02, backoff_max=0.3).start()
    try:
        wait_until(lambda: len(drawn) >= 6, what="several retries")
        status = agent.status()
        assert not status["connected"] and status["published_records"] == 0
        assert status["last_error"].endswith(("Not authorized", "Bad user name or password"))
        refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
        assert len(refusals) == 1  # one clear line, not one per retry
        assert [a for a, _ in drawn[:6]] == list(range(6))  # exponential: the attempt grows
        assert all(d <= min(0.3, 0.02 * 2 ** a) for a, d in drawn)

        broker.users = {"dev": "dev-pw", "admin": "admin-pw"}
        broker._write_config()
        broker.restart()
        collector = Subscriber(broker.port, username="admin", password="admin-pw", acking=True)
        wait_until(lambda: agent.status()["published_records"] == 5, what="connect with the right user")
        wait_until(lambda: queue.stats()["records"] == 0, what="the host's ack")
        assert agent.status()["last_error"] is None
        collector.close()
    finally:
        agent.stop(flush_timeout=1)
        broker.stop()
        queue.close()


def make_pki(folder: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 (IP SAN) and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, key, issuer, issuer_key, ca=False, san=None, usage=None):
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                            critical=True)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem, cert, key):
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        return str(folder / f"{stem}.crt"), str(folder / f"{stem}.key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("edgeml test CA", ca_key, name("edgeml test CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = issue("broker", server_key, ca.subject, ca_key,
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = issue(DEVICE, client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    paths = {"ca": write("ca", ca, ca_key)[0]}
    paths["server_cert"], paths["server_key"] = write("server", server, server_key)
    paths["client_cert"], paths["client_key"] = write("client", client, client_key)
    return paths


def connects_over_tls(broker: Mosquitto, queue: TelemetryQueue, **tls) -> dict:
    """Status of a link over the TLS listener once it published, or after a few failed tries."""
    queue.append(records(3))
    agent = link(broker.tls_url, queue, **tls).start()
    try:
        wait_until(lambda: agent.status()["published_records"] or agent.status()["last_error"], what="a TLS outcome")
        time.sleep(0.1)
        return agent.status()
    finally:
        agent.stop(flush_timeout=1)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls(tmp_path, mutual):
    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "broker", tls={"cafile": pki["ca"], "certfile": pki["server_cert"],
                                                   "keyfile": pki["server_key"], "require_certificate": mutual}).start()
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    sub = Subscriber(broker.port)  # plain listener of the same broker
    client_cert = {"cert_file": pki["client_cert"], "key_file": pki["client_key"]}
    try:
        status = connects_over_tls(broker, queue, ca_file=pki["ca"], **(client_cert if mutual else {}))
        assert status["last_error"] is None and status["published_records"] == 3
        wait_until(lambda: len(sub.records()) == 3, what="records over TLS")

        other = make_pki(tmp_path / "other")  # a broker certificate from a CA we do not trust
        status = connects_over_tls(broker, queue, ca_file=other["ca"], **(client_cert if mutual else {}))
        assert not status["connected"] and "CERTIFICATE_VERIFY_FAILED" in status["last_error"]
        if mutual:  # without a client certificate the broker closes the connection
            status = connects_over_tls(broker, queue, ca_file=pki["ca"])
            assert not status["connected"] and status["last_error"] and status["published_records"] == 0
    finally:
        sub.close()
        broker.stop()
        queue.close()
