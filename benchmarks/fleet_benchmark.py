"""Fleet rollout benchmark: many devices, one Mosquitto, one ``edgeml fleet serve``.

Devices are simulated in worker processes (32 by default, so ~31 devices share a Python process
and its GIL, as 1,000 cannot share one), each with the real pieces that
carry an update: its own MQTT link (``device_agent.mqtt_link``), update engine and on-disk state
(``device_agent.updates``), and a LiteRT model service that the engine verifies, self-tests and
swaps. What a light device leaves out is the HTTP API and the telemetry recorder; it verifies
signatures in-process (one cryptography import per worker, not a child per check) and serves no
traffic, so its health windows close with zero requests (``--min-requests 0``). The devices'
data directories are in memory (/dev/shm): each real device has a disk of its own.

For 10, 100 and 1,000 devices: time from ``fleet push`` to the rollout completed (waves
1,10%,50%,100%, health window 2 s), MQTT bytes each device moved for the update against the
artifact's size (desired message, block requests and blocks, with their MQTT framing, counted at
the device), controller CPU seconds and peak RSS, broker CPU seconds.

    python benchmarks/fleet_benchmark.py [--devices 10,100,1000] [--workers 32]
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def mqtt_publish_bytes(topic: str, payload: int, properties: int = 0) -> int:
    """A QoS 1 PUBLISH on the wire with its PUBACK (MQTT 5): what one message costs."""
    remaining = 2 + len(topic.encode()) + 2 + _varint_len(properties) + properties + payload
    return 1 + _varint_len(remaining) + remaining + 4


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


# --- a worker: many light devices ---------------------------------------------------------------


def worker(args) -> None:
    """Run ``args.count`` light devices; print one JSON line per device when asked to stop."""
    from device_agent.mqtt_link import MqttLink
    from device_agent.serving import ModelService
    from device_agent.telemetry import TelemetryQueue
    from device_agent.updates import HealthMonitor, UpdateEngine, UpdateStore
    from edgeml.core.artifact import verify_artifact
    from edgeml.core.orders import verify_order

    def verified(path, key):
        return verify_artifact(path, key)

    # Light devices make no telemetry: they share one (empty) queue, so a worker holds three file
    # descriptors per device (paho's socket and wake-up pair) and stays under select()'s 1,024.
    shared_queue = TelemetryQueue(Path(args.data) / f"{args.prefix}-telemetry.db", 1 << 20)

    class LightDevice:
        def __init__(self, name: str, data_dir: Path):
            self.name = name
            self.store = UpdateStore(data_dir)
            self.service = self.load(args.artifact)
            self.store.adopt(self.service.artifact, Path(args.artifact))
            self.monitor = HealthMonitor()
            self.link = MqttLink(args.broker, "sim", name, shared_queue, state=self.state, poll_s=1.0,
                                 backoff_min=0.5, backoff_max=5.0)
            self.engine = UpdateEngine(self.store, self.link, self, self.monitor, fleet="sim", device=name,
                                       verify_file=lambda p: verified(p, args.public_key),
                                       verify_order=lambda o: verify_order(o, args.public_key), tick_s=1.0)
            self.received = 0
            self.link.start()
            self.engine.start()

        def load(self, path):
            return ModelService.load(path, args.public_key, verify=verified)

        def swap(self, service):
            self.service = service
            self.report()

        def report(self):
            self.link.publish_state()

        def state(self) -> dict:
            return {"model": self.service.name, "version": self.service.version, "sha256": self.service.sha256,
                    "content_sha256": self.service.artifact.content_sha256, "ready": True, "ts": time.time(),
                    "update": self.engine.status()}

        def wire(self) -> dict:
            """MQTT bytes this device moved for the update, counted from what its engine saw."""
            s = self.engine.stats
            prefix = f"edgeml/v1/sim/{self.name}/"
            desired = mqtt_publish_bytes(prefix + "desired", s["desired_bytes"]) if s["desired_bytes"] else 0
            blocks = s.get("blocks", 0)
            block_wire = s["block_bytes"] + blocks * (mqtt_publish_bytes(prefix + "chunks", 0, 100))
            requests = s["request_bytes"] + s["requests"] * mqtt_publish_bytes(prefix + "chunks/req", 0)
            return {"desired": desired, "requests": requests, "blocks": block_wire, "payload": s["block_bytes"]}

    devices = []
    for i in range(args.count):
        name = f"{args.prefix}-{i:04d}"
        devices.append(LightDevice(name, Path(args.data) / name))
    print(json.dumps({"ready": len(devices)}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    for d in devices:
        d.engine.stop()
        d.link.stop(flush_timeout=0)
        print(json.dumps({"device": d.name, "version": d.service.version, "wire": d.wire()}), flush=True)


# --- one run --------------------------------------------------------------------------------------


def run(n: int, workers: int, work: Path, v1: Path, v2: Path, key: Path, pub: Path) -> dict:
    from edgeml.core.artifact import read_artifact
    from edgeml.fleet.store import open_store

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    (work / "mosquitto.conf").write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\n"
                                         "allow_anonymous true\npersistence false\n"
                                         f"max_queued_messages 0\nlog_dest file {work / 'mosquitto.log'}\n")

    def raise_nofile():  # Mosquitto and the workers hold a socket per device
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                              preexec_fn=raise_nofile)
    time.sleep(0.5)
    url, db = f"mqtt://127.0.0.1:{port}", f"sqlite:///{work / 'fleet.db'}"
    serve = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "serve", "--broker", url, "--db", db],
                             stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"), preexec_fn=raise_nofile)
    procs = []
    per = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    # Each real device has its own storage; a thousand simulated ones on one disk would measure
    # that disk's fsync rate. Their data goes to memory (/dev/shm) where there is one.
    shm = Path("/dev/shm")
    devices_dir = Path(tempfile.mkdtemp(prefix="edgeml-fleet-devices-", dir=shm if shm.is_dir() else work))
    try:
        for i, count in enumerate(c for c in per if c):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--count", str(count), "--prefix", f"w{i}", "--broker", url,
                 "--artifact", str(v1), "--public-key", str(pub), "--data", str(devices_dir)],
                stdout=subprocess.PIPE, stderr=open(work / f"worker{i}.log", "wb"), text=True,
                preexec_fn=raise_nofile))
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker died: {(work / 'worker0.log').read_text()[-2000:]}")
        with open_store(db) as store:
            deadline = time.monotonic() + 300
            while len([d for d in store.known_devices("sim") if d["model_version"] == 1]) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("not every device reported v1")
                time.sleep(0.5)
        cpu0 = {"serve": proc_cpu(serve.pid), "broker": proc_cpu(broker.pid),
                "devices": sum(proc_cpu(p.pid) for p in procs)}
        started = time.monotonic()
        pushed = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "push", str(v2), "--fleet", "sim",
                                 "--key", str(key), "--waves", "1,10%,50%,100%", "--health-window", "2s",
                                 "--no-delta", "--db", db, "--json"], capture_output=True, text=True, check=True)
        rollout = json.loads(pushed.stdout)["rollout"]
        with open_store(db) as store:
            deadline, waves = time.monotonic() + 600, {}
            while (r := store.rollout(rollout))["state"] not in ("completed", "aborted", "paused"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the rollout did not finish in 10 minutes")
                waves.setdefault(r["wave"], round(time.monotonic() - started, 1))
                time.sleep(0.2)
            with store.transaction(write=False):
                assignments = store.assignments(rollout)
            states = [a["state"] for a in assignments]
        converged = time.monotonic() - started
        cpu = {k: (proc_cpu(p.pid) - cpu0[k]) for k, p in (("serve", serve), ("broker", broker))}
        cpu["devices"] = sum(proc_cpu(p.pid) for p in procs) - cpu0["devices"]
        peak = proc_peak_rss(serve.pid)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        wires = []
        for p in procs:
            out, _ = p.communicate(timeout=300)
            wires += [json.loads(line) for line in out.splitlines() if line.startswith('{"device"')]
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(devices_dir, ignore_errors=True)
    size = read_artifact(v2).size
    per_device = [w["wire"]["desired"] + w["wire"]["requests"] + w["wire"]["blocks"] for w in wires]
    return {
        "devices": n, "state": r["state"], "committed": states.count("committed"), "converge_s": round(converged, 2),
        "artifact_bytes": size, "wire_bytes_per_device_mean": round(sum(per_device) / len(per_device)),
        "wire_ratio_max": round(max(per_device) / size, 4), "wire_ratio_mean": round(sum(per_device) / len(per_device) / size, 4),
        "controller_cpu_s": round(cpu["serve"], 2), "controller_peak_rss_mib": round(peak / 2 ** 20, 1),
        "broker_cpu_s": round(cpu["broker"], 2), "on_v2": sum(1 for w in wires if w["version"] == 2),
        "simulated_devices_cpu_s": round(cpu["devices"], 1),
        "states": {s: states.count(s) for s in sorted(set(states))}, "wave_started_s": waves,
        "errors": sorted({a["detail"].get("error", "")[:160] for a in assignments if a["state"] != "committed"})[:5],
    }


def build_artifacts(work: Path):
    """v1 and v2 of the int8 digits model (the tests' model), signed with a fresh key."""
    import edgeml
    from edgeml.core.signing import generate_keys

    data = work / "digits"
    if not (data / "digits.keras").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "digits" / "train.py"), "--out", str(data)], check=True,
                       stdout=subprocess.DEVNULL)
    key, pub = generate_keys(work / "keys", force=True)
    out = []
    for version in (1, 2):
        path = work / f"digits-v{version}.edgeml"
        edgeml.optimize(edgeml.OptimizeConfig(model=data / "digits.keras", output=path, key=key,
                                              calibration=str(data / "calib.npz"), eval=str(data / "eval.npz"),
                                              recipe="int8", name="digits", version=version, latency_runs=5,
                                              plot=False))
        out.append(path)
    return out[0], out[1], key, pub


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--count", type=int)
    parser.add_argument("--prefix")
    parser.add_argument("--broker")
    parser.add_argument("--artifact")
    parser.add_argument("--public-key")
    parser.add_argument("--data")
    parser.add_argument("--devices", default="10,100,1000")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (logs, the store) to look into.")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = Path(tempfile.mkdtemp(prefix="edgeml-fleet-bench-"))
    v1, v2, key, pub = build_artifacts(work)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        row = run(n, min(args.workers, n), work / f"run-{n}", v1, v2, key, pub)
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    lines = ["| devices | converged | time to converge | MQTT bytes per device (× artifact, mean / max) | "
             "controller CPU s | controller peak RSS | broker CPU s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['committed']}/{r['devices']} | {r['converge_s']:.1f} s | "
                     f"{r['wire_bytes_per_device_mean']:,} ({r['wire_ratio_mean']:.3f} / {r['wire_ratio_max']:.3f}) | "
                     f"{r['controller_cpu_s']:.1f} | {r['controller_peak_rss_mib']:.0f} MiB | {r['broker_cpu_s']:.1f} |")
    (RESULTS / "fleet.md").write_text(f"Run of {time.strftime('%Y-%m-%d')}: `python benchmarks/fleet_benchmark.py`; "
                                      f"artifact {rows[0]['artifact_bytes']:,} bytes (int8 digits CNN, zstd).\n\n"
                                      + "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
