"""Scoring in the worker: data files into feeds, ONNX Runtime sessions, the metric, and ``Trials``,
the eval function ``autotune`` calls for each trial model (it keeps the best one)."""
from __future__ import annotations

import os
import time

from worker_env import EXIT_DATA, WorkerError, first_line, log

EPS = 1e-9  # scores are fractions of a finite eval set; this only absorbs float rounding


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
