"""The agent, a real Mosquitto and the collector together, through outages and crashes.

The agent runs as the real ``edgeml-agent run`` process; the collector is ``edgeml.fleet``'s,
storing into SQLite; the broker is stopped, restarted and misconfigured for real.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

import numpy as np
import pytest
from agent_proc import AgentProcess
from broker import Mosquitto
from waiting import wait_until


@pytest.fixture(scope="module")
def artifact(digits_int8_artifact):
    return digits_int8_artifact


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"][:50]


@contextlib.contextmanager
def collector(broker_url: str, db):
    from edgeml.fleet.collector import Collector
    from edgeml.fleet.store import open_store

    store = open_store(f"sqlite:///{db}")
    col = Collector(broker_url, store, client_id="test-collector")
    stop = threading.Event()
    thread = threading.Thread(target=col.run, args=(stop,), daemon=True)
    thread.start()
    assert col.subscribed.wait(10), "collector did not subscribe"
    try:
        yield col
    finally:
        stop.set()
        thread.join(15)
        store.close()


def device(db, name="dev1") -> dict:
    from edgeml.fleet.store import open_store

    with open_store(f"sqlite:///{db}") as store:
        return next((d for d in store.devices() if d["device"] == name), {})


def agent(artifact, digits_dir, tmp_path, **kwargs) -> AgentProcess:
    return AgentProcess(artifact, digits_dir / "keys" / "signing.pub", tmp_path / "data", **kwargs)


def test_broker_outage_1000_requests_all_collected_exactly_once(artifact, digits_dir, images, tmp_path, mosquitto):
    db = tmp_path / "fleet.db"
    with collector(mosquitto.url, db):
        a = agent(artifact, digits_dir, tmp_path, broker=mosquitto.url).start()
        wait_until(lambda: device(db).get("presence") == "online", 20, "presence online")
        mosquitto.stop()
        assert a.infer_many("digits", images, 1000) == 1000  # served while the broker is down
        for _ in range(5):  # bad requests are served a 4xx and counted too
            assert a.infer("digits", {"no_such_input": images[:1]})[0] == 400
        assert a.infer("no_such_model", {"image": images[:1]})[0] == 404
        mosquitto.start()
        try:
            wait_until(lambda: device(db).get("requests") == 1000, 60, "1000 requests collected")
        except AssertionError:
            print("AGENT LOG", a.log()[-3000:], "BROKER LOG", mosquitto.log()[-3000:], "DEVICE", device(db))
            raise
        time.sleep(1.5)  # anything published twice would show up by now
        d = device(db)
        assert d["requests"] == 1000 and d["errors"] == 6
        assert d["model_name"] == "digits" and d["model_version"] == 1
        assert a.terminate() == 0
        wait_until(lambda: device(db).get("presence") == "offline", 20, "presence offline after SIGTERM")


def test_sigkill_mid_publish_then_restart_loses_and_doubles_nothing(artifact, digits_dir, images, tmp_path, mosquitto):
    """The broker is frozen (SIGSTOP) so batches go out and wait for PUBACKs that cannot come;
    the agent is killed right then. After a restart it publishes them again: the collector
    must end with every served request once."""
    import signal

    db = tmp_path / "fleet.db"
    with collector(mosquitto.url, db) as col:
        a = agent(artifact, digits_dir, tmp_path, broker=mosquitto.url).start()
        assert a.infer_many("digits", images, 1000) == 1000
        wait_until(lambda: device(db).get("requests") == 1000, 30, "the first 1000")
        mosquitto.process.send_signal(signal.SIGSTOP)
        try:
            assert a.infer_many("digits", images, 1000) == 1000  # served; their batches wait for PUBACKs
            time.sleep(0.5)
            assert a.kill() != 0
        finally:
            mosquitto.process.send_signal(signal.SIGCONT)
        b = agent(artifact, digits_dir, tmp_path, broker=mosquitto.url).start()
        wait_until(lambda: device(db).get("requests") == 2000, 60, "2000 requests collected")
        time.sleep(1.5)  # a batch delivered twice would be counted by now
        assert device(db)["requests"] == 2000
        assert col.stats()["inserted"] >= 2000
        assert b.terminate() == 0


def test_broker_sigkill_after_a_burst_loses_no_record(artifact, digits_dir, images, tmp_path):
    """A PUBACK is not delivery. The collector is away while 800 requests are served, so the
    broker holds their batches in memory for its session; then the broker is SIGKILLed
    (persistence off: nothing on disk) and restarted. The device kept every record the host had
    not acknowledged and sends them again: the collector ends with each one exactly once."""
    broker = Mosquitto(tmp_path / "broker", persistence=False).start()
    db = tmp_path / "fleet.db"
    a = agent(artifact, digits_dir, tmp_path, broker=broker.url, extra=["--ack-timeout", "1"]).start()
    try:
        with collector(broker.url, db):
            assert a.infer_many("digits", images, 10) == 10
            wait_until(lambda: device(db).get("requests") == 10, 20, "the first 10")
        # the collector left with a persistent session: the broker now queues telemetry for it
        assert a.infer_many("digits", images, 800) == 800
        time.sleep(1.0)  # the batches are PUBACKed by now: only the broker's memory holds them
        broker.kill()
        broker.start()
        with collector(broker.url, db):
            try:
                wait_until(lambda: device(db).get("requests") == 810, 60, "all 810 requests collected")
            except AssertionError:
                print("AGENT LOG", a.log()[-3000:], "DEVICE", device(db))
                raise
            time.sleep(1.5)  # a record stored twice would show up by now
            assert device(db)["requests"] == 810
            wait_until(lambda: a.metric("edgeml_telemetry_queue_records") == 0, 20, "the device's queue to empty")
        assert "sending" in a.log() and "records again" in a.log()
        assert a.terminate() == 0
    finally:
        broker.stop()


def test_queue_bound_offline_drops_the_oldest_and_reports_it(artifact, digits_dir, images, tmp_path, mosquitto):
    config = tmp_path / "agent.toml"
    config.write_text("[telemetry]\nqueue_max_bytes = 65536\nsystem_interval_s = 3600\n")
    a = agent(artifact, digits_dir, tmp_path, config=config).start()  # no broker: offline
    assert a.infer_many("digits", images, 2000) == 2000
    wait_until(lambda: a.metric("edgeml_telemetry_dropped_total") > 0, 10, "drops counted")
    dropped = a.metric("edgeml_telemetry_dropped_total")
    db = tmp_path / "fleet.db"
    with collector(mosquitto.url, db):
        config.write_text(config.read_text() + f'[mqtt]\nbroker = "{mosquitto.url}"\n')
        a.hup()  # SIGHUP: re-read the config, which now names a broker
        wait_until(lambda: device(db).get("dropped", 0) > 0 and device(db).get("requests", 0) > 0, 30,
                   "the dropped report and the newest records")
        time.sleep(1.0)
        d = device(db)
        assert d["dropped"] >= dropped and 0 < d["requests"] < 2000  # the oldest went, the newest stayed
        assert d["requests"] + d["dropped"] >= 2000
        assert a.terminate() == 0
    assert "reloaded" in a.log()


def test_refused_credentials_are_reported_and_the_agent_keeps_serving(artifact, digits_dir, images, tmp_path):
    broker = Mosquitto(tmp_path / "auth", users={"dev1": "right"}).start()
    try:
        (tmp_path / "pw").write_text("wrong\n")
        a = agent(artifact, digits_dir, tmp_path, broker=broker.url,
                  extra=["--username", "dev1", "--password-file", str(tmp_path / "pw")]).start()
        wait_until(lambda: "Not authorized" in a.log() or "not authori" in a.log().lower(), 20, "the auth error")
        assert a.infer_many("digits", images, 20) == 20
        status, _ = a.get("/v2/health/ready")
        assert status == 200
        assert a.terminate() == 0
        refusals = [line for line in a.log().splitlines() if "authori" in line.lower()]
        assert refusals and all("Traceback" not in line for line in refusals)
    finally:
        broker.stop()


def test_presence_and_state_are_retained(artifact, digits_dir, tmp_path, mosquitto):
    import paho.mqtt.client as mqtt

    from edgeml.core.mqtt_contract import topic

    a = agent(artifact, digits_dir, tmp_path, broker=mosquitto.url, device="dev7", fleet="lab").start()
    got = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c, u, m):
        got[m.topic] = json.loads(m.payload)
        done.set() if len(got) == 2 else None

    client.on_message = on_message
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe([(topic("lab", "dev7", "presence"), 1), (topic("lab", "dev7", "state"), 1)])
    client.loop_start()
    try:
        assert done.wait(10)
        assert got[topic("lab", "dev7", "presence")]["status"] == "online"
        state = got[topic("lab", "dev7", "state")]
        assert state["model"] == "digits" and state["version"] == 1 and state["ready"] is True
        assert len(state["sha256"]) == 64
        assert a.terminate() == 0
        wait_until(lambda: got[topic("lab", "dev7", "presence")]["status"] == "offline", 10, "offline")
    finally:
        client.loop_stop()
        client.disconnect()
