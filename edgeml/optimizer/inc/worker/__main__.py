"""Accuracy-aware int8 tuning of an ONNX model with Intel Neural Compressor, in its own venv.

Run as ``<inc-python> -I -u edgeml/optimizer/inc/worker request.json`` by ``edgeml.optimizer.inc.tuner``.
This folder is self-contained (stdlib, numpy, onnx, onnxruntime, onnx_neural_compressor; never edgeml):
onnx-neural-compressor pins NumPy < 2, so it lives in a virtualenv of its own (.venv-inc).
Running the folder puts it first on ``sys.path``, so its modules import each other by name:
``worker_env`` (errors, INC's imports, versions), ``worker_trials`` (data, metric, trial scoring) and
``worker_graph`` (node names, tuning space, float nodes); this file handles the request.

The request (JSON) names::

    model        float ONNX model (already prepared by edgeml: quantizable, shapes recorded)
    calibration  .npz, one array per model input, sample axis first
    eval         .npz, the same inputs, plus optional ``y`` labels
    reference    .npz of the float model's outputs on the eval inputs (agreement metric)
    metric       "accuracy" (needs ``y``) or "agreement" (top-1 agreement with the reference)
    max_accuracy_drop  absolute: 0.01 = one point below the float score
    seed, max_trials, output (the tuned .onnx), result (the result .json)
    optional: whole (feed one sample at a time), batch_size, eval_batch_size,
              quant_format ("qdq" | "qoperator"), reduce_range (bool)

The tuning space is INC's own for static int8 (StaticQuantConfig.get_config_set_for_tuning:
per-channel or not, the last MatMul in float or not, Add/Mul and Gather-like op types in float
or not; variants that change nothing for this model dropped), followed by trials that keep the
last, the first, and both weight layers in float. ``autotune`` stops at the first trial within
``max_accuracy_drop`` of the float score. It returns nothing (it calls ``exit(0)``) when no
trial meets the goal, so this worker scores every trial itself and always writes the best one:
the goal-meeting trial, otherwise the best scoring (smaller file on ties). INC keys per-node
settings by node name, so unnamed nodes are named first (ORT's fusions leave some unnamed).

Logs go to stderr (stdout is redirected there too). On failure the last stderr line is
``inc_worker error: <one line>`` and the exit code is 1 (tuning failed), 3 (the environment
lacks a package) or 4 (the data does not fit the model).
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
import traceback

from worker_env import ERROR_PREFIX, EXIT_DATA, EXIT_ERROR, WorkerError, first_line, import_inc, log, versions
from worker_graph import float_nodes, float_tensor_names, name_nodes, tuning_space
from worker_trials import EPS, Metric, Trials, describe_config, load_npz, make_feeds, run_all

REQUIRED = ("model", "calibration", "eval", "max_accuracy_drop", "output", "result")


def tune(request: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="inc-worker-") as work_dir:
        return _tune(request, work_dir)


def _tune(request: dict, work_dir: str) -> dict:
    import numpy as np
    import onnx
    from onnx_neural_compressor import constants, data_reader, quantization
    from onnx_neural_compressor.quantization import tuning

    missing = [k for k in REQUIRED if k not in request]
    if missing:
        raise WorkerError(f"the request lacks {', '.join(missing)}")
    seed = int(request.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    max_drop = float(request["max_accuracy_drop"])
    if not (max_drop >= 0 and max_drop != float("inf")):
        raise WorkerError(f"max_accuracy_drop must be a number >= 0, not {request['max_accuracy_drop']!r}")
    max_trials = int(request.get("max_trials", 20))
    whole = bool(request.get("whole", False))
    formats = {"qdq": quantization.QuantFormat.QDQ, "qoperator": quantization.QuantFormat.QOperator}
    if str(request.get("quant_format", "qdq")).lower() not in formats:
        raise WorkerError(f"unknown quant_format {request.get('quant_format')!r}; use qdq or qoperator")
    quant_format = formats[str(request.get("quant_format", "qdq")).lower()]
    reduce_range = bool(request.get("reduce_range", True))
    model = onnx.load(request["model"])
    renamed = name_nodes(model)
    if renamed:  # INC keys its per-node configs by name: unnamed nodes share one entry and break it
        log.info("named %d unnamed or duplicate-named nodes", renamed)
    model_path = os.path.join(work_dir, "float.onnx")
    onnx.save(model, model_path)

    calibration = load_npz(request["calibration"], "calibration")
    calibration.pop("y", None)
    evaluation = load_npz(request["eval"], "eval")
    labels = evaluation.pop("y", None)
    reference = load_npz(request["reference"], "reference") if request.get("reference") else {}
    metric_kind = request.get("metric") or ("accuracy" if labels is not None else "agreement")
    calib_feeds = make_feeds(calibration, whole, int(request.get("batch_size", 16)))
    eval_feeds = make_feeds(evaluation, whole, int(request.get("eval_batch_size", 32)))
    if not calib_feeds or not eval_feeds:
        raise WorkerError("the calibration and eval files need at least one sample each", EXIT_DATA)

    started = time.perf_counter()
    try:
        float_outputs = run_all(model_path, eval_feeds, whole)
    except Exception as exc:
        raise WorkerError(f"the float model does not run on the eval data: {first_line(exc)}", EXIT_DATA) from exc
    metric = Metric(metric_kind, model.graph.output[0].name, labels, reference)
    float_score = metric(float_outputs)
    goal = float_score - max_drop
    log.info("float %s %.4f on %d eval samples; goal %.4f; %d calibration feeds", metric_kind, float_score,
             len(next(iter(evaluation.values()))), goal, len(calib_feeds))

    class Reader(data_reader.CalibrationDataReader):
        def __init__(self):
            self.position = 0

        def get_next(self):
            if self.position >= len(calib_feeds):
                return None
            self.position += 1
            return calib_feeds[self.position - 1]

        def rewind(self):
            self.position = 0

    qdq = quant_format == quantization.QuantFormat.QDQ
    op_list = constants.STATIC_QDQ_CPU_OP_LIST if qdq else constants.STATIC_QOPERATOR_CPU_OP_LIST
    trials = Trials(model_path, float_score, goal, metric, eval_feeds, whole)
    float_data = float_tensor_names(model)
    present = {n.op_type for n in model.graph.node if any(i in float_data for i in n.input)} & set(op_list)
    space = tuning_space(model, present, quant_format, reduce_range, len(calib_feeds))
    # autotune's goal is relative: trial >= baseline * (1 - tolerable_loss); ours is absolute
    tolerable = (max_drop + EPS) / float_score if float_score > 0 else 0.0
    tune_config = tuning.TuningConfig(config_set=space, tolerable_loss=tolerable, max_trials=max_trials)

    # autotune quantizes each trial through this module function: wrapping it records what the
    # trial tried (INC keeps its trial history in a local). Without it, trials go unlabelled.
    original_quantize = getattr(tuning, "_quantize", None)

    def recording_quantize(model_input, quant_config, calibration_data_reader=None):
        trials.pending_config = describe_config(quant_config, present)
        return original_quantize(model_input, quant_config=quant_config, calibration_data_reader=calibration_data_reader)

    if original_quantize is not None:
        tuning._quantize = recording_quantize
    stopped = None
    try:
        # the model is prepared already: ORT_DISABLE_ALL makes autotune's baseline our float model
        tuning.autotune(model_path, tune_config, trials, calibration_data_reader=Reader(),
                        optimization_level=__import__("onnxruntime").GraphOptimizationLevel.ORT_DISABLE_ALL)
    except SystemExit as exc:  # INC 1.0 calls exit(0) when no trial met the goal
        if exc.code not in (0, None):
            stopped = f"autotune exited with status {exc.code}"
    except WorkerError:
        raise
    except Exception as exc:  # a quantizer crash on one config: keep what the earlier trials found
        log.debug("%s", traceback.format_exc().rstrip())
        if trials.best is None:
            raise WorkerError(f"Neural Compressor failed before any trial finished: "
                              f"{type(exc).__name__}: {first_line(exc)}") from exc
        stopped = f"{type(exc).__name__}: {first_line(exc)}"
        log.warning("tuning stopped early: %s", stopped)
    finally:
        if original_quantize is not None:
            tuning._quantize = original_quantize
    if trials.best is None:
        raise WorkerError("Neural Compressor produced no quantized model that runs "
                          f"({len(trials.records)} trials); the model's ops may not be quantizable")

    (goal_met, best_score, _), best_index, best_model = trials.best
    with open(request["output"], "wb") as f:
        f.write(best_model)
    quantized, floats, names = float_nodes(best_model, op_list, model)
    return {
        "goal_met": bool(goal_met),
        "metric": metric_kind,
        "float_score": float_score,
        "best_score": best_score,
        "max_accuracy_drop": max_drop,
        "best_trial": best_index,
        "trials": len(trials.records),
        "trial_scores": [r.get("score") for r in trials.records],
        "trial_details": trials.records,
        "quantized_ops": quantized,
        "float_ops": floats,
        "float_nodes": names,  # layers with weights left in float
        "float_bytes": os.path.getsize(model_path),
        "bytes": len(best_model),
        "quant_format": str(request.get("quant_format", "qdq")).lower(),
        "reduce_range": reduce_range,
        "seed": seed,
        "max_trials": max_trials,
        "stopped_early": stopped,
        "seconds": round(time.perf_counter() - started, 3),
        "inc_version": versions()["onnx_neural_compressor"],
        "versions": versions(),
    }


def main(argv: list) -> int:
    real_stderr = sys.stderr
    sys.stdout = sys.stderr  # INC prints tracebacks to stdout; the protocol is files plus stderr
    handler = logging.StreamHandler(real_stderr)
    handler.setFormatter(logging.Formatter("inc_worker: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        if len(argv) != 2:
            raise WorkerError("usage: python -I worker/ request.json")
        try:
            with open(argv[1]) as f:
                request = json.load(f)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"cannot read the request {argv[1]}: {first_line(exc)}") from exc
        import_inc()
        if request.get("probe"):  # is this environment usable? (edgeml.inc_tuner.check_inc_env)
            result = {"versions": versions()}
        else:
            result = tune(request)
        tmp = request["result"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        os.replace(tmp, request["result"])
        return 0
    except WorkerError as exc:
        real_stderr.write(f"{ERROR_PREFIX}{first_line(exc)}\n")
        return exc.code
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in INC or here: one line + the traceback
        traceback.print_exc(file=real_stderr)
        real_stderr.write(f"{ERROR_PREFIX}{type(exc).__name__}: {first_line(exc)}\n")
        return EXIT_ERROR
    finally:
        real_stderr.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
