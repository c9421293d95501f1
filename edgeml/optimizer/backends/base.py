"""What every backend (a target format) provides: build one candidate for one recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from edgeml.core.data import Dataset

from ..sources.base import SourceModel

# The recipes every backend implements; "auto" is built on top of these by edgeml.optimizer.job.
RECIPES = ("fp32", "float16", "dynamic", "int8", "int8-weights")
NEEDS_CALIBRATION = ("int8",)
ONNX_ONLY = ("int8-weights",)  # TFLite's dynamic recipe already stores int8 weights (hybrid kernels)


@dataclass
class BuildOptions:
    """Knobs shared by the backends. ``min_agreement`` is the score against float (in each
    output's task metric, ``kinds``: see edgeml.optimizer.metrics) a quantized build aims for
    when it decides which ops to keep in float."""

    seed: int = 0
    min_agreement: float = 0.99
    kinds: Dict[str, str] = field(default_factory=dict)  # output -> kind; empty: read off the outputs
    threshold: float = 0.5  # of a probability map's mask (the iou kind)


@dataclass
class Candidate:
    """One built model, not yet measured."""

    recipe: str
    format: str  # "tflite" | "onnx"
    model: bytes
    notes: list = field(default_factory=list)  # human-readable remarks for the report
    details: dict = field(default_factory=dict)  # recipe facts for the manifest (e.g. float ops)


class Backend:
    format: str = ""

    def build(
        self,
        source: SourceModel,
        recipe: str,
        calibration: Optional[Dataset],
        options: BuildOptions,
    ) -> Candidate:  # pragma: no cover
        raise NotImplementedError
