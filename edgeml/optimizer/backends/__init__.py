"""Backends by target format, looked up by name and imported lazily (TensorFlow is heavy)."""
from __future__ import annotations

import importlib

from edgeml.core.errors import UsageError

from .base import RECIPES, Backend, BuildOptions, Candidate

BACKENDS = {
    "tflite": "edgeml.optimizer.backends.tflite:TFLiteBackend",
    "onnx": "edgeml.optimizer.backends.onnx:OnnxBackend",
}


def get_backend(fmt: str) -> Backend:
    try:
        module_name, _, cls = BACKENDS[fmt].partition(":")
    except KeyError:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module_name), cls)()


__all__ = ["BACKENDS", "RECIPES", "Backend", "BuildOptions", "Candidate", "get_backend"]
