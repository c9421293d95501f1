"""Run a model file with the runtime a device uses: LiteRT for .tflite, ONNX Runtime for .onnx.

Light on purpose (numpy plus the runtime, imported lazily): the device agent uses it too, so it
must never import tensorflow. Callers always pass and receive float arrays for quantized
tensors; the runner applies each tensor's scale and zero point.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .errors import InputError, UnsupportedModelError, first_line
from .native_output import captured_stderr
from .specs import TensorSpec

FORMATS = ("tflite", "onnx")


def _litert_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:  # older devices ship only the deprecated tflite-runtime wheel
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise UnsupportedModelError(
                "no LiteRT runtime installed; pip install ai-edge-litert to run .tflite models"
            ) from exc
    return Interpreter


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float array -> the integer dtype of a quantized tensor (round, clip)."""
    info = np.iinfo(spec.dtype)
    with np.errstate(over="ignore"):  # values far out of range become inf, and clip to the extremes
        q = np.divide(x, np.float32(spec.scale), dtype=np.float32)
        # in place: one float array, not four (a 224x224x3 image: 0.085 -> 0.075 ms)
        np.round(q, out=q)
        q += np.float32(spec.zero_point)
        np.clip(q, info.min, info.max, out=q)
    return q.astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return (q.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)


def _is_quantized(spec: TensorSpec) -> bool:
    return spec.scale is not None and np.issubdtype(np.dtype(spec.dtype), np.integer)


class Runner:
    """A loaded model: ``inputs``/``outputs`` describe it, ``run(feed)`` runs one batch.

    ``run`` is ``decode(invoke(encode(feed)))``: only ``invoke`` touches the runtime's state, so a
    caller sharing runners between threads (``device_agent.instances``) holds a runner for
    ``invoke`` alone and quantizes and dequantizes outside it."""

    format: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]

    def encode(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Float inputs -> what the runtime takes (quantized where the model is)."""
        return feed

    def invoke(self, args: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def decode(self, out: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """What the runtime returned -> float outputs (dequantized where the model is)."""
        return out

    def run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self.decode(self.invoke(self.encode(feed)))

    def feed_specs(self) -> List[TensorSpec]:
        """The inputs as callers feed them: float32 in place of quantized integer tensors."""
        return [
            TensorSpec(s.name, "float32", s.shape) if _is_quantized(s) else s for s in self.inputs
        ]


class TFLiteRunner(Runner):
    format = "tflite"

    def __init__(self, model: bytes, num_threads: int = 1):
        Interpreter = _litert_interpreter_class()
        try:
            with captured_stderr():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
                self._interp = Interpreter(model_content=model, num_threads=num_threads)
                self._interp.allocate_tensors()  # applies the delegate now, while stderr is captured
                sigs = self._interp.get_signature_list()
                if sigs:
                    self._runner = self._interp.get_signature_runner(next(iter(sigs)))
        except (ValueError, RuntimeError) as exc:
            raise UnsupportedModelError(f"LiteRT cannot load this model: {first_line(exc)}") from exc
        if not sigs:
            raise UnsupportedModelError(
                "the .tflite model has no signature; convert it with a serving signature"
            )
        self.inputs = [_tfl_spec(n, d) for n, d in self._runner.get_input_details().items()]
        self.outputs = [_tfl_spec(n, d) for n, d in self._runner.get_output_details().items()]

    def encode(self, feed):
        return {spec.name: quantize(feed[spec.name], spec) if _is_quantized(spec)
                else np.asarray(feed[spec.name], spec.dtype) for spec in self.inputs}

    def invoke(self, args):
        return self._runner(**args)

    def decode(self, out):
        return {spec.name: dequantize(out[spec.name], spec) if _is_quantized(spec) else out[spec.name]
                for spec in self.outputs}


def _tfl_spec(name: str, d: dict) -> TensorSpec:
    shape = tuple(None if s < 0 else int(s) for s in d["shape_signature"])
    scale, zp = d["quantization"]
    quant = np.issubdtype(np.dtype(d["dtype"]), np.integer) and scale != 0.0
    return TensorSpec(
        name=name,
        dtype=np.dtype(d["dtype"]).name,
        shape=shape,
        scale=float(scale) if quant else None,
        zero_point=int(zp) if quant else None,
    )


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


# A weight-only int8 model (edgeml's int8-weights recipe) carries this metadata key: its
# DequantizeLinear nodes are folded into float weights when the session loads (ONNX Runtime
# otherwise keeps them for QDQ fusion and dequantizes every weight at every run, 2x slower).
FOLD_WEIGHTS_KEY = "edgeml.fold_dequantized_weights"


class OnnxRunner(Runner):
    format = "onnx"

    def __init__(self, model: bytes, num_threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if FOLD_WEIGHTS_KEY.encode() in model:  # cheap: the key is stored verbatim in the protobuf
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            self._sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped exceptions
            msg = first_line(exc)
            if "NOT_IMPLEMENTED" in msg or "implementation" in msg.lower():
                raise UnsupportedModelError(f"ONNX Runtime has no kernel for an op: {msg}") from exc
            raise InputError(f"ONNX Runtime cannot load this model: {msg}") from exc
        self.inputs = [_ort_spec(i) for i in self._sess.get_inputs()]
        self.outputs = [_ort_spec(o) for o in self._sess.get_outputs()]

    def encode(self, feed):
        return {s.name: np.asarray(feed[s.name], s.dtype) for s in self.inputs}

    def invoke(self, args):
        values = self._sess.run(None, args)
        return {s.name: v for s, v in zip(self.outputs, values)}


def _ort_spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)



_RUNNERS = {"tflite": TFLiteRunner, "onnx": OnnxRunner}


def load_runner(model: bytes, fmt: str, num_threads: int = 1) -> Runner:
    """Load ``model`` (bytes of a .tflite or .onnx file) with the device's runtime."""
    try:
        cls = _RUNNERS[fmt]
    except KeyError:
        raise InputError(f"unknown model format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
    return cls(model, num_threads=num_threads)
