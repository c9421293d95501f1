"""Serve one verified artifact: load, warm up, validate every request, run it. No HTTP here.

``ModelService.load`` refuses an artifact whose signature, hashes or self-test do not check out,
so a service that exists is one that may serve. ``ModelService.infer`` is the in-process API;
``LocalClient`` adds the telemetry an app embedding the agent gets for free over HTTP.

For more than one request at a time (all off by default, set by ``load``): several interpreters
of the model (``device_agent.instances``), dynamic batching of concurrent requests
(``device_agent.batching``) and a response cache (``device_agent.cache``).

Request rules (the same over HTTP, see ``device_agent.api``):

* names: every model input exactly once, nothing else; requested outputs must exist.
* dtypes: the tensor's dtype, or one numpy casts to it "safely" (without losing values): uint8
  pixels or int16 audio for a float32 input, int32 for an int64 one. float64 for float32 is
  refused: it would round silently, the caller should choose to. Quantized models take and
  return float32 (the runtime applies scale and zero point).
* shapes: the rank must match; dims the model leaves open (None) are free, the others must match.
  For .tflite models fed in batches, the batch axis is free too (LiteRT resizes its inputs;
  ONNX Runtime checks fixed dims itself, so there a fixed batch really is fixed).
* values: float inputs must be finite. The models served here cannot take NaN or infinity: float
  kernels spread them to every output and quantizing maps them to arbitrary integers.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np

from edgeml.core.data import Dataset
from edgeml.core.errors import first_line
from edgeml.core.runtime import load_runner
from edgeml.core.selftest import run_selftest
from edgeml.core.specs import TensorSpec

from .batching import DynamicBatcher
from .cache import ResponseCache, request_key
from .instances import Instance, RunnerPool
from .telemetry.sink import NullSink, TelemetrySink
from .verifier import read_verified

log = logging.getLogger("edgeml-agent.serving")
WARMUP_RUNS = 3  # after the self-test: first runs allocate arenas and pack weights
MAX_INPUT_BYTES = 64 << 20


RUNTIME_REFUSAL = 422  # valid inputs the model itself could not run on: the client hears 4xx, health counts it


def runtime_refusal(text: str, feed: Dict[str, np.ndarray]) -> str:
    """What to tell a client whose inputs passed validation but not the model: which inputs, and
    the likely cause, without the runtime's internals."""
    low = text.lower()
    shapes = ", ".join(f"'{k}' {list(v.shape)}" for k, v in feed.items())
    ints = [k for k, v in feed.items() if v.dtype.kind in "iu"]
    if ints and any(w in low for w in ("out of data bounds", "out of range", "out of bounds", "indices", "index")):
        names = ", ".join(f"'{k}'" for k in ints)
        return (f"the model could not run on these inputs: a value of {names} is out of the range the model "
                "indexes (say, a token id beyond the vocabulary); send values the model knows")
    if any(w in low for w in ("broadcast", "dimension", "shape", "mismatch")):
        return (f"the model could not run on these inputs: their shapes do not fit together ({shapes}); "
                "send inputs whose shared axes (say, the sequence length) agree")
    return f"the model could not run on these inputs ({shapes}); check their values and shapes"


class RequestError(Exception):
    """A request the service will not run: ``status`` is the HTTP status the API answers with.

    400 bad input (names, dtypes, shapes, values), 404 unknown model or version, 413 too large,
    422 inputs that passed validation but that the model could not run on (a token id beyond its
    vocabulary, sequence lengths that do not agree): the client's to fix, and an error of the model
    for its health window (the model it replaced may have taken them).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ModelService:
    """One loaded artifact. ``inputs``/``outputs`` are the tensors as callers see them (float for
    quantized ones); ``ready`` turns true once the self-test and warm-up runs passed.

    ``runner`` is one runner or a ``RunnerPool`` of several instances (``device_agent.instances``);
    ``max_batch`` > 1 merges concurrent requests (``device_agent.batching``, only for models with
    a free batch axis); ``cache_bytes`` > 0 answers repeated requests from a response cache
    (``device_agent.cache``). ``load`` sets them from the agent's config; the defaults serve with
    one interpreter, unbatched, uncached.
    """

    def __init__(self, artifact, runner, inputs: List[TensorSpec], outputs: List[TensorSpec],
                 max_input_bytes: int = MAX_INPUT_BYTES, *, max_batch: int = 0, max_delay_ms: float = 1.0,
                 cache_bytes: int = 0):
        self.artifact = artifact
        # LiteRT interpreters are not thread-safe: each instance runs one request at a time
        self.pool = runner if isinstance(runner, RunnerPool) else RunnerPool([Instance(0, runner)])
        self.inputs = inputs
        self.outputs = outputs
        self.max_input_bytes = max_input_bytes
        self.ready = False
        self.selftest = None
        self._local = threading.local()  # each request thread's last model run time
        self.batcher = None
        if max_batch > 1:
            if batch_free(artifact, inputs, outputs):
                self.batcher = DynamicBatcher(self.pool, self._refusal, max_batch, max_delay_ms)
            else:
                log.info("%s: dynamic batching does not apply, the model has no free batch axis; "
                         "requests run one by one", artifact.manifest.get("name", "the model"))
        self.cache = ResponseCache(cache_bytes) if cache_bytes > 0 else None

    @classmethod
    def load(cls, artifact_path, public_key, num_threads: int = 1, max_input_bytes: int = MAX_INPUT_BYTES,
             verify=read_verified, *, instances: int = 1, max_batch: int = 0, max_delay_ms: float = 1.0,
             cache_bytes: int = 0) -> "ModelService":
        """Verify, load and warm up; raise VerificationError (or the loader's error) otherwise.
        ``verify(path, public_key)`` returns the verified artifact: by default checked in a child
        process (cryptography stays out of the daemon); a simulator of many devices passes its own.

        ``instances`` runners are created one after the other, each self-tested and warmed up and
        its memory measured; ``max_batch``/``max_delay_ms`` turn on dynamic batching,
        ``cache_bytes`` the response cache (see the class)."""
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        artifact = verify(artifact_path, public_key)
        selftests = []

        def make(index: int):
            runner = load_runner(artifact.model, artifact.model_format, num_threads=num_threads)
            selftests.append(_warm_up(artifact, runner))
            return runner

        pool = RunnerPool.build(make, instances)
        batched = artifact.model_format == "tflite" and not _whole_samples(artifact)
        inputs = [_served(s, batched) for s in pool.first.inputs]
        outputs = [_served(s, batched) for s in pool.first.outputs]
        service = cls(artifact, pool, inputs, outputs, max_input_bytes, max_batch=max_batch,
                      max_delay_ms=max_delay_ms, cache_bytes=cache_bytes)
        service.selftest = selftests[0]
        service.ready = True
        return service

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def name(self) -> str:
        return self.artifact.manifest["name"]

    @property
    def version(self) -> int:
        return self.artifact.manifest["version"]

    @property
    def sha256(self) -> str:
        return self.artifact.sha256

    @property
    def format(self) -> str:
        return self.artifact.model_format

    def last_run_ms(self) -> Optional[float]:
        """Milliseconds the model itself took for this thread's last request (without validation,
        HTTP or waiting for a free instance): what tells one model's speed from another's. A
        request run in a merged batch reports the batch's run; one answered from the cache, the
        run that computed the cached answer."""
        return getattr(self._local, "run_ms", None)

    def infer(self, inputs: Dict[str, np.ndarray], outputs: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """Validate ``inputs``, run the model, return the requested outputs (all when None)."""
        feed = self._validate(inputs)
        names = self._output_names(outputs)
        key = request_key(self.sha256, names, feed) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                answer, self._local.run_ms = hit
                return answer
        result, self._local.run_ms = self.batcher.infer(feed) if self.batcher is not None else self.run_alone(feed)
        answer = {name: result[name] for name in names}
        if key is not None:
            self.cache.put(key, answer, self._local.run_ms)
        return answer

    def run_alone(self, feed: Dict[str, np.ndarray]):
        """Run validated inputs by themselves on a free instance (no batch, no cache): the outputs
        and the model's milliseconds; RequestError (422) when the model cannot run on them."""
        try:
            return self.pool.run(feed)
        except Exception as exc:  # LiteRT and ONNX Runtime raise their own untyped errors
            raise self._refusal(exc, feed) from exc

    def serving_stats(self) -> dict:
        """What the instances, the batcher and the cache did since this model was loaded (/metrics)."""
        stats = self.pool.stats()
        stats.update(self.batcher.stats() if self.batcher is not None
                     else {"batches": 0, "batch_requests": 0, "batch_rows": 0})
        stats["cache"] = self.cache.stats() if self.cache is not None else None
        return stats

    def telemetry_stats(self) -> dict:
        """Fields for the ``system`` telemetry record: the cache's hits and misses, when it is on."""
        if self.cache is None:
            return {}
        c = self.cache.stats()
        return {"cache_hits": c["cache_hits"], "cache_misses": c["cache_misses"]}

    def _refusal(self, exc: Exception, feed: Dict[str, np.ndarray]) -> "RequestError":
        # the model passed its self-test when loaded, so what fails now is these inputs' values
        # or shapes; the runtime's own text (node names, source paths) stays in the device's log
        log.warning("%s v%s refused a request: %s", self.name, self.version, first_line(exc, 500))
        return RequestError(RUNTIME_REFUSAL, runtime_refusal(str(exc), feed))

    # -- validation -------------------------------------------------------------------------------

    def _validate(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        expected = {s.name: s for s in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise RequestError(400, f"unknown input '{unknown[0]}'; {self.name} takes {_names(self.inputs)}")
        missing = [n for n in expected if n not in inputs]
        if missing:
            raise RequestError(400, f"missing input '{missing[0]}'; {self.name} takes {_names(self.inputs)}")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        total = sum(a.size * np.dtype(expected[n].dtype).itemsize for n, a in arrays.items())
        if total > self.max_input_bytes:
            raise RequestError(413, f"the inputs take {total} bytes, more than the {self.max_input_bytes} allowed; "
                                    "send smaller batches")
        return {name: _checked(arrays[name], spec) for name, spec in expected.items()}

    def _output_names(self, outputs: Optional[List[str]]) -> List[str]:
        known = [s.name for s in self.outputs]
        if outputs is None:
            return known
        for name in outputs:
            if name not in known:
                raise RequestError(400, f"unknown output '{name}'; {self.name} returns {_names(self.outputs)}")
        return list(outputs)


class LocalClient:
    """The in-process API with telemetry: what the HTTP API does for a request, without HTTP.

    Every call reports to ``sink``: ``inference`` when served, ``error`` (then re-raised) when not.
    A sink that fails is logged and does not fail the call.
    """

    def __init__(self, service: ModelService, sink: TelemetrySink = NullSink()):
        self.service = service
        self.sink = sink

    def infer(self, inputs: Dict[str, np.ndarray], outputs: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            result = self.service.infer(inputs, outputs)
        except RequestError as exc:
            report_safely(self.sink.error, self.service.name, exc.status, exc.message, _ms(started))
            raise
        report_safely(self.sink.inference, self.service.name, self.service.version, _ms(started), inputs, result,
                      self.service.last_run_ms())
        return result


def report_safely(call, *args) -> None:
    """Telemetry must never take serving down: a failing sink is logged, the request still answered."""
    try:
        call(*args)
    except Exception:
        log.exception("telemetry sink failed")


def _checked(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if x.dtype != want:
        if not np.can_cast(x.dtype, want, "safe"):
            raise RequestError(400, f"input '{spec.name}' is {x.dtype.name}; the model takes {want.name} "
                                    f"(convert it, e.g. np.asarray(x, np.{want.name}))")
        x = x.astype(want)
    if x.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, x.shape)):
        raise RequestError(400, f"input '{spec.name}' has shape {list(x.shape)}; the model takes "
                                f"{_shape_text(spec.shape)} (? is free)")
    if x.size == 0:
        raise RequestError(400, f"input '{spec.name}' is empty (shape {list(x.shape)})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise RequestError(400, f"input '{spec.name}' holds NaN or infinity in {bad} of {x.size} values; the model "
                                "cannot take them (they spread to every output, or quantize to arbitrary values)")
    return x


def _warm_up(artifact, runner):
    """Self-test one runner (raise if it fails), then run it WARMUP_RUNS times; the self-test's result."""
    st = run_selftest(artifact, runner).require_ok("do not serve this model on this device", where=str(artifact.path))
    sample = Dataset(artifact.selftest_inputs, whole=_whole_samples(artifact)).feed(0)
    for _ in range(WARMUP_RUNS):
        runner.run(sample)
    return st


def batch_free(artifact, inputs: List[TensorSpec], outputs: List[TensorSpec]) -> bool:
    """True when requests may be merged along axis 0: every input and output has a free first
    dim, and it is a batch axis (not the free length of a whole-sample model's input)."""
    return (not _whole_samples(artifact) and bool(inputs)
            and all(s.shape and s.shape[0] is None for s in list(inputs) + list(outputs)))


def _served(spec: TensorSpec, batch_free: bool) -> TensorSpec:
    """The tensor as callers see it: float for quantized tensors, a free batch axis if the runtime allows."""
    quantized = spec.scale is not None and np.dtype(spec.dtype).kind in "iu"
    shape = (None,) + tuple(spec.shape[1:]) if batch_free and spec.shape else tuple(spec.shape)
    return replace(spec, dtype="float32" if quantized else spec.dtype, shape=shape, scale=None, zero_point=None)


def _whole_samples(artifact) -> bool:
    return bool(artifact.manifest.get("selftest", {}).get("whole_samples", False))


def _names(specs: List[TensorSpec]) -> str:
    return ", ".join(s.describe() for s in specs)


def _shape_text(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
