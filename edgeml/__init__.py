"""edgeml: optimize, sign, measure and ship models to small devices.

The public surface is what this module exports; everything else is internal. Heavy
dependencies (tensorflow, onnx) load only when a function that needs them runs.
"""
from __future__ import annotations

from .core import __version__
from .core.errors import (
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


def __getattr__(name):
    # Lazy re-exports keep `import edgeml` fast and free of numpy-heavy imports.
    lazy = {
        "OptimizeConfig": ("edgeml.optimizer.config", "OptimizeConfig"),
        "optimize": ("edgeml.optimizer.job", "optimize"),
        "OptimizeResult": ("edgeml.optimizer.job", "OptimizeResult"),
        "bench": ("edgeml.optimizer.bench", "bench"),
        "describe": ("edgeml.optimizer.inspection", "describe"),
        "generate_keys": ("edgeml.core.signing", "generate_keys"),
        "read_artifact": ("edgeml.core.artifact", "read_artifact"),
        "verify_artifact": ("edgeml.core.artifact", "verify_artifact"),
        "run_selftest": ("edgeml.core.selftest", "run_selftest"),
        "load_data": ("edgeml.core.data", "load_data"),
        "Dataset": ("edgeml.core.data", "Dataset"),
        "load_runner": ("edgeml.core.runtime", "load_runner"),
        # the training stages on their own, for notebooks: Keras model in, Keras model out
        "prune_model": ("edgeml.optimizer.training.pruning", "prune"),
        "PruneSettings": ("edgeml.optimizer.training.pruning", "PruneSettings"),
        "distill_model": ("edgeml.optimizer.training.distill", "distill"),  # not "distill": a module has that name
        "DistillSettings": ("edgeml.optimizer.training.distill", "DistillSettings"),
        "TrainSettings": ("edgeml.optimizer.training.keras_train", "TrainSettings"),
        "read_recipe_file": ("edgeml.optimizer.recipe", "read_recipe_file"),
        "tune_int8": ("edgeml.optimizer.inc.tuner", "tune_int8"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgeml' has no attribute {name!r}")


__all__ = [
    "__version__",
    "AccuracyGoalNotMet", "ConversionError", "DataError", "EdgemlError", "InputError", "KeyFileError",
    "UnsupportedModelError", "UsageError", "VerificationError", "OptimizeConfig", "OptimizeResult", "optimize",
    "bench", "describe", "generate_keys", "read_artifact", "verify_artifact", "run_selftest", "load_data",
    "Dataset", "load_runner", "prune_model", "PruneSettings", "distill_model", "DistillSettings", "TrainSettings",
    "read_recipe_file", "tune_int8",
]
