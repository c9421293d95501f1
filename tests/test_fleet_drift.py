"""Drift end to end: real agents count live requests into their artifact's baseline bins, raise
and clear alerts (telemetry and the events topic), and the host adds the devices' windows up
(``edgeml fleet drift``) and lists the alerts (``edgeml fleet alerts``), through a real broker
and ``fleet serve``."""
from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_proc import AgentProcess
from fleet_harness import FleetServe, cli, cli_json
from waiting import wait_until

MONITORING = """
[monitoring]
drift_window_s = 0.5
drift_windows = 4
drift_min_samples = 40
"""


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"]


class Receiver:
    """A webhook receiver on loopback that fails its first POST (a receiver restarting)."""

    def __init__(self):
        self.posts, self.refused = [], 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if receiver.refused == 0 else 200
                if status == 503:
                    receiver.refused += 1
                else:
                    receiver.posts.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/alerts"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def drift_fleet(tmp_path, mosquitto, digits_dir, digits_int8_artifact):
    config = tmp_path / "agent.toml"
    config.write_text(MONITORING)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    receiver = Receiver()
    serve = FleetServe(mosquitto.url, db, tmp_path / "serve.log", http=True,
                       extra=["--alert-webhook", receiver.url]).start()
    serve.receiver = receiver
    events, lock = [], threading.Lock()
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client, userdata, message):
        with lock:
            events.append(json.loads(message.payload))

    listener.on_message = on_message
    listener.connect("127.0.0.1", mosquitto.port)
    listener.subscribe("edgeml/v1/f1/+/events", qos=1)
    listener.loop_start()
    agents = {d: AgentProcess(digits_int8_artifact, digits_dir / "keys" / "signing.pub", tmp_path / d, device=d,
                              broker=mosquitto.url, config=config).start() for d in ("dev1", "dev2")}
    yield db, agents, events, serve
    for a in agents.values():
        a.terminate()
    listener.loop_stop()
    listener.disconnect()
    serve.stop()
    receiver.close()


def _send(agent, x: np.ndarray) -> None:
    for row in x:
        status, _ = agent.infer("digits", {"image": row[None]})
        assert status == 200


def test_a_shifted_device_alerts_and_the_host_judges_the_fleet_from_window_histograms(drift_fleet, images):
    db, agents, events, serve = drift_fleet
    normal = images[:160]
    shifted = np.clip(images[:160] * 0.4 + 0.6, 0, 1).astype(np.float32)  # washed-out digits, a new camera
    _send(agents["dev1"], normal)
    _send(agents["dev2"], shifted)

    alerts = wait_until(lambda: (a := cli_json("fleet", "alerts", "--db", db))["open"] and a, 30, "an open alert")
    opened = [a for a in alerts["alerts"] if a["state"] == "open"]
    assert {a["device"] for a in opened} == {"dev2"}, opened
    assert "input_drift" in {a["alert"] for a in opened}
    drifted = next(a for a in opened if a["alert"] == "input_drift")
    assert drifted["model"] == "digits" and drifted["features"] and drifted["features"][0]["name"] == "image"
    # the same alert went out on the events topic as it happened
    wait_until(lambda: any(e.get("event") == "alert" and e["device"] == "dev2" for e in list(events)), 10,
               "the alert on the events topic")

    # posted to the webhook (its first POST failed and was retried), and counted in /metrics
    posted = wait_until(lambda: [p for p in serve.receiver.posts if p["alert"] == "input_drift"], 15, "the webhook")
    assert serve.receiver.refused == 1 and posted[0]["device"] == "dev2" and posted[0]["state"] == "raised"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{serve.http_port}/metrics", timeout=10).read().decode()
    assert 'edgeml_fleet_alerts_open{fleet="f1",alert="input_drift"} 1' in metrics, metrics
    assert 'edgeml_fleet_devices{fleet="f1",presence="online"} 2' in metrics

    by_device = cli_json("fleet", "drift", "--fleet", "f1", "--db", db)
    rows = {r["group"]: r for r in by_device["rows"]}
    assert set(rows) == {"dev1", "dev2"} and all(r["judged"] for r in rows.values()), rows
    assert rows["dev2"]["input_drift"] and not rows["dev1"]["input_drift"], rows
    assert rows["dev1"]["samples"] == 160 and rows["dev2"]["samples"] == 160
    fleet_wide = cli_json("fleet", "drift", "--fleet", "f1", "--db", db, "--by", "fleet")["rows"]
    assert len(fleet_wide) == 1 and fleet_wide[0]["samples"] == 320 and fleet_wide[0]["devices"] == ["dev1", "dev2"]
    # half the fleet's traffic is washed out: that is drift for the fleet too, judged from summed counts
    assert fleet_wide[0]["input_drift"]

    # the camera is fixed: once the shifted windows slide out, the alert clears
    cursor = iter(range(10**6))

    def cleared():
        start = 40 * next(cursor) % (len(images) - 40)  # fresh digits each time, as real traffic would be
        _send(agents["dev2"], images[start : start + 40])
        a = cli_json("fleet", "alerts", "--db", db)
        return not a["open"] and a

    done = wait_until(cleared, 40, "the alerts to clear", interval=0.2)
    states = {(a["device"], a["alert"]): a["state"] for a in done["alerts"]}
    assert states[("dev2", "input_drift")] == "cleared"
    wait_until(lambda: any(p["state"] == "cleared" for p in serve.receiver.posts), 15, "the clearing posted")
    assert len([p for p in serve.receiver.posts if p["alert"] == "input_drift" and p["state"] == "raised"]) == 1
    table = cli("fleet", "alerts", "--db", db)
    assert table.returncode == 0 and "cleared" in table.stdout and "dev2" in table.stdout


def test_fleet_drift_explains_bad_arguments_in_one_line(tmp_path):
    proc = cli("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--db", "sqlite:///x.db", "--alert-webhook", "ftp://x")
    assert proc.returncode == 2 and "--alert-webhook" in proc.stderr and proc.stderr.strip().count("\n") == 0
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    from edgeml.fleet import open_store

    open_store(db).close()
    proc = cli("fleet", "drift", "--fleet", "f1", "--db", db, "--since", "yesterday")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--since" in proc.stderr, proc.stderr
    proc = cli("fleet", "drift", "--fleet", "f1", "--db", db, "--by", "wave")
    assert proc.returncode == 2 and "rollout" in proc.stderr
    assert cli_json("fleet", "drift", "--fleet", "f1", "--db", db)["rows"] == []


# --- the host's side on both databases, from records as devices send them --------------------------




def _device_records(seed: int, shift: float, windows: int = 3, start_seq: int = 1):
    """A device's baseline, drift windows and alerts as its monitor emits them (a real monitor)."""
    from device_agent.monitoring.drift import DriftMonitor, DriftSettings
    from edgeml.core.stats import baseline_stats

    rng = np.random.default_rng(0)
    baseline = baseline_stats({"x": rng.normal(size=(4000, 4)).astype(np.float32)})
    out = []
    monitor = DriftMonitor(baseline, "m", 3, "ab" * 32, DriftSettings(windows=2, min_samples=100), emit=out.append,
                           start=False)
    live = np.random.default_rng(seed)
    for _ in range(windows):
        x = live.normal(size=(500, 4)).astype(np.float32)
        x[:, 2] += shift
        monitor.inference("m", 3, 0.1, {"x": x}, {})
        monitor.close_window()
    for i, r in enumerate(out):
        r["seq"] = start_seq + i
    return out


def test_fleet_drift_and_alerts_add_up_devices_on_both_databases(db_url):
    from edgeml.fleet import open_store
    from edgeml.fleet.alerting import AlertWebhook, fleet_metrics
    from edgeml.fleet.drift import alerts, fleet_drift

    receiver = Receiver()
    receiver.refused = 1  # this one answers every POST
    with open_store(db_url) as store:
        store.insert_records("f1", "calm", _device_records(1, 0.0))
        store.insert_records("f1", "shifted", _device_records(2, 1.5))
        by_device = {r["group"]: r for r in fleet_drift(store, "f1")["rows"]}
        assert not by_device["calm"]["input_drift"] and by_device["shifted"]["input_drift"]
        assert by_device["shifted"]["worst"][0]["channel"] == 2 and by_device["calm"]["samples"] == 1500
        fleet = fleet_drift(store, "f1", by="version", since_s=None)["rows"]
        assert len(fleet) == 1 and fleet[0]["group"] == "v3" and fleet[0]["version"] == 3 and fleet[0]["samples"] == 3000
        listed = alerts(store)
        assert listed["open"] == 1 and listed["alerts"][0]["device"] == "shifted"
        assert 'edgeml_fleet_alerts_open{fleet="f1",alert="input_drift"} 1' in fleet_metrics(store)
        hook = AlertWebhook(store, receiver.url, interval_s=3600)  # passes driven by hand below
        try:
            assert hook.deliver() == 1 and hook.deliver() == 0  # each alert once
        finally:
            hook.stop()
        assert receiver.posts[0]["device"] == "shifted" and receiver.posts[0]["alert"] == "input_drift"
    receiver.close()


class _RolloutStore:
    """A store's reads that fleet_drift needs, over one rollout's waves and devices' records."""

    def __init__(self, records, waves):
        self._records, self._waves = records, waves

    def records(self, kinds, fleet=None, since=None):
        return [("f1", d, r) for d, r in self._records if r["kind"] in kinds]

    def rollouts(self, fleet=None):
        return [{"id": "r-1"}]

    def rollout(self, rollout_id):
        return {"id": "r-1"} if rollout_id == "r-1" else None

    def transaction(self, write=True):
        import contextlib

        return contextlib.nullcontext(self)

    def assignments(self, rollout_id):
        return [{"device": d, "wave": w} for d, w in self._waves.items()]


def test_drift_by_wave_adds_up_the_devices_of_each_wave():
    from edgeml.fleet.drift import fleet_drift

    records = []
    for device, seed, shift in (("a", 1, 0.0), ("b", 2, 0.0), ("c", 3, 1.5), ("d", 4, 1.5)):
        records += [(device, r) for r in _device_records(seed, shift)]
    store = _RolloutStore(records, {"a": 1, "b": 1, "c": 2, "d": 2})
    rows = {r["group"]: r for r in fleet_drift(store, "f1", by="wave", since_s=None)["rows"]}
    assert set(rows) == {"wave 1", "wave 2"}
    assert rows["wave 1"]["devices"] == ["a", "b"] and not rows["wave 1"]["input_drift"]
    assert rows["wave 2"]["devices"] == ["c", "d"] and rows["wave 2"]["input_drift"]
    assert rows["wave 2"]["samples"] == 3000 and rows["wave 2"]["worst"][0]["channel"] == 2
    with pytest.raises(Exception, match="no rollout"):
        fleet_drift(store, "f1", by="wave", rollout="r-404")
