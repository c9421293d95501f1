"""The fleet collector against a real Mosquitto, with SQLite and PostgreSQL stores.

A real paho publisher plays the device: contract-conformant zstd batches (QoS 1), retained
presence with a will, retained state.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest
import zstandard
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from conftest import PG_BASE
from waiting import wait_until

from edgeml.cli import main
from edgeml.core import mqtt_contract as contract
from edgeml.fleet import Collector, open_store

FLEET = "lab"


# --- helpers ------------------------------------------------------------------------------

wait_for = functools.partial(wait_until, timeout=20.0)  # a collector and a broker: give them time


def records(first, count, ts=None, error_every=10):
    """``count`` records from seq ``first``: every ``error_every``-th an error, the rest inferences."""
    ts = time.time() if ts is None else ts
    out = []
    for seq in range(first, first + count):
        if seq % error_every == 0:
            out.append({"seq": seq, "ts": ts, "kind": "error", "model": "digits", "status": 422,
                        "error": "bad input", "latency_ms": 0.1})
        else:
            out.append({"seq": seq, "ts": ts, "kind": "inference", "model": "digits", "version": 3,
                        "latency_ms": 1.5, "outputs": {"y": {"top1": seq % 10, "score": 0.9}}})
    return out


class Device:
    """A device's MQTT side: will = offline presence, retained presence and state, QoS 1 batches."""

    def __init__(self, broker, device="dev-1", fleet=FLEET):
        self.fleet, self.device = fleet, device
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"device-{device}",
                                  protocol=mqtt.MQTTv5)
        now = time.time()
        self.client.will_set(self.topic("presence"), contract.presence("offline", fleet, device, now), qos=1, retain=True)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def topic(self, channel):
        return contract.topic(self.fleet, self.device, channel)

    def publish(self, channel, payload, retain=False):
        self.client.publish(self.topic(channel), payload, qos=1, retain=retain).wait_for_publish(10)

    def online(self, status="online"):
        self.publish("presence", contract.presence(status, self.fleet, self.device, time.time()), retain=True)

    def state(self, model="digits", version=3):
        body = {"model": model, "version": version, "sha256": "ab" * 32, "ready": True, "ts": time.time()}
        self.publish("state", json.dumps(body).encode(), retain=True)

    def send(self, recs):
        self.publish("telemetry", contract.encode_batch(self.fleet, self.device, recs))

    def send_batch(self, recs, epoch, after):
        self.publish("telemetry", contract.encode_batch(self.fleet, self.device, recs, epoch=epoch, after=after))

    def die(self):
        """Disconnect so that the broker publishes the will, as when the device vanishes."""
        self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        self.client.loop_stop()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def collecting(broker, store, **kwargs):
    """A Collector running in a thread, subscribed before the block starts."""
    kwargs.setdefault("client_id", "collector-a")
    collector = Collector(broker.url, store, **kwargs)
    stop = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.update(collector.run(stop)), daemon=True)
    thread.start()
    try:
        assert collector.subscribed.wait(15), "collector did not subscribe"
        yield collector
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "collector did not stop"


def stored(store, fleet=FLEET, device="dev-1"):
    return next((d["records"] for d in store.devices() if (d["fleet"], d["device"]) == (fleet, device)), 0)




@pytest.fixture
def store(db_url):
    with open_store(db_url) as s:
        yield s


# --- the store alone ----------------------------------------------------------------------

def test_store_dedupes_and_counts(store):
    assert store.insert_records(FLEET, "dev-1", records(1, 100)) == 100
    assert store.insert_records(FLEET, "dev-1", records(51, 100)) == 50  # half of it already stored
    store.insert_records(FLEET, "dev-1", [{"seq": 200, "ts": 1.0, "kind": "dropped", "count": 7,
                                           "first_seq": 1, "last_seq": 7},
                                          {"seq": 201, "ts": 2.0, "kind": "system", "dropped_total": 5}])
    (dev,) = store.devices()
    assert (dev["records"], dev["requests"], dev["errors"], dev["dropped"]) == (152, 135, 15, 7)
    assert dev["presence"] is None and dev["last_seen"].endswith("+00:00")


def test_store_watermark_chains_batches_committed_out_of_order(store):
    """The ack a device gets: batches lost or late hold the watermark back; once they come, the
    batches committed meanwhile chain up. A new queue epoch starts from nothing."""
    assert store.acknowledge(FLEET, "dev-1", "e1", None, 100) == 100
    assert store.acknowledge(FLEET, "dev-1", "e1", 200, 300) == 100  # (100, 200] has not come
    assert store.acknowledge(FLEET, "dev-1", "e1", 300, 350) == 100
    assert store.acknowledge(FLEET, "dev-1", "e1", 100, 200) == 350  # it came: all three chain
    assert store.acknowledge(FLEET, "dev-1", "e1", None, 120) == 350  # a resent old batch moves nothing back
    assert store.acknowledge(FLEET, "dev-2", "e1", 10, 20) == 0  # other devices are their own
    assert store.acknowledge(FLEET, "dev-1", "e2", None, 5) == 5  # the device's queue was reset
    assert store.acknowledge(FLEET, "dev-1", "e2", 5, 9) == 9


def test_collector_acks_what_it_committed(mosquitto, store):
    """The retained ack carries the watermark for the batch's queue epoch, after the commit."""
    acks = []
    device = Device(mosquitto)
    device.client.on_message = lambda c, u, m: acks.append(contract.decode_ack(m.payload))
    device.client.subscribe(device.topic("ack"), qos=1)
    with collecting(mosquitto, store):
        device.send_batch(records(1, 50), epoch="abc", after=None)
        device.send_batch(records(101, 50), epoch="abc", after=90)  # records 51..90 were lost on the way
        wait_for(lambda: ("abc", 50) in acks, what="the first ack")
        time.sleep(0.5)
        assert max(seq for _, seq in acks) == 50
        device.send_batch(records(51, 40), epoch="abc", after=50)  # sent again: 51..90
        wait_for(lambda: ("abc", 150) in acks, what="the chained ack")
    assert stored(store) == 140
    device.close()


def test_store_ingest_rate(store):
    batches = [records(i, 100) for i in range(1, 20_001, 100)]
    start = time.perf_counter()
    with store.transaction():
        inserted = sum(store.insert_records(FLEET, "dev-1", batch) for batch in batches)
    rate = inserted / (time.perf_counter() - start)
    print(f"\n{type(store).__name__}: {rate:,.0f} records/s")
    assert inserted == 20_000 and rate > 2_000


# --- collector ----------------------------------------------------------------------------

def test_batches_are_stored_once_and_counted(mosquitto, store):
    device = Device(mosquitto)
    with collecting(mosquitto, store) as collector:
        batches = [records(seq, 100) for seq in range(1, 1001, 100)]
        for batch in batches:
            device.send(batch)
        device.send(batches[0])  # a lost PUBACK: the device publishes again
        device.send(batches[7])
        wait_for(lambda: collector.stats()["batches"] == 12, what="12 batches")
    (dev,) = store.devices()
    assert (dev["records"], dev["requests"], dev["errors"]) == (1000, 900, 100)
    stats = collector.stats()
    assert (stats["inserted"], stats["duplicates"], stats["rejected"]) == (1000, 200, 0)
    device.close()


def test_collector_away_gets_what_was_published_meanwhile(mosquitto, store):
    device = Device(mosquitto)
    with collecting(mosquitto, store):
        device.send(records(1, 50))
        wait_for(lambda: stored(store) == 50, what="first batch")
    for seq in range(51, 551, 50):  # the collector is down; its session queues these
        device.send(records(seq, 50))
    device.send(records(501, 50))
    with collecting(mosquitto, store) as collector:
        wait_for(lambda: collector.stats()["batches"] == 11, what="queued batches")
    assert stored(store) == 550 and collector.stats()["duplicates"] == 50
    device.close()


class FailingStore:
    """A store whose database is down: every transaction fails before committing."""

    def __init__(self):
        self.attempts = 0

    @contextmanager
    def transaction(self):
        self.attempts += 1
        raise OSError("database is down")
        yield  # pragma: no cover


def test_nothing_is_acked_before_commit(mosquitto, store):
    failing = FailingStore()
    device = Device(mosquitto)
    with collecting(mosquitto, failing):
        device.send(records(1, 100))
        wait_for(lambda: failing.attempts >= 1, what="a failed commit")
    assert failing.attempts >= 1
    with collecting(mosquitto, store) as collector:  # same client id: the same session
        wait_for(lambda: stored(store) == 100, what="the redelivered batch")
    assert collector.stats()["inserted"] == 100
    device.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_outage_is_retried_without_loss(mosquitto, db_url):
    import psycopg

    name = f"edgeml-test-{uuid.uuid4().hex[:8]}"
    device = Device(mosquitto)
    with open_store(f"{db_url}&application_name={name}") as store, open_store(db_url) as reader:
        with collecting(mosquitto, store) as collector:
            device.send(records(1, 100))
            wait_for(lambda: stored(reader) == 100, what="first batch")
            with psycopg.connect(PG_BASE, autocommit=True) as admin:  # the server drops the collector
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                              (name,))
            device.send(records(101, 100))
            wait_for(lambda: stored(reader) == 200, what="the batch after the outage")
        assert collector.stats()["inserted"] == 200
    device.close()


def test_broker_restart_reconnects(mosquitto, store):
    device = Device(mosquitto)
    with collecting(mosquitto, store) as collector:
        device.send(records(1, 10))
        wait_for(lambda: stored(store) == 10, what="first batch")
        device.close()
        mosquitto.restart()
        wait_for(collector.subscribed.is_set, what="resubscription")
        device = Device(mosquitto)
        device.send(records(11, 10))
        wait_for(lambda: stored(store) == 20, what="batch after the restart")
    device.close()


def test_two_collectors_split_a_group(mosquitto, db_url):
    devices = [Device(mosquitto, f"dev-{i}") for i in range(2)]
    with open_store(db_url) as one, open_store(db_url) as two, open_store(db_url) as reader:
        with collecting(mosquitto, one, client_id="collector-1") as a, \
                collecting(mosquitto, two, client_id="collector-2") as b:
            for seq in range(1, 2001, 100):
                for device in devices:
                    device.send(records(seq, 100))
            wait_for(lambda: a.stats()["batches"] + b.stats()["batches"] == 40, what="40 batches")
        assert a.stats()["batches"] > 0 and b.stats()["batches"] > 0
        assert a.stats()["inserted"] + b.stats()["inserted"] == 4000
        assert [d["records"] for d in reader.devices()] == [2000, 2000]
    for device in devices:
        device.close()


def test_presence_state_and_last_seen(mosquitto, store):
    device = Device(mosquitto)
    device.online()
    device.state(version=4)
    with collecting(mosquitto, store):  # retained presence and state reach a new collector
        wait_for(lambda: store.devices() and store.devices()[0]["model_version"] == 4, what="state")
        (dev,) = store.devices()
        assert (dev["presence"], dev["model_name"], dev["sha256"]) == ("online", "digits", "ab" * 32)
        first_seen = dev["last_seen"]
        device.send(records(1, 5, ts=time.time() + 2))
        wait_for(lambda: store.devices()[0]["last_seen"] > first_seen, what="last_seen to advance")
        device.online("offline")
        wait_for(lambda: store.devices()[0]["presence"] == "offline", what="explicit offline")
        device.online()
        wait_for(lambda: store.devices()[0]["presence"] == "online", what="online again")
        device.die()
        wait_for(lambda: store.devices()[0]["presence"] == "offline", what="the will")
        assert store.devices()[0]["last_seen"] > first_seen  # the will's older ts does not move it back


def test_malformed_payloads_are_rejected(mosquitto, store):
    device = Device(mosquitto)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (contract.MAX_BATCH_BYTES + 1))
    wrong_schema = zstandard.ZstdCompressor().compress(json.dumps({"schema": 9, "records": []}).encode())
    other = contract.encode_batch(FLEET, "someone-else", records(1, 3))
    nan_ts = zstandard.ZstdCompressor().compress(json.dumps(
        {"schema": 1, "fleet": FLEET, "device": "dev-1", "records": [{"seq": 1, "ts": float("nan"), "kind": "system"}]}).encode())
    with collecting(mosquitto, store) as collector:
        for payload in (b"not zstd at all", wrong_schema, bomb, other, nan_ts, b""):
            device.publish("telemetry", payload)
        device.publish("presence", b"{not json")
        device.publish("state", json.dumps({"model": 3}).encode())
        device.send(records(1, 10))
        wait_for(lambda: collector.stats()["inserted"] == 10, what="the good batch after the bad ones")
        assert collector.stats()["rejected"] == 8
    assert stored(store) == 10
    device.close()


def test_end_to_end_ingest_rate(mosquitto, store):
    device = Device(mosquitto)
    batches = [records(seq, 200) for seq in range(1, 20_001, 200)]
    payloads = [contract.encode_batch(FLEET, "dev-1", b) for b in batches]
    with collecting(mosquitto, store) as collector:
        start = time.perf_counter()
        infos = [device.client.publish(device.topic("telemetry"), p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
        wait_for(lambda: collector.stats()["inserted"] == 20_000, timeout=60, what="20,000 records")
        rate = 20_000 / (time.perf_counter() - start)
    print(f"\nMQTT -> {type(store).__name__}: {rate:,.0f} records/s")
    assert rate > 1_000
    device.close()


def devices_at(url):
    """The devices in a SQLite file another process writes; none before it exists."""
    if not os.path.exists(url[len("sqlite:///"):]):
        return []
    with open_store(url) as s:
        return s.devices()


# --- CLI ----------------------------------------------------------------------------------

def test_cli_devices_json(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with open_store(url) as s:
        s.insert_records(FLEET, "dev-1", records(1, 20))
        s.upsert_presence(FLEET, "dev-1", "online", time.time())
    assert main(["fleet", "devices", "--db", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    info = json.loads(out)
    assert info["ok"] and info["devices"][0]["requests"] == 18 and info["devices"][0]["errors"] == 2
    assert main(["fleet", "devices", "--db", url]) == 0
    assert "dev-1" in capsys.readouterr().out


@pytest.mark.parametrize("url, code", [("mysql://db/x", 2), (f"{PG_BASE.rsplit(':', 1)[0]}:1/test", 3)])
def test_cli_bad_db(url, code, tmp_path, capsys):
    assert main(["fleet", "devices", "--db", url]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def collect_process(broker, url):
    return subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "collect", "--broker", broker.url,
                             "--db", url, "--client-id", "cli-collector", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_collect_killed_mid_stream_loses_and_doubles_nothing(mosquitto, tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    device = Device(mosquitto)
    device.online()
    proc = collect_process(mosquitto, url)
    wait_for(lambda: devices_at(url), what="the retained presence (the collector subscribed)")
    infos = [device.client.publish(device.topic("telemetry"), contract.encode_batch(FLEET, "dev-1", records(seq, 100)),
                                   qos=1) for seq in range(1, 30_001, 100)]
    wait_for(lambda: devices_at(url)[0]["records"] > 0, what="the first records")
    proc.kill()  # no chance to commit or acknowledge what it holds
    proc.communicate(timeout=30)
    for info in infos:
        info.wait_for_publish(30)
    proc = collect_process(mosquitto, url)
    try:
        wait_for(lambda: devices_at(url)[0]["records"] == 30_000, timeout=60, what="all 30,000 records")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    (dev,) = devices_at(url)
    assert (dev["requests"], dev["errors"]) == (27_000, 3_000)
    device.close()


def test_cli_collect_refused_login_is_one_line(tmp_path, capsys):
    from broker import Mosquitto

    broker = Mosquitto(tmp_path / "auth", users={"collector": "right"}).start()
    (tmp_path / "password").write_text("wrong\n")
    try:
        code = main(["fleet", "collect", "--broker", broker.url, "--db", f"sqlite:///{tmp_path / 'fleet.db'}",
                     "--username", "collector", "--password-file", str(tmp_path / "password")])
    finally:
        broker.stop()
    assert code == 3
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: broker")


def test_cli_collect_stops_cleanly_on_sigterm(mosquitto, tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    device = Device(mosquitto)
    device.online()
    proc = collect_process(mosquitto, url)
    try:
        wait_for(lambda: devices_at(url), what="the retained presence (the collector subscribed)")
        device.send(records(1, 30))
        wait_for(lambda: devices_at(url)[0]["records"] == 30, what="the batch")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("\n") == 1
    stats = json.loads(out)
    assert stats["ok"] and stats["inserted"] == 30 and stats["presence"] == 1
    device.close()
