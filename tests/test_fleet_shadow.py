"""Shadow evaluation end to end: a real Mosquitto, ``edgeml fleet serve`` and ``edgeml-agent run``
processes, real models. ``fleet push --shadow`` delivers, verifies and self-tests a candidate
that then runs beside the active model, which alone answers; ``fleet shadow`` reports how the two
agree per device and fleet-wide; ``fleet promote`` rolls the candidate out without a second
download; SIGKILL while shadowing resumes the shadow; an abort drops the candidate."""
from __future__ import annotations

import numpy as np
import pytest
from agent_proc import AgentProcess
from fleet_harness import (
    FleetServe,
    Poller,
    cli,
    cli_json,
    devices,
    env_with,
    resign,
    show,
    state_file,
    trap_artifact,
    wait_for_rollout,
    wait_state,
)
from waiting import wait_until

STATS = ["--stats-window", "0.5"]  # a shadow window every half second


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"][:40]


@pytest.fixture(scope="module")
def versions(digits_int8_artifact, digits_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shadow-versions")
    key = digits_dir / "keys" / "signing.key"
    return {1: digits_int8_artifact, 2: resign(digits_int8_artifact, folder / "v2.edgeml", key, version=2),
            # random weights: fine on digits, agrees with the real model on about one in ten
            "other": trap_artifact(digits_int8_artifact, folder / "other.edgeml", key, "slow", version=3)}


@pytest.fixture()
def fleet(tmp_path, mosquitto, digits_dir, versions):
    class Fleet:
        db = f"sqlite:///{tmp_path / 'fleet.db'}"
        key = digits_dir / "keys" / "signing.key"
        agents = []
        serve = FleetServe(mosquitto.url, f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "serve.log")

        def agent(self, device, env=None) -> AgentProcess:
            a = AgentProcess(versions[1], digits_dir / "keys" / "signing.pub", tmp_path / device, device=device,
                             broker=mosquitto.url, extra=[*STATS, "--fetch-timeout", "0.5"], env=env)
            self.agents.append(a)
            return a.start()

        def online(self, *names):
            wait_until(lambda: all((devices(self.db).get(n) or {}).get("presence") == "online" for n in names), 30,
                       f"{names} online")

        def push(self, artifact, *args):
            return cli_json("fleet", "push", artifact, "--fleet", "f1", "--key", self.key, "--db", self.db, *args)

        def shadow(self, *args):
            return cli_json("fleet", "shadow", "--fleet", "f1", "--db", self.db, *args)

    f = Fleet()
    f.serve.start()
    yield f
    for a in f.agents:
        if a.process and a.process.poll() is None:
            a.kill()
    f.serve.stop()


def _compared_at_least(fleet, n, *args):
    def check():
        report = fleet.shadow(*args)
        return report if (report["fleet_wide"].get("compared") or 0) >= n else None
    return wait_until(check, 60, f"{n} requests compared", interval=0.5)


def test_a_shadow_runs_beside_the_active_model_which_alone_answers(fleet, versions, images):
    a1, a2 = fleet.agent("dev1"), fleet.agent("dev2")
    fleet.online("dev1", "dev2")
    pollers = [Poller(a1, images).start(), Poller(a2, images).start()]
    pushed = fleet.push(versions["other"], "--shadow", "--sample", "1.0")
    assert pushed["kind"] == "shadow" and pushed["shadow"] == {"sample": 1.0} and pushed["waves"] == [2]
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("shadowing",))
    assert {d["state"] for d in r["devices"]} == {"shadowing"}
    report = _compared_at_least(fleet, 60, "--version", "3")
    answers = [p.stop() for p in pollers]
    for got in answers:  # the candidate never answered a request, and no request failed
        assert got and all(s == 200 for s, _, _ in got) and {v for _, v, _ in got} == {"1"}
    shown = show(fleet.db, pushed["rollout"])["shadow"]  # the rollout shows the same figures, fleet-wide
    assert shown["sample"] == 1.0 and shown["compared"] >= report["fleet_wide"]["compared"]
    rows = {d["device"]: d for d in report["devices"]}
    assert set(rows) == {"dev1", "dev2"}
    for d in rows.values():
        assert d["shadow_version"] == 3 and d["active_version"] == 1 and d["errors"] == 0
        assert d["top1_agreement"] < 0.5  # random weights against the trained model
    fw = report["fleet_wide"]  # the devices' counts, added up
    assert fw["compared"] == sum(d["compared"] for d in rows.values()) and fw["devices"] == 2
    assert fw["top1_agreement"] == pytest.approx(sum(d["top1_agreement"] * d["rows"] for d in rows.values())
                                                 / sum(d["rows"] for d in rows.values()), abs=1e-5)
    # what the device holds: the candidate staged and the active model unchanged
    st = state_file(a1.data_dir)
    assert st["state"] == "shadowing" and st["target"]["version"] == 3 and st["active"]["version"] == 1
    # a push to devices running a shadow says how to go on
    refused = cli("fleet", "push", versions[2], "--fleet", "f1", "--key", fleet.key, "--db", fleet.db)
    assert refused.returncode != 0 and "promote it" in refused.stderr
    # abort: the devices drop the candidate, its file goes, the active model stays
    cli_json("fleet", "rollout", "abort", pushed["rollout"], "--db", fleet.db)
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted",))
    assert {d["state"] for d in r["devices"]} == {"returned"}
    for a in (a1, a2):
        st = wait_state(a.data_dir, lambda s: s.get("state") == "idle", 30, "idle")
        assert st["result"] == "ended" and st["active"]["version"] == 1
        assert [p.name for p in (a.data_dir / "updates" / "models").iterdir()] == [
            st["active"]["path"].rsplit("/", 1)[-1]]


def test_promote_rolls_the_shadow_out_without_a_second_download(fleet, versions, images):
    a = fleet.agent("dev1")
    fleet.online("dev1")
    poller = Poller(a, images).start()
    pushed = fleet.push(versions[2], "--shadow", "--sample", "0.5")
    wait_for_rollout(fleet.db, pushed["rollout"], ("shadowing",))
    report = _compared_at_least(fleet, 10)
    assert report["fleet_wide"]["top1_agreement"] == 1.0  # the same weights, another version
    wrong = cli("fleet", "promote", "--fleet", "f1", "--shadow-version", "7", "--key", fleet.key, "--db", fleet.db)
    assert wrong.returncode == 2 and "runs no shadow of version 7 (shadows running: v2)" in wrong.stderr
    promoted = cli_json("fleet", "promote", "--fleet", "f1", "--shadow-version", "2", "--key", fleet.key,
                        "--waves", "100%", "--health-window", "2s", "--db", fleet.db)
    assert promoted["promoted_from"] == pushed["rollout"] and promoted["kind"] == "update"
    r = wait_for_rollout(fleet.db, promoted["rollout"], ("completed",))
    answers = poller.stop()
    assert r["devices"][0]["state"] == "committed" and r["devices"][0]["model_version"] == 2
    assert show(fleet.db, pushed["rollout"])["state"] == "promoted"
    # the promotion went from staged: no download, no second verification of the file
    states = [e.get("state") for e in r["events"] if e.get("rollout") == promoted["rollout"]]
    assert "downloading" not in states and "verifying" not in states and "observing" in states, states
    assert a.log().count("downloading") == 1  # the shadow's, once
    assert all(s == 200 for s, _, _ in answers) and {v for _, v, _ in answers} == {"1", "2"}


def test_sigkill_while_shadowing_resumes_the_shadow(fleet, versions, images):
    a = fleet.agent("dev1", env=env_with(EDGEML_UPDATE_STEP_DELAY=0.5))
    fleet.online("dev1")
    poller = Poller(a, images).start()
    pushed = fleet.push(versions[2], "--shadow", "--sample", "1.0")
    wait_state(a.data_dir, lambda s: s.get("state") == "shadowing", 60, "shadowing")
    a.kill()
    a.start()
    st = wait_state(a.data_dir, lambda s: (s.get("attempts") or {}).get("shadowing") == 2, 30, "the shadow resumed")
    assert st["state"] == "shadowing" and st["active"]["version"] == 1
    before = fleet.shadow()["fleet_wide"].get("compared") or 0
    _compared_at_least(fleet, before + 20)  # the restarted agent compares again
    answers = poller.stop()
    assert {v for s, v, _ in answers if s == 200} == {"1"}
    assert show(fleet.db, pushed["rollout"])["state"] == "shadowing"
