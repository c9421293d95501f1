"""Fleet updates end to end: a real Mosquitto, ``edgeml fleet serve`` and ``edgeml-agent run``
processes, real models. Each fault named in the issue is provoked for real: SIGKILL, a stopped
or killed broker, a slow wire, a full disk, bad signatures, replays, models that go wrong only on
live traffic."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from agent_proc import AgentProcess
from fleet_harness import (
    FakeHost,
    FleetServe,
    Poller,
    cli,
    cli_json,
    devices,
    env_with,
    later_versions,
    resign,
    show,
    state_file,
    trap_artifact,
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
    """v1 (the int8 digits model), v2 and v3 (the same model, later versions), and bad ones."""
    from edgeml.core.artifact import read_artifact
    from edgeml.core.signing import generate_keys

    folder = tmp_path_factory.mktemp("versions")
    key = digits_dir / "keys" / "signing.key"
    v1 = digits_int8_artifact
    out = later_versions(v1, folder, key)
    out["slow"] = trap_artifact(v1, folder / "slow.edgeml", key, "slow", version=4)
    out["errors"] = trap_artifact(v1, folder / "errors.edgeml", key, "errors", version=4)
    wrong = {k: np.zeros_like(v) for k, v in read_artifact(v1).selftest_outputs.items()}
    out["bad_selftest"] = resign(v1, folder / "bad.edgeml", key, version=5, selftest_outputs=wrong)
    other_private, _ = generate_keys(folder / "other")
    out["foreign"] = resign(v1, folder / "foreign.edgeml", other_private, version=6)
    return out


@pytest.fixture()
def fleet(tmp_path, mosquitto, digits_dir, versions):
    """A broker, a store, ``fleet serve``, and a way to start agents that serve v1."""
    class Fleet:
        db = f"sqlite:///{tmp_path / 'fleet.db'}"
        key = digits_dir / "keys" / "signing.key"
        pub = digits_dir / "keys" / "signing.pub"
        broker = mosquitto
        agents = []
        serve = FleetServe(mosquitto.url, f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "serve.log")

        def agent(self, device, *, env=None, extra=(), broker_url=None, start=True, artifact=None) -> AgentProcess:
            a = AgentProcess(artifact or versions[1], self.pub, tmp_path / device, device=device,
                             broker=broker_url or mosquitto.url,
                             extra=["--fetch-timeout", "0.5", "--fetch-attempts", "4", *extra], env=env)
            self.agents.append(a)
            return a.start() if start else a

        def online(self, *names):
            wait_until(lambda: all((devices(self.db).get(n) or {}).get("presence") == "online" for n in names), 30,
                       f"{names} online")

        def push(self, artifact, *args):
            return cli_json("fleet", "push", artifact, "--fleet", "f1", "--key", self.key, "--db", self.db, *args)

    f = Fleet()
    f.serve.start()
    yield f
    for a in f.agents:
        if a.process and a.process.poll() is None:
            a.kill()
    f.serve.stop()


def _served_versions(answers):
    return {v for s, v, _ in answers if s == 200}


# --- the loop ------------------------------------------------------------------------------------------


def test_two_waves_commit_on_live_evidence_and_no_request_fails(fleet, versions, images):
    a1, a2 = fleet.agent("dev1"), fleet.agent("dev2")
    fleet.online("dev1", "dev2")
    pollers = [Poller(a1, images).start(), Poller(a2, images).start()]
    pushed = fleet.push(versions[2], "--waves", "1,100%", "--health-window", "2s", "--min-requests", "10")
    assert pushed["waves"] == [1, 2] and pushed["devices"] == 2 and pushed["rollback_order"]
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("completed",))
    answers = [p.stop() for p in pollers]
    by_device = {d["device"]: d for d in r["devices"]}
    for d in by_device.values():
        assert d["state"] == "committed" and d["model_version"] == 2
        assert d["evidence"]["requests"] >= 10 and d["evidence"]["reference"]["requests"] > 0
    for got in answers:  # served the whole time, by v1 then v2, never an error
        assert all(s == 200 for s, _, _ in got), [s for s, _, _ in got if s != 200][:5]
        assert _served_versions(got) == {"1", "2"}
        first_v2 = next(i for i, (_, v, _) in enumerate(got) if v == "2")
        assert all(v == "2" for _, v, _ in got[first_v2:])
    # the second wave started only after the first device had committed with evidence
    events = r["events"]
    first = next(d["device"] for d in r["devices"] if d["wave"] == 1)
    second = next(d["device"] for d in r["devices"] if d["wave"] == 2)
    committed_1 = min(e["ts"] for e in events if e["device"] == first and e.get("result") == "committed")
    started_2 = min(e["ts"] for e in events if e["device"] == second)
    assert started_2 > committed_1
    table = devices(fleet.db)
    assert table["dev1"]["model_version"] == 2 and table["dev1"]["update_state"] == "idle"
    assert table["dev1"]["update_result"] == "committed" and table["dev1"]["target_version"] == 2
    listed = cli_json("fleet", "rollouts", "--db", fleet.db)["rollouts"]
    assert listed[0]["state"] == "completed" and listed[0]["counts"] == {"committed": 2}


def test_min_requests_not_reached_is_not_evidence(fleet, versions):
    """No traffic: the device commits but says so; the wave waits until its timeout, then,
    with no evidence from any device, pauses and says why instead of hanging or going on."""
    fleet.agent("dev1")
    fleet.online("dev1")
    pushed = fleet.push(versions[2], "--waves", "1,100%", "--health-window", "1s", "--min-requests", "5",
                        "--wave-timeout", "4s")
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("paused",))
    assert "no device committing with evidence" in r["reason"]
    assert r["devices"][0]["state"] == "unobserved" and r["devices"][0]["result"] == "committed_unobserved"


def test_delta_when_the_host_knows_the_old_model(fleet, versions):
    a = fleet.agent("dev1")
    fleet.online("dev1")
    pushed = fleet.push(versions[2], "--waves", "100%", "--health-window", "1s", "--delta-base", versions[1])
    assert pushed["deltas"] and max(pushed["deltas"].values()) < pushed["artifact_bytes"] / 10
    wait_for_rollout(fleet.db, pushed["rollout"], ("completed",))
    st = state_file(a.data_dir)
    assert st["active"]["version"] == 2 and st["desired"]["delta"]["size"] < 2000
    assert "downloading" in a.log() and a.terminate() == 0


# --- faults on the device ----------------------------------------------------------------------------------

KILL_STATES = ["downloading", "verifying", "staged", "self_testing", "activating", "observing", "committed"]


@pytest.mark.parametrize("state", KILL_STATES)
def test_sigkill_in_every_state_resumes_and_serves_only_verified_models(fleet, versions, images, state):
    """SIGKILL the agent the moment it persisted ``state``; restarted, it finishes the update, and
    a client polling it the whole time only ever got answers from v1 or v2."""
    slow = env_with(EDGEML_UPDATE_STEP_DELAY=1.0)
    a = fleet.agent("dev1", env=slow)
    fleet.online("dev1")
    poller = Poller(a, images).start()
    pushed = fleet.push(versions[2], "--waves", "100%", "--health-window", "3s", "--block-size", "4KiB")
    wait_state(a.data_dir, lambda s: s.get("state") == state, 60, f"the agent in {state}")
    a.kill()
    time.sleep(0.3)
    a.start()
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("completed",))
    answers = poller.stop()
    assert r["devices"][0]["state"] == "committed" and r["devices"][0]["model_version"] == 2
    assert {s for s, _, _ in answers} <= {200, None}  # None: while the process was down
    assert _served_versions(answers) <= {"1", "2"} and "2" in _served_versions(answers)
    st = state_file(a.data_dir)
    assert st["state"] == "idle" and st["result"] == "committed" and st["active"]["version"] == 2
    if state in ("downloading", "verifying", "self_testing", "activating", "observing"):  # the step ran again
        assert st["attempts"][state] == 2, st["attempts"]
    leftovers = list((a.data_dir / "updates" / "downloads").iterdir())
    assert leftovers == [] and len(list((a.data_dir / "updates" / "models").iterdir())) == 2  # active + previous


def test_sigkill_while_rolling_back_finishes_on_the_old_model(fleet, versions, images):
    a = fleet.agent("dev1", env=env_with(EDGEML_UPDATE_STEP_DELAY=1.0))
    fleet.online("dev1")
    poller = Poller(a, images, scale=10.0).start()  # bright inputs: the trap model fails on them
    pushed = fleet.push(versions["errors"], "--waves", "100%", "--health-window", "20s")
    wait_state(a.data_dir, lambda s: s.get("state") == "rolling_back", 60, "rolling back")
    a.kill()
    a.start()
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted", "aborting"))
    poller.stop()
    st = wait_state(a.data_dir, lambda s: s.get("state") == "idle", 30, "idle")
    assert st["result"] == "rolled_back" and st["active"]["version"] == 1
    assert r["devices"][0]["state"] == "rolled_back"


def test_model_that_errors_on_live_traffic_is_rolled_back_and_the_rollout_aborts(fleet, versions, images):
    a1, a2 = fleet.agent("dev1"), fleet.agent("dev2")
    fleet.online("dev1", "dev2")
    pollers = [Poller(a1, images, scale=10.0).start(), Poller(a2, images, scale=10.0).start()]
    pushed = fleet.push(versions["errors"], "--waves", "1,100%", "--health-window", "30s")
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted",), timeout=60)
    for p in pollers:
        p.stop()
    first = next(d for d in r["devices"] if d["wave"] == 1)
    second = next(d for d in r["devices"] if d["wave"] == 2)
    assert first["state"] == "rolled_back" and "error_rate" in first["error"]
    assert second["state"] == "skipped" and second["model_version"] == 1  # wave 2 never started
    assert "abort rule" in r["reason"] and "failed" in r["reason"]
    ev = first["evidence"]
    assert ev["requests"] < 200 and ev["error_rate"] > 0.05  # within the window, well before it closed


def test_model_20x_slower_on_live_traffic_is_rolled_back(fleet, versions, images):
    a = fleet.agent("dev1")
    fleet.online("dev1")
    poller = Poller(a, images, scale=50.0, pause=0.0).start()
    pushed = fleet.push(versions["slow"], "--waves", "100%", "--health-window", "60s")
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted",), timeout=90)
    answers = poller.stop()
    d = r["devices"][0]
    assert d["state"] == "rolled_back" and "latency_p95" in d["error"], d
    ev = d["evidence"]
    assert ev["latency_p95_ms"] > 1.5 * ev["reference"]["latency_p95_ms"]
    assert all(s == 200 for s, _, _ in answers)  # slow, never failed


def test_model_failing_its_self_test_never_serves(fleet, versions, images):
    a = fleet.agent("dev1")
    fleet.online("dev1")
    poller = Poller(a, images).start()
    pushed = fleet.push(versions["bad_selftest"], "--waves", "100%", "--health-window", "1s")
    r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted",))
    answers = poller.stop()
    d = r["devices"][0]
    assert d["state"] == "failed" and "self-test failed" in d["error"]
    assert _served_versions(answers) == {"1"}
    trust = json.loads((a.data_dir / "updates" / "trust.json").read_text())
    assert len(trust["failed"]) == 1 and trust["highest"]["digits"]["version"] == 1


# --- what the device refuses -------------------------------------------------------------------------------


def test_push_refuses_foreign_signatures_and_old_versions(fleet, versions):
    fleet.agent("dev1")
    fleet.online("dev1")
    proc = cli("fleet", "push", versions["foreign"], "--fleet", "f1", "--key", fleet.key, "--db", fleet.db)
    assert proc.returncode == 8 and "signed by key" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("fleet", "push", versions[1], "--fleet", "f1", "--key", fleet.key, "--db", fleet.db)
    assert proc.returncode == 2 and "already runs" in proc.stderr


def test_device_refuses_bad_signature_downgrade_and_replay(tmp_path, mosquitto, digits_dir, versions, images):
    """A host that sends what a real controller would not: the device judges for itself."""
    pub = digits_dir / "keys" / "signing.pub"
    a = AgentProcess(versions[1], pub, tmp_path / "dev1", device="dev1", broker=mosquitto.url,
                     extra=["--fetch-timeout", "0.5"]).start()
    host = FakeHost(mosquitto.port)
    poller = Poller(a, images).start()
    try:
        host.offer("dev1", versions["foreign"], rollout="x1")
        st = wait_state(a.data_dir, lambda s: s.get("last", {}).get("rollout") == "x1" and s["state"] == "idle" and s.get("result"), 30)
        assert st["result"] == "failed" and "verification failed" in st["error"]
        old = host.offer("dev1", versions[2], rollout="x2")
        st = wait_state(a.data_dir, lambda s: s.get("result") == "committed" and s["active"]["version"] == 2, 30)
        host.offer("dev1", versions[1], rollout="x3")  # a downgrade, no order
        st = wait_state(a.data_dir, lambda s: s.get("last", {}).get("rollout") == "x3" and s["state"] == "idle" and s.get("result"), 30)
        assert st["result"] == "refused" and "signed rollback order" in st["error"]
        host.offer("dev1", versions[3], rollout="x4")
        wait_state(a.data_dir, lambda s: s.get("result") == "committed" and s["active"]["version"] == 3, 30)
        host.publish_desired("dev1", old.encode())  # the v2 desired message again, replayed
        st = wait_state(a.data_dir, lambda s: s.get("last", {}).get("rollout") == "x2" and s["state"] == "idle" and s.get("result"), 30)
        assert st["result"] == "refused" and st["active"]["version"] == 3
    finally:
        answers = poller.stop()
        host.close()
        a.kill()
    assert _served_versions(answers) <= {"1", "2", "3"} and all(s == 200 for s, _, _ in answers)


def test_blocks_changed_duplicated_reversed_or_never_answered(tmp_path, mosquitto, digits_dir, versions):
    pub = digits_dir / "keys" / "signing.pub"
    a = AgentProcess(versions[1], pub, tmp_path / "dev1", device="dev1", broker=mosquitto.url,
                     extra=["--fetch-timeout", "0.5", "--fetch-attempts", "3"]).start()
    host = FakeHost(mosquitto.port)
    try:
        host.mode = "corrupt_first"
        host.offer("dev1", versions[2], rollout="c1")
        wait_state(a.data_dir, lambda s: s.get("result") == "committed" and s["active"]["version"] == 2, 30)
        assert "arrived changed" in a.log()
        host.mode = "reversed_twice"
        host.offer("dev1", versions[3], rollout="c2")
        wait_state(a.data_dir, lambda s: s.get("result") == "committed" and s["active"]["version"] == 3, 30)
        host.mode = "silent"
        v4 = resign(versions[1], tmp_path / "v4.edgeml", digits_dir / "keys" / "signing.key", version=4)
        host.offer("dev1", v4, rollout="c3")
        st = wait_state(a.data_dir, lambda s: s.get("last", {}).get("rollout") == "c3" and s["state"] == "idle" and s.get("result"), 60)
        assert st["result"] == "failed" and "did not arrive after 3 requests" in st["error"]
        assert st["active"]["version"] == 3
        status, _ = a.get("/v2/health/ready")
        assert status == 200
    finally:
        host.close()
        a.kill()


def test_a_rollout_held_at_a_wave_compares_the_cohorts_with_significance_tests(fleet, versions, images):
    """Two of four devices take the "slow" model (slow on bright inputs, other weights) and the
    rollout is paused: the comparison calls the new version slower and its class mix different,
    and does not call the error rates different."""
    agents = {d: fleet.agent(d) for d in ("dev1", "dev2", "dev3", "dev4")}
    fleet.online(*agents)
    pollers = [Poller(a, images).start() for a in agents.values()]
    pushed = fleet.push(versions["slow"], "--waves", "2,100%", "--health-window", "2s", "--abort-on", "")
    wait_until(lambda: show(fleet.db, pushed["rollout"])["wave"] == 1, 30, "wave 1")
    cli_json("fleet", "rollout", "pause", pushed["rollout"], "--db", fleet.db)
    r = wait_until(lambda: (r := show(fleet.db, pushed["rollout"])) and
                   sum(d["state"] == "committed" for d in r["devices"]) == 2 and r, 60, "wave 1 committed")
    for p in pollers:
        p.stop()
    new = sorted(d["device"] for d in r["devices"] if d["state"] == "committed")
    for a in agents.values():  # bright inputs: the slow model loops on them, the old one does not care
        for i in range(60):
            status, _ = a.infer("digits", {"image": (images[i % len(images)][None] * 50).astype(np.float32)})
            assert status == 200
    result = wait_until(lambda: (c := cli_json("fleet", "rollout", "compare", pushed["rollout"], "--db", fleet.db))
                        ["cohorts"]["new"]["requests"] >= 120 and c["cohorts"]["old"]["requests"] >= 120 and c,
                        30, "the bright requests in the store")
    assert result["cohorts"]["new"]["devices"] == new
    assert sorted(result["cohorts"]["old"]["devices"]) == sorted(set(agents) - set(new))
    latency = result["tests"]["latency"]
    assert latency["verdict"] == "new version slower" and latency["p"] < 0.01 and latency["p_greater"] > 0.5
    assert result["tests"]["predictions"]["verdict"] == "different"
    assert result["tests"]["error_rate"]["verdict"] == "no significant difference"
    table = cli("fleet", "rollout", "compare", pushed["rollout"][:12], "--db", fleet.db)
    assert table.returncode == 0 and "new version slower" in table.stdout


def test_an_ab_rule_aborts_when_the_new_cohort_is_significantly_slower(fleet, versions, images):
    """``ab_latency>1.5x``: no fixed latency threshold, the comparison of the cohorts decides."""
    agents = {d: fleet.agent(d) for d in ("dev1", "dev2", "dev3")}
    fleet.online(*agents)
    pollers = [Poller(a, images, scale=50).start() for a in agents.values()]  # bright: the slow model loops
    try:
        pushed = fleet.push(versions["slow"], "--waves", "1,100%", "--health-window", "30s", "--abort-on",
                            "ab_latency>1.5x")
        r = wait_for_rollout(fleet.db, pushed["rollout"], ("aborted",), timeout=90)
    finally:
        for p in pollers:
            p.stop()
    assert "answer slower" in r["reason"] and "Mann-Whitney" in r["reason"], r["reason"]
    assert all(d["state"] in ("returned", "skipped", "stays") for d in r["devices"]), r["devices"]
