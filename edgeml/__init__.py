"""edgeml: optimize, sign, measure and ship models to small devices.

The public surface is what this module exports; everything else is internal. Heavy
dependencies (tensorflow, onnx) load only when a function that needs them runs.
"""
from __future__ import annotations

from .errors import (
    AccuracyGoalNotMet,
    ConversionError,
    DataError,
    EdgemlError,
    InputError,
    KeyFileError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy re-exports keep `import edgeml` fast and free of numpy-heavy imports.
    lazy = {
        "OptimizeConfig": ("edgeml.config", "OptimizeConfig"),
        "optimize": ("edgeml.optimizer", "optimize"),
        "OptimizeResult": ("edgeml.optimizer", "OptimizeResult"),
        "bench": ("edgeml.artifact_bench", "bench"),
        "describe": ("edgeml.inspection", "describe"),
        "generate_keys": ("edgeml.signing", "generate_keys"),
        "read_artifact": ("edgeml.artifact", "read_artifact"),
        "verify_artifact": ("edgeml.artifact", "verify_artifact"),
        "run_selftest": ("edgeml.selftest", "run_selftest"),
        "load_data": ("edgeml.data", "load_data"),
        "Dataset": ("edgeml.data", "Dataset"),
        "load_runner": ("edgeml.runtime", "load_runner"),
        # the training stages on their own, for notebooks: Keras model in, Keras model out
        "prune_model": ("edgeml.pruning", "prune"),
        "PruneSettings": ("edgeml.pruning", "PruneSettings"),
        "distill_model": ("edgeml.distill", "distill"),  # not "distill": that is the module's name
        "DistillSettings": ("edgeml.distill", "DistillSettings"),
        "TrainSettings": ("edgeml.keras_train", "TrainSettings"),
        "read_recipe_file": ("edgeml.recipe", "read_recipe_file"),
        "tune_int8": ("edgeml.inc_tuner", "tune_int8"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgeml' has no attribute {name!r}")


__all__ = [
    "AccuracyGoalNotMet", "ConversionError", "DataError", "EdgemlError", "InputError", "KeyFileError",
    "UnsupportedModelError", "UsageError", "VerificationError", "OptimizeConfig", "OptimizeResult", "optimize",
    "bench", "describe", "generate_keys", "read_artifact", "verify_artifact", "run_selftest", "load_data",
    "Dataset", "load_runner", "prune_model", "PruneSettings", "distill_model", "DistillSettings", "TrainSettings",
    "read_recipe_file", "tune_int8",
]
