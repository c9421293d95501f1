"""The update loop on one machine: a broker, the fleet controller, two devices, a rollout.

Starts Mosquitto (a child process on a free port), ``edgeml fleet serve``, and two
``edgeml-agent run`` devices serving v1 with live traffic from this script; pushes v2 in two
waves with a health window; shows each device switch, then ``edgeml fleet rollouts`` and
``edgeml fleet devices``; stops everything it started, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if not found:
        sys.exit("mosquitto is not installed (make quickstart installs Debian's package)")
    return found


def infer(port: int, x: np.ndarray):
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())["model_version"]
    except (urllib.error.URLError, OSError, ValueError):
        return None, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v1", type=Path, required=True)
    parser.add_argument("--v2", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True, help="signing.key (signing.pub beside it)")
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    edgeml, agent_bin = str(args.bin / "edgeml"), str(args.bin / "edgeml-agent")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    db = f"sqlite:///{args.work / 'fleet.db'}"
    port = free_port()
    (args.work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                              f"persistence false\nlog_dest file {args.work / 'mosquitto.log'}\n")
    children, stop = [], threading.Event()

    def start(name, command):
        log = open(args.work / f"{name}.log", "wb")
        children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        return children[-1]

    with np.load(args.eval) as data:
        images = data["image"][:50]
    try:
        start("mosquitto", [mosquitto(), "-c", str(args.work / "mosquitto.conf")])
        broker = f"mqtt://127.0.0.1:{port}"
        time.sleep(0.3)
        start("fleet-serve", [edgeml, "fleet", "serve", "--broker", broker, "--db", db])
        api = {}
        for device in ("cam-1", "cam-2"):
            api[device] = free_port()
            start(device, [agent_bin, "run", "--artifact", str(args.v1), "--public-key", str(args.key.with_suffix(".pub")),
                           "--data-dir", str(args.work / device), "--device-id", device, "--fleet", "demo",
                           "--broker", broker, "--api", f"127.0.0.1:{api[device]}"])
        served = {d: {"failed": 0} for d in api}

        def traffic(device, port):  # live requests, so each device has evidence to judge the new model by
            i = 0
            while not stop.is_set():
                status, version = infer(port, images[i % len(images)][None])
                key = version if status == 200 else "failed"
                served[device][key] = served[device].get(key, 0) + 1
                i += 1
                stop.wait(0.02)

        deadline = time.monotonic() + 30
        while any(infer(p, images[:1])[0] != 200 for p in api.values()):
            if time.monotonic() > deadline:
                raise SystemExit("the agents did not become ready")
            time.sleep(0.1)
        for device, p in api.items():
            threading.Thread(target=traffic, args=(device, p), daemon=True).start()
        while True:  # the controller knows the devices once their retained state has arrived
            known = json.loads(subprocess.run([edgeml, "fleet", "devices", "--db", db, "--json"], capture_output=True,
                                              text=True).stdout or '{"devices": []}')["devices"]
            if len([d for d in known if d["model_version"] == 1]) == 2:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the controller did not see both devices")
            time.sleep(0.2)
        print("two devices serve digits v1; pushing v2 in two waves (health window 5 s, at least 20 requests each)")
        push = [edgeml, "fleet", "push", str(args.v2), "--fleet", "demo", "--key", str(args.key),
                "--waves", "1,100%", "--health-window", "5s", "--min-requests", "20", "--delta-base", str(args.v1),
                "--db", db]
        print("$ " + " ".join(Path(c).name if c == edgeml else c for c in push).replace(str(args.work) + "/", ""))
        pushed = subprocess.run(push + ["--json"], capture_output=True, text=True)
        if pushed.returncode != 0:
            raise SystemExit(f"push failed: {pushed.stderr.strip()}")
        rollout = json.loads(pushed.stdout)["rollout"]
        seen, deadline = {}, time.monotonic() + 120
        while True:
            shown = json.loads(subprocess.run([edgeml, "fleet", "rollout", "show", rollout, "--db", db, "--json"],
                                              capture_output=True, text=True).stdout)
            for d in shown["devices"]:
                if seen.get(d["device"]) != d["state"]:
                    seen[d["device"]] = d["state"]
                    ev = d.get("evidence") or {}
                    said = (f" ({ev['requests']} requests in its window, p95 {ev['latency_p95_ms']:.2f} ms against "
                            f"{ev['reference']['latency_p95_ms']:.2f} ms for v1)") if ev.get("latency_p95_ms") else ""
                    print(f"  {time.strftime('%H:%M:%S')} {d['device']} (wave {d['wave']}): {d['state']}{said}")
            if shown["state"] in ("completed", "aborted", "paused"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the rollout did not finish: {shown['state']}")
            time.sleep(0.3)
        stop.set()
        for command in ([edgeml, "fleet", "rollouts", "--db", db], [edgeml, "fleet", "devices", "--db", db]):
            print("$ " + " ".join(c if c != edgeml else "edgeml" for c in command).replace(str(args.work) + "/", ""))
            subprocess.run(command)
        for device, counts in served.items():
            print(f"{device} answered {counts.get('1', 0)} requests with v1 and {counts.get('2', 0)} with v2; "
                  f"{counts['failed']} failed")
        return 0 if shown["state"] == "completed" else 1
    finally:
        stop.set()
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in reversed(children):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
