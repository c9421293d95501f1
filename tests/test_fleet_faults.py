"""Fleet updates through faults on the host's side and on the wire: the controller killed, two
controllers on PostgreSQL, the broker killed or stopped mid-download, a full disk, an abort in
the middle of a download, devices offline, signed rollback orders, HTTP delivery."""
from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager

import numpy as np
import pytest
from agent_proc import AgentProcess
from broker import Mosquitto
from fleet_harness import (
    FleetServe,
    Poller,
    SlowProxy,
    cli,
    cli_json,
    devices,
    later_versions,
    show,
    state_file,
    wait_for_rollout,
    wait_state,
)
from waiting import wait_until


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"][:40]


@pytest.fixture(scope="module")
def versions(digits_int8_artifact, digits_dir, tmp_path_factory):
    return later_versions(digits_int8_artifact, tmp_path_factory.mktemp("fault-versions"),
                          digits_dir / "keys" / "signing.key")


class Site:
    """A broker, a store, controllers and agents for one test."""

    def __init__(self, tmp_path, digits_dir, versions, broker: Mosquitto, db: str):
        self.tmp, self.versions, self.broker, self.db = tmp_path, versions, broker, db
        self.key, self.pub = digits_dir / "keys" / "signing.key", digits_dir / "keys" / "signing.pub"
        self.agents, self.serves = [], []

    def serve(self, name="serve", **kw) -> FleetServe:
        s = FleetServe(self.broker.url, self.db, self.tmp / f"{name}.log", **kw).start()
        self.serves.append(s)
        return s

    def agent(self, device, *, broker_url=None, data_dir=None, env=None, extra=()) -> AgentProcess:
        a = AgentProcess(self.versions[1], self.pub, data_dir or self.tmp / device, device=device,
                         broker=broker_url or self.broker.url,
                         extra=["--fetch-timeout", "0.5", "--fetch-attempts", "6", *extra], env=env)
        self.agents.append(a)
        return a.start()

    def online(self, *names):
        wait_until(lambda: all((devices(self.db).get(n) or {}).get("presence") == "online" for n in names), 30,
                   f"{names} online")

    def push(self, version, *args):
        return cli_json("fleet", "push", self.versions[version], "--fleet", "f1", "--key", self.key, "--db", self.db,
                        *args)

    def close(self):
        for a in self.agents:
            if a.process and a.process.poll() is None:
                a.kill()
        for s in self.serves:
            if s.process and s.process.poll() is None:
                s.stop()


@pytest.fixture()
def site(tmp_path, digits_dir, versions, mosquitto):
    s = Site(tmp_path, digits_dir, versions, mosquitto, f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


def test_controller_sigkill_mid_rollout_is_picked_up_by_a_restart(site):
    serve = site.serve()
    site.agent("dev1"), site.agent("dev2")
    site.online("dev1", "dev2")
    pushed = site.push(2, "--waves", "1,100%", "--health-window", "4s")
    wait_until(lambda: show(site.db, pushed["rollout"])["wave"] == 1, 30, "wave 1")
    serve.kill()  # mid-rollout: wave 1 observing, wave 2 not started
    time.sleep(1.0)
    site.serve("serve2")
    r = wait_for_rollout(site.db, pushed["rollout"], ("completed",))
    assert [d["state"] for d in r["devices"]] == ["committed", "committed"]


def test_two_controllers_on_postgresql_one_killed(tmp_path, digits_dir, versions, mosquitto, pg_url):
    site = Site(tmp_path, digits_dir, versions, mosquitto, pg_url)
    try:
        first, _ = site.serve("a"), site.serve("b")
        for d in ("dev1", "dev2", "dev3"):
            site.agent(d)
        site.online("dev1", "dev2", "dev3")
        pushed = site.push(2, "--waves", "1,2,100%", "--health-window", "3s")
        wait_until(lambda: show(site.db, pushed["rollout"])["wave"] >= 1, 30, "wave 1")
        first.kill()
        r = wait_for_rollout(site.db, pushed["rollout"], ("completed",), timeout=120)
        assert [d["state"] for d in r["devices"]] == ["committed"] * 3
        import psycopg

        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT COUNT(*) FROM controllers").fetchone()[0] == 2
    finally:
        site.close()


def _blocks_done(data_dir) -> int:
    marks = list((data_dir / "updates" / "downloads").glob("*.blocks"))
    try:
        return len(json.loads(marks[0].read_text())) if marks else 0
    except (OSError, ValueError):
        return 0


@contextmanager
def slow_download(tmp_path, digits_dir, versions, *, rate: int, persistence: bool = True):
    """A site with its own broker and one agent, dev1, whose broker traffic passes a proxy that
    lets ``rate`` bytes/s through toward it, so a download lasts long enough to break into."""
    broker = Mosquitto(tmp_path / "broker", persistence=persistence).start()
    site = Site(tmp_path, digits_dir, versions, broker, f"sqlite:///{tmp_path / 'fleet.db'}")
    proxy = SlowProxy(broker.port, rate=rate)
    try:
        site.serve()
        agent = site.agent("dev1", broker_url=proxy.url)
        site.online("dev1")
        yield site, broker, agent
    finally:
        site.close()
        proxy.close()
        broker.stop()


def test_broker_killed_mid_download_resumes(tmp_path, digits_dir, versions):
    """A slow wire (a proxy passing 20 KB/s toward the device) so the broker can be SIGKILLed
    (persistence off) with part of the artifact on the device's disk; it resumes from there."""
    with slow_download(tmp_path, digits_dir, versions, rate=20_000, persistence=False) as (site, broker, a):
        pushed = site.push(2, "--waves", "100%", "--health-window", "1s", "--block-size", "4KiB")
        wait_until(lambda: _blocks_done(a.data_dir) >= 5, 60, "5 blocks on disk")
        before = _blocks_done(a.data_dir)
        broker.kill()
        time.sleep(1.0)
        broker.start()
        wait_until(lambda: _blocks_done(a.data_dir) > before or state_file(a.data_dir).get("result"), 60,
                   "the download to go on")
        r = wait_for_rollout(site.db, pushed["rollout"], ("completed",), timeout=120)
        st = state_file(a.data_dir)
        assert r["devices"][0]["state"] == "committed" and st["attempts"]["downloading"] == 1  # resumed, not restarted
        assert before < 39  # it really was in the middle (39 blocks in all)


def test_broker_stopped_mid_download_then_back(tmp_path, digits_dir, versions):
    with slow_download(tmp_path, digits_dir, versions, rate=20_000) as (site, broker, a):
        pushed = site.push(2, "--waves", "100%", "--health-window", "1s", "--block-size", "4KiB")
        wait_until(lambda: _blocks_done(a.data_dir) >= 5, 60, "5 blocks on disk")
        broker.stop()
        time.sleep(3.0)  # longer than the fetch timeout: requests made now cannot be answered
        assert state_file(a.data_dir)["state"] == "downloading"  # it waits for the broker, it does not give up
        broker.start()
        r = wait_for_rollout(site.db, pushed["rollout"], ("completed",), timeout=120)
        assert r["devices"][0]["state"] == "committed"


def test_abort_reaches_a_device_in_the_middle_of_a_download(tmp_path, digits_dir, versions, images):
    with slow_download(tmp_path, digits_dir, versions, rate=10_000) as (site, broker, a):
        poller = Poller(a, images).start()
        pushed = site.push(2, "--waves", "100%", "--health-window", "1s", "--block-size", "4KiB")
        wait_until(lambda: _blocks_done(a.data_dir) >= 2, 60, "the download under way")
        assert cli_json("fleet", "rollout", "abort", pushed["rollout"], "--db", site.db)["state"] == "aborting"
        r = wait_for_rollout(site.db, pushed["rollout"], ("aborted",), timeout=60)
        st = wait_state(a.data_dir, lambda s: s["state"] == "idle" and s.get("result"), 30, "the device idle")
        assert st["result"] == "cancelled" and st["active"]["version"] == 1
        assert list((a.data_dir / "updates" / "downloads").iterdir()) == []
        assert r["devices"][0]["state"] == "returned"
        answers = poller.stop()
        assert {v for s, v, _ in answers if s == 200} == {"1"} and all(s == 200 for s, _, _ in answers)


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_while_downloading_fails_cleanly_and_keeps_serving(site, small_disk, images):
    site.serve()
    a = site.agent("dev1", data_dir=small_disk / "dev1")
    site.online("dev1")
    st = os.statvfs(small_disk)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 60_000))  # leave ~60 KB: less than the artifact
    pushed = site.push(2, "--waves", "100%", "--health-window", "1s")
    r = wait_for_rollout(site.db, pushed["rollout"], ("aborted",), timeout=60)
    d = r["devices"][0]
    assert d["state"] == "failed" and "disk is full" in d["error"]
    assert a.infer("digits", {"image": images[:1]})[0] == 200
    assert list((a.data_dir / "updates" / "downloads").iterdir()) == []
    ballast.unlink()
    pushed = site.push(3, "--waves", "100%", "--health-window", "1s")
    r = wait_for_rollout(site.db, pushed["rollout"], ("completed",), timeout=60)
    assert r["devices"][0]["model_version"] == 3


def test_offline_device_gets_the_update_when_it_comes_back(site):
    site.serve()
    site.agent("dev1")
    a2 = site.agent("dev2")
    site.online("dev1", "dev2")
    assert a2.terminate() == 0
    wait_until(lambda: devices(site.db)["dev2"]["presence"] == "offline", 20, "dev2 offline")
    pushed = site.push(2, "--waves", "100%", "--health-window", "1s", "--wave-timeout", "120s")
    wait_until(lambda: any(d["state"] == "committed" for d in show(site.db, pushed["rollout"])["devices"]), 60,
               "dev1 committed")
    waiting = show(site.db, pushed["rollout"])["waiting"]
    assert waiting and waiting[0]["devices"] == ["dev2"] and waiting[0]["offline"] == ["dev2"]
    assert 0 < waiting[0]["timeout_in_s"] <= 120
    a2.start()
    r = wait_for_rollout(site.db, pushed["rollout"], ("completed",))
    assert {d["device"]: d["model_version"] for d in r["devices"]} == {"dev1": 2, "dev2": 2}


def test_pause_holds_the_next_wave_and_resume_goes_on(site):
    site.serve()
    site.agent("dev1"), site.agent("dev2")
    site.online("dev1", "dev2")
    pushed = site.push(2, "--waves", "1,100%", "--health-window", "2s")
    wait_until(lambda: show(site.db, pushed["rollout"])["wave"] == 1, 30, "wave 1")
    assert cli_json("fleet", "rollout", "pause", pushed["rollout"], "--db", site.db)["state"] == "paused"
    time.sleep(6.0)  # long enough for wave 1 to finish: the device in it goes on, wave 2 does not start
    r = show(site.db, pushed["rollout"])
    assert r["state"] == "paused" and sorted(d["state"] for d in r["devices"]) == ["committed", "pending"]
    proc = cli("fleet", "rollout", "pause", pushed["rollout"], "--db", site.db)
    assert proc.returncode == 2 and "is paused" in proc.stderr
    cli_json("fleet", "rollout", "resume", pushed["rollout"][:12], "--db", site.db)  # a unique start of the id works
    r = wait_for_rollout(site.db, pushed["rollout"], ("completed",))
    assert [d["state"] for d in r["devices"]] == ["committed", "committed"]


def test_signed_rollback_order_takes_devices_below_their_highest_version(site):
    site.serve()
    a = site.agent("dev1")
    site.online("dev1")
    for v in (2, 3):
        wait_for_rollout(site.db, site.push(v, "--waves", "100%", "--health-window", "1s")["rollout"], ("completed",))
    assert devices(site.db)["dev1"]["model_version"] == 3
    back = cli_json("fleet", "rollback", "--fleet", "f1", "--to", "2", "--key", site.key, "--health-window", "1s",
                    "--db", site.db)
    r = wait_for_rollout(site.db, back["rollout"], ("completed",))
    assert r["devices"][0]["model_version"] == 2 and r["kind"] == "rollback"
    trust = json.loads((a.data_dir / "updates" / "trust.json").read_text())
    assert trust["highest"]["digits"]["version"] == 3 and trust["last_order_issued"] > 0  # never lowered


def test_expired_rollback_order_is_refused(site):
    site.serve()
    a = site.agent("dev1")
    site.online("dev1")
    wait_for_rollout(site.db, site.push(2, "--waves", "100%", "--health-window", "1s")["rollout"], ("completed",))
    assert a.terminate() == 0
    back = cli_json("fleet", "rollback", "--fleet", "f1", "--to", "1", "--artifact", site.versions[1], "--key", site.key,
                    "--expires", "2s", "--wave-timeout", "30s", "--db", site.db)
    time.sleep(3.0)  # the order expires while the device is away
    a.start()
    r = wait_for_rollout(site.db, back["rollout"], ("completed",), timeout=60)
    assert r["devices"][0]["state"] == "refused" and "expired" in r["devices"][0]["error"]
    assert devices(site.db)["dev1"]["model_version"] == 2


def test_artifacts_over_http_range_requests(site, images):
    from edgeml.fleet.blocks import HttpArtifacts
    from edgeml.fleet.store import open_store

    site.serve()
    a = site.agent("dev1")
    site.online("dev1")
    with open_store(site.db) as store:
        web = HttpArtifacts(store, "127.0.0.1", 0)
        try:
            pushed = site.push(2, "--waves", "100%", "--health-window", "1s", "--block-size", "16KiB", "--no-delta",
                               "--url", f"http://127.0.0.1:{web.port}/artifacts/{{sha256}}.edgeml")
            r = wait_for_rollout(site.db, pushed["rollout"], ("completed",))
            assert r["devices"][0]["model_version"] == 2
            assert web.range_requests == 10  # 156 KB in 16 KiB blocks, each fetched once
        finally:
            web.stop()
    assert "asking the host over the broker instead" not in a.log()
