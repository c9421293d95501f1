"""The artifact server: answers devices' block requests over MQTT, and Range requests over HTTP.

A device asks on ``.../chunks/req`` for the blocks it lacks of one transfer (an artifact file or a
patch, by sha256); each block goes back on ``.../chunks`` as its own message with the transfer id,
the block index and the request's token as MQTT 5 user properties. A device gets only the
transfers of rollouts it is part of; anything else is answered with one JSON error, so a device
fails fast instead of waiting out its retries. Controllers share the requests through a shared
subscription; the bytes come from the store, so any of them can answer.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

from edgeml.core import update_contract as uc
from edgeml.core.mqtt_contract import topic

from .store import Store

log = logging.getLogger("edgeml.fleet.blocks")

CACHE_BYTES = 256 << 20  # transfers kept in memory
PERMISSIONS_TTL_S = 2.0


class BlockServer:
    """``handle(fleet, device, payload)`` from the MQTT thread; a worker answers in order."""

    def __init__(self, store: Store, publish: Callable[..., bool]):
        self.store, self.publish = store, publish
        self._cache: "OrderedDict[str, bytes]" = OrderedDict()
        self._cache_bytes = 0
        self._permissions: Dict[str, Tuple[float, Dict[str, Dict[str, int]]]] = {}
        self._lock = threading.Lock()
        self._inbox: "queue.Queue" = queue.Queue()
        self.stats = {"requests": 0, "blocks": 0, "bytes": 0, "refused": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeml-blocks", daemon=True)
        self._thread.start()

    def handle(self, fleet: str, device: str, payload: bytes) -> None:
        self._inbox.put((fleet, device, payload))

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.get()
            if item is None:
                return
            try:
                self._answer(*item)
            except Exception:  # one bad request must not stop the server
                log.exception("blocks: cannot answer a request from %s/%s", item[0], item[1])

    def _answer(self, fleet: str, device: str, payload: bytes) -> None:
        self.stats["requests"] += 1
        try:
            transfer_id, blocks, token = uc.decode_request(payload)
        except ValueError as exc:
            log.warning("blocks: %s/%s sent a bad request: %s", fleet, device, exc)
            self.stats["refused"] += 1
            return
        block_size = self._allowed(fleet, device).get(transfer_id)
        data = self._bytes(transfer_id) if block_size else None
        if data is None:
            self.stats["refused"] += 1
            why = "not part of a rollout for this device" if not block_size else "not in the store"
            self.publish(topic(fleet, device, "chunks"), json.dumps({"id": transfer_id, "error": why}).encode(),
                         content_type=uc.ERROR_CONTENT_TYPE)
            return
        for index in blocks:
            start = index * block_size
            if start >= max(len(data), 1):
                continue
            block = data[start:start + block_size]
            if self.publish(topic(fleet, device, "chunks"), block,
                            user_properties=[("id", transfer_id), ("block", str(index)), ("token", token)]):
                self.stats["blocks"] += 1
                self.stats["bytes"] += len(block)

    def _allowed(self, fleet: str, device: str) -> Dict[str, int]:
        """{transfer id: block size} this device may fetch: those of the active rollouts it is in."""
        with self._lock:
            cached = self._permissions.get(fleet)
        if cached is None or cached[0] < time.monotonic():
            by_device: Dict[str, Dict[str, int]] = {}
            for rollout_id in self.store.rollout_ids():
                r = self.store.rollout(rollout_id)
                if r is None or r["fleet"] != fleet:
                    continue
                ids = {r["plan"]["full"]["id"]: r["plan"]["full"]["block_size"]}
                ids.update({d["id"]: d["block_size"] for d in r["plan"]["deltas"].values()})
                with self.store.transaction(write=False):
                    assigned = self.store.assignments(rollout_id)
                for a in assigned:
                    mine = by_device.setdefault(a["device"], {})
                    mine.update(ids)
                    if r["state"] == "aborting" and a["from_content"]:  # the way back
                        info = self.store.artifact_info(a["from_content"])
                        if info:
                            mine[info["sha256"]] = uc.BLOCK_SIZE
            cached = (time.monotonic() + PERMISSIONS_TTL_S, by_device)
            with self._lock:
                self._permissions[fleet] = cached
        return cached[1].get(device, {})

    def _bytes(self, transfer_id: str) -> Optional[bytes]:
        with self._lock:
            if transfer_id in self._cache:
                self._cache.move_to_end(transfer_id)
                return self._cache[transfer_id]
        data = self.store.blob(transfer_id)
        if data is not None:
            with self._lock:
                self._cache[transfer_id] = data
                self._cache_bytes += len(data)
                while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)
        return data


_ARTIFACT_PATH = re.compile(r"^/artifacts/([0-9a-f]{64})(?:\.edgeml)?$")


class HttpArtifacts:
    """``GET /artifacts/<sha256>[.edgeml]`` with Range support, for ``fleet push --url``; /healthz;
    and more: ``pages`` (path -> function of the handler returning ``(content type, text[, headers])``), ``streams`` (path ->
    function writing to the handler until the client leaves), ``posts`` (path -> function of the
    handler returning ``(status, JSON object)``); ``guard(handler)`` is asked before any of those
    and returns None to let the request through or ``(status, message, headers)`` to refuse it."""

    def __init__(self, store: Store, host: str, port: int, pages: Optional[dict] = None, streams: Optional[dict] = None,
                 posts: Optional[dict] = None, guard: Optional[Callable] = None):
        self.pages, self.streams, self.posts = dict(pages or {}), dict(streams or {}), dict(posts or {})
        self.guard = guard
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                log.debug("http %s", format % args)

            def do_GET(self):
                server._get(self)

            def do_POST(self):
                server._post(self)

        self.store = store
        self.range_requests = 0
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edgeml-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.closing.set()  # streams end
        self.httpd.shutdown()
        self.httpd.server_close()

    def _refused(self, h: BaseHTTPRequestHandler) -> bool:
        refusal = self.guard(h) if self.guard else None
        if refusal is not None:
            status, message, headers = refusal
            _send(h, status, json.dumps({"error": message}).encode(), "application/json", headers)
            return True
        return False

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        for pattern, handler in self.posts.items():
            m = re.match(pattern, path)
            if m:
                if self._refused(h):
                    return
                try:
                    status, body = handler(h, m)
                except Exception as exc:  # the store away, a bug: one answer, the server goes on
                    log.warning("http POST %s failed: %s", path, exc)
                    status, body = 503, {"error": f"unavailable: {type(exc).__name__}"}
                return _send(h, status, json.dumps(body).encode(), "application/json")
        _send(h, 404, b"no such endpoint\n")

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        if h.path == "/healthz":
            return _send(h, 200, b"ok\n")
        path = h.path.split("?")[0]
        stream = self.streams.get(path)
        if stream is not None:
            if self._refused(h):
                return
            return stream(h, self.closing)
        page = self.pages.get(path)
        if page is not None:
            if self._refused(h):
                return
            try:
                answer = page(h)
            except Exception as exc:  # the store away: say so, keep serving
                log.warning("http %s failed: %s", h.path, exc)
                return _send(h, 503, f"unavailable: {type(exc).__name__}\n".encode())
            kind, text, headers = (*answer, None)[:3]
            return _send(h, 200, text.encode(), kind, headers)
        m = _ARTIFACT_PATH.match(h.path.split("?")[0])
        data = self.store.blob(m[1]) if m else None
        if data is None:
            return _send(h, 404, b"no such artifact\n")
        rng = h.headers.get("Range")
        if not rng:
            return _send(h, 200, data, "application/octet-stream")
        r = re.match(r"^bytes=(\d+)-(\d*)$", rng.strip())
        start = int(r[1]) if r else len(data)
        end = min(int(r[2]) if r and r[2] else len(data) - 1, len(data) - 1)
        if not r or start > end:
            return _send(h, 416, b"", extra={"Content-Range": f"bytes */{len(data)}"})
        self.range_requests += 1
        _send(h, 206, data[start:end + 1], "application/octet-stream",
              {"Content-Range": f"bytes {start}-{end}/{len(data)}"})


def _send(h, status: int, body: bytes, kind: str = "text/plain", extra: Optional[dict] = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", kind)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Accept-Ranges", "bytes")
    for k, v in (extra or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)
