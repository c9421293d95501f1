"""Make real exported ONNX models quantizable without changing what they compute.

Exporters such as paddle2onnx and torch's keep weights in ``Constant`` nodes, which ONNX
Runtime's quantizers treat as activations (so nothing gets smaller), and their graphs defeat
the symbolic shape inference that ``quant_pre_process`` relies on. ``prepare`` lifts constants
into initializers (in If/Loop bodies too), folds constant-only arithmetic, fuses
BatchNormalization into the Conv before it, drops dead nodes, records a type for every tensor,
and then proves on sample data that the outputs did not change.
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgeml.core.errors import ConversionError, DataError, first_line

log = logging.getLogger(__name__)

# Per-channel QDQ (DequantizeLinear's axis attribute) needs opset 13.
QUANTIZER_MIN_OPSET = 13
# Ops that are safe to evaluate ahead of time when every input is a constant.
FOLDABLE = {
    "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Cast", "Reshape", "Transpose",
    "Unsqueeze", "Squeeze", "Flatten", "Concat", "Slice", "Gather", "Identity", "Clip", "Abs",
}
MAX_FOLD_GROWTH = 4  # never fold a node whose output is far bigger than its inputs (Expand, Tile)


def prepare(model, sample_feed: Optional[Dict[str, np.ndarray]] = None) -> Tuple[object, List[str]]:
    """Return ``(prepared ModelProto, notes)``; with ``sample_feed``, prove outputs are unchanged."""
    import onnx

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    notes: List[str] = []
    lifted = _lift_constants(prepared.graph) if prepared.ir_version >= 4 else 0
    if lifted:
        notes.append(f"turned {lifted} Constant nodes into initializers")
    prepared = _upgrade_opset(prepared, notes)
    folded = _fold_constants(prepared.graph, _opset(prepared))
    if folded:
        notes.append(f"folded {folded} constant-only nodes")
    fused = _fuse_conv_batchnorm(prepared.graph)
    if fused:
        notes.append(f"fused {fused} BatchNormalization nodes into their Conv")
    removed = _remove_unused(prepared.graph)
    if removed:
        notes.append(f"removed {removed} unused nodes and initializers")
    prepared = _ort_basic_fusions(prepared, notes)
    prepared = _infer_shapes(prepared, sample_feed, notes)
    if sample_feed is not None:
        check_same_outputs(model, prepared, sample_feed)
    else:
        notes.append("prepared model not checked against the original (no sample data)")
    return prepared, notes


# --- graph walking ---------------------------------------------------------------------------------


def subgraphs(node):
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_used(graph) -> set:
    """Every tensor name a graph's nodes read, including from inside their subgraphs."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for g in subgraphs(node):
            used |= _names_used(g)
            used.update(o.name for o in g.output)
    return used


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


# --- the steps ------------------------------------------------------------------------------------------


def _lift_constants(graph) -> int:
    """Constant nodes -> initializers of the same graph (subgraphs recurse)."""
    from onnx import helper, numpy_helper

    outputs = {o.name for o in graph.output}
    kept, count = [], 0
    for node in graph.node:
        for g in subgraphs(node):
            count += _lift_constants(g)
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            attr = node.attribute[0] if len(node.attribute) == 1 else None
            if attr is not None and attr.name == "value":
                tensor = attr.t
            elif attr is not None and attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                value = helper.get_attribute_value(attr)
                dtype = np.float32 if "float" in attr.name else np.int64
                tensor = numpy_helper.from_array(np.asarray(value, dtype))
        if tensor is None:
            kept.append(node)
            continue
        init = graph.initializer.add()
        init.CopyFrom(tensor)
        init.name = node.output[0]
        count += 1
    del graph.node[:]
    graph.node.extend(kept)
    return count


def _upgrade_opset(model, notes: List[str]):
    import onnx
    from onnx import version_converter

    version = _opset(model)
    if version >= QUANTIZER_MIN_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, QUANTIZER_MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter has gaps for rare ops; per-channel QDQ is then unavailable
        notes.append(f"kept opset {version}: upgrading to {QUANTIZER_MIN_OPSET} failed ({first_line(exc)})")
        return model
    notes.append(f"upgraded opset {version} -> {QUANTIZER_MIN_OPSET} (per-channel int8 needs it)")
    return upgraded


def _fold_constants(graph, opset: int) -> int:
    """Evaluate main-graph nodes whose inputs are all initializers; replace them by their result."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    values = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, count = [], 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = (
            node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and inputs
            and all(i in values for i in inputs) and not any(o in outputs for o in node.output)
        )
        if foldable:
            try:
                feeds = {i: numpy_helper.to_array(values[i]) for i in inputs}
                results = ReferenceEvaluator(_single_node_model(node, values, opset)).run(None, feeds)
            except Exception as exc:  # an op the reference runtime lacks: leave it to ONNX Runtime
                log.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                results = None
            size_in = sum(values[i].ByteSize() for i in inputs)
            if results is not None and sum(np.asarray(r).nbytes for r in results) <= MAX_FOLD_GROWTH * size_in + 1024:
                for name, value in zip(node.output, results):
                    tensor = numpy_helper.from_array(np.asarray(value), name)
                    graph.initializer.append(tensor)
                    values[name] = tensor
                count += 1
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return count


def _single_node_model(node, values, opset: int):
    from onnx import helper

    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, values[i].data_type, None) for i in node.input if i],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _fuse_conv_batchnorm(graph) -> int:
    """Conv -> BatchNormalization (inference form, constant parameters) becomes one Conv.

    Quantizing the fused weights per channel is more accurate than quantizing the Conv output
    and then scaling it again, and ONNX Runtime fuses the float model the same way at load time.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consumers = Counter(i for n in graph.node for i in n.input)
    consumers.update(o.name for o in graph.output)
    for node in graph.node:
        for g in subgraphs(node):
            consumers.update(_names_used(g))
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    drop, count = set(), 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in graph_outputs or consumers.get(conv.output[0]) != 1:
            continue
        params = bn.input[1:5]
        if not all(p in inits for p in params) or conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        factor = gamma / np.sqrt(var + eps)
        w_name, b_name = f"{bn.output[0]}__fused_W", f"{bn.output[0]}__fused_B"
        graph.initializer.extend([
            numpy_helper.from_array((w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), w_name),
            numpy_helper.from_array(((b - mean) * factor + beta).astype(np.float32), b_name),
        ])
        fused = helper.make_node("Conv", [conv.input[0], w_name, b_name], [bn.output[0]], name=conv.name or bn.name)
        fused.attribute.extend(conv.attribute)
        conv.CopyFrom(fused)
        drop.add(id(bn))
        count += 1
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    return count


def _ort_basic_fusions(model, notes: List[str]):
    """ONNX Runtime's hardware-independent ("basic") rewrites, saved back as plain ONNX.

    They fold the Mul/Add that exporters leave after a Conv (scale and shift of a batch norm)
    into the Conv's weights. Quantizing those Mul/Add ops separately adds a quantize/dequantize
    pair each, which made int8 MobileNetV2 no faster than float on ONNX Runtime; fused, it is
    about a third faster. Any failure keeps the model as it was; so does control flow.
    """
    import onnx
    import onnxruntime as ort

    if any(True for node in model.graph.node for _ in subgraphs(node)):
        # ORT moves branch weights out of If/Loop bodies when it saves, and the quantizer then
        # finds no weight inside the branches: control-flow models keep their graph
        return model
    before = sum(1 for g in _all_graphs(model.graph) for _ in g.node)
    with tempfile.TemporaryDirectory(prefix="edgeml-ort-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            optimized = onnx.load(str(out))
        except Exception as exc:  # ORT raises untyped errors; the unoptimized model still works
            notes.append(f"kept the graph as it was: ONNX Runtime's basic rewrites failed ({first_line(exc)})")
            return model
    # ORT rewrites how dynamic dims are spelled (-1 becomes an empty dim): keep the original I/O
    for new_io, old_io in ((optimized.graph.input, model.graph.input), (optimized.graph.output, model.graph.output)):
        types = {v.name: v.type for v in old_io}
        for v in new_io:
            if v.name in types:
                v.type.CopyFrom(types[v.name])
    _flatten_gemm_bias(optimized.graph)
    after = sum(1 for g in _all_graphs(optimized.graph) for _ in g.node)
    if after < before:
        notes.append(f"fused {before - after} nodes with ONNX Runtime's basic rewrites")
    return optimized


def _flatten_gemm_bias(graph) -> None:
    """MatMul+Add fused into Gemm keeps the Add's [1, N] constant as its bias; ORT's quantizer
    expects [N]. Gemm broadcasts either to [M, N], so the reshape changes nothing computed."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    users: Counter = Counter(name for n in graph.node for name in n.input)
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = inits[node.input[2]]
        if len(bias.dims) == 2 and bias.dims[0] == 1 and users[bias.name] == 1:
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), bias.name))


def _all_graphs(graph):
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _all_graphs(sub)


def _remove_unused(graph) -> int:
    """Drop nodes no graph output depends on, then initializers nothing reads (subgraphs too)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for g in subgraphs(node):
                needed |= _names_used(g)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for node in graph.node:
        for g in subgraphs(node):
            removed += _remove_unused(g)
    live = [t for t in graph.initializer if t.name in needed]
    removed += len(graph.initializer) - len(live)
    del graph.initializer[:]
    graph.initializer.extend(live)
    return removed


# --- shape inference with fallbacks ----------------------------------------------------------------


def _untyped(model) -> List[str]:
    known = {v.name for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    known |= {t.name for t in model.graph.initializer}
    return [o for n in model.graph.node for o in n.output if o and o not in known]


def _infer_shapes(model, sample_feed, notes: List[str]):
    """onnx strict -> onnx lenient -> ORT symbolic -> shapes recorded from running the model."""
    import onnx

    attempts = [
        ("onnx (strict)", lambda m: onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)),
        ("onnx", lambda m: onnx.shape_inference.infer_shapes(m, data_prop=True)),
        ("onnxruntime symbolic", _ort_symbolic),
    ]
    for label, infer in attempts:
        try:
            inferred = infer(model)
        except Exception as exc:
            log.debug("shape inference %s failed: %s", label, first_line(exc))
            continue
        if inferred is not None and not _untyped(inferred):
            log.debug("shapes inferred by %s", label)
            return inferred
        if inferred is not None:
            model = inferred  # keep what it found; the next attempt fills in the rest
    if sample_feed is None:
        notes.append(f"{len(_untyped(model))} tensors have no inferred type (no sample data to record them)")
        return model
    recorded = _record_types(model, sample_feed)
    notes.append(f"shape inference gave up on {recorded} tensors; recorded their types from a sample run")
    return model


def _ort_symbolic(model):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)


def _record_types(model, sample_feed) -> int:
    """Run the model with every untyped tensor as an extra output; write element type and rank
    (every dimension left unnamed, so dynamic axes stay dynamic) into value_info."""
    import onnx
    from onnx import helper

    missing = _untyped(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in missing)
    values = run_model(probe, sample_feed, names=missing)
    for name, value in zip(missing, values):
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
        info = helper.make_tensor_value_info(name, elem, [None] * np.ndim(value))
        model.graph.value_info.append(info)
    return len(missing)


# --- running and checking --------------------------------------------------------------------------


def run_model(model, feed: Dict[str, np.ndarray], names: Optional[List[str]] = None) -> list:
    """Run a ModelProto (or bytes) on ONNX Runtime CPU with one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    wanted = {i.name: i for i in session.get_inputs()}
    return session.run(names, {k: v for k, v in feed.items() if k in wanted})


def check_same_outputs(original, prepared, feed: Dict[str, np.ndarray]) -> None:
    """Raise ConversionError unless ``prepared`` computes what ``original`` does on ``feed``
    (floats to rounding error: folding and BN fusion reorder float arithmetic)."""
    try:
        want = run_model(original, feed)
    except Exception as exc:
        raise DataError(f"the sample data does not run on the original model: {first_line(exc)}; "
                        "check its shapes against the model's inputs") from exc
    try:
        got = run_model(prepared, feed)
    except Exception as exc:
        raise ConversionError(f"the prepared ONNX model does not run: {first_line(exc)}") from exc
    names = [o.name for o in original.graph.output]
    for name, a, b in zip(names, want, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ConversionError(f"preparing the model changed output {name} from {a.dtype}{a.shape} to {b.dtype}{b.shape}")
        if a.dtype.kind == "f":
            worst = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
            tolerance = 1e-4 * max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
            same = worst <= tolerance
        else:
            same, worst = bool(np.array_equal(a, b)), None
        if not same:
            raise ConversionError(
                f"preparing the model changed output {name} (max difference {worst}); "
                "report this model to the edgeml developers and use the fp32 recipe meanwhile"
            )
