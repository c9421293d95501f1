"""What the worker reads off ONNX graphs: node names INC can key on, the weight layers, the tuning
space built from them, and which nodes of a tuned model still run in float."""
from __future__ import annotations

from collections import Counter

WEIGHT_OPS = ("Conv", "ConvTranspose", "FusedConv", "Gemm", "MatMul")
LAYER_OPS = WEIGHT_OPS + ("Gather", "GatherElements", "GatherND", "EmbedLayerNormalization", "Attention")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


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
