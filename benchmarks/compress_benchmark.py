"""Pruning and distillation that reach the device: dense int8 against pruned + int8 and distilled + pruned + int8.

Two Keras models trained here on scikit-learn's bundled digits (offline):
  digits CNN  (8x8 input, ~151k parameters; examples/digits/train.py)
  wide CNN    (the digits upscaled to 16x16, ~620k parameters)
Each row is one ``edgeml.optimize`` run through the library API; bytes, zstd bytes (what
shipping costs), accuracy on the 400 held-out digits and single-thread latency are all measured
by edgeml itself and shown as ratios to the dense fp32 model.

Targets (issue 3): at 75% sparsity, int8 + zstd <= 0.10x the fp32 bytes with <= 1 point accuracy
drop; a student with <= 0.3x the teacher's parameters within 2 points of the teacher.

Run: .venv/bin/python benchmarks/compress_benchmark.py   (writes benchmarks/results/compress.{md,json})
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
sys.path.insert(0, str(ROOT / "examples" / "digits"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import train as digits  # noqa: E402

ROWS = [
    ("dense int8", {}),
    ("50% pruned + int8", {"prune": 0.5}),
    ("75% pruned + int8", {"prune": 0.75}),
    ("90% pruned + int8", {"prune": 0.9}),
    ("distilled (width 0.5) + 75% pruned + int8", {"student_width": 0.5, "prune": 0.75}),
]


def build_wide_cnn():
    import keras

    inputs = keras.Input((16, 16, 1), name=digits.INPUT_NAME)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="wide_cnn")


def upscale(x: np.ndarray) -> np.ndarray:
    return np.kron(x, np.ones((1, 2, 2, 1), np.float32))  # 8x8 -> 16x16, nearest neighbour


def prepare(name: str, out: Path, epochs: int) -> Path:
    """Train the model and write model.keras, train/calib/eval .npz into ``out``."""
    import keras

    keras.utils.set_random_seed(0)
    splits = digits.digits_splits(0)
    if name == "wide":
        splits = {k: (upscale(x), y) for k, (x, y) in splits.items()}
        model = build_wide_cnn()
    else:
        model = digits.build_digits_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*splits["train"], epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    n = digits.INPUT_NAME
    np.savez(out / "train.npz", **{n: splits["train"][0], "y": splits["train"][1]})
    np.savez(out / "calib.npz", **{n: splits["calibration"][0]})
    np.savez(out / "eval.npz", **{n: splits["eval"][0], "y": splits["eval"][1]})
    return out


def run_row(folder: Path, keys: Path, label: str, extra: dict, seed: int) -> dict:
    import edgeml
    from edgeml.core.errors import AccuracyGoalNotMet

    config = edgeml.OptimizeConfig(
        model=folder / "model.keras", output=folder / f"{label.split()[0]}-{len(extra)}-{extra.get('prune', 0)}.edgeml",
        key=keys / "signing.key", calibration=str(folder / "calib.npz"), eval=str(folder / "eval.npz"),
        train=str(folder / "train.npz") if extra else None, recipe="int8", plot=False, seed=seed,
        latency_runs=200, **extra)
    started = time.perf_counter()
    try:
        result = edgeml.optimize(config)
    except AccuracyGoalNotMet as exc:
        result = exc.result
    seconds = time.perf_counter() - started
    base = result.baseline
    c = result.chosen
    total = c.total if c.total is not None else c.quality
    stages = {s.stage: s for s in result.stages}
    params = stages["original"].params if stages else None
    final_stage = [s for s in result.stages if s.passed][-1] if result.stages else None
    return {
        "row": label,
        "goal_met": result.goal_met,
        "failed_stages": [s.stage for s in result.failed_stages],
        "fp32_bytes": base.bytes,
        "fp32_accuracy": base.quality.accuracy,
        "fp32_latency_ms": base.latency.median_ms,
        "bytes": c.bytes,
        "zstd_bytes": c.zstd_bytes,
        "artifact_bytes": result.artifact_bytes,
        "accuracy": total.accuracy,
        "latency_ms": c.latency.median_ms,
        "params_ratio": (final_stage.params / params) if final_stage and params else 1.0,
        "nonzero_ratio": (final_stage.nonzero_params / params) if final_stage and params else 1.0,
        "seconds": seconds,
    }


def table(name: str, rows: list) -> str:
    lines = [f"### {name}", "",
             "| model | params × | nonzero × | bytes × fp32 | zstd bytes × fp32 | accuracy (Δ points) | latency × fp32 | gates |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    base = rows[0]
    lines.append(f"| fp32 (dense) | 1.00 | 1.00 | 1.000 ({base['fp32_bytes']:,} B) | – | {base['fp32_accuracy']:.4f} | "
                 f"1.00 ({base['fp32_latency_ms']:.3f} ms) | |")
    for r in rows:
        fp32 = r["fp32_bytes"]
        delta = 100 * (r["accuracy"] - r["fp32_accuracy"])
        gates = "met" if r["goal_met"] else "missed: " + (", ".join(r["failed_stages"]) or "quantize")
        lines.append(f"| {r['row']} | {r['params_ratio']:.2f} | {r['nonzero_ratio']:.2f} | {r['bytes'] / fp32:.3f} | "
                     f"{r['zstd_bytes'] / fp32:.3f} ({r['zstd_bytes']:,} B) | {r['accuracy']:.4f} ({delta:+.2f}) | "
                     f"{r['latency_ms'] / r['fp32_latency_ms']:.2f} | {gates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,wide")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from edgeml.core.signing import generate_keys

    work = Path(tempfile.mkdtemp(prefix="edgeml-compress-bench-"))
    keys = work / "keys"
    generate_keys(keys)
    results, sections = {}, []
    for name in args.models.split(","):
        folder = prepare(name, work / name, epochs=10)
        rows = []
        for label, extra in ROWS:
            print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
            rows.append(run_row(folder, keys, label, extra, seed=0))
        results[name] = rows
        sections.append(table({"digits": "digits CNN (8x8, 151k parameters)",
                               "wide": "wide CNN (digits at 16x16, 620k parameters)"}[name], rows))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    text = "\n\n".join([
        f"# Pruning and distillation benchmark\n\nRun {stamp} UTC with `.venv/bin/python benchmarks/compress_benchmark.py` "
        "(1 thread, batch 1, .tflite on LiteRT). Ratios are to the dense fp32 model; accuracy is on 400 held-out digits; "
        "zstd is level 19, as the artifact ships. 'params ×' and 'nonzero ×' count the Keras model's weights.",
        *sections])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress.md").write_text(text + "\n")
    (args.out / "compress.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
