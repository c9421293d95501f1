"""The agent's local HTTP API: the Open Inference Protocol (KServe v2) as Triton speaks it.

So the standard client works unchanged (``tritonclient.http.InferenceServerClient``), requests
and responses follow Triton's binary tensor data extension and its compression (``protocol``
decodes and encodes them); this module is the HTTP server around it: routing, keep-alive, body
limits, refusals, telemetry and metrics for every request.

Endpoints: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}][/ready],
/metrics, /v2/openapi.json (the OpenAPI document of all of them); POST
/v2/models/{name}[/versions/{v}]/infer and .../feedback.

Beyond a loopback demo: with ``tokens`` every request needs ``Authorization: Bearer TOKEN``
(401 with ``WWW-Authenticate`` otherwise; ``open_health`` leaves /v2/health/* open for probes);
with ``tls`` (an ``ssl.SSLContext``) it speaks HTTPS, the handshake done on the connection's own
thread within ``request_timeout``. Load is bounded: the kernel queues ``backlog`` connections,
at most ``max_connections`` are open (one more gets 503 with ``Retry-After`` and is closed), at
most ``workers`` requests run the model at once (one more waits up to ``WORKER_WAIT_S``, then 503
with ``Retry-After``), and a request's headers and body must arrive within ``request_timeout`` (408
and the connection closed otherwise), so stalled uploads cannot pile up threads.

Errors are ``{"error": "..."}`` with Triton's statuses: 404 unknown model, version or path,
400 anything wrong in a request (unknown tensor names included), 401 no or a wrong token, 405
wrong method, 408 the request did not arrive in time, 411 no Content-Length, 413 body over ``max_body_bytes`` (judged from Content-Length, before reading),
415 unknown Content-Encoding, 422 inputs the model could not run on (valid, but say a token id
beyond its vocabulary; the runtime's own text stays in the device log), 500 a bug, 503 busy. Each one is reported to the TelemetrySink and
counted; ``edgeml_requests_total`` and the latency histogram cover inference requests and refused
requests (successful probes, metadata reads and scrapes are not counted: they would drown the
signal).
"""
from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
from http import HTTPStatus
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
REQUEST_TIMEOUT_S = 10.0  # from a request's first byte, its headers and body must arrive within this
WORKER_WAIT_S = 1.0  # a request finding every worker busy waits this long for one, then 503
RETRY_AFTER_S = "1"
MAX_CLASS_ID = 1 << 31  # a feedback label is a class id, not any integer JSON can spell
REFUSERS = 16  # connections being told 503 at once; beyond, they are closed (and counted)
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
                 idle_timeout: float = IDLE_TIMEOUT_S, *, tokens=None, open_health: bool = False,
                 tls: Optional[ssl.SSLContext] = None, backlog: int = 128, max_connections: int = 128,
                 workers: int = 8, request_timeout: float = REQUEST_TIMEOUT_S):
        self.service, self.sink = service, sink
        self.host, self.port = host, port
        self.max_body_bytes, self.idle_timeout = max_body_bytes, idle_timeout
        self.tokens, self.open_health, self.tls = tokens, open_health, tls  # tokens: security.Tokens or None
        self.backlog, self.max_connections, self.request_timeout = backlog, max_connections, request_timeout
        self.worker_count = workers
        self.workers = threading.BoundedSemaphore(workers)
        self.feedback = None  # device_agent.monitoring.feedback.Feedback when feedback is on
        self.metrics = metrics or m.Registry()
        self.auth_failures = self.metrics.counter(
            "edgeml_auth_failures_total", "Requests refused for a missing or wrong bearer token, by reason")
        self.refused_connections = self.metrics.counter(
            "edgeml_connections_refused_total", "Connections beyond max_connections: told 503, or closed when "
                                                "too many were being told at once")
        self.metrics.gauge_function("edgeml_connections_open", "Connections open now",
                                    lambda: [({}, self._httpd.active if self._httpd else 0)])
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
        log.info("KServe v2 API on %s://%s:%d%s", "https" if self.tls else "http", self.host, self.port,
                 "" if self.tokens else " (no token needed: loopback)")
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
        self.request_queue_size = api.backlog  # the listen backlog (socketserver's default is 5)
        self.api = api
        self._connections = set()
        self._lock = threading.Lock()
        self.active = 0  # connections with a thread
        self._refusers = threading.BoundedSemaphore(REFUSERS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        """On the accepting thread: a connection beyond ``max_connections`` is refused with 503 on a
        short-lived thread of its own (bounded too), never silently dropped while it can be told."""
        with self._lock:
            full = self.active >= self.api.max_connections
            if not full:
                self.active += 1
        if full:
            self._refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._lock:
                self.active -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.active -= 1

    def _refuse_connection(self, sock) -> None:
        if not self._refusers.acquire(blocking=False):
            self.api.refused_connections.inc(how="closed")
            self.shutdown_request(sock)
            return
        self.api.refused_connections.inc(how="503")

        def tell():
            try:
                conn = sock
                conn.settimeout(1.0)
                if self.api.tls is not None:
                    conn = self.api.tls.wrap_socket(sock, server_side=True)
                try:
                    conn.recv(1 << 16)  # the request, so that closing does not reset the connection
                except OSError:
                    pass
                body = b'{"error": "the agent is at its connection limit; retry shortly"}'
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: " + RETRY_AFTER_S.encode() + b"\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                conn.close()
            except OSError:
                pass
            finally:
                self.shutdown_request(sock)
                self._refusers.release()

        threading.Thread(target=tell, name="edgeml-api-refuse", daemon=True).start()

    def track(self, conn, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def handle_error(self, request, client_address):
        """The stdlib prints tracebacks to stderr; a client hanging up is normal, the rest a bug."""
        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout, ssl.SSLError)):
            log.debug("connection from %s dropped: %s", client_address[0], sys.exc_info()[1])
        else:
            log.exception("error on a connection from %s", client_address[0])

    def close_connections(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


MAX_HEADER_LINE, MAX_HEADERS = 65536, 100
_date = [0, ""]
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def _http_date() -> str:
    """The Date header, formatted once a second rather than for every response."""
    now = int(time.time())
    if _date[0] != now:
        _date[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _date[0] = now
    return _date[1]


class _Headers(dict):
    """Request headers by lower-cased name."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.get(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: tritonclient reuses its connections
    server_version = f"edgeml-agent/{__version__}"
    # headers and body go out in separate writes; with Nagle on, a keep-alive client's delayed
    # ACK stalls every response by ~40 ms
    disable_nagle_algorithm = True

    # -- plumbing ---------------------------------------------------------------------------------

    def setup(self):
        api = self.server.api
        self.timeout = api.idle_timeout
        if api.tls is not None:  # the handshake here, on this connection's thread, within the request timeout
            self.request.settimeout(api.request_timeout)
            self.request = api.tls.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.track(self.connection, True)

    def handle_one_request(self):
        """Wait for a request as long as an idle connection may stay; once its first byte is here,
        the rest of it (headers, body) must come within the request timeout."""
        api = self.server.api
        try:
            self.connection.settimeout(api.idle_timeout)
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):
            self.close_connection = True
            return
        self._deadline = time.monotonic() + api.request_timeout
        self.connection.settimeout(api.request_timeout)
        super().handle_one_request()

    def finish(self):
        self.server.track(self.connection, False)
        super().finish()

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # the stdlib writes every request to stderr
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        pass  # every request is counted in metrics; a debug line each would cost the request path

    def date_time_string(self, timestamp=None):
        return _http_date()

    def parse_request(self):
        """The request line and headers, parsed here: the stdlib's email parser took 94 us of every
        request (measured), a fifth of the agent's HTTP overhead. Headers become a dict with
        case-insensitive ``get``; a repeated header keeps its last value."""
        self.command, self.request_version = None, self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.send_error(400, f"bad request line {self.requestline[:80]!r}; this agent speaks HTTP/1.1")
            return False
        self.command, self.path, self.request_version = words
        headers = _Headers()
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(431, "a header line is too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            if len(headers) >= MAX_HEADERS:
                self.send_error(431, f"more than {MAX_HEADERS} headers")
                return False
            name, sep, value = line.decode("iso-8859-1").partition(":")
            if not sep or not name.strip():
                self.send_error(400, f"bad header line {line[:60]!r}")
                return False
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (self.request_version == "HTTP/1.0"
                                                           and connection != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue" and self.request_version != "HTTP/1.0":
            return self.handle_expect_100()
        return True

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
            self._authorize()
            self._route()()
        except RequestError as exc:
            self._refuse(exc)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("internal error on %s %s", self.command, self.path)
            self._refuse(RequestError(500, f"internal error: {type(exc).__name__}"))

    def _authorize(self) -> None:
        api = self._api
        if api.tokens is None or (api.open_health and urlsplit(self.path).path.startswith("/v2/health/")):
            return
        why = api.tokens.check(self.headers.get("Authorization"))
        if why is not None:
            api.auth_failures.inc(reason=why)
            raise RequestError(401, "a bearer token is needed: Authorization: Bearer TOKEN" if why == "missing"
                               else "the bearer token is not valid")

    def _route(self):
        path = urlsplit(self.path).path
        simple = {"/v2/health/live": self._live, "/v2/health/ready": self._ready, "/v2": self._server_metadata,
                  "/metrics": self._metrics, "/v2/openapi.json": self._openapi}
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

    def _openapi(self):
        from .openapi import document

        self._send_json(document(self._service))

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
        # a worker only for running the model: a request still arriving holds none
        if not self._api.workers.acquire(timeout=max(0.0, min(WORKER_WAIT_S, self._deadline - time.monotonic()))):
            raise RequestError(503, f"the agent is busy ({self._api.worker_count} requests running); retry shortly")
        try:
            outputs = service.infer(inputs, list(wanted) if wanted else None)  # none named: all of them
        finally:
            self._api.workers.release()
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
        report = (service.name, service.version, seconds * 1000.0, inputs, outputs, service.last_run_ms())
        sink = self._sink
        after = getattr(sink, "inference_after", None)  # a Tee: what keeps memory only waits for the response
        report_safely(sink.inference_before if after is not None else sink.inference, *report)
        headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
        kind = "application/json" if header_length is None else "application/octet-stream"
        self._send(200, body, kind, headers)
        self._api.record(service.name, 200, seconds)
        if after is not None:
            report_safely(after, *report)

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
        except RecursionError:
            raise RequestError(400, "the feedback's JSON is nested too deeply") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise RequestError(400, 'feedback must be {"id": "<the id of the infer response>", "label": <class id>}')
        label = body.get("label", body.get("labels"))
        flat = label if isinstance(label, list) else [label]
        if not flat or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_CLASS_ID for v in flat):
            raise RequestError(400, f"label must be a class id (an integer from 0 to {MAX_CLASS_ID - 1}) or a list of "
                                    "them, one per sample")
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
        body = self._read_exactly(size)
        self._body_read = True
        if len(body) != size:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of {size} bytes")
        return decode_body(body, self.headers.get("Content-Encoding", "identity"), limit)

    def _read_exactly(self, size: int) -> bytearray:
        """The body, within what is left of the request timeout: a stalled upload is cut off (408).

        Read into one buffer of the announced size: first what the header parsing left buffered,
        then straight from the socket. Reading chunks through the buffered reader allocated a
        megabyte per chunk and copied the body twice more (joining, splitting off the JSON):
        reading and splitting a 600 KB image took 196 us in the agent, 122 us this way (median, one client)."""
        body = bytearray(size)
        view, got = memoryview(body), 0
        while got < size:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(got, size)
            self.connection.settimeout(remaining)
            try:
                if got == 0:  # the reader's buffer, then (once it is used up) the socket alone
                    chunk = self.rfile.read1(len(self.rfile.peek(1)[:size]))
                    view[:len(chunk)] = chunk
                    n = len(chunk)
                else:
                    n = self.connection.recv_into(view[got:], size - got)
            except (socket.timeout, TimeoutError):
                self._timed_out(got, size)
            if not n:
                break
            got += n
        del view
        if got < size:
            del body[got:]
        return body

    def _timed_out(self, got: int, size: int):
        self._body_read = True  # what did not come will not: no draining, the connection closes
        self.close_connection = True
        raise RequestError(408, f"the body did not arrive within {self._api.request_timeout:g} s "
                                f"({got} of {size} bytes); the connection is closed")

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
        # the head as one string, not the stdlib's send_response/send_header (a call, an encode
        # and a list append per line), and head and body in one write: one syscall and, with
        # Nagle off, one packet
        head = (f"{self.protocol_version} {status} {_PHRASES.get(status, '')}\r\nServer: {self.server_version}\r\n"
                f"Date: {_http_date()}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n")
        if encoding:
            head += f"Content-Encoding: {encoding}\r\n"
        if status == 405:
            head += f"Allow: {self._allowed}\r\n"
        if status == 401:
            head += 'WWW-Authenticate: Bearer realm="edgeml-agent"\r\n'
        if status == 503:
            head += f"Retry-After: {RETRY_AFTER_S}\r\n"
        for key, value in (headers or {}).items():
            head += f"{key}: {value}\r\n"
        if drain or self.close_connection:
            head += "Connection: close\r\n"
            self.close_connection = True
        head = (head + "\r\n").encode("latin-1", "strict")
        self.wfile.write(head + body if self.command != "HEAD" else head)
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
