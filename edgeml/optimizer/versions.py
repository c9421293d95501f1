"""Versions of the tools that made an artifact, for its lineage."""
from __future__ import annotations

import importlib.metadata as md
import platform

DISTRIBUTIONS = ("edgeml", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy")


def tool_versions() -> dict:
    found = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return found


def runtime_name(fmt: str) -> str:
    """The runtime that measured a format, with its version."""
    dist = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}[fmt]
    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return dist
