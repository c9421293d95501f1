"""The models a user hands to ``edgeml optimize``: Keras 3 and SavedModel (``tensorflow``), ONNX
(``onnx``), and ``onnx_prepare``, which makes real exported ONNX graphs quantizable."""
from __future__ import annotations

from .base import LOADERS, SourceModel, detect_kind, load_source

__all__ = ["LOADERS", "SourceModel", "detect_kind", "load_source"]
