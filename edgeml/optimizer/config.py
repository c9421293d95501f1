"""The options of ``edgeml optimize`` as one typed object, checked before any work starts."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from edgeml.core.errors import InputError, UsageError
from edgeml.tracking import is_mlflow_uri

from .backends import BACKENDS, RECIPES
from .recipe import Recipe, build_recipe, read_recipe_file

ALL_RECIPES = RECIPES + ("auto",)
MAX_VERSION = 2**53  # versions travel in JSON (manifest, MQTT, the fleet database): beyond it they lose digits
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class OptimizeConfig:
    model: Union[Path, str]  # a file or folder, or an MLflow URI (models:/name/version, models:/name@alias, runs:/...)
    output: Path
    key: Optional[Path] = None
    recipe: Optional[str] = None  # default: the recipe file's [quantize] recipe, else "auto"
    format: Optional[str] = None  # default: the source's own (tflite for Keras/SavedModel)
    calibration: Optional[str] = None
    eval: Optional[str] = None
    max_accuracy_drop: Optional[float] = None  # default: the recipe file's, else 0.01
    metric: Optional[str] = None  # what the drop measures (edgeml.optimizer.metrics); default: the recipe file's, else auto
    name: Optional[str] = None
    version: int = 1
    seed: int = 0
    calibration_samples: int = 300
    eval_samples: int = 1000
    latency_runs: int = 50
    labels: Optional[Path] = None
    preprocessing: Optional[Path] = None
    plot: bool = True
    # training stages (see edgeml.optimizer.recipe): a recipe file, and flags that override it
    train: Optional[str] = None  # training data with labels: a .npz or module:function
    recipe_file: Optional[Path] = None
    prune: Optional[float] = None
    prune_schedule: Optional[str] = None
    structured: Optional[str] = None
    layer_sparsity: Dict[str, float] = field(default_factory=dict)
    student: Optional[Path] = None
    student_width: Optional[float] = None
    temperature: Optional[float] = None
    alpha: Optional[float] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    patience: Optional[int] = None
    tuner: Optional[str] = None
    # MLflow (edgeml.tracking): record the run; experiment or register imply it
    mlflow: bool = False
    experiment: Optional[str] = None
    register: Optional[str] = None
    plan: Optional[Recipe] = field(default=None, repr=False)  # the merged recipe, set by check()

    def __post_init__(self):
        self.model = str(self.model) if is_mlflow_uri(self.model) else Path(self.model)
        self.output = Path(self.output)
        self.key = Path(self.key) if self.key else None

    def _flags(self) -> Dict[str, dict]:
        """The recipe values given as options (None means: not given)."""
        groups = {
            "train": {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                      "patience": self.patience},
            "distill": {"student": str(self.student) if self.student else None, "student_width": self.student_width,
                        "temperature": self.temperature, "alpha": self.alpha},
            "prune": {"sparsity": self.prune, "schedule": self.prune_schedule, "structured": self.structured,
                      "layers": dict(self.layer_sparsity) or None},
            "quantize": {"recipe": self.recipe, "format": self.format, "tuner": self.tuner,
                         "max_accuracy_drop": self.max_accuracy_drop, "metric": self.metric},
            "mlflow": {"enabled": True if (self.mlflow or self.experiment or self.register) else None,
                       "experiment": self.experiment, "register": self.register},
        }
        return {name: {k: v for k, v in values.items() if v is not None} for name, values in groups.items()}

    def check(self) -> "OptimizeConfig":
        """Reject bad values and combinations with a message that names them."""
        tables = read_recipe_file(self.recipe_file) if self.recipe_file else None
        self.plan = build_recipe(tables, self._flags(), str(self.recipe_file) if self.recipe_file else None)
        q = self.plan.quantize
        self.recipe, self.format, self.tuner, self.max_accuracy_drop = q.recipe, q.format, q.tuner, q.max_accuracy_drop
        self.metric = q.metric
        t = self.plan.mlflow
        self.mlflow, self.experiment, self.register = t is not None, t and t.experiment, t and t.register
        if self.mlflow or self.is_mlflow_source:
            from edgeml.tracking.client import tracking_uri

            tracking_uri()  # set, before any work
        if self.register is not None and not self.register.strip():
            raise UsageError("--register needs a registered model name, such as digits-edge")
        if self.plan.trains and not self.train:
            raise UsageError(f"{' and '.join(self.plan.stages()[:-1])} train the model: pass --train data "
                             "(a .npz with the inputs and labels 'y')")
        if self.tuner == "inc" and self.recipe not in ("int8", "auto"):
            raise UsageError(f"--tuner inc tunes the int8 build; use --recipe int8 or auto, not {self.recipe}")
        if self.tuner == "inc" and self.format == "tflite":
            raise UsageError("--tuner inc works on ONNX models; use --format onnx")
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
        if not isinstance(self.version, int) or not 1 <= self.version <= MAX_VERSION:
            raise UsageError(f"--version must be a whole number from 1 to 2**53 (exact in every JSON reader), "
                             f"got {self.version}")
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
        check_writable(self.output.parent)
        return self

    @property
    def is_mlflow_source(self) -> bool:
        return isinstance(self.model, str)

    @property
    def artifact_name(self) -> str:
        if self.name:
            return self.name
        if self.is_mlflow_source:  # models:/digits@champion -> digits; runs:/id/model.keras -> model
            last = re.split(r"[/@]", self.model.split(":/", 1)[1].strip("/"))
            model = Path(last[0] if self.model.startswith("models:/") else last[-1])
        else:
            model = self.model
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", model.stem if model.suffix else model.name)
        return stem.lstrip(".-_")[:64] or "model"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = self.plan.to_dict() if self.plan else None
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "key"}


def check_writable(folder: Path) -> None:
    """Write a probe file now rather than find out after minutes of building (permissions, a
    read-only mount or a full disk; os.access does not see the last two, nor anything as root)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".edgeml-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to the output folder {folder}: {exc.strerror or exc}; "
                         "choose a folder you can write to") from exc
