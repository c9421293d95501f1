"""The model a user hands to ``edgeml optimize``: detection, loading, and float reference outputs.

Loaders are looked up by kind and imported lazily, so reading an ONNX file never imports
TensorFlow.
"""
from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np

from edgeml.core.errors import InputError
from edgeml.core.specs import TensorSpec

# kind -> "module:function" returning a SourceModel for a path
LOADERS = {
    "keras": "edgeml.optimizer.sources.tensorflow:load_keras",
    "saved_model": "edgeml.optimizer.sources.tensorflow:load_saved_model",
    "onnx": "edgeml.optimizer.sources.onnx:load_onnx",
}


class SourceModel:
    """A loaded float model.

    Subclasses set ``path``, ``kind``, ``sha256``, ``inputs``, ``outputs`` and implement
    ``reference`` (float outputs for one batch) and ``onnx_bytes`` (the fp32 model as ONNX).
    """

    path: Path
    kind: str
    sha256: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    default_format: str = "tflite"

    def reference(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def onnx_bytes(self) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.sha256,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


def detect_kind(path: Path) -> str:
    """Tell a Keras file, a SavedModel directory and an ONNX file apart, by content where possible."""
    if not path.exists():
        raise InputError(f"model not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise InputError(f"{path} is a directory without saved_model.pb; pass a SavedModel directory, a .keras file or an .onnx file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        raise InputError(f"{path} is a legacy HDF5 Keras file; load it and re-save it with model.save('model.keras')")
    if suffix == ".keras" or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if "config.json" in z.namelist():
                    return "keras"
        except zipfile.BadZipFile:
            pass
        raise InputError(f"{path} is not a Keras 3 .keras file (no config.json inside); save the model with model.save('model.keras')")
    if suffix == ".onnx":
        return "onnx"
    raise InputError(f"cannot tell what kind of model {path} is; pass a .keras file, a SavedModel directory or an .onnx file")


def load_source(path) -> SourceModel:
    path = Path(path)
    kind = detect_kind(path)
    module_name, _, func = LOADERS[kind].partition(":")
    return getattr(importlib.import_module(module_name), func)(path)
