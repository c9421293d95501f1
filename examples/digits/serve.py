"""Serve an artifact with the device agent and ask it a few questions over KServe v2 HTTP.

Starts ``edgeml-agent run`` (offline: no broker, telemetry stays queued on disk), waits until it
is ready, classifies some held-out digits with plain JSON requests (any KServe v2 / Triton
client works the same), shows a line of /metrics and the queued telemetry, then stops it
with SIGTERM, as systemd would.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--public-key", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--agent", default="edgeml-agent")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # interleave sensibly with the agent's stderr
    base = f"http://127.0.0.1:{free_port()}"
    agent = subprocess.Popen([args.agent, "run", "--artifact", str(args.artifact), "--public-key", str(args.public_key),
                              "--data-dir", str(args.data_dir), "--device-id", "quickstart", "--fleet", "demo",
                              "--api", base.removeprefix("http://"), "--log-level", "warning"])
    try:
        started = time.monotonic()
        while call(f"{base}/v2/health/ready")[0] != 200:
            if agent.poll() is not None or time.monotonic() - started > 30:
                print("the agent did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.05)
        _, meta = call(f"{base}/v2/models/digits-small")
        meta = json.loads(meta)
        print(f"agent ready in {time.monotonic() - started:.2f} s: {meta['name']} v{meta['versions'][0]} "
              f"({meta['platform']}), inputs {[(i['name'], i['datatype'], i['shape']) for i in meta['inputs']]}")
        with np.load(args.eval) as data:
            x, y = data["image"][:8], data["y"][:8]
        body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        status, answer = call(f"{base}/v2/models/digits-small/infer", body)
        out = json.loads(answer)["outputs"][0]
        predicted = np.array(out["data"]).reshape(out["shape"]).argmax(-1)
        print(f"POST /v2/models/digits-small/infer -> {status}: predicted {predicted.tolist()}, labels {y.tolist()}")
        status, answer = call(f"{base}/v2/models/digits-small/infer", {"inputs": [{"name": "pixels", "shape": [1],
                                                                                  "datatype": "FP32", "data": [0]}]})
        print(f"a bad request -> {status}: {json.loads(answer)['error']}")
        _, metrics = call(f"{base}/metrics")
        print("\n".join(line for line in metrics.decode().splitlines() if line.startswith("edgeml_requests_total")))
    finally:
        agent.terminate()  # SIGTERM: flush telemetry, stop cleanly
        code = agent.wait(30)
    from device_agent.telemetry import TelemetryQueue

    with TelemetryQueue(args.data_dir / "telemetry.db") as queue:
        print(f"agent stopped (exit {code}); {queue.stats()['records']} telemetry records queued on disk for a broker")
    return code


if __name__ == "__main__":
    sys.exit(main())
