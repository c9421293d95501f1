"""What every backend (a target format) provides: build one candidate for one recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from edgeml.core.data import Dataset

from ..sources.base import SourceModel

# The recipes every backend implements; "auto" is built on top of these by edgeml.optimizer.job.
RECIPES = ("fp32", "float16", "dynamic", "int8")
NEEDS_CALIBRATION = ("int8",)


@dataclass
class BuildOptions:
    """Knobs shared by the backends. ``min_agreement`` is the float-agreement an int8 build aims
    for when it decides which ops to keep in float."""

    seed: int = 0
    min_agreement: float = 0.99


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
