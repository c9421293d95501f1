"""Shorter names inside an ONNX file: the bytes a device downloads should be weights, not labels.

Exporters name every tensor after its layer path ("save_infer_model/scale_0.tmp_1",
"conv2d_17.w_0_quantized_scale"), and the quantizer adds a quantize/dequantize pair per tensor
with longer names still; in a small int8 model the names can outweigh the weights. Graph inputs
and outputs keep their names (callers use them); everything else gets a short one.
"""
from __future__ import annotations

from typing import Dict


def _short(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if i == 0:
            return "t" + s


def compact_names(model_bytes: bytes) -> bytes:
    """Rename internal tensors, drop node names and doc strings; unchanged for control flow.

    Subgraphs (If/Loop bodies) refer to outer tensors by name, so such models are left alone.
    """
    import onnx

    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return model_bytes
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: Dict[str, str] = {}

    def rename(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = _short(len(names))
        return names[name]

    for init in graph.initializer:
        init.name = rename(init.name)
        init.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for vi in graph.value_info:
        vi.name = rename(vi.name)
    graph.doc_string = ""
    model.doc_string = ""
    return model.SerializeToString()
