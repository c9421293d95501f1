"""Accuracy-aware int8 tuning of an ONNX model with Intel Neural Compressor, in its own venv.

Run as ``<inc-python> -I -u edgeml/optimizer/inc/worker request.json`` by ``edgeml.optimizer.inc.tuner``.
This folder is self-contained (stdlib, numpy, onnx, onnxruntime, onnx_neural_compressor; never edgeml):
onnx-neural-compressor pins NumPy < 2, so it lives in a virtualenv of its own (.venv-inc).

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

import importlib.util
import json
import logging
import os
import random
import sys
import tempfile
import time
import traceback
import types
from collections import Counter

ERROR_PREFIX = "inc_worker error: "
EXIT_ERROR, EXIT_MISSING, EXIT_DATA = 1, 3, 4
WEIGHT_OPS = ("Conv", "ConvTranspose", "FusedConv", "Gemm", "MatMul")
LAYER_OPS = WEIGHT_OPS + ("Gather", "GatherElements", "GatherND", "EmbedLayerNormalization", "Attention")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16
EPS = 1e-9  # scores are fractions of a finite eval set; this only absorbs float rounding

log = logging.getLogger("inc_worker")


class WorkerError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


# --- importing INC without its heavy, unused dependencies -----------------------------------------------


def _install_stand_ins() -> list:
    """onnx-neural-compressor 1.0 imports two big packages at module level that static int8
    tuning does not need, and its metadata declares one and forgets the other:

    - ``transformers`` (126 MB with its own dependencies) only reads a Hugging Face config.json
      lying next to the model file; this worker's model never has one.
    - ``scipy`` (140 MB, not declared) only provides ``scipy.stats.entropy`` for Entropy
      calibration; ONNX Runtime ships the same function for exactly this reason.

    A real package, when installed, always wins over the stand-in."""
    installed = []
    if importlib.util.find_spec("transformers") is None:
        module = types.ModuleType("transformers")

        class PretrainedConfig:  # noqa: D401 - a stand-in
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                raise RuntimeError("transformers is not installed in the INC environment; "
                                   "remove config.json from beside the model")

        module.PretrainedConfig = PretrainedConfig
        sys.modules["transformers"] = module
        installed.append("transformers")
    if importlib.util.find_spec("scipy") is None:
        from onnxruntime.quantization.calibrate import entropy

        scipy = types.ModuleType("scipy")
        stats = types.ModuleType("scipy.stats")
        stats.entropy = entropy
        scipy.stats = stats
        sys.modules["scipy"], sys.modules["scipy.stats"] = scipy, stats
        installed.append("scipy")
    return installed


def _import_inc():
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        stand_ins = _install_stand_ins()
        import onnx_neural_compressor  # noqa: F401
        from onnx_neural_compressor import data_reader, quantization  # noqa: F401
        from onnx_neural_compressor.quantization import config, tuning  # noqa: F401
    except ImportError as exc:
        name = getattr(exc, "name", None) or first_line(exc)
        raise WorkerError(f"{sys.executable} cannot import {name} ({first_line(exc)}); "
                          "install requirements-inc.txt into this environment", EXIT_MISSING) from exc
    if stand_ins:
        log.debug("using stand-ins for %s (not needed by static int8 tuning)", ", ".join(stand_ins))


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    from onnx_neural_compressor import version

    return {"onnx_neural_compressor": version.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": numpy.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}


# --- data, sessions and the metric -----------------------------------------------------------------------


def load_npz(path: str, role: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise WorkerError(f"cannot read the {role} file {path}: {first_line(exc)}", EXIT_DATA) from exc


def make_feeds(arrays: dict, whole: bool, batch: int) -> list:
    """Model feeds: slices of ``batch`` samples, or single samples when ``whole``."""
    n = len(next(iter(arrays.values())))
    if whole:
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    return [{k: v[s : s + batch] for k, v in arrays.items()} for s in range(0, n, batch)]


def session(model):
    """ONNX Runtime on CPU with one thread: what edgeml measures candidates with."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_all(model, feeds: list, whole: bool) -> dict:
    import numpy as np

    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    parts = [sess.run(None, {k: v for k, v in f.items() if k in wanted}) for f in feeds]
    join = np.stack if whole else np.concatenate
    return {name: join([p[i] for p in parts]) for i, name in enumerate(names)}


def is_classifier(y) -> bool:
    return y.dtype.kind == "f" and y.ndim in (2, 3) and y.shape[-1] > 1


class Metric:
    """``accuracy``: top-1 of the first output against ``y``; ``agreement``: mean top-1
    agreement with the float reference over the classifier outputs."""

    def __init__(self, kind: str, first_output: str, labels, reference: dict):
        import numpy as np

        self.kind, self.first_output = kind, first_output
        if kind == "accuracy":
            if labels is None:
                raise WorkerError("metric accuracy needs labels 'y' in the eval file", EXIT_DATA)
            self.labels = np.asarray(labels)
        elif kind == "agreement":
            self.targets = {k: np.asarray(v).argmax(-1) for k, v in reference.items() if is_classifier(np.asarray(v))}
            if not self.targets:
                shapes = {k: np.shape(v) for k, v in reference.items()}
                raise WorkerError(f"top-1 agreement needs a classifier output ([N, classes] floats); the reference "
                                  f"has {shapes}; give eval labels or use edgeml's own int8 tuning", EXIT_DATA)
        else:
            raise WorkerError(f"unknown metric {kind!r}; use accuracy or agreement", EXIT_DATA)

    def __call__(self, outputs: dict) -> float:
        import numpy as np

        if self.kind == "accuracy":
            y = np.asarray(outputs[self.first_output])
            if not is_classifier(y):
                raise WorkerError(f"labels were given but output {self.first_output} has shape {y.shape[1:]}, "
                                  "not class scores", EXIT_DATA)
            labels = self.labels
            if labels.ndim == y.ndim and labels.shape[-1] == y.shape[-1]:
                labels = labels.argmax(-1)  # one-hot
            predicted = y.argmax(-1)
            if labels.size != predicted.size:
                raise WorkerError(f"{labels.size} labels for {predicted.size} predictions", EXIT_DATA)
            return float(np.mean(predicted.reshape(-1) == labels.reshape(-1)))
        scores = []
        for name, target in self.targets.items():
            got = np.asarray(outputs[name])
            if got.shape[:-1] != target.shape:
                raise WorkerError(f"output {name} has shape {got.shape}, the reference {target.shape}+classes", EXIT_DATA)
            scores.append(float(np.mean(got.argmax(-1) == target)))
        return float(np.mean(scores))


# --- the trials ------------------------------------------------------------------------------------------


def describe_config(quant_config, present: set) -> dict:
    """What one trial tried, in plain JSON."""
    def plain(v):
        if isinstance(v, (list, tuple, set)):
            return sorted(plain(x) for x in v) if isinstance(v, set) else [plain(x) for x in v]
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        return getattr(v, "name", str(v))

    keys = ("per_channel", "quant_last_matmul", "calibrate_method")
    out = {k: plain(getattr(quant_config, k, None)) for k in keys}
    quantized = set(getattr(quant_config, "op_types_to_quantize", None) or [])
    out["float_op_types"] = sorted(present - quantized)  # of the op types INC would quantize here
    out["float_nodes"] = list(getattr(quant_config, "nodes_to_exclude", None) or [])
    return out


class Trials:
    """The eval function handed to ``autotune``: scores each trial model and keeps the best."""

    def __init__(self, float_path: str, float_score: float, goal: float, metric: Metric, feeds: list, whole: bool):
        self.float_path, self.float_score, self.goal = float_path, float_score, goal
        self.metric, self.feeds, self.whole = metric, feeds, whole
        self.records: list = []
        self.pending_config = None
        self.best = None  # (key, index, model bytes)

    def __call__(self, model_path: str) -> float:
        import onnx

        if os.path.abspath(model_path) == os.path.abspath(self.float_path):
            return self.float_score  # autotune's baseline: already measured
        index = len(self.records)
        record = {"trial": index, "config": self.pending_config}
        self.pending_config = None
        started = time.perf_counter()
        try:
            score = self.metric(run_all(model_path, self.feeds, self.whole))
        except WorkerError:
            raise
        except Exception as exc:  # a quantized model ORT cannot run: a failed trial, not a failed tuning
            record.update(score=None, error=first_line(exc))
            self.records.append(record)
            log.warning("trial %d does not run in ONNX Runtime: %s", index, first_line(exc))
            return float("-inf")
        data = onnx.load(model_path).SerializeToString()  # external data folded back in
        meets = score >= self.goal - EPS
        record.update(score=score, bytes=len(data), goal_met=meets, seconds=round(time.perf_counter() - started, 3))
        self.records.append(record)
        log.info("trial %d: score %.4f (float %.4f, goal %.4f), %d bytes", index, score, self.float_score, self.goal, len(data))
        key = (meets, score, -len(data))
        if self.best is None or key > self.best[0]:
            self.best = (key, index, data)
        return score


def name_nodes(model) -> int:
    """Give every main-graph node a unique, non-empty name (what it computes is unchanged)."""
    taken = Counter(n.name for n in model.graph.node)
    seen, count = set(), 0
    for i, node in enumerate(model.graph.node):
        if node.name and taken[node.name] == 1:
            seen.add(node.name)
            continue
        base = node.name or node.op_type
        name, k = base, i
        while not name or name in seen or (name != node.name and name in taken):
            name, k = f"{base}__{k}", k + 1
        node.name = name
        seen.add(name)
        count += 1
    return count


def weight_nodes(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits and n.name]


def tuning_space(model, present: set, quant_format, reduce_range: bool, sampling_size: int) -> list:
    """INC's static int8 space, then the last, the first, and both weight layers kept in float.

    INC's space varies which op types are quantized (all, then without Add/Mul, Gather-likes,
    Attention); variants that make no difference for this model's op types are dropped, and so
    is the last-MatMul-in-float choice for models without MatMul, so that no trial is spent
    building a model that an earlier trial built already."""
    from onnx_neural_compressor.quantization import config

    common = dict(quant_format=quant_format, reduce_range=reduce_range, calibration_sampling_size=sampling_size)
    space, seen = [], set()
    for candidate in config.StaticQuantConfig.get_config_set_for_tuning(**common):
        effective = frozenset(candidate.op_types_to_quantize) & present
        if effective in seen:
            continue
        seen.add(effective)
        if "MatMul" not in effective:
            candidate.quant_last_matmul = True
        space.append(candidate)
    layers = weight_nodes(model)
    excluded = []
    if layers:
        excluded.append([layers[-1]])
    if len(layers) > 1:
        excluded += [[layers[0]], [layers[0], layers[-1]]]
    for nodes in excluded:
        space.append(config.StaticQuantConfig(per_channel=True, nodes_to_exclude=nodes, **common))
    return space


def float_tensor_names(model) -> set:
    graph = model.graph
    names = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.type.tensor_type.elem_type in FLOAT_TYPES:
            names.add(v.name)
    return names


def float_nodes(model_bytes: bytes, quantizable: list, float_model) -> tuple:
    """(quantized op counts, float op counts, float layer names) of a QDQ or QOperator model.

    A QLinear/Integer op runs quantized; in QDQ, a weight op whose weight comes from
    DequantizeLinear does, and any other op that reads a dequantized tensor and writes into a
    QuantizeLinear. A node on float data of a type INC can quantize that does neither stayed in
    float. Names are listed for the layers with weights only (reshapes are many and say little)."""
    import onnx

    graph = onnx.load_model_from_string(model_bytes).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    into_quantize = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    float_data = float_tensor_names(float_model) | dequantized
    quantized, floats, names = Counter(), Counter(), []
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            continue
        if node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"):
            runs_int8 = True
        elif node.op_type in WEIGHT_OPS and len(node.input) > 1:
            runs_int8 = node.input[1] in dequantized
        else:
            runs_int8 = any(i in dequantized for i in node.input) and any(o in into_quantize for o in node.output)
        if runs_int8:
            quantized[node.op_type] += 1
        elif node.op_type in quantizable and any(i in float_data for i in node.input):
            floats[node.op_type] += 1
            if node.op_type in LAYER_OPS:
                names.append(node.name)
    return dict(quantized), dict(floats), names


# --- the request -----------------------------------------------------------------------------------------


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
        _import_inc()
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
