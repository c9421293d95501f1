"""The agent's local HTTP API: the Open Inference Protocol (KServe v2) as Triton speaks it.

So the standard client works unchanged (``tritonclient.http.InferenceServerClient``), this
implements Triton's binary tensor data extension in both directions: a request whose
``Inference-Header-Content-Length`` header gives the JSON's length carries raw little-endian
tensor bytes after it, one run per input with ``parameters.binary_data_size``; outputs asked for
with ``parameters.binary_data`` (or all of them, with the request parameter
``binary_data_output``, which tritonclient sets when no outputs are named) come back the same way.
Request bodies may be gzip or deflate encoded (tritonclient's ``request_compression_algorithm``),
responses are compressed when ``Accept-Encoding`` asks for it.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}][/ready],
/metrics; POST /v2/models/{name}[/versions/{v}]/infer.

Errors are ``{"error": "..."}`` with Triton's statuses: 404 unknown model, version or path,
400 anything wrong in a request (unknown tensor names included), 405 wrong method, 411 no
Content-Length, 413 body over ``max_body_bytes`` (judged from Content-Length, before reading),
415 unknown Content-Encoding, 500 runtime failure. Each one is reported to the TelemetrySink and
counted; ``edgeml_requests_total`` and the latency histogram cover inference requests and refused
requests (successful probes, metadata reads and scrapes are not counted: they would drown the
signal).
"""
from __future__ import annotations

import json
import logging
import math
import re
import socket
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import numpy as np

from edgeml.core import __version__

from ..serving import ModelService, RequestError, report_safely
from ..telemetry.sink import NullSink, TelemetrySink
from . import metrics as m

log = logging.getLogger("edgeml-agent.api")

MAX_BODY_BYTES = 16 << 20
IDLE_TIMEOUT_S = 60.0  # a kept-alive connection that stays silent this long is closed
DRAIN_S, DRAIN_QUIET_S = 5.0, 1.0  # bounds on reading a refused body to its end
DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_TYPES = {kserve: np.dtype(name).newbyteorder("<") for name, kserve in DATATYPES.items()}
PLATFORMS = {"tflite": "tflite", "onnx": "onnxruntime"}
# JSON values a datatype accepts, by numpy kind of the parsed list: JSON has no int/float split
# for floats, but a 1.5 for an INT64 would be truncated silently, so it is refused.
_JSON_KINDS = {"f": "biuf", "i": "iu", "u": "iu", "b": "b"}
_UNSUPPORTED = ("shared_memory_region", "classification")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?$")


class ApiServer:
    """Serve ``service`` on ``host:port`` (port 0: a free one, see ``.port``) until ``stop()``.

    ``service`` and ``sink`` may be replaced while running (the daemon does on reload); each
    request uses the ones it started with. ``metrics`` is the registry /metrics renders.
    """

    def __init__(self, service: ModelService, sink: TelemetrySink = NullSink(), host: str = "127.0.0.1",
                 port: int = 8500, max_body_bytes: int = MAX_BODY_BYTES, metrics: Optional[m.Registry] = None,
                 idle_timeout: float = IDLE_TIMEOUT_S):
        self.service, self.sink = service, sink
        self.host, self.port = host, port
        self.max_body_bytes, self.idle_timeout = max_body_bytes, idle_timeout
        self.metrics = metrics or m.Registry()
        self.requests = self.metrics.counter(
            "edgeml_requests_total", "Inference requests and refused requests, by model and HTTP status")
        self.latency = self.metrics.histogram(
            "edgeml_request_latency_seconds", "Seconds from request to response, inference and refused requests")
        self.metrics.gauge_function("edgeml_model_ready", "1 when the served model is verified and warmed up",
                                    self._ready_samples)
        self.metrics.gauge_function("process_resident_memory_bytes", "Resident memory of the agent",
                                    m.resident_memory)
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ApiServer":
        self._httpd = _Server((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgeml-api", daemon=True)
        self._thread.start()
        log.info("KServe v2 API on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop taking requests and close kept-alive connections (their threads then end)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None

    def record(self, model: str, status: int, seconds: float) -> None:
        self.requests.inc(model=model, status=status)
        self.latency.observe(seconds, model=model)

    def _ready_samples(self):
        s = self.service
        return [({"model": s.name, "version": s.version}, 1.0 if s.ready else 0.0)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], api: ApiServer):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api = api
        self._connections = set()
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def handle_error(self, request, client_address):
        """The stdlib prints tracebacks to stderr; a client hanging up is normal, the rest a bug."""
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            log.debug("connection from %s dropped", client_address[0])
        else:
            log.exception("error on a connection from %s", client_address[0])

    def close_connections(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: tritonclient reuses its connections
    server_version = f"edgeml-agent/{__version__}"
    # headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK stalls every response by ~40 ms
    disable_nagle_algorithm = True

    # -- plumbing ---------------------------------------------------------------------------------

    def setup(self):
        self.timeout = self.server.api.idle_timeout
        super().setup()
        self.server.track(self.connection, True)

    def finish(self):
        self.server.track(self.connection, False)
        super().finish()

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # the stdlib writes every request to stderr
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own refusals (bad request line, unknown method) in the protocol's format."""
        self._begin()
        self._refuse(RequestError(int(code), message or getattr(code, "phrase", "bad request")))

    def _begin(self):
        """Per-request state (one handler serves every request of a kept-alive connection)."""
        self._started = time.perf_counter()
        self._api = self.server.api
        self._service, self._sink = self._api.service, self._api.sink  # a reload may swap them meanwhile
        self._model = None  # the served model's name once the request is known to target it
        self._body_read = False

    def _handle(self):
        self._begin()
        try:
            self._route()()
        except RequestError as exc:
            self._refuse(exc)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("internal error on %s %s", self.command, self.path)
            self._refuse(RequestError(500, f"internal error: {type(exc).__name__}"))

    def _route(self):
        path = urlsplit(self.path).path
        simple = {"/v2/health/live": self._live, "/v2/health/ready": self._ready, "/v2": self._server_metadata,
                  "/metrics": self._metrics}
        if path in simple:
            return self._allow("GET", simple[path])
        match = _MODEL_PATH.match(path)
        if match is None:
            raise RequestError(404, f"no endpoint {path}; see the Open Inference Protocol (KServe v2)")
        name, version, action = unquote(match[1]), match[2] and unquote(match[2]), match[3]
        method, handler = {None: ("GET", self._model_metadata), "ready": ("GET", self._model_ready),
                           "infer": ("POST", self._infer)}[action]
        handler = self._allow(method, handler)
        self._find_model(name, version)
        return handler

    def _allow(self, method: str, handler):
        if self.command != method:
            self._allowed = method
            raise RequestError(405, f"{self.command} is not allowed here; use {method}")
        return handler

    def _find_model(self, name: str, version: Optional[str]) -> None:
        service = self._service
        if name != service.name:
            raise RequestError(404, f"unknown model '{name[:100]}'; this agent serves '{service.name}'")
        self._model = service.name
        if version not in (None, "", str(service.version)):
            raise RequestError(404, f"model '{name}' has no version {version[:20]}; it serves version {service.version}")

    # -- endpoints --------------------------------------------------------------------------------

    def _live(self):
        self._send(200, b"")

    def _ready(self):
        self._send(200 if self._service.ready else 503, b"")

    def _server_metadata(self):
        self._send_json({"name": "edgeml-agent", "version": __version__, "extensions": ["binary_tensor_data"]})

    def _metrics(self):
        self._send(200, self._api.metrics.render().encode("utf-8"), m.CONTENT_TYPE)

    def _model_metadata(self):
        s = self._service
        self._send_json({
            "name": s.name, "versions": [str(s.version)], "platform": PLATFORMS[s.format],
            "inputs": [_tensor_metadata(t) for t in s.inputs], "outputs": [_tensor_metadata(t) for t in s.outputs],
            "parameters": {"sha256": s.sha256, "version": s.version},
        })

    def _model_ready(self):
        self._send(200 if self._service.ready else 503, b"")

    def _infer(self):
        service = self._service
        request, binary = _split_body(self._read_body(), self.headers.get("Inference-Header-Content-Length"))
        inputs = _parse_inputs(request.get("inputs"), binary)
        wanted = _requested_outputs(request)
        outputs = service.infer(inputs, list(wanted) if wanted else None)  # none named: all of them
        default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
        reply = {"model_name": service.name, "model_version": str(service.version)}
        if "id" in request:
            reply["id"] = request["id"]
        body, header_length = _encode_outputs(reply, outputs, wanted or {}, default_binary)
        seconds = time.perf_counter() - self._started
        report_safely(self._sink.inference, service.name, service.version, seconds * 1000.0, inputs, outputs)
        self._api.record(service.name, 200, seconds)
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        kind = "application/json" if header_length is None else "application/octet-stream"
        self._send(200, body, kind, headers)

    # -- reading ----------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            raise RequestError(400, f"Content-Length {length[:30]!r} is not a byte count")
        limit = self._api.max_body_bytes
        if size > limit:
            raise RequestError(413, f"the body is {size} bytes, more than the {limit} this agent takes; "
                                    "send smaller batches")
        body = self.rfile.read(size)
        self._body_read = True
        if len(body) != size:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of {size} bytes")
        return _decode(body, self.headers.get("Content-Encoding", "identity"), limit)

    def _unread_body(self) -> bool:
        headers = getattr(self, "headers", None)  # missing when the request line was bad
        if headers is None or self._body_read:
            return False
        return headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in headers

    # -- writing ----------------------------------------------------------------------------------

    def _refuse(self, exc: RequestError) -> None:
        seconds = time.perf_counter() - self._started
        log.debug("refused %s %s: %d %s", self.command, getattr(self, "path", None), exc.status, exc.message)
        report_safely(self._sink.error, self._model, exc.status, exc.message, seconds * 1000.0)
        self._api.record(self._model or "", exc.status, seconds)
        self._send_json({"error": exc.message}, exc.status)

    def _send_json(self, obj: dict, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain",
              headers: Optional[Dict[str, str]] = None) -> None:
        # The body of a refused request was never read, so the connection cannot be reused.
        drain = self._unread_body()
        headers_in = getattr(self, "headers", None)
        encoding = _accepted_encoding(headers_in.get("Accept-Encoding", "")) if body and headers_in else None
        if encoding:
            body = _compress(body, encoding)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        if status == 405:
            self.send_header("Allow", self._allowed)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if drain or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if drain:
            self._drain()

    def _drain(self) -> None:
        """Read what the client still sends (until it closes, goes quiet, or DRAIN_S pass) before
        closing: closing a socket with unread data resets the connection, and the client would
        lose the response it has not read yet."""
        self.wfile.flush()
        deadline = time.monotonic() + DRAIN_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(DRAIN_QUIET_S)
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass


# -- protocol helpers (pure functions) -----------------------------------------------------------


def _tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": DATATYPES.get(spec.dtype, spec.dtype.upper()),
            "shape": [-1 if d is None else d for d in spec.shape]}


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding, refusing bodies that would unpack beyond ``limit`` (zip bombs)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)  # deflate in HTTP is the zlib format
    if wbits is None:
        raise RequestError(415, f"Content-Encoding {encoding[:30]!r} is not supported; use gzip, deflate or none")
    unpacker = zlib.decompressobj(wbits)
    try:
        data = unpacker.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"the {encoding} body cannot be unpacked: {exc}") from None
    if len(data) > limit:
        raise RequestError(413, f"the body unpacks to more than the {limit} bytes this agent takes")
    if not unpacker.eof:
        raise RequestError(400, f"the {encoding} body is truncated")
    return data


def _split_body(body: bytes, header_length: Optional[str]) -> Tuple[dict, bytes]:
    """The JSON request and the binary tensor data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length[:30]!r} does not fit "
                                    f"a body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError(400, 'the request must be a JSON object with an "inputs" list')
    if not isinstance(request.get("parameters", {}), dict):
        raise RequestError(400, '"parameters" must be an object')
    return request, binary


def _parse_inputs(items: list, binary: bytes) -> Dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for item in items:
        name, shape, dtype, params = _input_header(item)
        if name in arrays:
            raise RequestError(400, f"input '{name}' is given twice")
        count = math.prod(shape)
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise RequestError(400, f"input '{name}': binary_data_size {size!r} does not fit the "
                                        f"{len(binary) - offset} bytes of binary data left")
            if size != count * dtype.itemsize:
                raise RequestError(400, f"input '{name}' has {size} bytes of binary data; shape {shape} of "
                                        f"{item['datatype']} takes {count * dtype.itemsize}")
            arrays[name] = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise RequestError(400, f"input '{name}' has neither data nor parameters.binary_data_size")
            arrays[name] = _from_json(item["data"], dtype, name, shape, count)
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def _input_header(item) -> Tuple[str, List[int], np.dtype, dict]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise RequestError(400, 'each input must be an object with "name", "shape", "datatype" and data')
    name, shape, datatype = item["name"], item.get("shape"), item.get("datatype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(400, f"input '{name}': shape must be a list of whole numbers >= 0, not {shape!r}"[:300])
    if datatype not in NUMPY_TYPES:
        raise RequestError(400, f"input '{name}': datatype {str(datatype)[:20]!r} is not supported; "
                                f"use one of {', '.join(NUMPY_TYPES)}")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"input '{name}': parameters must be an object")
    _refuse_unsupported(params, f"input '{name}'")
    return name, shape, NUMPY_TYPES[datatype], params


def _from_json(data, dtype: np.dtype, name: str, shape: List[int], count: int) -> np.ndarray:
    """Flat or nested JSON numbers -> an array of ``dtype``, refusing values it cannot hold."""
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise RequestError(400, f"input '{name}': data must be a (nested) list of numbers") from None
    if raw.size != count:
        raise RequestError(400, f"input '{name}' has {raw.size} values; shape {shape} takes {count}")
    if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise RequestError(400, f"input '{name}': data must be {_kind_text(dtype)}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise RequestError(400, f"input '{name}': a value is outside the range of {dtype.name}")
    with np.errstate(over="ignore"):  # floats beyond float32 become inf, which infer then refuses
        return raw.astype(dtype).reshape(shape)


def _kind_text(dtype: np.dtype) -> str:
    return {"b": "true or false", "f": "numbers", "i": "whole numbers", "u": "whole numbers"}[dtype.kind]


def _requested_outputs(request: dict) -> Optional[Dict[str, Optional[bool]]]:
    """{name: binary_data or None (not said)} in request order, or None for all outputs."""
    items = request.get("outputs")
    if items is None:
        return None
    if not isinstance(items, list):
        raise RequestError(400, '"outputs" must be a list')
    wanted = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(400, 'each requested output must be an object with a "name"')
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, f"output '{item['name']}': parameters must be an object")
        _refuse_unsupported(params, f"output '{item['name']}'")
        if item["name"] in wanted:
            raise RequestError(400, f"output '{item['name']}' is requested twice")
        wanted[item["name"]] = params.get("binary_data")
    return wanted


def _refuse_unsupported(params: dict, what: str) -> None:
    for key in _UNSUPPORTED:
        if key in params:
            raise RequestError(400, f"{what}: {key} is not supported by this agent")


def _encode_outputs(reply: dict, outputs: Dict[str, np.ndarray], wanted: Dict[str, Optional[bool]],
                    default_binary: bool) -> Tuple[bytes, Optional[int]]:
    """The response body, and the JSON header's length when binary data follows it."""
    entries, blobs = [], []
    for name, value in outputs.items():
        array = np.ascontiguousarray(value)
        entry = {"name": name, "datatype": DATATYPES[array.dtype.name], "shape": list(array.shape)}
        binary = wanted.get(name)
        if binary if binary is not None else default_binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise RequestError(500, f"output '{name}' holds NaN or infinity, which JSON cannot carry; "
                                        "request it as binary data")
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    header = json.dumps({**reply, "outputs": entries}).encode("utf-8")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _accepted_encoding(accept: str) -> Optional[str]:
    """gzip or deflate if the client takes it (tritonclient's response_compression_algorithm)."""
    for token in accept.split(","):
        coding, _, params = token.strip().partition(";")
        if coding.strip().lower() in ("gzip", "deflate") and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return coding.strip().lower()
    return None


def _compress(body: bytes, encoding: str) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    return packer.compress(body) + packer.flush()

