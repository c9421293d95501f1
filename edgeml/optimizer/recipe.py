"""Recipes as data: the chain distill → prune → quantize, from a TOML file and CLI flags.

A recipe file has up to four tables; every key is optional and unknown keys are refused::

    [train]        # defaults for both training stages
    epochs = 10    batch_size = 64    learning_rate = 1e-3    patience = 3    loss = "..."

    [distill]      # student = "student.keras" (relative to this file) or student_width = 0.5
    temperature = 4.0    alpha = 0.1    max_accuracy_drop = 0.02    (and any [train] key)

    [prune]        # sparsity = 0.75 and/or structured = "2:4"
    schedule = "polynomial"    ramp = 0.6    frequency = 0    max_accuracy_drop = 0.01
    layers = { conv2d = 0.0 }  (per-layer targets; and any [train] key)

    [quantize]
    recipe = "auto"    format = "tflite"    tuner = "inc"    max_accuracy_drop = 0.01
    metric = "auto"  (or accuracy, agreement, sequence, iou@0.5, cosine, relative-error)

    [mlflow]       # record the run in MLflow at MLFLOW_TRACKING_URI, as --mlflow does
    enabled = true    experiment = "edge-builds"    register = "digits-edge"

Flags given on the command line override the file. Each stage has its own accuracy gate, measured
against the stage's input model (the teacher for distill, the distilled or original model for
prune, the pruned model for quantize).
"""
from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional

from edgeml.core.errors import InputError, UsageError

from .metrics import parse_metric
from .training.pruning import SCHEDULES

TUNERS = ("inc",)


@dataclass
class Training:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 3
    loss: Optional[str] = None


@dataclass
class DistillStage(Training):
    student: Optional[str] = None
    student_width: Optional[float] = None
    temperature: float = 4.0
    alpha: float = 0.1
    max_accuracy_drop: float = 0.02
    epochs: int = 30  # a student starts from nothing
    learning_rate: float = 2e-3  # measured on digits: 1e-3 with patience 3 stopped too early
    patience: int = 5


@dataclass
class PruneStage(Training):
    sparsity: Optional[float] = None
    schedule: str = "polynomial"
    structured: Optional[str] = None
    layers: Dict[str, float] = field(default_factory=dict)
    ramp: float = 0.6
    frequency: int = 0
    max_accuracy_drop: float = 0.01


@dataclass
class QuantizeStage:
    recipe: str = "auto"
    format: Optional[str] = None
    tuner: Optional[str] = None
    max_accuracy_drop: float = 0.01
    metric: str = "auto"  # edgeml.optimizer.metrics: what the drop measures


@dataclass
class Tracking:
    enabled: bool = True
    experiment: Optional[str] = None
    register: Optional[str] = None


@dataclass
class Recipe:
    distill: Optional[DistillStage] = None
    prune: Optional[PruneStage] = None
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    mlflow: Optional[Tracking] = None
    source: Optional[str] = None  # the recipe file, if any

    @property
    def trains(self) -> bool:
        return self.distill is not None or self.prune is not None

    def stages(self) -> list:
        return [name for name in ("distill", "prune") if getattr(self, name) is not None] + ["quantize"]

    def to_dict(self) -> dict:
        def plain(stage):
            return None if stage is None else {f.name: getattr(stage, f.name) for f in fields(stage)}

        return {"file": self.source, "distill": plain(self.distill), "prune": plain(self.prune),
                "quantize": plain(self.quantize), "mlflow": plain(self.mlflow)}


TABLES = {"train": Training, "distill": DistillStage, "prune": PruneStage, "quantize": QuantizeStage,
          "mlflow": Tracking}


def read_recipe_file(path) -> Dict[str, dict]:
    """The file's tables, with every key checked against the recipe's fields (types included)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"recipe file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read recipe file {path}: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe file {path} is not valid TOML: {exc}") from exc
    for table, values in doc.items():
        if table not in TABLES:
            raise UsageError(f"recipe file {path}: unknown table [{table}]{_hint(table, TABLES)}; "
                             f"use {', '.join(f'[{t}]' for t in TABLES)}")
        if not isinstance(values, dict):
            raise UsageError(f"recipe file {path}: {table} must be a table ([{table}]), not a value")
        for key, value in values.items():
            _check_value(path, table, key, value)
    distill = doc.get("distill", {})
    if isinstance(distill.get("student"), str) and not Path(distill["student"]).is_absolute():
        distill["student"] = str(path.parent / distill["student"])  # relative to the file, not the cwd
    return doc


def build_recipe(file_tables: Optional[Dict[str, dict]], flags: Dict[str, dict], source: Optional[str] = None) -> Recipe:
    """Merge the file's tables and the flags (``{"prune": {"sparsity": 0.75}, ...}``, given ones only).

    Precedence, lowest first: the file's [train], the file's stage table, the --epochs style
    flags, the stage's own flags. So a flag always wins over the file."""
    file_tables = file_tables or {}

    def merged(name: str) -> dict:
        return {**file_tables.get("train", {}), **file_tables.get(name, {}), **flags.get("train", {}),
                **flags.get(name, {})}

    def given(name: str) -> dict:  # what the user set for this stage itself
        return {**file_tables.get(name, {}), **flags.get(name, {})}

    recipe = Recipe(quantize=QuantizeStage(**given("quantize")), source=source)
    tracking = given("mlflow")
    if tracking.get("enabled", bool(tracking)):
        recipe.mlflow = Tracking(**{**tracking, "enabled": True})
    distill, prune = given("distill"), given("prune")
    if distill.get("student") is not None or distill.get("student_width") is not None:
        values = merged("distill")
        if "loss" in distill:
            raise UsageError("distillation sets its own losses (teacher soft targets and labels); remove loss from [distill]")
        values.pop("loss", None)  # a [train] loss is for the prune stage
        recipe.distill = DistillStage(**values)
    elif distill:
        raise UsageError(
            f"distillation settings ({', '.join(sorted(distill))}) were given without a student; "
            "add --student student.keras or --student-width 0.5 (student / student_width in [distill])"
        )
    if prune.get("sparsity") is not None or prune.get("structured") is not None:
        recipe.prune = PruneStage(**merged("prune"))
    elif prune:
        raise UsageError(
            f"pruning settings ({', '.join(sorted(prune))}) were given without a target; "
            "add --prune 0.75 or --structured 2:4 (sparsity / structured in [prune])"
        )
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Ranges and combinations; the model-dependent checks come when the model is loaded."""
    for name in ("distill", "prune"):
        stage = getattr(recipe, name)
        if stage is None:
            continue
        for key in ("epochs", "batch_size", "patience"):
            if getattr(stage, key) < 1:
                raise UsageError(f"{name} {key} must be at least 1, got {getattr(stage, key)}")
        if not stage.learning_rate > 0 or not math.isfinite(stage.learning_rate):
            raise UsageError(f"{name} learning_rate must be a positive number, got {stage.learning_rate}")
        _check_drop(f"{name} max_accuracy_drop", stage.max_accuracy_drop)
    prune = recipe.prune
    if prune is not None:
        if prune.sparsity is not None and not 0.0 <= prune.sparsity < 1.0:
            raise UsageError(f"--prune sparsity must be in [0, 1) (0.75 zeroes three weights in four), got {prune.sparsity}")
        for layer, value in prune.layers.items():
            if not 0.0 <= value < 1.0:
                raise UsageError(f"the sparsity for layer {layer!r} must be in [0, 1), got {value}")
        if prune.schedule not in SCHEDULES:
            raise UsageError(f"unknown prune schedule {prune.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 < prune.ramp <= 1.0:
            raise UsageError(f"prune ramp must be in (0, 1] (the share of training spent ramping up), got {prune.ramp}")
        if prune.frequency < 0:
            raise UsageError(f"prune frequency must be 0 (automatic) or a number of steps, got {prune.frequency}")
    distill = recipe.distill
    if distill is not None:
        if distill.student is not None and distill.student_width is not None:
            raise UsageError("give either --student or --student-width, not both")
        if distill.student_width is not None and not 0.0 < distill.student_width < 1.0:
            raise UsageError(f"--student-width must be in (0, 1) (0.5 halves every layer), got {distill.student_width}")
        if not distill.temperature > 0:
            raise UsageError(f"--temperature must be above 0 (4 is usual), got {distill.temperature}")
        if not 0.0 <= distill.alpha <= 1.0:
            raise UsageError(f"--alpha (the weight of the label loss) must be in [0, 1], got {distill.alpha}")
    q = recipe.quantize
    _check_drop("--max-accuracy-drop", q.max_accuracy_drop)
    if q.tuner is not None and q.tuner not in TUNERS:
        raise UsageError(f"unknown tuner {q.tuner!r}; choose one of {', '.join(TUNERS)}")
    parse_metric(q.metric)


def _check_drop(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{name} must be in [0, 1) (0.01 is one point), got {value}")


_TYPES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _check_value(path: Path, table: str, key: str, value) -> None:
    allowed = {f.name: f for f in fields(TABLES[table])}
    if key not in allowed:
        raise UsageError(f"recipe file {path}: unknown key {key!r} in [{table}]{_hint(key, allowed)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    if key == "layers":
        if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
            raise UsageError(f"recipe file {path}: [{table}] layers must be a table of layer = sparsity")
        return
    want = _field_type(allowed[key])
    if want is bool:
        ok = isinstance(value, bool)
    else:
        ok = _is_number(value) if want is float else isinstance(value, want) and not isinstance(value, bool)
    if not ok:
        raise UsageError(f"recipe file {path}: [{table}] {key} must be {_TYPES[want]}, got {value!r}")


def _field_type(f) -> type:
    text = str(f.type)
    if "bool" in text:
        return bool
    return int if "int" in text else float if "float" in text else str


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hint(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
