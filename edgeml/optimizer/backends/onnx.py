"""The ONNX backend: fp32, float16, dynamic, static int8 and int8-weights models for ONNX Runtime.

Every recipe starts from ``edgeml.optimizer.sources.onnx_prepare.prepare`` (real exports are not quantizable as
they are). Quantized builds are then measured against the source model on the calibration data,
and nodes that break accuracy are kept in float, within a bounded number of rebuilds.

Static int8 is QDQ with uint8 activations and per-channel int8 weights in 7-bit range
(``reduce_range``): on x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels saturate with full-range
weights (measured on the PP-OCR classifier: 0.94 top-1 agreement without it, 0.98 with it), and
QDQ ran as fast as the QOperator format there while staying portable to other execution providers.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from edgeml.core.data import Dataset
from edgeml.core.errors import ConversionError, EdgemlError, UnsupportedModelError, UsageError, first_line
from edgeml.core.native_output import captured_stderr
from edgeml.core.runtime import FOLD_WEIGHTS_KEY, load_runner
from edgeml.core.specs import TensorSpec

from ..metrics import mask_ious
from ..sources.base import SourceModel
from ..sources.onnx_prepare import prepare, subgraphs
from .base import RECIPES, Backend, BuildOptions, Candidate
from .onnx_compact import compact_names
from .onnx_gptq import round_weights
from .onnx_weights import int8_weight_names, weights_to_float16, weights_to_int8

log = logging.getLogger(__name__)

BATCH = 16
MAX_STEP = 8  # most nodes one repair round may move to float
LEAVE_ONE_OUT_MAX = 16  # weight ops a dynamic build may test one by one
MAX_STALE_ROUNDS = 2  # stop when this many rounds in a row did not help
MAX_REBUILDS = 8  # quantize-and-measure rounds an accuracy repair may spend
PERCENTILE = 99.999  # of |activation|, the range a percentile calibration keeps
SENSITIVITY_MAX = 200  # weights whose worth int8-weights measures one by one (most rounding error first)
SENSITIVITY_BUDGET_S = 180.0  # and the time it may spend on that
INT8_CLASS = 0.45  # of the float bytes: what int8-weights may grow to by keeping weights float32
MIN_GAIN = 1e-3  # a score gain smaller than this (or a tenth of the way to the goal) is calibration noise
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "LSTM", "Conv")  # the last ones go back to float first; Gather: embedding tables
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
QDQ_MARKERS = ("QuantizeLinear", "DequantizeLinear")
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeLinear")


class OnnxBackend(Backend):
    format = "onnx"

    def build(self, source: SourceModel, recipe: str, calibration: Optional[Dataset], options: BuildOptions) -> Candidate:
        if recipe not in RECIPES:
            raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if recipe == "int8" and calibration is None:
            raise UsageError("int8 needs --calibration data (a .npz or module:function with a few hundred inputs); "
                             "or use the dynamic recipe, which needs none")
        feeds = list(iter_feeds(calibration, source.inputs)) if calibration is not None else []
        prepared, notes = self._prepared(source, calibration, feeds)
        if recipe in ("dynamic", "int8", "int8-weights"):
            _require_quantizable(prepared, recipe)
        build = {"fp32": _fp32, "float16": _float16, "dynamic": _dynamic, "int8": _int8,
                 "int8-weights": _int8_weights}[recipe]
        with tempfile.TemporaryDirectory(prefix="edgeml-onnx-") as workdir:
            candidate = build(_Job(source, prepared, feeds, options, Path(workdir)))
        before = len(candidate.model)
        candidate.model = compact_names(candidate.model)
        if len(candidate.model) < before:
            notes.append(f"shortened internal names: {before - len(candidate.model)} bytes fewer "
                         "(details name nodes as in the prepared model)")
        candidate.notes[:0] = notes
        return candidate

    def _prepared(self, source: SourceModel, calibration: Optional[Dataset], feeds: List[dict]):
        """Prepare once per source and data: optimize builds every recipe with one backend."""
        import onnx

        cached = getattr(self, "_cache", None)  # (source, calibration, prepared, notes): one at a time
        if cached is None or cached[0] is not source or cached[1] is not calibration:
            try:
                original = onnx.load_model_from_string(source.onnx_bytes())
            except Exception as exc:
                raise ConversionError(f"the source's ONNX bytes do not parse: {first_line(exc)}") from exc
            self._cache = cached = (source, calibration, *prepare(original, feeds[0] if feeds else None))
        return cached[2], list(cached[3])  # recipes copy the prepared model before changing it


def _require_quantizable(model, recipe: str) -> None:
    """Say plainly when ONNX Runtime's quantizer has nothing to work on (tree ensembles and linear
    classifiers from scikit-learn are single ai.onnx.ml ops), instead of its own error."""
    from collections import Counter

    ops = Counter(n.op_type for g in _all_graphs(model.graph) for n in g.node)
    if any(op in ops for op in (*WEIGHT_OPS, *DYNAMIC_OPS)):
        return
    common = ", ".join(op for op, _ in ops.most_common(4))
    raise UnsupportedModelError(
        f"the {recipe} recipe has nothing to quantize: ONNX Runtime quantizes MatMul, Gemm, Conv, ConvTranspose "
        f"and LSTM, and this model has none (its ops: {common}); keep it as fp32"
    )


class _Job:
    """What one build needs: the prepared model, calibration feeds and their float reference."""

    def __init__(self, source: SourceModel, prepared, feeds: List[dict], options: BuildOptions, workdir: Path):
        self.source, self.prepared, self.feeds, self.options = source, prepared, feeds, options
        self.reference = [source.reference(f) for f in feeds]
        self.batch_sizes = [_batch_size(f) for f in feeds]
        self.workdir = workdir
        self.prepared_path = self.workdir / "prepared.onnx"
        self.prepared_path.write_bytes(prepared.SerializeToString())

    def score(self, model_bytes: bytes) -> dict:
        runner = load_runner(model_bytes, "onnx", num_threads=1)
        return agreement(self.reference, [runner.run(f) for f in self.feeds], self.batch_sizes, self.options.kinds,
                         self.options.threshold)


# --- recipes ------------------------------------------------------------------------------------------


def _fp32(job: _Job) -> Candidate:
    return Candidate("fp32", "onnx", job.prepared.SerializeToString())


def _float16(job: _Job) -> Candidate:
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(job.prepared)
    count = weights_to_float16(model.graph)
    return Candidate("float16", "onnx", model.SerializeToString(),
                     notes=[f"stored {count} weight tensors as float16 (cast back to float32 when loaded)"],
                     details={"float16_weights": count})


def _dynamic(job: _Job) -> Candidate:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(op_types: Sequence[str], exclude: Sequence[str]) -> bytes:
        out = job.workdir / "dynamic.onnx"
        quantize_dynamic(job.prepared_path, out, op_types_to_quantize=list(op_types), per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                         extra_options={"EnableSubgraph": True})  # weights inside If/Loop bodies too
        return out.read_bytes()

    op_types = list(DYNAMIC_OPS)
    model = _quantizer_call("dynamic", lambda: quantize(op_types, []))
    notes: List[str] = []
    if not job.feeds:
        notes.append("not checked against float: no calibration data given")
        return _quantized_candidate("dynamic", model, [], None, notes)
    score = job.score(model)
    float_nodes: List[str] = []
    weights = {i.name for g in _all_graphs(job.prepared.graph) for i in g.initializer}
    candidates = [n.name for g in _all_graphs(job.prepared.graph) for n in g.node
                  if n.op_type in op_types and n.name and (n.op_type != "Gather" or n.input[0] in weights)]
    if score["score"] < goal(job.options) and 0 < len(candidates) <= LEAVE_ONE_OUT_MAX:
        # Few weight ops: measure each one left in float on its own, then keep the most
        # helpful ones in float until the goal is met.
        alone = {}
        for name in candidates:
            alone[name] = job.score(_quantizer_call("dynamic", lambda: quantize(op_types, [name])))["score"]
        for name in sorted(candidates, key=lambda n: -alone[n]):
            if score["score"] >= goal(job.options) or len(float_nodes) >= len(candidates) - 1:
                break
            float_nodes.append(name)
            model = _quantizer_call("dynamic", lambda: quantize(op_types, float_nodes))
            score = job.score(model)
        log.debug("dynamic: %d nodes in float, score %.4f", len(float_nodes), score["score"])
    # Otherwise try whole op types in float, convolutions first (dynamic quantization scales a
    # conv's input per tensor at run time, the usual culprit); a type stays in float only when
    # that measurably helps, so an embedding table is not given up for nothing.
    present = {n.op_type for g in _all_graphs(job.prepared.graph) for n in g.node}
    for dropped in [t for t in reversed(op_types[1:]) if t in present]:
        if score["score"] >= goal(job.options):
            break
        fewer = [t for t in op_types if t != dropped]
        trial = _quantizer_call("dynamic", lambda: quantize(fewer, float_nodes))
        trial_score = job.score(trial)
        if trial_score["score"] - score["score"] >= max(MIN_GAIN, 0.1 * (goal(job.options) - score["score"])):
            notes.append(f"kept {dropped} ops in float: score {trial_score['score']:.4f}, against {score['score']:.4f} "
                         "with them quantized")
            op_types, model, score = fewer, trial, trial_score
    if float_nodes:
        notes.append(f"kept {len(float_nodes)} nodes in float (score {score['score']:.4f}): {', '.join(float_nodes[:6])}")
    if score["score"] < goal(job.options):
        notes.append(f"score {score['score']:.4f} on the calibration data is below the goal {goal(job.options):.4f}")
    return _quantized_candidate("dynamic", model, float_nodes, score, notes)


def _equal_batches(job: _Job) -> List[dict]:
    """The calibration feeds of the first feed's batch size: ORT's histogram calibrators stack
    every batch into one array and crash on a smaller last one ("inhomogeneous shape")."""
    if not job.feeds:
        return []
    return [f for f, n in zip(job.feeds, job.batch_sizes) if n == job.batch_sizes[0]]


def _int8_weights(job: _Job) -> Candidate:
    """Weight-only int8: every weight of a Conv, MatMul, Gemm or embedding Gather stored as int8
    with a scale per output channel (per row for an embedding table), dequantized to float32
    when the model loads; every op computes in float. A quarter of the bytes at float speed and
    close to float accuracy, where activation quantization (int8, dynamic) loses too much.

    Below the goal, the weights are rounded again with GPTQ (onnx_gptq: the rounding errors
    cancel in each layer's output instead of adding up; on PP-OCR's text recognizer that took
    per-position agreement from 0.967 to 0.993). Still below it, each weight's worth is
    measured: the score with only that weight left in float32. The most helpful ones stay float32, 1, 2, 4... of them, until the goal is met (on
    PP-OCR's text detector, two small early convolutions carry most of the loss)."""
    import onnx

    rounded: dict = {}  # weight -> int8 values GPTQ chose, once rounding to nearest misses the target

    def build(keep_float: Sequence[str]) -> tuple:
        model = onnx.ModelProto()
        model.CopyFrom(job.prepared)
        count = weights_to_int8(model.graph, set(keep_float), rounded)
        # ONNX Runtime keeps a DequantizeLinear in front of a weight (to fuse it into int8
        # kernels) and would dequantize it at every run: this mark has the runtime fold it at load.
        onnx.helper.set_model_props(model, {FOLD_WEIGHTS_KEY: "1"})
        return model.SerializeToString(), count

    model, count = build([])
    notes: List[str] = []
    score, kept, rounds, rounding = None, [], 0, None
    if job.feeds:
        # Weights kept float32 cost no speed and few bytes, so this recipe aims closer to float
        # than the others (what calibration data scores, held-out data scores a little lower),
        # as long as the model stays int8-class.
        target = 1.0 - (1.0 - goal(job.options)) / 2
        limit = INT8_CLASS * job.prepared.ByteSize()
        score = job.score(model)
        if score["score"] < target:
            score, model, rounding = _error_compensated(job, build, rounded, score, model, notes)
        if score["score"] < target:
            weights = int8_weight_names(job.prepared.graph)[:SENSITIVITY_MAX]
            gain, started = {}, time.monotonic()
            for w in weights:  # most rounding error first, so a spent time budget skips the least likely
                gain[w] = job.score(build([w])[0])["score"] - score["score"]
                if time.monotonic() - started > SENSITIVITY_BUDGET_S:
                    notes.append(f"measured the worth of {len(gain)} of {len(weights)} weights within "
                                 f"{SENSITIVITY_BUDGET_S:.0f} s")
                    break
            helpful = [w for w in sorted(gain, key=lambda w: -gain[w]) if gain[w] > 0]
            log.debug("int8-weights: %.4f; best single float weights %s", score["score"],
                      [(w, round(gain[w], 4)) for w in helpful[:6]])
            best = (score, model, count, [])
            k = 1
            while best[0]["score"] < target and k <= len(helpful) and rounds < MAX_REBUILDS:
                trial, trial_count = build(helpful[:k])
                if len(trial) > limit:
                    break
                trial_score = job.score(trial)
                rounds += 1
                if trial_score["score"] > best[0]["score"]:
                    best = (trial_score, trial, trial_count, helpful[:k])
                k *= 2
            score, model, count, kept = best
        if kept:
            notes.append(f"kept {len(kept)} weights in float32, the ones the score gained most from "
                         f"(score {score['score']:.4f}): " + ", ".join(kept[:6]) +
                         (f" and {len(kept) - 6} more" if len(kept) > 6 else ""))
        if score["score"] < target:
            notes.append(f"score {score['score']:.4f} on the calibration data is below the goal {target:.4f}")
    notes.insert(0, f"stored {count} weight tensors as int8 with per-channel scales (float compute)")
    candidate = _quantized_candidate("int8-weights", model, kept, score, notes, rounds=rounds)
    candidate.details["int8_weights"] = count
    if rounding:
        candidate.details["rounding"] = rounding
    return candidate


def _error_compensated(job: _Job, build: Callable, rounded: dict, score: dict, model: bytes, notes: List[str]) -> tuple:
    """Round the weights with GPTQ (each weight's rounding error moved onto the weights not yet
    rounded, by how the layer's inputs correlate on the calibration data) and keep that when it
    scores better than rounding to nearest; ``rounded`` is left holding what was kept.
    Returns the score and model kept, and what both roundings scored."""
    started = time.monotonic()
    chosen = round_weights(job.prepared, job.feeds, int8_weight_names(job.prepared.graph), seed=job.options.seed)
    if not chosen:
        return score, model, None
    rounded.update(chosen)
    trial = build([])[0]
    trial_score = job.score(trial)
    rounding = {"nearest": round(score["score"], 6), "gptq": round(trial_score["score"], 6),
                "gptq_weights": len(chosen), "gptq_seconds": round(time.monotonic() - started, 1)}
    if trial_score["score"] > score["score"]:
        notes.append(f"rounded {len(chosen)} weights with GPTQ (error compensation on the calibration data): "
                     f"score {score['score']:.4f} -> {trial_score['score']:.4f}")
        return trial_score, trial, rounding
    rounded.clear()
    notes.append(f"GPTQ rounding scored {trial_score['score']:.4f}, not above rounding to nearest "
                 f"({score['score']:.4f}): kept rounding to nearest")
    return score, model, rounding


def _all_graphs(graph):
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from _all_graphs(g)


def _int8(job: _Job) -> Candidate:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = CalibrationMethod.MinMax

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(job.feeds if method == CalibrationMethod.MinMax else _equal_batches(job))

        def get_next(self):
            return next(self._feeds, None)

    def quantize(exclude: Sequence[str], op_types: Optional[Sequence[str]] = None) -> bytes:
        out = job.workdir / "int8.onnx"
        quantize_static(job.prepared_path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), op_types_to_quantize=list(op_types) if op_types else None,
                        calibrate_method=method, extra_options={"CalibPercentile": PERCENTILE})
        return out.read_bytes()

    target = goal(job.options)
    model = _quantizer_call("int8", lambda: quantize([]))
    if not quantized_op_counts(model):
        raise ConversionError("static int8 found nothing to quantize outside control flow (If/Loop bodies); "
                              "use the dynamic recipe for this model")
    notes: List[str] = []
    score = job.score(model)
    calibration = {"tried": ["min-max"], "kept": "min-max"}
    if score["score"] < target and len(_equal_batches(job)) > 0:
        # Min-max ranges stretch to the rarest activation; a percentile range clips those few
        # and gives the rest finer steps. Measured, and kept only when it scores better.
        method = CalibrationMethod.Percentile
        clipped = _quantizer_call("int8", lambda: quantize([]))
        clipped_score = job.score(clipped)
        log.debug("int8: min-max %.4f, percentile %.4f", score["score"], clipped_score["score"])
        calibration["tried"].append("percentile")
        if clipped_score["score"] > score["score"]:
            notes.append(f"calibrated with the {PERCENTILE}th percentile: score {clipped_score['score']:.4f}, "
                         f"against {score['score']:.4f} with min-max ranges")
            model, score = clipped, clipped_score
            calibration["kept"] = "percentile"
        else:
            method = CalibrationMethod.MinMax
    op_types: Optional[List[str]] = None
    if score["score"] < target:
        # Elementwise chains (layer norms, hard-swish, GELU) are where int8 usually breaks and they
        # hold no weights, so first try quantizing only the weight-carrying ops.
        narrow = _quantizer_call("int8", lambda: quantize([], WEIGHT_OPS))
        narrow_score = job.score(narrow)
        log.debug("int8: all ops %.4f, weight ops only %.4f", score["score"], narrow_score["score"])
        if narrow_score["score"] > score["score"] and quantized_op_counts(narrow):
            notes.append(f"quantized only {'/'.join(WEIGHT_OPS)}: score {narrow_score['score']:.4f} "
                         f"against {score['score']:.4f} with every op quantized")
            model, score, op_types = narrow, narrow_score, list(WEIGHT_OPS)
    float_nodes: List[str] = []
    best = (score, model, list(float_nodes))
    step, rounds, stale = 1, 0, 0
    while best[0]["score"] < target and rounds < MAX_REBUILDS and stale < MAX_STALE_ROUNDS:
        # Re-rank after every rebuild: once the worst node is float, the next culprit shows.
        suspects: List[str] = []
        for group in rank_error_jumps(job, model):
            new = [n for n in group if n not in float_nodes and n not in suspects]
            if new and len(suspects) < step:
                suspects.extend(new)
        if not suspects:
            break
        float_nodes.extend(suspects)
        model = _quantizer_call("int8", lambda: quantize(float_nodes, op_types))
        score = job.score(model)
        rounds += 1
        log.debug("int8 round %d: float %s, score %.4f", rounds, suspects, score["score"])
        if score["score"] > best[0]["score"]:
            best, stale = (score, model, list(float_nodes)), 0
        else:
            stale += 1  # the error is spread thin over the network; more float nodes will not fix it
        step = min(step * 2, MAX_STEP)  # bounded rounds even when many nodes are to blame
    score, model, kept = best
    if kept:
        shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
        notes.append(f"kept {len(kept)} nodes in float (score {score['score']:.4f}): {shown}")
    if score["score"] < goal(job.options):
        notes.append(f"score {score['score']:.4f} on the calibration data is below the goal {goal(job.options):.4f} "
                     f"after {rounds} repair rounds")
    candidate = _quantized_candidate("int8", model, kept, score, notes, rounds=rounds)
    candidate.details["calibration"] = calibration
    return candidate


# --- accuracy ------------------------------------------------------------------------------------------


def agreement(reference: List[dict], candidate: List[dict], batch_sizes: Optional[List[int]] = None,
              kinds: Optional[Dict[str, str]] = None, threshold: float = 0.5) -> dict:
    """Compare outputs batch by batch, each by its task (``kinds``, edgeml.optimizer.metrics):
    top-1 agreement for class scores ([N, C] or [N, T, C] floats), mask IoU for probability
    maps, cosine similarity and max abs error for every float output.

    ``score`` is what a build must push above its goal: for class scores the share of samples
    that keep the float top-1 class with at least half of the float top-1/top-2 margin left (a
    sample whose margin quantization nearly used up flips on the next, similar input), for maps
    the IoU; outputs of those kinds decide, else the worst cosine (or 1 - relative error). Without
    ``kinds``, an output counts as class scores when it has their shape and, with
    ``batch_sizes``, its first axis is the batch (a recurrent state [2, N, 128] is not one)."""
    top1: Dict[str, List[np.ndarray]] = {}
    robust: Dict[str, List[np.ndarray]] = {}
    ious: Dict[str, List[float]] = {}
    dots: Dict[str, List[float]] = {}
    max_abs = 0.0
    for k, (ref, got) in enumerate(zip(reference, candidate)):
        for name, a in ref.items():
            a, b = np.asarray(a), np.asarray(got[name])
            if a.dtype.kind != "f":
                continue
            batched = batch_sizes is None or a.shape[:1] == (batch_sizes[k],)
            scores = a.ndim in (2, 3) and a.shape[-1] > 1 and batched
            kind = kinds.get(name, "cosine") if kinds else ("agreement" if scores else "cosine")
            if kind in ("accuracy", "agreement", "sequence") and scores:
                top1.setdefault(name, []).append((a.argmax(-1) == b.argmax(-1)).ravel())
                robust.setdefault(name, []).append(_keeps_margin(a, b).ravel())
            elif kind == "iou" and batched:
                ious.setdefault(name, []).extend(mask_ious(a, b, threshold))
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            acc = dots.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(a64 @ b64)
            acc[1] += float(a64 @ a64)
            acc[2] += float(b64 @ b64)
            if a.size:
                max_abs = max(max_abs, float(np.max(np.abs(a64 - b64))))
    agree = {k: float(np.concatenate(v).mean()) for k, v in top1.items()}
    kept = {k: float(np.concatenate(v).mean()) for k, v in robust.items()}
    iou = {k: float(np.mean(v)) for k, v in ious.items()}
    cosine = {k: (1.0 if v[1] == v[2] == 0 else v[0] / max(np.sqrt(v[1] * v[2]), 1e-30)) for k, v in dots.items()}
    relative = {k: (0.0 if v[1] == 0 and v[2] == 0 else
                    float(np.sqrt(max(v[1] - 2 * v[0] + v[2], 0.0)) / np.sqrt(v[1])) if v[1] > 0 else 1.0)
                for k, v in dots.items()}
    deciding = list(kept.values()) + list(iou.values())
    if not deciding:
        deciding = [1.0 - relative[k] if kinds and kinds.get(k) == "relative-error" else c for k, c in cosine.items()]
    score = min(deciding, default=1.0)
    return {"score": float(score), "top1": agree, "margin_kept": kept, "iou": iou, "cosine": cosine,
            "relative_error": relative, "max_abs_error": max_abs, "agreement": min(agree.values()) if agree else None}


def _keeps_margin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: does ``b`` rank the float top-1 class above the float top-2 class by at least
    half the float margin?"""
    top = np.argsort(-a, axis=-1)[..., :2]

    def pick(z, k):
        return np.take_along_axis(z, top[..., k : k + 1], axis=-1)[..., 0]

    return (pick(b, 0) - pick(b, 1)) >= 0.5 * (pick(a, 0) - pick(a, 1))


def goal(options: BuildOptions) -> float:
    """The calibration-data score a build aims for: twice as strict as the user's goal, because
    the same data chose the quantization ranges and held-out data always does a little worse."""
    return 1.0 - (1.0 - options.min_agreement) / 2


def rank_error_jumps(job: _Job, qmodel: bytes, max_feeds: int = 4) -> List[List[str]]:
    """Groups of nodes to keep in float, worst first, by how much error each quantization step ADDS.

    Both models run with every main-graph tensor as an output. A tensor's error is its relative
    L2 distance from the float value. Two kinds of step add error: quantizing an activation ``t``
    (error of DequantizeLinear(t) minus error of ``t``; fixed by keeping t's producer and
    consumers in float) and a quantized op (its output's error minus the worst error among the
    inputs it reads; fixed by keeping that op in float). Steps that merely pass on upstream error
    rank low, so the step that introduces it (a badly ranged activation, weights that do not
    survive int8, a division that amplifies noise) ranks high."""
    import onnx

    graph = job.prepared.graph
    qgraph = onnx.load_model_from_string(qmodel).graph
    quant_of = {n.output[0]: n.input[0] for n in qgraph.node if n.op_type == "QuantizeLinear"}
    dq_of = {quant_of[n.input[0]]: n.output[0] for n in qgraph.node
             if n.op_type == "DequantizeLinear" and n.input[0] in quant_of}  # float name -> its DQ copy
    qnames = {o for n in qgraph.node for o in n.output}
    floats = _float_tensors(job.prepared)
    names = [o for n in graph.node for o in n.output if o in qnames and o in floats]
    dq_names = [dq_of[t] for t in names if t in dq_of]
    if not names:
        return []
    sums: Dict[str, List[float]] = {}
    float_runner = load_runner(_with_outputs(job.prepared, names), "onnx")
    quant_runner = load_runner(_with_outputs(onnx.load_model_from_string(qmodel), names + dq_names), "onnx")
    for feed in job.feeds[:max_feeds]:
        want, got = float_runner.run(feed), quant_runner.run(feed)
        for t in names:
            for key, value in ((t, got[t]), (dq_of.get(t), got.get(dq_of.get(t)))):
                a, b = np.asarray(want[t], np.float64), np.asarray(value, np.float64) if value is not None else None
                if key is not None and b is not None and a.shape == b.shape:
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += float(np.sum((a - b) ** 2))
                    acc[1] += float(np.sum(a ** 2))
    err = {k: np.sqrt(d / max(t, 1e-30)) for k, (d, t) in sums.items()}
    producer = {o: n for n in graph.node for o in n.output}
    q_producer = {o: n.op_type for n in qgraph.node for o in n.output}
    consumers: Dict[str, List[str]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)

    def seen(t):
        """The error of what a consumer of ``t`` reads (its dequantized copy when quantized)."""
        return err.get(dq_of.get(t), err.get(t))

    steps = []  # (added error, nodes to keep in float)
    for node in graph.node:
        outs = [seen(o) for o in node.output if seen(o) is not None]
        if not outs or not node.name:
            continue
        group, reads = [node.name], []
        for i in node.input:
            if seen(i) is None and i in producer:  # fused into the node before it (Conv+Relu): blame both
                group.append(producer[i].name)
                reads.extend(seen(j) for j in producer[i].input)
            else:
                reads.append(seen(i))
        steps.append((max(outs) - max([r for r in reads if r is not None] + [0.0]), group))
    for t in names:
        same_op = t in producer and q_producer.get(t) == producer[t].op_type  # else the raw value is pre-fusion
        if same_op and dq_of.get(t) in err and t in err:
            group = [n for n in [producer[t].name, *consumers.get(t, [])] if n]
            steps.append((err[dq_of[t]] - err[t], group))
    steps.sort(key=lambda s: -s[0])
    return [group for added, group in steps if added > 0]


def _float_tensors(model) -> set:
    import onnx

    infos = list(model.graph.value_info) + list(model.graph.output)
    return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def _with_outputs(model, names: Sequence[str]) -> bytes:
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    typed = {v.name: v for v in probe.graph.value_info}
    probe.graph.output.extend(typed.get(n) or onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    return probe.SerializeToString()


# --- helpers ---------------------------------------------------------------------------------------------


def iter_feeds(dataset: Dataset, specs: Sequence[TensorSpec], batch_size: int = BATCH) -> Iterator[dict]:
    """Model feeds from a dataset. An array with one more axis than its input holds one
    unbatched feed per sample (a recurrent state [2, N, 128] or a scalar sample rate); if any
    input is like that, every sample is fed on its own. Otherwise arrays are sliced in batches."""
    per_sample = any(np.ndim(dataset.inputs[s.name]) == len(s.shape) + 1 for s in specs)
    if per_sample:
        for i in range(len(dataset)):
            yield {s.name: _conform(dataset.inputs[s.name], s, i) for s in specs}
        return
    for batch in dataset.batches(batch_size):
        yield {s.name: np.asarray(batch[s.name], s.dtype) for s in specs}


def _batch_size(feed: dict) -> int:
    """The batch of a feed: the first axis its inputs share most often."""
    firsts = Counter(np.shape(v)[0] for v in feed.values() if np.ndim(v) > 0)
    return firsts.most_common(1)[0][0] if firsts else 1


def _conform(array: np.ndarray, spec: TensorSpec, i: int) -> np.ndarray:
    if np.ndim(array) == len(spec.shape) + 1:
        return np.asarray(array[i], spec.dtype)
    return np.asarray(array[i : i + 1], spec.dtype)


def quantized_op_counts(model: bytes) -> Dict[str, int]:
    """Ops that run quantized, by type: QDQ-fed ops, integer ops, and QLinear ops (all graphs)."""
    import onnx

    counts: Counter = Counter()

    def walk(graph):
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        for node in graph.node:
            for g in subgraphs(node):
                walk(g)
            if node.op_type in QDQ_MARKERS or node.op_type == "DynamicQuantizeLinear":
                continue
            if node.op_type in INTEGER_OPS or node.op_type.startswith("QLinear") or any(i in dequantized for i in node.input):
                counts[node.op_type] += 1

    walk(onnx.load_model_from_string(model).graph)
    return dict(counts)


def _quantized_candidate(recipe: str, model: bytes, float_nodes: List[str], score: Optional[dict], notes: List[str], rounds: int = 0) -> Candidate:
    counts = quantized_op_counts(model)
    details = {"quantized_ops": counts, "float_nodes": list(float_nodes), "repair_rounds": rounds}
    if score is not None:
        details["agreement"] = score["agreement"] if score["agreement"] is not None else score["score"]
        details["score"] = score["score"]
        details["cosine"] = score["cosine"]
        details["max_abs_error"] = score["max_abs_error"]
    notes = [f"quantized {sum(counts.values())} ops ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})", *notes]
    return Candidate(recipe, "onnx", model, notes=notes, details=details)


class _DropRootRecords(logging.Filter):
    """ORT's quantizer logs advice to the root logger ("consider pre-processing"); edgeml did
    the preparation itself, so the advice is noise on the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root"


def _quantizer_call(recipe: str, call: Callable[[], bytes]) -> bytes:
    root = logging.getLogger()
    quiet = _DropRootRecords()
    root.addFilter(quiet)
    try:
        # ORT's C++ warnings from the sessions the quantizer opens; its histogram calibrators
        # print progress on stdout, which belongs to --json
        with captured_stderr(), contextlib.redirect_stdout(sys.stderr):
            return call()
    except EdgemlError:
        raise
    except Exception as exc:  # ORT's quantizer raises anything from AssertionError to KeyError
        raise ConversionError(f"ONNX Runtime's quantizer failed on the {recipe} recipe: "
                              f"{type(exc).__name__}: {first_line(exc)}; try the fp32 or float16 recipe") from exc
    finally:
        root.removeFilter(quiet)
