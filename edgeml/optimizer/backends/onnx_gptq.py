"""Int8 weights rounded with the error they cause in mind (GPTQ: Frantar et al., 2022, "Accurate
post-training quantization for generative pre-trained transformers").

Rounding every weight to its nearest int8 step makes each error small, but a layer's output
sums hundreds of them. GPTQ rounds one input column at a time and moves the rounding error onto
the columns not yet rounded, weighted by how the layer's real inputs correlate (their second
moment H = XᵀX from calibration data), so the errors cancel in the output instead of adding
up. Scales stay per output channel and the stored format is exactly the plain one: only which
int8 value each weight gets changes.

Covered: MatMul/Gemm with a constant 2-D weight and Conv (1-D and 2-D, any group count),
whose inputs are unfolded into patches. The inputs are read off the float model, one sample at
a time, so memory holds one sample's activations and an H per layer.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

MAX_ROWS = 16384  # input rows (samples x positions) that go into one layer's H
MAX_COLUMNS = 4608  # wider layers (inputs x kernel) keep plain rounding: H would cost too much
DAMP = 0.01  # of H's mean diagonal, added to it: keeps the inverse stable for rare inputs
BLOCK = 128  # columns rounded together before the rest is updated (same result, faster)


class _Layer:
    """One weight as GPTQ sees it: W [outputs, columns] per group, and how to cut input rows."""

    def __init__(self, name: str, op: str, source: str, shape: Sequence[int], attrs: dict):
        self.name, self.op, self.source, self.shape, self.attrs = name, op, source, list(shape), attrs
        self.group = int(attrs.get("group", 1)) if op == "Conv" else 1
        self.h: List[Optional[np.ndarray]] = [None] * self.group
        self.rows = 0

    @property
    def columns(self) -> int:
        return int(np.prod(self.shape[1:])) if self.op == "Conv" else self.shape[0]


def _layers(graph, initializers: dict, names: Sequence[str]) -> Dict[str, _Layer]:
    wanted, layers = set(names), {}
    users: Dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    for node in graph.node:
        attrs = {a.name: _value(a) for a in node.attribute}
        if len(node.input) < 2 or node.input[1] not in wanted or users.get(node.input[1]) != 1:
            continue  # a weight read by two ops would need both ops' inputs: plain rounding
        shape = list(initializers[node.input[1]].dims)
        if node.op_type == "Conv" and len(shape) in (3, 4) and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            layer = _Layer(node.input[1], "Conv", node.input[0], shape, attrs)
        elif node.op_type == "MatMul" and len(shape) == 2:
            layer = _Layer(node.input[1], "MatMul", node.input[0], shape, attrs)
        elif node.op_type == "Gemm" and len(shape) == 2 and not attrs.get("transA", 0):
            layer = _Layer(node.input[1], "Gemm", node.input[0], shape, attrs)
        else:
            continue
        if layer.columns // layer.group <= MAX_COLUMNS:
            layers[layer.name] = layer
    return layers


def _value(attr):
    from onnx import helper

    return helper.get_attribute_value(attr)


def _rows(layer: _Layer, x: np.ndarray, limit: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The input rows the layer multiplies with its weight, one array [rows, columns/group] per
    group, at most ``limit`` rows drawn at random."""
    if layer.op != "Conv":
        rows = x.reshape(-1, x.shape[-1])
        rows = rows[rng.choice(len(rows), limit, replace=False)] if len(rows) > limit else rows
        return [rows.astype(np.float64)]
    kernel = layer.shape[2:]
    spatial = len(kernel)
    strides = list(layer.attrs.get("strides") or [1] * spatial)
    dilations = list(layer.attrs.get("dilations") or [1] * spatial)
    pads = list(layer.attrs.get("pads") or [0] * (2 * spatial))
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    out = [(padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(spatial)]
    total = x.shape[0] * int(np.prod(out))
    picks = rng.choice(total, min(limit, total), replace=False) if total > limit else np.arange(total)
    where = np.unravel_index(picks, [x.shape[0], *out])
    n = where[0][:, None, None]
    channels = np.arange(x.shape[1])[None, :, None]
    offsets = np.stack(np.meshgrid(*[np.arange(k) * dilations[i] for i, k in enumerate(kernel)], indexing="ij"), -1)
    offsets = offsets.reshape(-1, spatial)  # kernel positions, in the weight's (row-major) order
    index = [n, channels] + [(where[1 + i] * strides[i])[:, None, None] + offsets[None, None, :, i] for i in range(spatial)]
    patches = padded[tuple(index)].reshape(len(picks), x.shape[1], -1)  # [rows, channels, kernel]
    per_group = x.shape[1] // layer.group
    return [patches[:, g * per_group : (g + 1) * per_group].reshape(len(picks), -1).astype(np.float64)
            for g in range(layer.group)]


def collect(model, feeds: Sequence[dict], names: Sequence[str], seed: int = 0) -> Dict[str, _Layer]:
    """H = mean of xxᵀ over the input rows each weight meets, read off the float model."""
    import onnx
    import onnxruntime as ort

    initializers = {t.name: t for t in model.graph.initializer}
    layers = _layers(model.graph, initializers, names)
    if not layers:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    sources = sorted({layer.source for layer in layers.values()})
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(s) for s in sources if s not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor named
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = sources
    samples = [_slice(feed, i) for feed in feeds for i in range(_batch(feed))]
    rng = np.random.default_rng(seed)
    per_sample = max(MAX_ROWS // max(len(samples), 1), 16)
    for sample in samples:
        values = dict(zip(fetch, session.run(fetch, sample)))
        for layer in layers.values():
            for g, rows in enumerate(_rows(layer, values[layer.source], per_sample, rng)):
                h = rows.T @ rows
                layer.h[g] = h if layer.h[g] is None else layer.h[g] + h
            layer.rows += len(rows)
    return layers


def _batch(feed: dict) -> int:
    sizes = {np.shape(v)[0] for v in feed.values() if np.ndim(v) > 0}
    return sizes.pop() if len(sizes) == 1 else 1


def _slice(feed: dict, i: int) -> dict:
    if _batch(feed) == 1:
        return feed
    return {k: v[i : i + 1] for k, v in feed.items()}


def round_weights(model, feeds: Sequence[dict], names: Sequence[str], seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray, int]]:
    """Weight name -> (int8 values in the weight's own layout, float32 scale per output channel,
    the channel axis), for the weights in ``names`` that GPTQ covers."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    done = {}
    for name, layer in collect(model, feeds, names, seed).items():
        w = numpy_helper.to_array(initializers[name]).astype(np.float64)
        if not np.all(np.isfinite(w)) or any(h is None for h in layer.h):
            continue
        if layer.op == "Conv":
            outputs = w.shape[0] // layer.group
            parts = [_gptq(w[g * outputs : (g + 1) * outputs].reshape(outputs, -1), layer.h[g] / layer.rows)
                     for g in range(layer.group)]
            q = np.concatenate([p[0] for p in parts]).reshape(w.shape)
            done[name] = (q, np.concatenate([p[1] for p in parts]), 0)
        else:
            trans = layer.op == "Gemm" and layer.attrs.get("transB", 0)
            q, scale = _gptq(w if trans else w.T, layer.h[0] / layer.rows)
            done[name] = (q if trans else np.ascontiguousarray(q.T), scale, 0 if trans else 1)
    return done


def _gptq(w: np.ndarray, h: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Round W [outputs, columns] to int8 with a symmetric scale per output row, columns in
    order of decreasing input energy (diag H), each one's error spread over the rest."""
    w = w.copy()
    scale = np.max(np.abs(w), axis=1) / 127.0
    scale[scale == 0] = 1.0
    h = h.copy()
    dead = np.diag(h) == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[order][:, order]
    h[np.diag_indices_from(h)] += DAMP * np.mean(np.diag(h))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        upper = None
    q = np.zeros(w.shape, np.int8)
    if upper is None:  # H not positive definite even damped: plain rounding
        q[:] = np.clip(np.round(w / scale[:, None]), -127, 127)
    else:
        for start in range(0, w.shape[1], BLOCK):
            end = min(start + BLOCK, w.shape[1])
            block, errors, inv = w[:, start:end].copy(), np.zeros((w.shape[0], end - start)), upper[start:end, start:end]
            for i in range(end - start):
                step = np.clip(np.round(block[:, i] / scale), -127, 127)
                q[:, start + i] = step
                error = (block[:, i] - step * scale) / inv[i, i]
                block[:, i:] -= np.outer(error, inv[i, i:])
                errors[:, i] = error
            w[:, end:] -= errors @ upper[start:end, end:]
    restored = np.empty_like(q)
    restored[:, order] = q
    return restored, scale.astype(np.float32)
