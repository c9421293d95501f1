"""Keras 3 (.keras) and SavedModel sources: load, describe, run the float model, export to ONNX.

Both kinds are reduced to one *serving function*: a ``tf.function`` whose positional inputs are
TensorSpecs named like the model's inputs and which returns a dict of named outputs. A Keras
model's serving function is exported as the SavedModel the TFLite backend converts (a
SavedModel source is converted as it is); ``onnx_bytes`` exports the same function. So the names
in ``inputs``/``outputs`` are the names of the converted models' signatures, and one dataset
feeds the float model, the .tflite and the .onnx alike.

Naming follows ``tf.lite.TFLiteConverter.from_keras_model``: inputs take the Keras Input names
(the keys for a model built on a dict of inputs), outputs are ``output_0``, ``output_1``, ...
(the keys for a model that returns a dict). A SavedModel keeps its serving signature's names.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from edgeml.core.errors import ConversionError, DataError, InputError, UnsupportedModelError, first_line
from edgeml.core.hashing import sha256_path
from edgeml.core.native_output import captured_stderr
from edgeml.core.specs import TensorSpec

from .base import SourceModel

log = logging.getLogger(__name__)

SERVING_KEY = "serving_default"
REFERENCE_BATCH = 256
ONNX_OPSET = 17


def import_tensorflow():
    """Import TensorFlow with its C++ start-up chatter turned down (only if TF is not loaded yet)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with captured_stderr():  # absl's "log messages before InitializeLog" and CUDA probing notes
        import tensorflow as tf

    return tf


class TFSource(SourceModel):
    """Shared by both kinds: a serving function and the specs derived from it."""

    default_format = "tflite"

    def __init__(self, path: Path, kind: str, serving_fn, inputs: List[TensorSpec],
                 outputs: List[TensorSpec]):
        self.path = path
        self.kind = kind
        self.sha256 = sha256_path(path)
        self.inputs = inputs
        self.outputs = outputs
        self._serving_fn = serving_fn

    @property
    def serving_function(self):
        """``tf.function`` taking the inputs positionally (in ``inputs`` order), returning a dict."""
        return self._serving_fn

    def input_signature(self):
        tf = import_tensorflow()
        return [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in self.inputs]

    def reference(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        tf = import_tensorflow()
        missing = [s.name for s in self.inputs if s.name not in feed]
        if missing:
            names = [s.name for s in self.inputs]
            raise DataError(f"data lacks inputs {missing}; the model's inputs are {names}")
        arrays = [np.asarray(feed[s.name], s.dtype) for s in self.inputs]
        n = len(arrays[0])
        if n == 0:
            raise DataError("no samples to run the float model on; pass data with at least one sample")
        parts: Dict[str, list] = {s.name: [] for s in self.outputs}
        for start in range(0, n, REFERENCE_BATCH):
            args = [tf.constant(a[start : start + REFERENCE_BATCH]) for a in arrays]
            out = self._serving_fn(*args)
            for name in parts:
                parts[name].append(out[name].numpy())
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def saved_model_dir(self) -> Path:
        """A SavedModel whose 'serving_default' signature is the serving function (what the TFLite
        converter reads). A Keras model is exported once per source, into a temporary folder that
        lives as long as the source does."""
        raise NotImplementedError

    def onnx_bytes(self) -> bytes:
        """The fp32 model as ONNX (tf2onnx on the serving function), I/O named like ``inputs``/``outputs``."""
        tf = import_tensorflow()
        import tf2onnx

        _patch_tf2onnx_for_numpy2()
        tf2onnx_log = logging.getLogger("tf2onnx")
        level = tf2onnx_log.level
        tf2onnx_log.setLevel(logging.ERROR)  # it logs every rewrite at INFO
        try:
            with captured_stderr(), tf.device("/cpu:0"):
                proto, _ = tf2onnx.convert.from_function(
                    self._serving_fn, input_signature=self.input_signature(), opset=ONNX_OPSET
                )
        except Exception as exc:  # tf2onnx raises bare exceptions of many kinds
            raise ConversionError(
                f"tf2onnx could not export {self.path.name} to ONNX: {first_line(exc)}; use --format tflite"
            ) from exc
        finally:
            tf2onnx_log.setLevel(level)
        _check_onnx_ops(proto)
        _rename_onnx_io(proto, [s.name for s in self.inputs], [s.name for s in self.outputs])
        return proto.SerializeToString()


class KerasSource(TFSource):
    def __init__(self, path: Path, model):
        tf = import_tensorflow()
        self.model = model
        self._export = None  # TemporaryDirectory of the SavedModel export, made on first use
        in_names, call_as = _keras_input_names(model)
        specs = [tf.TensorSpec(t.shape, t.dtype, name=n) for n, t in zip(in_names, model.inputs)]
        out_names = _keras_output_names(model)

        @tf.function(input_signature=specs)
        def serve(*args):
            if call_as == "dict":
                x = dict(zip(in_names, args))
            else:
                x = list(args) if len(args) > 1 else args[0]
            y = model(x, training=False)
            flat = [y[k] for k in out_names] if isinstance(y, dict) else tf.nest.flatten(y)
            return dict(zip(out_names, flat))

        concrete = serve.get_concrete_function()
        outputs = [_spec_from_tf(n, concrete.structured_outputs[n]) for n in out_names]
        inputs = [_spec_from_tf(n, s) for n, s in zip(in_names, specs)]
        super().__init__(path, "keras", serve, inputs, outputs)

    def saved_model_dir(self) -> Path:
        if self._export is None:
            import keras

            export = tempfile.TemporaryDirectory(prefix="edgeml-keras-")
            archive = keras.export.ExportArchive()
            archive.track(self.model)
            archive.add_endpoint(SERVING_KEY, self._serving_fn)
            with captured_stderr():
                archive.write_out(export.name, verbose=False)
            self._export = export
        return Path(self._export.name)


class SavedModelSource(TFSource):
    def __init__(self, path: Path, loaded, signature):
        tf = import_tensorflow()
        self._loaded = loaded  # keeps the variables alive
        arg_specs = signature.structured_input_signature[1]
        in_names = sorted(arg_specs)
        specs = [tf.TensorSpec(arg_specs[n].shape, arg_specs[n].dtype, name=n) for n in in_names]
        structured = signature.structured_outputs
        out_names = sorted(structured)

        @tf.function(input_signature=specs)
        def serve(*args):
            return signature(**dict(zip(in_names, args)))

        inputs = [_spec_from_tf(n, s) for n, s in zip(in_names, specs)]
        outputs = [_spec_from_tf(n, structured[n]) for n in out_names]
        super().__init__(path, "saved_model", serve, inputs, outputs)

    def saved_model_dir(self) -> Path:
        return self.path  # already one; convert it as it is, signature and all


def load_keras(path) -> KerasSource:
    path = Path(path)
    import_tensorflow()
    import keras

    if not zipfile.is_zipfile(path):  # Keras would call a damaged file "not found"
        raise InputError(
            f"{path} is not a readable .keras file (not a zip archive: damaged or truncated?); "
            "re-save the model with model.save('model.keras')"
        )
    try:
        with captured_stderr():
            model = keras.saving.load_model(path, compile=False)
    except zipfile.BadZipFile as exc:
        raise InputError(
            f"{path} is not a readable .keras file ({exc}); re-save the model with model.save('model.keras')"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise _keras_load_error(path, exc) from exc
    except Exception as exc:  # h5py / zip / json errors from a damaged file
        raise InputError(
            f"cannot load {path.name} with Keras ({type(exc).__name__}: {first_line(exc)}); "
            "the file may be damaged, re-save it with model.save('model.keras')"
        ) from exc
    try:
        model.inputs
    except (AttributeError, ValueError):
        model_inputs = None
    else:
        model_inputs = model.inputs
    if not model_inputs:
        raise InputError(
            f"{path.name} holds a model without defined inputs (a subclassed model never built on keras.Input); "
            "build it as a functional or Sequential model with keras.Input, or export a SavedModel"
        )
    try:
        return KerasSource(path, model)
    except Exception as exc:
        raise InputError(
            f"cannot trace {path.name} for serving ({first_line(exc)}); "
            "make sure model(x) runs on its declared inputs"
        ) from exc


def load_saved_model(path) -> SavedModelSource:
    path = Path(path)
    tf = import_tensorflow()
    try:
        with captured_stderr():
            loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise InputError(
            f"cannot load SavedModel {path}: {first_line(exc)}; "
            "re-export it with tf.saved_model.save or model.export"
        ) from exc
    signatures = getattr(loaded, "signatures", {}) or {}
    if SERVING_KEY not in signatures:
        have = ", ".join(signatures) or "none"
        raise InputError(
            f"SavedModel {path} has no '{SERVING_KEY}' signature (it has: {have}); export it with "
            "model.export(path) or tf.saved_model.save(obj, path, signatures={'serving_default': fn})"
        )
    return SavedModelSource(path, loaded, signatures[SERVING_KEY])


def _keras_load_error(path: Path, exc: Exception) -> InputError:
    """Keras hides the cause (an unregistered custom class, a Lambda layer) deep in its message."""
    text = str(exc)
    missing = re.search(r"Could not locate (class|function) '([^']+)'", text)
    if missing:
        return InputError(
            f"cannot load {path.name}: it uses the custom {missing.group(1)} '{missing.group(2)}', which is not "
            "registered in this process; register the custom object with "
            "@keras.saving.register_keras_serializable() and import its module before running edgeml"
        )
    if "Lambda" in text and "safe_mode" in text:
        return InputError(
            f"cannot load {path.name}: it holds a Lambda layer, whose code Keras will not load from a file; "
            "replace the Lambda with a custom layer registered with @keras.saving.register_keras_serializable()"
        )
    return InputError(
        f"cannot load {path.name} with Keras: {first_line(exc)}; check that it was saved by Keras 3 with model.save()"
    )


def _keras_input_names(model):
    """Input names as the TFLite converter will name them, and how the model wants to be called."""
    struct = getattr(model, "_inputs_struct", None)  # Functional keeps the structure it was built on
    if isinstance(struct, dict):
        return sorted(struct), "dict"  # TF flattens dicts in sorted key order
    return [t.name for t in model.inputs], "list"


def _keras_output_names(model) -> List[str]:
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return sorted(struct)
    return [f"output_{i}" for i in range(len(model.outputs))]


def _spec_from_tf(name: str, spec) -> TensorSpec:
    if spec.shape.rank is None:
        return TensorSpec(name=name, dtype=spec.dtype.name, shape=())
    shape = tuple(None if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name=name, dtype=spec.dtype.name, shape=shape)


def _check_onnx_ops(proto) -> None:
    """tf2onnx copies a TF op it cannot translate into the graph as is; ONNX Runtime would then
    refuse the whole file, so name those ops now."""
    import onnx

    unknown = sorted(
        {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    )
    if unknown:
        raise UnsupportedModelError(
            f"these TensorFlow ops have no ONNX equivalent: {', '.join(unknown)}; "
            "replace them in the model or use --format tflite"
        )


def _rename_onnx_io(proto, input_names: List[str], output_names: List[str]) -> None:
    """Give the graph's inputs and outputs the source's names, in place, everywhere they appear."""
    graph = proto.graph
    graph_inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(graph_inputs) != len(input_names) or len(graph.output) != len(output_names):
        raise ConversionError(
            f"the ONNX export has {len(graph_inputs)} inputs and {len(graph.output)} outputs, expected "
            f"{len(input_names)} and {len(output_names)}; use --format tflite"
        )
    # tf2onnx keeps the inputs in argument order and the outputs in the order TF flattens the
    # returned dict (sorted keys); it usually names them right already.
    mapping = {}
    if {i.name for i in graph_inputs} != set(input_names):
        mapping.update({v.name: want for v, want in zip(graph_inputs, input_names)})
    if {o.name for o in graph.output} != set(output_names):
        mapping.update({v.name: want for v, want in zip(graph.output, sorted(output_names))})
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return
    for value in list(graph_inputs) + list(graph.output) + list(graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def _patch_tf2onnx_for_numpy2() -> None:
    """tf2onnx 1.17 still uses numpy names removed in NumPy 2; Keras ships the fix it applies
    before its own ONNX export, so use it when it is there."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # pragma: no cover - older or newer Keras
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its np.object probe warns
        patch_tf2onnx()
