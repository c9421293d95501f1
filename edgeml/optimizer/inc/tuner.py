"""``--tuner inc``: accuracy-aware int8 tuning of ONNX models with Intel Neural Compressor.

Neural Compressor's ONNX Runtime support (the ``onnx-neural-compressor`` package) pins
NumPy < 2, which the main environment (TensorFlow on NumPy 2) cannot use. So it lives in a
virtualenv of its own (``.venv-inc``, from requirements-inc.txt) and runs as a subprocess:
the ``worker`` folder next to this module reads a request JSON plus .npz files and writes the tuned model and a
result JSON. This module prepares the model (``edgeml.optimizer.sources.onnx_prepare``), writes those files,
runs the worker, and turns its answer into a ``Candidate``.

The worker scores every trial on the eval data (accuracy with labels, otherwise top-1 agreement
with the float reference), stops at the first trial within ``max_drop`` of the float score, and
otherwise returns the best trial with ``details["goal_met"] = False``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edgeml.core.data import LABEL_KEY, Dataset
from edgeml.core.errors import ConversionError, DataError, UsageError, first_line

from ..backends.base import Candidate

log = logging.getLogger(__name__)

ENV_VAR = "EDGEML_INC_PYTHON"
VENV_DIR = ".venv-inc"
REQUIREMENTS = "requirements-inc.txt"
WORKER = Path(__file__).resolve().with_name("worker")  # a folder run as a script: python -I worker/
DEFAULT_MAX_TRIALS = 20
CALIBRATION_BATCH = 16  # as edgeml's own ONNX int8 build feeds calibration
EVAL_BATCH = 32  # as edgeml.core.data.run_dataset
ERROR_PREFIX = "inc_worker error: "  # the worker's last stderr line when it fails
EXIT_MISSING, EXIT_DATA = 3, 4  # the worker's exit codes: a package is missing; data does not fit
HOW_TO = (f"create it in the edgeml checkout with `make inc` (or `python3.11 -m venv {VENV_DIR} && "
          f"{VENV_DIR}/bin/pip install --no-deps -r {REQUIREMENTS}`), or set {ENV_VAR} to the python of such an environment")


def project_root() -> Path:
    """The folder holding the edgeml package (the repository, for an editable install)."""
    return Path(__file__).resolve().parents[3]


def inc_python() -> str:
    """The Python of the INC environment: ``$EDGEML_INC_PYTHON``, else ``.venv-inc`` next to the
    edgeml package. Raises UsageError (exit 2) saying how to create it. Not resolved: a venv's
    python is a symlink to the base interpreter, and only the link's path selects the venv."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        if not Path(configured).is_file():
            raise UsageError(f"{ENV_VAR}={configured} is not a file; {HOW_TO}")
        return configured
    venv = project_root() / VENV_DIR
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if candidate.is_file():
            return str(candidate)
    raise UsageError(f"--tuner inc runs Intel Neural Compressor in its own environment (it needs NumPy < 2), "
                     f"and there is none: {HOW_TO}")


def check_inc_env(python: Optional[str] = None, timeout: float = 120) -> dict:
    """Start the worker once to prove the environment imports INC; return its versions.
    Cheap enough (about a second) to call when validating ``--tuner inc`` before any build."""
    python = python or inc_python()
    with tempfile.TemporaryDirectory(prefix="edgeml-inc-") as tmp:
        result = Path(tmp) / "result.json"
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"probe": True, "result": str(result)}))
        _run_worker(python, request, timeout)
        return json.loads(result.read_text())["versions"]


def tune_int8(
    model_bytes: bytes,
    calibration: Dataset,
    eval_ds: Dataset,
    reference: Dict[str, np.ndarray],
    max_drop: float,
    seed: int = 0,
    max_trials: int = DEFAULT_MAX_TRIALS,
    *,
    python: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Candidate:
    """Tune a static int8 build of ``model_bytes`` (float ONNX) with INC's ``autotune``.

    ``reference`` holds the float model's outputs on ``eval_ds`` (what
    ``edgeml.core.data.run_dataset(source.reference, eval_ds)`` returns). The score is accuracy
    when ``eval_ds`` has labels, else top-1 agreement with ``reference``; the goal is a score at
    least ``float score - max_drop`` (absolute: 0.01 is one point). Always returns the best model
    found; ``details["goal_met"]`` says whether it meets the goal.
    """
    import onnx

    from edgeml.core.runtime import load_runner

    from ..backends.onnx import iter_feeds
    from ..backends.onnx_compact import compact_names
    from ..sources.onnx_prepare import prepare

    if calibration is None or len(calibration) == 0:
        raise UsageError("--tuner inc builds int8 models, which need --calibration data "
                         "(a .npz or module:function with a few hundred inputs)")
    if eval_ds is None or len(eval_ds) == 0:
        raise UsageError("--tuner inc scores its trials on --eval data; pass a .npz with a few hundred inputs")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise UsageError(f"the maximum accuracy drop must be a number >= 0 (0.01 = one point), not {max_drop!r}")
    if int(max_trials) < 1:
        raise UsageError(f"max_trials must be at least 1, not {max_trials}")
    python = python or inc_python()

    try:
        original = onnx.load_model_from_string(model_bytes)
    except Exception as exc:
        raise ConversionError(f"the model's ONNX bytes do not parse: {first_line(exc)}") from exc
    specs = load_runner(model_bytes, "onnx", num_threads=1).inputs
    whole = any(_per_sample(ds, specs) for ds in (calibration, eval_ds))
    first_feed = next(iter_feeds(calibration, specs), None)
    prepared, notes = prepare(original, first_feed)
    metric = "accuracy" if eval_ds.labels is not None else "agreement"
    if metric == "agreement" and not any(_is_classifier(np.asarray(v)) for v in reference.values()):
        shapes = ", ".join(f"{k} {tuple(np.shape(v))[1:]}" for k, v in reference.items())
        raise UsageError(f"--tuner inc ranks trials by top-1 accuracy or agreement with the float model, which needs "
                         f"class scores ([N, classes]); this model outputs {shapes}: drop --tuner inc")
    batch = _fixed_batch(specs)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeml-inc-") as tmp:
        tmp = Path(tmp)
        paths = {k: tmp / f"{k}{ext}" for k, ext in (("model", ".onnx"), ("calibration", ".npz"), ("eval", ".npz"),
                                                      ("reference", ".npz"), ("output", ".onnx"), ("result", ".json"))}
        paths["model"].write_bytes(prepared.SerializeToString())
        np.savez(paths["calibration"], **_arrays(calibration, specs, whole, "calibration"))
        evaluation = _arrays(eval_ds, specs, whole, "eval")
        if eval_ds.labels is not None:
            evaluation[LABEL_KEY] = np.asarray(eval_ds.labels)
        np.savez(paths["eval"], **evaluation)
        np.savez(paths["reference"], **{k: np.asarray(v) for k, v in reference.items()})
        request = {k: str(v) for k, v in paths.items()}
        request.update(metric=metric, max_accuracy_drop=float(max_drop), seed=int(seed), max_trials=int(max_trials),
                       whole=whole, batch_size=batch or CALIBRATION_BATCH, eval_batch_size=batch or EVAL_BATCH,
                       quant_format="qdq", reduce_range=True)
        request_path = tmp / "request.json"
        request_path.write_text(json.dumps(request, indent=1))
        _run_worker(python, request_path, timeout)
        result = json.loads(paths["result"].read_text())
        model = paths["output"].read_bytes()
    if not result.get("quantized_ops"):
        raise ConversionError(f"Neural Compressor quantized none of this model's ops (it has "
                              f"{', '.join(sorted({n.op_type for n in prepared.graph.node}))}); "
                              "use the fp32 or float16 recipe")
    log.info("INC tuning: %d trials in %.1f s, %s %.4f (float %.4f), goal %s", result["trials"],
             time.perf_counter() - started, metric, result["best_score"], result["float_score"],
             "met" if result["goal_met"] else "not met")
    return _candidate(model, compact_names(model), result, notes)


# --- helpers ---------------------------------------------------------------------------------------------


def _is_classifier(y: np.ndarray) -> bool:  # as edgeml.optimizer.evaluate.is_classifier
    return y.dtype.kind == "f" and y.ndim in (2, 3) and y.shape[-1] > 1


def _per_sample(dataset: Dataset, specs: Sequence) -> bool:
    """As ``edgeml.optimizer.backends.onnx.iter_feeds``: inputs with one more axis than the model's input
    hold one unbatched feed per sample."""
    return dataset.whole or any(s.name in dataset.inputs and np.ndim(dataset.inputs[s.name]) == len(s.shape) + 1
                                for s in specs)


def _fixed_batch(specs: Sequence) -> Optional[int]:
    """The batch size a model with a fixed first dimension takes (1 for many exports), else None."""
    firsts = {s.shape[0] if s.shape else None for s in specs}
    if len(firsts) == 1:
        first = firsts.pop()
        if isinstance(first, int) and first > 0:
            return first
    return None


def _arrays(dataset: Dataset, specs: Sequence, whole: bool, role: str) -> Dict[str, np.ndarray]:
    """One array per model input, in the model's dtype, sample axis first. For per-sample feeding
    an array shaped like the input itself gets a batch axis of one per sample, as iter_feeds does."""
    out = {}
    for s in specs:
        if s.name not in dataset.inputs:
            raise DataError(f"{role} data lacks input {s.name}; the model's inputs are {[t.name for t in specs]}")
        array = np.asarray(dataset.inputs[s.name], s.dtype)
        if whole and array.ndim == len(s.shape):
            array = array[:, None]
        out[s.name] = array
    return out


def _run_worker(python: str, request: Path, timeout: Optional[float]) -> None:
    """Run the worker; its output goes to our debug log. Raise the edgeml error its exit code means."""
    command = [python, "-I", "-u", str(WORKER), str(request)]
    log.debug("running %s", " ".join(command))
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", bufsize=1)
    except OSError as exc:
        raise UsageError(f"cannot run the INC environment's python {python} ({exc.strerror or exc}); {HOW_TO}") from exc
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    error, last = None, None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            log.debug("inc: %s", line)
            last = line
            if line.startswith(ERROR_PREFIX):
                error = line[len(ERROR_PREFIX):]
        code = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:  # interrupted while reading: do not leave the worker running
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise ConversionError(f"Neural Compressor tuning did not finish within {timeout:g} s; "
                              "allow more time or fewer trials")
    if code == 0:
        return
    message = error or last or f"exit status {code}"
    if code == EXIT_MISSING:
        raise UsageError(f"the INC environment {python} is not usable ({message}); {HOW_TO}")
    if code == EXIT_DATA:
        raise DataError(f"Neural Compressor tuning: {message}")
    raise ConversionError(f"Neural Compressor tuning failed: {message}; try edgeml's own int8 tuning (drop --tuner inc)")


def _candidate(raw: bytes, model: bytes, result: dict, prepare_notes: List[str]) -> Candidate:
    metric = result["metric"]
    notes = list(prepare_notes)
    if len(model) < len(raw):
        notes.append(f"shortened internal names: {len(raw) - len(model)} bytes fewer "
                     "(details name nodes as in the prepared model)")
    quantized = result.get("quantized_ops", {})
    notes.append(f"Intel Neural Compressor {result['inc_version']} autotune: {result['trials']} trials, "
                 f"{metric} {result['best_score']:.4f} vs float {result['float_score']:.4f} "
                 f"(allowed drop {result['max_accuracy_drop']:g})")
    notes.append(f"quantized {sum(quantized.values())} ops ({', '.join(f'{k} {v}' for k, v in sorted(quantized.items()))})")
    if result.get("float_nodes"):
        notes.append(f"kept in float: {', '.join(result['float_nodes'])}")
    if not result["goal_met"]:
        notes.append(f"no trial met the goal; kept the best-scoring one (trial {result['best_trial']})")
    if result.get("stopped_early"):
        notes.append(f"tuning stopped early: {result['stopped_early']}")
    details = {
        "tuner": "inc",
        "inc_version": result["inc_version"],
        "goal_met": result["goal_met"],
        "metric": metric,
        "float_score": result["float_score"],
        "score": result["best_score"],
        "max_accuracy_drop": result["max_accuracy_drop"],
        "trials": result["trials"],
        "best_trial": result["best_trial"],
        "trial_scores": result["trial_scores"],
        "trial_configs": [t.get("config") for t in result.get("trial_details", [])],
        "quantized_ops": quantized,
        "float_ops": result.get("float_ops", {}),
        "float_nodes": result.get("float_nodes", []),
        "quant_format": result.get("quant_format"),
        "reduce_range": result.get("reduce_range"),
        "seed": result.get("seed"),
        "tuning_seconds": result.get("seconds"),
        "versions": result.get("versions", {}),
    }
    if metric == "agreement":
        details["agreement"] = result["best_score"]
    return Candidate(recipe="int8", format="onnx", model=model, notes=notes, details=details)
