"""Drift monitoring on the device: what it costs on the request path, the memory it holds, how
soon it alerts after a shift, and how often it alerts on traffic that has not shifted.

Measured on the digits CNN artifact (int8 .tflite) that ``make quickstart`` builds; its baseline
is the 200 calibration images, and "in-distribution" traffic is drawn from the 1,197 training
images (same distribution, never in the baseline).

  overhead   p50/p99 of one single-sample inference with the monitor on and off, two agents
             side by side, requests alternating between them (in-process, and over HTTP)
  memory     the monitor's state (every histogram, its baseline and edges), for this model and
             for a 224x224x3 image input and a 256-feature tabular input
  delay      from the start of a shift to the alert, default settings (60 s windows, 10 judged,
             200 samples), at 1, 10 and 50 requests/s, on a simulated clock (a real one would
             take hours); shifts: washed-out images (x * 0.4 + 0.6) and a mild brightening (+0.15)
  false      alerts raised over 10,000 in-distribution requests (target 0), at 10 and 50 req/s

Run: .venv/bin/python benchmarks/monitor_benchmark.py   (writes benchmarks/results/monitor.{md,json})
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from agent_benchmark import build_artifact, percentiles  # noqa: E402
from agent_proc import AgentProcess  # noqa: E402


def interleaved(calls: dict, n: int, warmup: int = 200) -> dict:
    """p50/p99 of each call, alternating between them so both see the same machine."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {k: [] for k in calls}
    for _ in range(n):
        for k, call in calls.items():
            t = time.perf_counter()
            call()
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: percentiles(v) for k, v in times.items()}


def overhead(artifact: Path, pub: Path, x: np.ndarray, work: Path, n: int) -> dict:
    from device_agent.config import load_config
    from device_agent.daemon import Agent

    one = x[:1]
    agents = {}
    for label, drift in (("off", False), ("on", True)):
        agents[label] = Agent(load_config(None, dict(artifact=artifact, public_key=pub, data_dir=work / f"inproc-{label}",
                                                     device_id="bench", api="off", drift=drift))).start()
    inproc = interleaved({f"in-process, drift {k}": (lambda a=a: a.infer({"image": one})) for k, a in agents.items()}, n)
    for a in agents.values():
        a.stop()
    procs = {label: AgentProcess(artifact, pub, work / f"http-{label}", device=f"http-{label}",
                                 extra=["--drift", label]).start() for label in ("off", "on")}
    http = interleaved({f"HTTP (JSON), drift {k}": (lambda p=p: p.infer("digits", {"image": one})) for k, p in procs.items()},
                       n)
    for p in procs.values():
        p.terminate()
    return {**inproc, **http}


def memory(baseline: dict) -> dict:
    from device_agent.monitoring.drift import DriftMonitor, DriftSettings
    from edgeml.core.stats import baseline_stats, output_stats

    rng = np.random.default_rng(0)
    cases = {"digits CNN (8x8x1 image, 10 classes)": baseline}
    image = baseline_stats({"image": rng.random((32, 224, 224, 3)).astype(np.float32)})
    image["outputs"] = output_stats({"scores": rng.normal(size=(32, 1000))}, {"scores": "agreement"})
    cases["224x224x3 image, 1000 classes"] = image
    tabular = baseline_stats({"features": rng.normal(size=(2000, 256)).astype(np.float32)})
    tabular["outputs"] = output_stats({"value": rng.normal(size=(2000, 1))}, {"value": "cosine"})
    cases["256 features, one regression output"] = tabular
    return {name: DriftMonitor(b, "m", 1, "0" * 64, DriftSettings(), emit=lambda r: None, start=False).memory_bytes()
            for name, b in cases.items()}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(baseline: dict, runner, traffic, rate: float, seconds: float, shift_at: float = None):
    """Serve ``traffic(i)`` at ``rate`` requests/s for ``seconds`` of simulated time with the
    default settings; returns the alerts raised (with their simulated time)."""
    from device_agent.monitoring.drift import DriftMonitor, DriftSettings

    clock, raised = Clock(), []
    monitor = DriftMonitor(baseline, "digits", 1, "0" * 64, DriftSettings(), start=False, clock=clock,
                           emit=lambda r: raised.append((clock.now, r)) if r["kind"] == "alert" and r["state"] == "raised" else None)
    step, i = 1.0 / rate, 0
    while clock.now < seconds:
        x = traffic(i, clock.now)
        monitor.inference("digits", 1, 0.0, {"image": x}, runner.run({"image": x}))
        monitor.drain()
        i += 1
        clock.now += step
        monitor.tick()
    return raised, i


def delays(baseline: dict, runner, train: np.ndarray, shifts: dict, rates=(1, 10, 50)) -> list:
    rng = np.random.default_rng(1)
    rows = []
    for shift_name, shift in shifts.items():
        for rate in rates:
            start = 1200.0  # 20 minutes of normal traffic first: the window is full and calm

            def traffic(i, now):
                x = train[rng.integers(len(train))][None]
                return shift(x) if now >= start else x

            raised, _ = simulate(baseline, runner, traffic, rate, start + 3600)
            first = {}
            for t, r in raised:
                first.setdefault(r["alert"], t)
            before = [r for t, r in raised if t < start]
            rows.append({"shift": shift_name, "rate": rate, "false_before_shift": len(before),
                         **{f"{k}_delay_s": round(v - start, 1) for k, v in sorted(first.items()) if v >= start}})
    return rows


def false_alerts(baseline: dict, runner, train: np.ndarray, rates=(10, 50), requests: int = 10_000) -> list:
    rng = np.random.default_rng(2)
    rows = []
    for rate in rates:
        raised, n = simulate(baseline, runner, lambda i, now: train[rng.integers(len(train))][None], rate,
                             requests / rate)
        rows.append({"rate": rate, "requests": n, "alerts": len(raised),
                     "kinds": sorted({r["alert"] for _, r in raised})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--n", type=int, default=3000, help="requests per overhead measurement")
    args = parser.parse_args()
    from edgeml.core.artifact import read_artifact
    from edgeml.core.runtime import load_runner
    from train import digits_splits

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact, pub, x = build_artifact(work)
        art = read_artifact(artifact)
        runner = load_runner(art.model, "tflite", num_threads=1)
        train = digits_splits(0)["train"][0]
        results = {"overhead": overhead(artifact, pub, x, work, args.n), "memory_bytes": memory(art.baseline)}
        shifts = {"washed out (x * 0.4 + 0.6)": lambda v: np.clip(v * 0.4 + 0.6, 0, 1).astype(np.float32),
                  "brighter (+0.15)": lambda v: np.clip(v + 0.15, 0, 1).astype(np.float32)}
        results["delay"] = delays(art.baseline, runner, train, shifts)
        results["false_alerts"] = false_alerts(art.baseline, runner, train)
    results["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "command": "python benchmarks/monitor_benchmark.py", "cpu": os.cpu_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor.json").write_text(json.dumps(results, indent=1))
    (out / "monitor.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    lines = [f"# Drift monitor benchmark\n\nRun {r['run']['date']} with `{r['run']['command']}`; digits CNN artifact "
             "(int8 .tflite), baseline = its 200 calibration images, in-distribution traffic = the 1,197 training "
             "images.\n", "## Request path (single-sample inference, alternating requests)\n",
             "| path | p50 ms | p99 ms | n |", "|---|---:|---:|---:|"]
    for k, v in r["overhead"].items():
        lines.append(f"| {k} | {v['p50_ms']:.4f} | {v['p99_ms']:.4f} | {v['n']} |")
    o = r["overhead"]
    for where in ("in-process", "HTTP (JSON)"):
        off, on = o[f"{where}, drift off"]["p50_ms"], o[f"{where}, drift on"]["p50_ms"]
        lines.append(f"\n{where}: drift adds {100 * (on - off) / off:+.1f}% to p50 (target <= 5%)")
    lines += ["\n## Memory of the drift state\n", "| model | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in r["memory_bytes"].items()]
    lines += ["\n## Delay from the start of a shift to the alert (default settings, simulated clock)\n",
              "| shift | requests/s | input_drift s | prediction_drift s | confidence_drop s | false alerts before |",
              "|---|---:|---:|---:|---:|---:|"]
    for d in r["delay"]:
        lines.append(f"| {d['shift']} | {d['rate']} | {d.get('input_drift_delay_s', '-')} | "
                     f"{d.get('prediction_drift_delay_s', '-')} | {d.get('confidence_drop_delay_s', '-')} | "
                     f"{d['false_before_shift']} |")
    lines += ["\n## False alerts on in-distribution traffic (target 0)\n", "| requests/s | requests | alerts | kinds |",
              "|---:|---:|---:|---|"]
    lines += [f"| {f['rate']} | {f['requests']:,} | {f['alerts']} | {', '.join(f['kinds']) or '-'} |"
              for f in r["false_alerts"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
