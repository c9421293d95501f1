"""Run the real ``edgeml-agent run`` as a subprocess and talk to it over its KServe v2 API."""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from broker import free_port


class AgentProcess:
    def __init__(self, artifact: Path, public_key: Path, data_dir: Path, *, device: str = "dev1",
                 fleet: Optional[str] = "f1",
                 broker: Optional[str] = None, config: Optional[Path] = None, extra: List[str] = (),
                 env: Optional[dict] = None, token: Optional[str] = None, tls_context=None):
        self.port = free_port()
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.parent / f"{device}-agent.log"
        self.args = [sys.executable, "-m", "device_agent.cli", "run", "--artifact", str(artifact),
                     "--public-key", str(public_key), "--data-dir", str(data_dir), "--device-id", device,
                     "--api", f"127.0.0.1:{self.port}", *extra]
        if fleet:
            self.args += ["--fleet", fleet]
        if broker:
            self.args += ["--broker", broker]
        if config:
            self.args += ["--config", str(config)]
        self.env = env
        self.token, self.tls_context = token, tls_context  # what this client sends: a bearer token, over HTTPS
        self.process: Optional[subprocess.Popen] = None
        # one connection per thread: a Poller's requests and start()'s readiness probes run at the
        # same time, and one HTTPConnection shared by two threads hands one the other's response
        self._local = threading.local()

    def start(self, timeout: float = 30.0) -> "AgentProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._log, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}: {self.log()[-800:]}")
            if self.get("/v2/health/ready")[0] == 200:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"agent not ready within {timeout}s: {self.log()[-800:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _request(self, method: str, path: str, body: Optional[bytes] = None):
        for attempt in range(2):
            try:
                conn = getattr(self._local, "conn", None)
                if conn is None:
                    conn = self._local.conn = (
                        http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.tls_context)
                        if self.tls_context is not None else http.client.HTTPConnection("127.0.0.1", self.port,
                                                                                         timeout=10))
                headers = {"Content-Type": "application/json"}
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self._local.conn = None
                if attempt:
                    return None, b""
        return None, b""

    def get(self, path: str):
        return self._request("GET", path)

    def infer(self, name: str, inputs: dict) -> tuple:
        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                           for k, v in inputs.items()]}
        status, data = self._request("POST", f"/v2/models/{name}/infer", json.dumps(body).encode())
        return status, json.loads(data) if data else None

    def infer_many(self, name: str, x: np.ndarray, n: int, input_name: str = "image") -> int:
        ok = 0
        for i in range(n):
            status, _ = self.infer(name, {input_name: x[i % len(x)][None]})
            ok += status == 200
        return ok

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        for line in text.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return float("nan")

    def terminate(self, timeout: float = 20.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self._wait(timeout)

    def kill(self) -> int:
        self.process.kill()
        return self._wait(10)

    def hup(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def _wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            conn = getattr(self._local, "conn", None)
            if conn is not None:  # other threads' connections fail on their next use and reconnect
                conn.close()
                self._local.conn = None
            self._log.close()
        return code
