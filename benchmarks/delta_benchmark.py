"""When a delta pays: zstd ``--patch-from`` patches between artifacts against the whole artifact.

Trains the digits CNN (v1), then makes three kinds of v2: the same model with a new version
number (metadata only), the model fine-tuned in its last layer only (the other layers frozen),
and the model retrained from scratch with another seed. Each is optimized to fp32 and int8
``.tflite`` artifacts exactly as ``edgeml optimize`` does; the patch is what ``fleet push`` would
send a device holding v1 (made on the unpacked archives, as the device rebuilds them).

    python benchmarks/delta_benchmark.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


from edgeml.fleet.rollouts import DELTA_WORTH  # noqa: E402  (what fleet push sends)


def example():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import edgeml
    from edgeml.core.artifact import read_artifact
    from edgeml.core.artifact.reader import unpacked
    from edgeml.core.delta import apply_patch, make_patch
    from edgeml.core.signing import generate_keys

    digits = example()
    work = Path(tempfile.mkdtemp(prefix="edgeml-delta-bench-"))
    key, _ = generate_keys(work / "keys")
    v1, splits = digits.train_digits_cnn(epochs=10, seed=0)
    x_train, y_train = splits["train"]
    np.savez(work / "calib.npz", image=splits["calibration"][0])
    np.savez(work / "eval.npz", image=splits["eval"][0], y=splits["eval"][1])
    v1.save(work / "v1.keras")
    models = {"same model, new version": v1}

    head = keras.models.clone_model(v1)
    head.set_weights(v1.get_weights())
    for layer in head.layers[:-1]:
        layer.trainable = False
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    keras.utils.set_random_seed(1)
    head.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)
    models["fine-tuned last layer"] = head
    models["retrained from scratch (seed 1)"], _ = digits.train_digits_cnn(epochs=10, seed=1)

    def build(model, name, recipe, version):
        path = work / f"{name}.keras"
        model.save(path)
        out = work / f"{name}-{recipe}-v{version}.edgeml"
        edgeml.optimize(edgeml.OptimizeConfig(model=path, output=out, key=key, calibration=str(work / "calib.npz"),
                                              eval=str(work / "eval.npz"), recipe=recipe, name="digits",
                                              version=version, latency_runs=5, plot=False))
        return out

    rows = []
    for recipe in ("fp32", "int8"):
        base = build(v1, "v1", recipe, 1)
        base_zip = unpacked(base.read_bytes())
        for case, model in models.items():
            target = build(model, case.split()[0], recipe, 2)
            data = target.read_bytes()
            started = time.perf_counter()
            patch = make_patch(base_zip, unpacked(data))
            seconds = time.perf_counter() - started
            assert apply_patch(base_zip, patch, 2 << 30) == unpacked(data)  # the device rebuilds it exactly
            rows.append({"case": case, "recipe": recipe, "artifact_bytes": len(data), "patch_bytes": len(patch),
                         "ratio": round(len(patch) / len(data), 4), "make_patch_s": round(seconds, 2),
                         "accuracy": read_artifact(target).manifest["metrics"].get("accuracy")})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delta.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    lines = ["| v2 is | recipe | artifact (zstd) bytes | patch bytes | patch ÷ artifact | sent |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        sent = "patch" if r["patch_bytes"] < DELTA_WORTH * r["artifact_bytes"] else "artifact"
        lines.append(f"| {r['case']} | {r['recipe']} | {r['artifact_bytes']:,} | {r['patch_bytes']:,} | "
                     f"{r['ratio']:.3f} | {sent} |")
    (RESULTS / "delta.md").write_text(f"Run of {time.strftime('%Y-%m-%d')}: `python benchmarks/delta_benchmark.py`; "
                                      "patches from v1 of the same recipe, zstd level 19 with long-distance "
                                      "matching on the unpacked archives.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
