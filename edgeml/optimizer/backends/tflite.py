"""The TFLite backend: one .tflite candidate per recipe, made by TensorFlow's TFLite converter.

The converter reads the source's SavedModel ('serving_default' signature), so the converted
model's signature carries the same input and output names as the source's specs.

| recipe  | converter settings                                                              |
|---------|---------------------------------------------------------------------------------|
| fp32    | none                                                                            |
| float16 | Optimize.DEFAULT, supported_types=[float16] (float16 weights, float compute)    |
| dynamic | Optimize.DEFAULT, no representative data (int8 weights, float activations)      |
| int8    | Optimize.DEFAULT, representative data, TFLITE_BUILTINS_INT8 only, int8 I/O for  |
|         | float inputs/outputs; weights per channel (the converter's default)             |
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Iterator, List, Optional

import numpy as np

from edgeml.core.data import Dataset, match_inputs
from edgeml.core.errors import ConversionError, UnsupportedModelError, UsageError

from ..sources.base import SourceModel
from .base import NEEDS_CALIBRATION, ONNX_ONLY, RECIPES, Backend, BuildOptions, Candidate

log = logging.getLogger(__name__)

# Converter error codes that mean "this op has no TFLite builtin kernel".
_MISSING_OP_CODES = ("ERROR_NEEDS_FLEX_OPS", "ERROR_NEEDS_CUSTOM_OPS")


class TFLiteBackend(Backend):
    format = "tflite"

    def build(
        self,
        source: SourceModel,
        recipe: str,
        calibration: Optional[Dataset],
        options: BuildOptions,
    ) -> Candidate:
        if source.kind == "onnx":
            raise UsageError("ONNX models are optimized to .onnx; drop --format tflite")
        if recipe not in RECIPES:
            raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if recipe in ONNX_ONLY:
            raise UsageError(f"the {recipe} recipe builds ONNX models; add --format onnx, or use dynamic, which "
                             "stores int8 weights in a TFLite model too")
        if recipe in NEEDS_CALIBRATION and calibration is None:
            raise UsageError(f"the {recipe} recipe needs calibration data; pass --calibration data.npz")
        if calibration is not None and recipe in NEEDS_CALIBRATION:
            calibration = match_inputs(calibration, source.inputs, role="calibration")

        from edgeml.core.native_output import captured_stderr

        from ..sources.tensorflow import SERVING_KEY, import_tensorflow

        tf = import_tensorflow()
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(source.saved_model_dir()), signature_keys=[SERVING_KEY]
        )
        settings = _configure(tf, converter, recipe, source, calibration, options)
        log.info("converting %s to tflite (%s)", source.path.name, recipe)
        try:
            # the MLIR converter prints pages of notes to fd 2, and int8 calibration warns
            # that TF's own tf.lite.Interpreter (which it uses internally) is deprecated
            with captured_stderr(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                model = converter.convert()
        except Exception as exc:
            raise _translate(exc, recipe) from exc

        details = {"converter": settings, "tensorflow": tf.__version__}
        notes = []
        if recipe == "int8":
            details.update(_io_quantization(model))
            notes.append(
                f"int8: calibrated on {settings['calibration_samples']} samples "
                f"(seed {options.seed}); int8 input/output for float tensors"
            )
        return Candidate(recipe=recipe, format="tflite", model=model, notes=notes, details=details)


def _configure(tf, converter, recipe: str, source, calibration: Optional[Dataset],
               options: BuildOptions) -> dict:
    """Apply one recipe's settings to ``converter``; return them as plain data for the manifest."""
    settings: dict = {"recipe": recipe, "optimizations": [], "supported_ops": ["TFLITE_BUILTINS"]}
    if recipe == "fp32":
        return settings
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    settings["optimizations"] = ["DEFAULT"]
    if recipe == "float16":
        converter.target_spec.supported_types = [tf.float16]
        settings["supported_types"] = ["float16"]
    elif recipe == "dynamic":
        settings["weights"] = "int8 (dynamic range; activations stay float)"
    elif recipe == "int8":
        converter.representative_dataset = _representative_dataset(calibration, options.seed)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        float_in = [s for s in source.inputs if s.dtype.startswith("float")]
        float_out = [s for s in source.outputs if s.dtype.startswith("float")]
        # inference_*_type applies to float tensors only; integer ids keep their dtype
        if float_in:
            converter.inference_input_type = tf.int8
        if float_out:
            converter.inference_output_type = tf.int8
        settings.update(
            supported_ops=["TFLITE_BUILTINS_INT8"],
            inference_input_type="int8" if float_in else "unchanged",
            inference_output_type="int8" if float_out else "unchanged",
            per_channel_weights=True,
            calibration_samples=len(calibration),
            calibration_seed=options.seed,
        )
    return settings


def _representative_dataset(calibration: Dataset, seed: int):
    """All calibration samples, one per step, in a seeded order (a dict keyed by input name)."""
    order = np.random.default_rng(seed).permutation(len(calibration))
    arrays = {name: np.asarray(a) for name, a in calibration.inputs.items()}

    def generate() -> Iterator[dict]:
        for i in order:
            yield {name: a[i : i + 1] for name, a in arrays.items()}

    return generate


def _translate(exc: Exception, recipe: str) -> Exception:
    """Turn the converter's multi-page error into one line with a way forward."""
    missing = _missing_ops(exc)
    if missing:
        ops = ", ".join(missing)
        return UnsupportedModelError(
            f"the model uses TensorFlow ops with no LiteRT builtin kernel: {ops}; "
            f"replace {missing[0]} in the model or use --format onnx"
        )
    text = str(exc)
    m = re.search(r"[Qq]uantization (?:is )?not (?:yet )?supported for op:? '?([\w.]+)", text)
    if recipe == "int8" and m:
        return UnsupportedModelError(
            f"op {m.group(1)} has no full-integer kernel in LiteRT; use --recipe dynamic or float16, or --format onnx"
        )
    return ConversionError(f"the TFLite converter failed ({recipe}): {_summary(text)}")


def _missing_ops(exc: Exception) -> List[str]:
    names: List[str] = []
    for err in getattr(exc, "errors", None) or []:
        code = _error_code_name(err)
        op = getattr(getattr(err, "operator", None), "name", "")
        if code in _MISSING_OP_CODES and op and op not in names:
            names.append(op)
    if not names:  # older converters only say it in the text
        for listed in re.findall(r"(?:Flex|Custom) ops: ([^\n]+)", str(exc)):
            for op in listed.split(","):
                op = "tf." + op.strip() if op.strip() else ""
                if op and op not in names:
                    names.append(op)
    return names


def _error_code_name(err) -> str:
    try:
        return type(err).ErrorCode.Name(err.error_code)
    except (AttributeError, ValueError):
        return str(getattr(err, "error_code", ""))


def _summary(text: str) -> str:
    """The first line of the converter's message that reads like an error, shortened."""
    for line in text.splitlines():
        line = line.strip()
        if "error:" in line:
            return line.split("error:", 1)[1].strip()[:300]
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return first[:300]


def _io_quantization(model: bytes) -> dict:
    """Scale and zero point of each quantized input/output, as the device runtime sees them."""
    from edgeml.core.runtime import load_runner

    runner = load_runner(model, "tflite")

    def table(specs):
        return {
            s.name: {"dtype": s.dtype, "scale": s.scale, "zero_point": s.zero_point}
            for s in specs
            if s.scale is not None
        }

    return {"input_quantization": table(runner.inputs), "output_quantization": table(runner.outputs)}
