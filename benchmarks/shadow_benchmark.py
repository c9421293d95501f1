"""Shadow evaluation on the device: what a shadow at sample 1.0 (the candidate runs on every
request) costs the active model's answers, and how much of the traffic the shadow keeps up with.

Measured on the digits CNN artifact (int8 .tflite) that ``make quickstart`` builds; the candidate
is the same model signed as v2 (so agreement must be 100%, a check on the comparison itself).
One agent; the shadow is switched on and off in alternating blocks of requests, so both
conditions see the same process, the same warm caches and the same moments of the machine:

  in-process  ``Agent.infer`` on one image, the caller in the agent's process
  HTTP        the KServe v2 JSON API, the agent in a child process, the client in this one

Run: .venv/bin/python benchmarks/shadow_benchmark.py   (writes benchmarks/results/shadow.{md,json})
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from agent_benchmark import build_artifact, percentiles  # noqa: E402

BLOCK = 250  # requests per block; blocks alternate shadow off / on


def start_agent(artifact: Path, pub: Path, data: Path, api: str):
    from device_agent.config import load_config
    from device_agent.daemon import Agent

    return Agent(load_config(None, dict(artifact=artifact, public_key=pub, data_dir=data, device_id="bench",
                                        api=api, stats_window_s=3600.0, drift=False))).start()


def toggle(agent, candidate_path: Path, pub: Path, on: bool, sample: float = 1.0) -> None:
    from device_agent.serving import ModelService

    if on:
        agent.start_shadow(ModelService.load(candidate_path, pub), sample, "bench")
        assert agent.shadow.ready.wait(60), agent.shadow.status()  # its process loaded the candidate
    else:
        agent.stop_shadow()


def blocks(call, set_shadow, rounds: int) -> dict:
    """Alternating blocks of ``BLOCK`` requests with the shadow off and on; per condition, p50/p99."""
    times = {"off": [], "on": []}
    for _ in range(BLOCK):  # warm-up
        call()
    for r in range(rounds):
        for cond in (("off", "on") if r % 2 == 0 else ("on", "off")):
            set_shadow(cond == "on")
            for _ in range(BLOCK):
                t = time.perf_counter()
                call()
                times[cond].append((time.perf_counter() - t) * 1000)
    set_shadow(False)
    return {k: percentiles(v) for k, v in times.items()}


def in_process(artifact, candidate, pub, x, work, rounds, sample: float = 1.0) -> dict:
    agent = start_agent(artifact, pub, work / f"inproc-{sample}", "off")

    def set_shadow(on):
        if on != (agent.shadow is not None):
            toggle(agent, candidate, pub, on, sample)

    seen = []
    agent._shadow_record = seen.append  # the windows the shadow closes, to read its counts
    result = blocks(lambda: agent.infer({"image": x[:1]}), set_shadow, rounds)
    agent.stop()
    return {"latency": result, "shadow": _added(seen)}


def _added(records) -> dict:
    from edgeml.core.shadow import summarize

    return summarize(records)


def over_http(artifact, candidate, pub, x, work, rounds) -> dict:
    """The agent in a child process (``--serve``), told over stdin to start and stop the shadow."""
    from broker import free_port

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(artifact), str(candidate), str(pub),
                              str(work / "http"), f"127.0.0.1:{port}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ready"
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": x[:1].ravel().tolist()}]})

    def call():
        conn.request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200

    def set_shadow(on):
        child.stdin.write("on\n" if on else "off\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ok"

    result = blocks(call, set_shadow, rounds)
    child.stdin.write("quit\n")
    child.stdin.flush()
    shadow = json.loads(child.stdout.readline())
    child.wait(30)
    return {"latency": result, "shadow": shadow}


def serve(artifact, candidate, pub, data, api) -> None:
    agent = start_agent(Path(artifact), Path(pub), Path(data), api)
    seen = []
    agent._shadow_record = seen.append
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if (cmd == "on") != (agent.shadow is not None):
            toggle(agent, Path(candidate), Path(pub), cmd == "on")
        print("ok", flush=True)
    agent.stop()
    print(json.dumps(_added(seen)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=12, help="pairs of blocks of 250 requests")
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    from fleet_harness import resign

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact, pub, x = build_artifact(work)
        candidate = resign(artifact, work / "v2.edgeml", work / "keys" / "signing.key", version=2)
        x = np.asarray(x, np.float32)
        results = {"in_process": in_process(artifact, candidate, pub, x, work, args.rounds),
                   "http": over_http(artifact, candidate, pub, x, work, args.rounds),
                   "in_process_sample_0.2": in_process(artifact, candidate, pub, x, work, args.rounds, 0.2)}
    results["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "command": "python benchmarks/shadow_benchmark.py", "cpu": os.cpu_count(),
                      "requests_per_condition": args.rounds * BLOCK}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shadow.json").write_text(json.dumps(results, indent=1))
    (out / "shadow.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    lines = [f"# Shadow benchmark\n\nRun {r['run']['date']} with `{r['run']['command']}` on {r['run']['cpu']} cores; "
             "digits CNN artifact (int8 .tflite), the candidate the same model signed as v2, sample 1.0 (the "
             f"candidate runs on every request); {r['run']['requests_per_condition']:,} single-image requests per "
             f"condition, in alternating blocks of {BLOCK}.\n",
             "| path | shadow | p50 ms | p99 ms | n |", "|---|---|---:|---:|---:|"]
    paths = (("in_process", "in-process"), ("http", "HTTP (JSON)"), ("in_process_sample_0.2", "in-process, sample 0.2"))
    for where, label in paths:
        for cond in ("off", "on"):
            v = r[where]["latency"][cond]
            lines.append(f"| {label} | {cond} | {v['p50_ms']:.4f} | {v['p99_ms']:.4f} | {v['n']} |")
    lines.append("")
    for where, label in paths:
        lat, s = r[where]["latency"], r[where]["shadow"]
        added = 100 * (lat["on"]["p50_ms"] - lat["off"]["p50_ms"]) / lat["off"]["p50_ms"]
        lines.append(f"- {label}: the shadow adds {added:+.1f}% to the active model's p50 (target within 5%); it "
                     f"compared {s['compared']:,} of {s['sampled']:,} sampled requests, dropped {s['dropped']:,} "
                     f"(queue full), {s['errors']} errors, top-1 agreement {s['top1_agreement']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
