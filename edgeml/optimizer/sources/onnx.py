"""An ONNX file as an edgeml source model: its specs, its hash, and float reference outputs.

The reference is always the ORIGINAL file run by ONNX Runtime on CPU with one thread, so every
candidate built from it is measured against what the user handed in, not a prepared copy.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edgeml.core.errors import InputError, UnsupportedModelError
from edgeml.core.specs import TensorSpec

from .base import SourceModel

log = logging.getLogger(__name__)

# Operator domains ONNX Runtime's CPU build implements kernels for.
ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training")


class OnnxSource(SourceModel):
    kind = "onnx"
    default_format = "onnx"

    def __init__(self, path: Path, model_bytes: bytes, runner, file_sha256: Optional[str] = None):
        self.path = path
        self.sha256 = file_sha256 or hashlib.sha256(model_bytes).hexdigest()  # the user's file, for lineage
        self.inputs: List[TensorSpec] = runner.inputs
        self.outputs: List[TensorSpec] = runner.outputs
        self._bytes = model_bytes
        self._runner = runner  # ONNX Runtime, CPU, one thread

    def reference(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self._runner.run(feed)

    def onnx_bytes(self) -> bytes:
        return self._bytes


def load_onnx(path) -> OnnxSource:
    """Read and check an .onnx file; raise a one-line edgeml error for anything we cannot run."""
    import onnx

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path} is not an ONNX model (it does not parse as one); export the model to .onnx") from exc
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path} is not an ONNX model (it holds no graph); export the model to .onnx")
    file_sha256 = hashlib.sha256(data).hexdigest()
    inlined = _inline_external_data(model, path)
    stripped = _strip_metadata(model)
    unzipped = _unzip_maps(model, path)
    if inlined or stripped or unzipped:
        data = model.SerializeToString()
    _check_ops(model, path)
    from edgeml.core.runtime import load_runner

    runner = load_runner(data, "onnx", num_threads=1)
    log.debug("loaded %s: %d nodes, opsets %s", path, len(model.graph.node), _opsets(model))
    return OnnxSource(path, data, runner, file_sha256)


def _inline_external_data(model, path: Path) -> bool:
    """Weights kept beside the .onnx (torch's exporter and MLflow's onnx flavor do this even for
    small models) read into the model, which must then fit ONNX's 2 GB protobuf limit."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for g in _graphs(model.graph) for t in g.initializer if uses_external_data(t)]
    if not external:
        return False
    folder = path.parent.resolve()
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or folder not in target.parents:
            raise InputError(f"{path} names external weights at {location!r}, outside its folder; re-export the model")
        if not target.is_file():
            raise InputError(f"{path} keeps weights in {location}, which is missing; keep it beside {path.name}")
    load_external_data_for_model(model, str(folder))
    if model.ByteSize() >= 2**31:
        raise UnsupportedModelError(f"{path} with its external weights is over 2 GB, which one ONNX file cannot hold; "
                                    "models that large are out of scope")
    log.info("%s: read %d tensors from external data into the model", path.name, len(external))
    return True


def _unzip_maps(model, path: Path) -> int:
    """scikit-learn classifiers converted by skl2onnx end in a ZipMap: a sequence of {class: score}
    maps, which no tensor API can carry. Serve its input instead, the [N, classes] score tensor,
    under the same output name (what ``zipmap=False`` would have exported)."""
    from onnx import TensorProto, helper

    outputs = {o.name: o for o in model.graph.output}
    done = 0
    for node in list(model.graph.node):
        if node.op_type != "ZipMap" or node.output[0] not in outputs:
            continue
        out = outputs[node.output[0]]
        labels = [a for a in node.attribute if a.name in ("classlabels_int64s", "classlabels_strings")]
        classes = len(labels[0].ints or labels[0].strings) if labels else None
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(index, helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                                        name=node.name or "unzipped"))
        out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, [None, classes]))
        log.info("%s: output '%s' is a ZipMap (a sequence of maps); serving its [N, %s] scores instead",
                 path.name, out.name, classes if classes is not None else "classes")
        done += 1
    return done


def _strip_metadata(model) -> int:
    """Doc strings and metadata do not ship: exporters fill them with stack traces that name the
    build machine's paths (torch's dynamo exporter, per node). Names stay. Bytes removed."""
    before = model.ByteSize()
    model.doc_string = ""
    del model.metadata_props[:]
    for graph in _graphs(model.graph):
        graph.doc_string = ""
        for item in [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            if hasattr(item, "doc_string"):
                item.doc_string = ""
            if hasattr(item, "metadata_props"):
                del item.metadata_props[:]
    for fn in model.functions:
        fn.doc_string = ""
        for node in fn.node:
            node.doc_string = ""
            if hasattr(node, "metadata_props"):
                del node.metadata_props[:]
    return before - model.ByteSize()


def _check_ops(model, path: Path) -> None:
    """Name ops from domains ONNX Runtime has no kernels for, before ORT fails with a long message."""
    custom = sorted(
        {f"{n.domain}::{n.op_type}" for g in _graphs(model.graph) for n in g.node if n.domain not in ORT_DOMAINS}
    )
    local_functions = {(f.domain, f.name) for f in model.functions}
    custom = [c for c in custom if tuple(c.split("::", 1)) not in local_functions]
    if custom:
        raise UnsupportedModelError(
            f"{path} uses custom ops ONNX Runtime has no kernels for: {', '.join(custom)}; "
            "re-export the model with standard ONNX ops (or as a function-based model)"
        )


def _graphs(graph):
    """A graph and all its subgraphs (If/Loop/Scan bodies), depth first."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _opsets(model) -> dict:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}
