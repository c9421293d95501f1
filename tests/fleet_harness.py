"""What the fleet-update tests share: artifacts of several versions (good and bad ones, all real
models), ``edgeml fleet serve`` as a real process, the CLI, a client that polls an agent the
whole time, a stand-in host for the faults a real controller would never produce, and a TCP
proxy that slows or corrupts the wire."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from broker import free_port
from waiting import wait_until

from edgeml.core import mqtt_contract as contract
from edgeml.core import update_contract as uc

# --- artifacts ---------------------------------------------------------------------------------


def resign(source: Path, out: Path, key, *, version: int, name: Optional[str] = None, model: Optional[bytes] = None,
           fmt: Optional[str] = None, selftest_outputs=None, selftest_inputs=None) -> Path:
    """A new signed artifact from an existing one: another version, model or reference outputs."""
    from edgeml.core.artifact import read_artifact, write_artifact

    art = read_artifact(source)
    manifest = dict(art.manifest, version=version, name=name or art.manifest["name"])
    for k in ("schema_version", "format", "model_member", "members"):
        manifest.pop(k, None)
    write_artifact(out, model=model if model is not None else art.model, model_format=fmt or art.model_format,
                   manifest=manifest, selftest_inputs=selftest_inputs if selftest_inputs is not None
                   else art.selftest_inputs, selftest_outputs=selftest_outputs if selftest_outputs is not None
                   else art.selftest_outputs, baseline=art.baseline, private_key=key)
    return out


def later_versions(v1: Path, folder: Path, key) -> dict:
    """v1 and the same model signed again as v2 and v3."""
    return {1: v1, 2: resign(v1, folder / "v2.edgeml", key, version=2), 3: resign(v1, folder / "v3.edgeml", key, version=3)}


def trap_model(kind: str, threshold: float = 2.0) -> bytes:
    """An ONNX digits classifier ("image" [N,8,8,1] -> "probs" [N,10]) that is fine on inputs like
    its reference ones (pixels in [0, 1]) and goes wrong on live inputs brighter than
    ``threshold``: ``slow`` loops ~50x longer, ``errors`` fails in ONNX Runtime (a Reshape to a
    shape its data does not fit)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["scores"], axis=-1)]
    inits = [w, numpy_helper.from_array(np.array(threshold, np.float32), "threshold")]
    if kind == "slow":
        # trip count = max(0, sum(image) - 100): 0 for a digit (pixels in [0, 1], sums below 40),
        # ~1000 for a 50x brighter one
        inits += [numpy_helper.from_array(np.array(100.0, np.float32), "floor"),
                  numpy_helper.from_array(np.ones(4096, np.float32), "v0"),
                  numpy_helper.from_array(np.array(True), "cond")]
        nodes += [helper.make_node("ReduceSum", ["image"], ["total"], keepdims=0),
                  helper.make_node("Sub", ["total", "floor"], ["over"]),
                  helper.make_node("Relu", ["over"], ["trips_f"]),
                  helper.make_node("Cast", ["trips_f"], ["trips"], to=TensorProto.INT64),
                  helper.make_node("Loop", ["trips", "cond", "v0"], ["v_out"], body=_loop_body()),
                  helper.make_node("ReduceSum", ["v_out"], ["noise"], keepdims=0),
                  helper.make_node("Mul", ["noise", "zero"], ["nothing"]),
                  helper.make_node("Add", ["scores", "nothing"], ["probs"])]
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    else:
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
                  numpy_helper.from_array(np.array([10], np.int64), "ten")]
        nodes += [helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
                  helper.make_node("Greater", ["peak", "threshold"], ["bright"]),
                  helper.make_node("Cast", ["bright"], ["extra"], to=TensorProto.INT64),
                  helper.make_node("Unsqueeze", ["extra", "axes0"], ["extra1"]),
                  helper.make_node("Add", ["ten", "extra1"], ["width"]),
                  helper.make_node("Concat", ["minus1", "width"], ["shape"], axis=0),
                  helper.make_node("Reshape", ["scores", "shape"], ["probs"])]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    graph = helper.make_graph(
        nodes, f"digits_{kind}", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 8, 8, 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _loop_body():
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Sin", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4096])])


def trap_artifact(source: Path, out: Path, key, kind: str, version: int) -> Path:
    """``trap_model`` as a signed artifact whose self-test passes (reference outputs from ORT)."""
    from edgeml.core.artifact import read_artifact
    from edgeml.core.runtime import load_runner

    art = read_artifact(source)
    model = trap_model(kind)
    inputs = {"image": np.asarray(art.selftest_inputs[next(iter(art.selftest_inputs))], np.float32)}
    outputs = load_runner(model, "onnx").run(inputs)
    return resign(source, out, key, version=version, model=model, fmt="onnx", selftest_inputs=inputs,
                  selftest_outputs={"probs": np.asarray(outputs["probs"])})


# --- the host side -------------------------------------------------------------------------------


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def cli_json(*args) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class FleetServe:
    """``edgeml fleet serve`` as a real process."""

    def __init__(self, broker_url: str, db_url: str, log: Path, http: bool = False, extra=()):
        self.args = [sys.executable, "-m", "edgeml.cli", "fleet", "serve", "--broker", broker_url, "--db", db_url,
                     *extra]
        self.http_port = free_port() if http else None
        if http:
            self.args += ["--http", f"127.0.0.1:{self.http_port}"]
        self.log_path = Path(log)
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "FleetServe":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._log)
        wait_until(lambda: "serving" in self.log() or self.process.poll() is not None, 30, "fleet serve to start")
        assert self.process.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
            self._log.close()
            return code
        return self.process.returncode if self.process else 0


def show(db_url: str, rollout_id: str) -> dict:
    return cli_json("fleet", "rollout", "show", rollout_id, "--db", db_url)


def devices(db_url: str) -> dict:
    return {d["device"]: d for d in cli_json("fleet", "devices", "--db", db_url)["devices"]}


def wait_for_rollout(db_url: str, rollout_id: str, states, timeout: float = 90.0) -> dict:
    seen = {}

    def check():
        seen.update(show(db_url, rollout_id))
        return seen if seen["state"] in states else None

    try:
        return wait_until(check, timeout, f"rollout {rollout_id} to be {states}", interval=0.5)
    except AssertionError:
        print("ROLLOUT", json.dumps(seen, indent=1, default=str)[-4000:])
        raise


# --- a client polling an agent the whole time -------------------------------------------------------


class Poller:
    """Inference requests against an agent in a loop (as live traffic), recording every answer:
    (status or None when the process was down, model version, sha256 served)."""

    def __init__(self, agent, images: np.ndarray, scale: float = 1.0, pause: float = 0.01):
        self.agent, self.images, self.scale, self.pause = agent, images, scale, pause
        self.answers: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            x = self.images[i % len(self.images)][None] * self.scale
            try:
                status, body = self.agent.infer("digits", {"image": x.astype(np.float32)})
            except Exception:  # the process is being killed
                status, body = None, None
            self.answers.append((status, (body or {}).get("model_version"), time.monotonic()))
            i += 1
            self._stop.wait(self.pause)

    def stop(self) -> List[tuple]:
        self._stop.set()
        self._thread.join(10)
        return self.answers

    def served(self, version: str) -> int:
        return sum(1 for s, v, _ in self.answers if s == 200 and v == version)


# --- a stand-in host -----------------------------------------------------------------------------------


class FakeHost:
    """Publishes desired messages and answers block requests the way a test needs: in order or
    reversed, every block twice, changed, or not at all. Faults a real controller does not make,
    but a broker, a network or an attacker can."""

    def __init__(self, port: int, fleet: str = "f1"):
        import paho.mqtt.client as mqtt

        self.fleet = fleet
        self.blobs = {}  # transfer id -> (bytes, block size)
        self.mode = "normal"  # normal | reversed_twice | corrupt_first | silent
        self.requests = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-host", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{contract.PREFIX}/{fleet}/+/chunks/req", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def offer(self, device: str, artifact: Path, *, rollout: str = "fake", order=None, block_size: int = 4096,
              health: Optional[uc.Health] = None) -> uc.Desired:
        from edgeml.core.artifact import read_artifact

        data = Path(artifact).read_bytes()
        art = read_artifact(artifact)
        full = uc.Transfer.of(data, "full", block_size)
        self.blobs[full.id] = (data, block_size)
        target = {"name": art.manifest["name"], "version": art.manifest["version"], "sha256": art.sha256,
                  "content_sha256": art.content_sha256, "size": art.size, "format": art.model_format}
        desired = uc.Desired(self.fleet, device, rollout, time.time(), target, full, None,
                             health or uc.Health(window_s=1.0), order)
        self.publish_desired(device, desired.encode())
        return desired

    def publish_desired(self, device: str, payload: bytes) -> None:
        self.client.publish(contract.topic(self.fleet, device, "desired"), payload, qos=1, retain=True).wait_for_publish(10)

    def _on_message(self, client, userdata, message) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        fleet, device, _ = contract.parse_topic(message.topic)
        transfer_id, blocks, token = uc.decode_request(message.payload)
        self.requests.append((device, blocks))
        if self.mode == "silent" or transfer_id not in self.blobs:
            return
        data, size = self.blobs[transfer_id]
        order = list(reversed(blocks)) * 2 if self.mode == "reversed_twice" else blocks
        for n, index in enumerate(order):
            block = data[index * size:(index + 1) * size]
            if self.mode == "corrupt_first" and len(self.requests) == 1 and n == 0:
                block = bytes([block[0] ^ 0xFF]) + block[1:]
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("id", transfer_id), ("block", str(index)), ("token", token)]
            client.publish(contract.topic(fleet, device, "chunks"), block, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- a slow wire ----------------------------------------------------------------------------------------


class SlowProxy:
    """A TCP proxy in front of the broker that passes at most ``rate`` bytes/s toward the client,
    so a download takes long enough for a fault to land in the middle of it."""

    def __init__(self, target_port: int, rate: float):
        self.target_port, self.rate = target_port, rate
        self.port = free_port()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(16)
        self._stop = threading.Event()
        self._pairs = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client, upstream) -> None:
        budget, last = 0.0, time.monotonic()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in ready:
                    data = sock.recv(4096 if sock is upstream else 65536)
                    if not data:
                        raise OSError("closed")
                    if sock is upstream:
                        for i in range(0, len(data), 512):
                            piece = data[i:i + 512]
                            now = time.monotonic()
                            budget = min(budget + (now - last) * self.rate, self.rate)
                            last = now
                            if budget < len(piece):
                                time.sleep((len(piece) - budget) / self.rate)
                                budget = len(piece)
                            budget -= len(piece)
                            client.sendall(piece)
                    else:
                        upstream.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for a, b in self._pairs:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def state_file(data_dir: Path) -> dict:
    path = Path(data_dir) / "updates" / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_state(data_dir: Path, check: Callable[[dict], bool], timeout: float = 60.0, what: str = "update state"):
    return wait_until(lambda: (lambda s: s if s and check(s) else None)(state_file(data_dir)), timeout, what, 0.02)


def env_with(**values) -> dict:
    return {**os.environ, **{k: str(v) for k, v in values.items()}}
