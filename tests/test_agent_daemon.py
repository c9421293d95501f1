"""``edgeml-agent run``: config file and flags, offline serving, refusals, SIGTERM, SIGHUP, embedding."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from agent_proc import AgentProcess

from edgeml.core.artifact import read_artifact, write_artifact
from edgeml.core.signing import generate_keys


@pytest.fixture(scope="module")
def artifact(digits_int8_artifact):
    return digits_int8_artifact


def resign(src, dst, key, version: int):
    """The same model as a new version, signed with ``key``."""
    art = read_artifact(src)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("schema_version", "format", "model_member", "members")}
    manifest["version"] = version
    write_artifact(dst, model=art.model, model_format=art.model_format, manifest=manifest,
                   selftest_inputs=art.selftest_inputs, selftest_outputs=art.selftest_outputs,
                   baseline=art.baseline, private_key=key)
    return dst


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "device_agent.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_serves_offline_and_stops_cleanly_on_sigterm(artifact, digits_dir, tmp_path):
    from device_agent.telemetry import TelemetryQueue

    a = AgentProcess(artifact, digits_dir / "keys" / "signing.pub", tmp_path / "data").start()
    with np.load(digits_dir / "eval.npz") as data:
        x, y = data["image"][:20], data["y"][:20]
    status, body = a.infer("digits", {"image": x})
    assert status == 200
    out = body["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [20, 10]  # int8 model, float in and out
    assert np.mean(np.argmax(np.array(out["data"]).reshape(20, 10), 1) == y) > 0.8
    assert a.terminate() == 0
    with TelemetryQueue(tmp_path / "data" / "telemetry.db") as queue:  # kept on disk for a broker
        records = queue.peek(1000, 1 << 20)
    assert [r for r in records if r["kind"] == "inference"] and "stopped" in a.log()


def test_config_file_with_flags_over_it(artifact, digits_dir, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'artifact = "{artifact}"\npublic_key = "{digits_dir / "keys" / "signing.pub"}"\n'
                      f'data_dir = "data"\ndevice_id = "from-file"\nfleet = "lab"\n')
    a = AgentProcess(artifact, digits_dir / "keys" / "signing.pub", tmp_path / "flag-data", device="from-flag",
                     fleet=None, config=config).start()
    assert a.terminate() == 0
    assert "lab/from-flag" in a.log()  # the fleet from the file, the device id from the flag
    assert (tmp_path / "flag-data" / "telemetry.db").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("text, code, message", [
    ('device_id = "d"\nartefact = "x"\n', 2, "unknown key 'artefact' in the top level \\(did you mean 'artifact'"),
    ('[mqtt]\nbrokr = "mqtt://h"\n', 2, "unknown key 'brokr' in \\[mqtt\\]"),
    ('[mqtt]\nbroker = "http://h"\n', 2, "must be mqtt://HOST"),
    ('threads = "two"\n', 2, "threads must be a whole number"),
    ('api = "8500"\n', 2, "must be HOST:PORT"),
    ('device_id = "bad id"\n', 2, "device_id 'bad id' must be"),
    ('[mqtt]\ncert_file = "c.pem"\n', 2, "needs both cert_file and key_file"),
    ('this is not toml', 2, "not valid TOML"),
])
def test_bad_config_is_one_line_and_a_documented_exit_code(artifact, digits_dir, tmp_path, text, code, message):
    import re

    config = tmp_path / "agent.toml"
    config.write_text(text)
    flags = ["--config", config, "--artifact", artifact, "--public-key", digits_dir / "keys" / "signing.pub",
             "--data-dir", tmp_path / "data"]
    if "device_id" not in text:
        flags += ["--device-id", "dev1"]
    proc = run_cli(*flags)
    assert proc.returncode == code
    assert re.search(message, one_error_line(proc.stderr))
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_missing_settings_and_files(artifact, digits_dir, tmp_path):
    proc = run_cli("--artifact", artifact, "--data-dir", tmp_path / "d", "--device-id", "dev1")
    assert proc.returncode == 2 and "no public_key given" in one_error_line(proc.stderr)
    proc = run_cli("--artifact", tmp_path / "nope.edgeml", "--public-key", digits_dir / "keys" / "signing.pub",
                   "--data-dir", tmp_path / "d", "--device-id", "dev1")
    assert proc.returncode == 3 and "does not exist" in one_error_line(proc.stderr)
    proc = run_cli("--config", tmp_path / "missing.toml")
    assert proc.returncode == 3 and "config file not found" in one_error_line(proc.stderr)


def test_refuses_an_artifact_that_does_not_verify(artifact, tmp_path):
    _, other_pub = generate_keys(tmp_path / "other")
    proc = run_cli("--artifact", artifact, "--public-key", other_pub, "--data-dir", tmp_path / "d",
                   "--device-id", "dev1", "--api", "127.0.0.1:0")
    assert proc.returncode == 8 and "signed by key" in one_error_line(proc.stderr)


def test_sighup_swaps_in_a_new_version_and_refuses_a_bad_one(artifact, digits_dir, tmp_path):
    live = tmp_path / "live.edgeml"
    resign(artifact, live, digits_dir / "keys" / "signing.key", version=1)
    config = tmp_path / "agent.toml"
    config.write_text(f'artifact = "{live}"\n')
    a = AgentProcess(live, digits_dir / "keys" / "signing.pub", tmp_path / "data", config=config)
    a.args.remove("--artifact")
    a.args.remove(str(live))  # the artifact comes from the file, so a reload can change it
    a.start()

    def version():
        status, body = a.get("/v2/models/digits")
        return json.loads(body)["versions"] if status == 200 else None

    assert version() == ["1"]
    v2 = resign(artifact, tmp_path / "v2.edgeml", digits_dir / "keys" / "signing.key", version=2)
    config.write_text(f'artifact = "{v2}"\n')
    a.hup()
    deadline = time.monotonic() + 20
    while version() != ["2"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert version() == ["2"]
    other_key, _ = generate_keys(tmp_path / "other")
    bad = resign(artifact, tmp_path / "bad.edgeml", other_key, version=3)
    config.write_text(f'artifact = "{bad}"\n')
    a.hup()
    deadline = time.monotonic() + 20
    while "was refused" not in a.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "was refused" in a.log() and version() == ["2"]  # still serving the last good one
    with np.load(digits_dir / "eval.npz") as data:
        assert a.infer("digits", {"image": data["image"][:1]})[0] == 200
    assert a.terminate() == 0


def test_embedded_agent_counts_requests_and_never_imports_tensorflow(artifact, digits_dir, tmp_path):
    code = f"""
import json, sys
import numpy as np
from device_agent.config import load_config
from device_agent.daemon import Agent
from device_agent.serving import RequestError
config = load_config(None, dict(artifact={str(artifact)!r}, public_key={str(digits_dir / 'keys' / 'signing.pub')!r},
                                data_dir={str(tmp_path / 'data')!r}, device_id="app1", api="off"))
agent = Agent(config).start()
x = np.load({str(digits_dir / 'eval.npz')!r})["image"][:3]
out = agent.infer({{"image": x}})
try:
    agent.infer({{"image": x[:, :4]}})
except RequestError as exc:
    status = exc.status
agent.stop()
heavy = [m for m in ("tensorflow", "keras", "onnx", "tf2onnx") if m in sys.modules]
print(json.dumps({{"shape": list(out["output_0"].shape), "status": status, "heavy": heavy}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"shape": [3, 10], "status": 400, "heavy": []}
    from device_agent.telemetry import TelemetryQueue

    with TelemetryQueue(tmp_path / "data" / "telemetry.db") as queue:
        kinds = [r["kind"] for r in queue.peek(100, 1 << 20)]
    assert kinds.count("inference") == 1 and kinds.count("error") == 1


def test_state_carries_the_update_before_the_engine_runs(artifact, digits_dir, tmp_path):
    """The link publishes state as soon as it connects, before the update engine exists (at start,
    on SIGHUP). An agent restarted mid-update serves the new model then; without its update state
    the host would take it for a device that already runs the target and count it as committed."""
    from device_agent.config import load_config
    from device_agent.daemon import Agent

    config = load_config(None, dict(artifact=str(artifact), public_key=str(digits_dir / "keys" / "signing.pub"),
                                    data_dir=str(tmp_path / "data"), device_id="dev1", api="off"))
    agent = Agent(config).start()
    try:
        assert agent.updates is None  # offline: no engine, as before the engine starts
        agent.update_store.save(state="observing", rollout="r1", result=None)
        update = agent._state()["update"]
        assert update["state"] == "observing" and update["rollout"] == "r1" and "result" not in update
    finally:
        agent.stop()
