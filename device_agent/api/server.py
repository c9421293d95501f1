"""The agent's local HTTP API: the Open Inference Protocol (KServe v2) as Triton speaks it.

So the standard client works unchanged (``tritonclient.http.InferenceServerClient``), requests
and responses follow Triton's binary tensor data extension and its compression (``protocol``
decodes and encodes them); this module is the HTTP server around it: routing, keep-alive, body
limits, refusals, telemetry and metrics for every request.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}][/ready],
/metrics; POST /v2/models/{name}[/versions/{v}]/infer.

Errors are ``{"error": "..."}`` with Triton's statuses: 404 unknown model, version or path,
400 anything wrong in a request (unknown tensor names included), 405 wrong method, 411 no
Content-Length, 413 body over ``max_body_bytes`` (judged from Content-Length, before reading),
415 unknown Content-Encoding, 422 inputs the model could not run on (valid, but say a token id
beyond its vocabulary; the runtime's own text stays in the device log), 500 a bug. Each one is reported to the TelemetrySink and
counted; ``edgeml_requests_total`` and the latency histogram cover inference requests and refused
requests (successful probes, metadata reads and scrapes are not counted: they would drown the
signal).
"""
from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit

from edgeml.core import __version__

from ..serving import ModelService, RequestError, report_safely
from ..telemetry.sink import NullSink, TelemetrySink
from . import metrics as m
from .protocol import (
    accepted_encoding,
    compress,
    decode_body,
    encode_outputs,
    parse_inputs,
    requested_outputs,
    split_body,
    tensor_metadata,
)

log = logging.getLogger("edgeml-agent.api")

MAX_BODY_BYTES = 16 << 20
IDLE_TIMEOUT_S = 60.0  # a kept-alive connection that stays silent this long is closed
DRAIN_S, DRAIN_QUIET_S = 5.0, 1.0  # bounds on reading a refused body to its end
PLATFORMS = {"tflite": "tflite", "onnx": "onnxruntime"}
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer|feedback))?$")


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
        self.feedback = None  # device_agent.monitoring.feedback.Feedback when feedback is on
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
                           "infer": ("POST", self._infer), "feedback": ("POST", self._feedback)}[action]
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
            "inputs": [tensor_metadata(t) for t in s.inputs], "outputs": [tensor_metadata(t) for t in s.outputs],
            "parameters": {"sha256": s.sha256, "version": s.version},
        })

    def _model_ready(self):
        self._send(200 if self._service.ready else 503, b"")

    def _infer(self):
        service = self._service
        request, binary = split_body(self._read_body(), self.headers.get("Inference-Header-Content-Length"))
        inputs = parse_inputs(request.get("inputs"), binary)
        wanted = requested_outputs(request)
        outputs = service.infer(inputs, list(wanted) if wanted else None)  # none named: all of them
        default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
        reply = {"model_name": service.name, "model_version": str(service.version)}
        if "id" in request:
            reply["id"] = request["id"]
        feedback = self._api.feedback
        if feedback is not None:  # the id a later feedback names this request by
            reply["id"] = str(request.get("id") or feedback.new_id())[:128]
            feedback.keep(reply["id"], inputs, outputs)
        body, header_length = encode_outputs(reply, outputs, wanted or {}, default_binary)
        seconds = time.perf_counter() - self._started
        report_safely(self._sink.inference, service.name, service.version, seconds * 1000.0, inputs, outputs,
                      service.last_run_ms())
        self._api.record(service.name, 200, seconds)
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        kind = "application/json" if header_length is None else "application/octet-stream"
        self._send(200, body, kind, headers)

    def _feedback(self):
        """``{"id": "...", "label": 3}`` (or a list, one class id per sample of that request)."""
        from ..monitoring.feedback import UnknownRequest

        feedback = self._api.feedback
        if feedback is None:
            raise RequestError(404, "feedback is off on this agent; turn it on with [feedback] enabled = true")
        try:
            body = json.loads(self._read_body())
        except ValueError as exc:
            raise RequestError(400, f"the feedback is not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise RequestError(400, 'feedback must be {"id": "<the id of the infer response>", "label": <class id>}')
        label = body.get("label", body.get("labels"))
        flat = label if isinstance(label, list) else [label]
        if not flat or not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise RequestError(400, "label must be a class id (an integer) or a list of them, one per sample")
        try:
            result = feedback.label(body["id"], flat)
        except UnknownRequest:
            raise RequestError(404, f"no request {body['id'][:64]!r} is waiting for feedback: sampled out, "
                                    "labelled already, or forgotten (only the latest ones wait)") from None
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        self._api.record(self._service.name, 200, time.perf_counter() - self._started)
        self._send_json({"accepted": True, **result})

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
        return decode_body(body, self.headers.get("Content-Encoding", "identity"), limit)

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
        encoding = accepted_encoding(headers_in.get("Accept-Encoding", "")) if body and headers_in else None
        if encoding:
            body = compress(body, encoding)
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
