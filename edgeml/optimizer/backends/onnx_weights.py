"""How an ONNX model's weights are stored: float16 behind a Cast, or int8 with per-channel
scales behind a DequantizeLinear. Either way every op still reads float32, so CPU kernels run
as they did; only the file shrinks. Graph rewrites only: which weights to keep float, and
whether the result is good enough, is the recipes' business (``onnx.py``)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..sources.onnx_prepare import subgraphs

FP16_MIN_ELEMENTS = 16  # smaller tensors (biases, scalars, shapes) stay float32
FP16_MAX = 65504.0
INT8_WEIGHT_MIN_ELEMENTS = 256  # smaller weights stay float32: their scales would cost as much as they save

# a float32 initializer -> None to leave it, or (stored tensor, extra initializers, node that rebuilds the float)
Convert = Callable[[object], Optional[Tuple[object, list, object]]]


def _store(graph, converter_for: Callable[[object], Convert]) -> int:
    """Rewrite the float32 initializers ``converter_for(graph)`` takes, in every (sub)graph; the
    nodes that turn them back into float32 go first, which keeps the graph topologically sorted."""
    from onnx import TensorProto

    count = sum(_store(g, converter_for) for node in graph.node for g in subgraphs(node))
    convert, inputs = converter_for(graph), {i.name for i in graph.input}
    front, extra = [], []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in inputs:
            continue
        done = convert(tensor)
        if done is None:
            continue
        stored, more, node = done
        tensor.CopyFrom(stored)
        extra.extend(more)
        front.append(node)
        count += 1
    graph.initializer.extend(extra)
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def weights_to_float16(graph) -> int:
    """Store large float32 initializers as float16 with a Cast back to float32 in front."""
    from onnx import TensorProto, helper, numpy_helper

    def convert(tensor):
        w = numpy_helper.to_array(tensor)
        if w.size < FP16_MIN_ELEMENTS or not np.all(np.abs(w) < FP16_MAX):
            return None
        name = tensor.name
        return (numpy_helper.from_array(w.astype(np.float16), f"{name}__fp16"), [],
                helper.make_node("Cast", [f"{name}__fp16"], [name], name=f"{name}__to_fp32", to=TensorProto.FLOAT))

    return _store(graph, lambda g: convert)


def weights_to_int8(graph, keep_float: frozenset = frozenset(), rounded: Optional[Dict[str, tuple]] = None) -> int:
    """Store the large weights of Conv/MatMul/Gemm/Gather (but those in ``keep_float``) as int8
    with a scale per output channel and a DequantizeLinear in front. ``rounded`` gives, by
    weight name, int8 values and scales already chosen (onnx_gptq) to use instead of rounding
    to nearest."""
    from onnx import helper, numpy_helper

    def converter_for(g) -> Convert:
        axes = weight_axes(g)

        def convert(tensor):
            axis = axes.get(tensor.name)
            if axis is None or tensor.name in keep_float:
                return None
            w = numpy_helper.to_array(tensor).astype(np.float32)
            if w.size < INT8_WEIGHT_MIN_ELEMENTS or not np.all(np.isfinite(w)):
                return None
            name = tensor.name
            if axis < 0 or w.ndim == 0:
                scale = np.asarray(max(float(np.max(np.abs(w))), 1e-30) / 127.0, np.float32)
                q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
                zero, attrs = np.asarray(0, np.int8), {}
            else:
                given = (rounded or {}).get(name)
                scale, q = (given[1], given[0].astype(np.int8)) if given and given[2] == axis else int8_per_channel(w, axis)
                zero, attrs = np.zeros(scale.shape, np.int8), {"axis": axis}
            extra = [numpy_helper.from_array(scale, f"{name}__scale"), numpy_helper.from_array(zero, f"{name}__zero")]
            node = helper.make_node("DequantizeLinear", [f"{name}__int8", f"{name}__scale", f"{name}__zero"], [name],
                                    name=f"{name}__dequantize", **attrs)
            return numpy_helper.from_array(q, f"{name}__int8"), extra, node

        return convert

    return _store(graph, converter_for)


def weight_axes(graph) -> Dict[str, int]:
    """Initializer -> the axis of its output channels, for weights of ops that carry them."""
    inits = {t.name: len(t.dims) for t in graph.initializer}
    axes: Dict[str, int] = {}
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and len(node.input) > 1:
            name, axis = node.input[1], 0  # [O, I, k...]
        elif node.op_type == "ConvTranspose" and len(node.input) > 1:
            name, axis = node.input[1], 1  # [I, O/group, k...]
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            name, axis = node.input[1], inits[node.input[1]] - 1  # [..., K, N]: per output column
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            name, axis = node.input[1], 0 if trans_b else 1
        elif node.op_type == "Gather" and node.input and node.input[0] in inits:
            name, axis = node.input[0], 0  # an embedding table: a scale per row
        else:
            continue
        if name in inits and inits[name] >= 1:
            # shared by ops that read it along different axes: one scale for the tensor
            axes[name] = axis if axes.get(name, axis) == axis else -1
    return axes


def int8_per_channel(w: np.ndarray, axis: int) -> tuple:
    """Symmetric int8 with a scale per channel along ``axis`` (its largest |weight| is 127).
    Clipping ranges chosen for the least squared error were tried and measured: on PP-OCR's
    convolutions they picked the full range on every channel (int8 steps are already fine)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.max(np.abs(w), axis=reduce) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    shape = [1] * w.ndim
    shape[axis] = -1
    return scale, np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)


def int8_weight_names(graph) -> List[str]:
    """The main graph's weights that weights_to_int8 stores as int8, largest relative rounding error first."""
    from onnx import TensorProto, numpy_helper

    axes = weight_axes(graph)
    errors = {}
    for t in graph.initializer:
        if t.name in axes and t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) >= INT8_WEIGHT_MIN_ELEMENTS:
            w = numpy_helper.to_array(t).astype(np.float32)
            if axes[t.name] < 0 or not np.all(np.isfinite(w)):
                errors[t.name] = 0.0
                continue
            scale, q = int8_per_channel(w, axes[t.name])
            shape = [1] * w.ndim
            shape[axes[t.name]] = -1
            errors[t.name] = float(np.linalg.norm(q * scale.reshape(shape) - w) / max(np.linalg.norm(w), 1e-30))
    return sorted(errors, key=lambda n: -errors[n])
