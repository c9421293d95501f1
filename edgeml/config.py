"""The options of ``edgeml optimize`` as one typed object, checked before any work starts."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .backends import BACKENDS, RECIPES
from .errors import UsageError

ALL_RECIPES = RECIPES + ("auto",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class OptimizeConfig:
    model: Path
    output: Path
    key: Optional[Path] = None
    recipe: str = "auto"
    format: Optional[str] = None  # default: the source's own (tflite for Keras/SavedModel)
    calibration: Optional[str] = None
    eval: Optional[str] = None
    max_accuracy_drop: float = 0.01
    name: Optional[str] = None
    version: int = 1
    seed: int = 0
    calibration_samples: int = 300
    eval_samples: int = 1000
    latency_runs: int = 50
    labels: Optional[Path] = None
    preprocessing: Optional[Path] = None
    plot: bool = True

    def __post_init__(self):
        self.model = Path(self.model)
        self.output = Path(self.output)
        self.key = Path(self.key) if self.key else None

    def check(self) -> "OptimizeConfig":
        """Reject bad values and combinations with a message that names them."""
        if self.recipe not in ALL_RECIPES:
            raise UsageError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(ALL_RECIPES)}")
        if self.format is not None and self.format not in BACKENDS:
            raise UsageError(f"unknown format {self.format!r}; choose one of {', '.join(BACKENDS)}")
        if self.key is None:
            raise UsageError("an artifact must be signed: pass --key keys/signing.key (make one with 'edgeml keys generate')")
        if not self.eval:
            raise UsageError("pass --eval data: every candidate is measured against the float model before it is kept")
        if self.recipe == "int8" and not self.calibration:
            raise UsageError("recipe int8 needs --calibration data (a .npz with one array per model input)")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise UsageError(f"--max-accuracy-drop must be in [0, 1) (0.01 is one point), got {self.max_accuracy_drop}")
        if not isinstance(self.version, int) or self.version < 1:
            raise UsageError(f"--version must be a whole number >= 1, got {self.version}")
        if self.name is not None and not NAME_RE.match(self.name):
            raise UsageError(f"--name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        for field_name in ("calibration_samples", "eval_samples", "latency_runs"):
            if getattr(self, field_name) < 1:
                raise UsageError(f"--{field_name.replace('_', '-')} must be at least 1")
        if self.output.suffix != ".edgeml":
            raise UsageError(f"the output file should end in .edgeml, got {self.output.name}")
        if self.output.exists() and self.output.is_dir():
            raise UsageError(f"the output {self.output} is a directory; name a file such as {self.output / 'model.edgeml'}")
        if not self.output.parent.exists():
            raise UsageError(f"the output folder {self.output.parent} does not exist; create it first")
        return self

    @property
    def artifact_name(self) -> str:
        if self.name:
            return self.name
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", self.model.stem if self.model.suffix else self.model.name)
        return stem.lstrip(".-_")[:64] or "model"

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "key"}
