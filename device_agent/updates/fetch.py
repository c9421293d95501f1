"""Fetching a transfer block by block, over the broker or over HTTP(S) Range requests.

Both keep their progress on disk per block (``Download``): a ``.part`` file allocated to the full
size up front (a disk too small fails at once, not at 90%) and a ``.blocks`` list of the blocks it
holds, each block fsynced before the list names it. A fetch cut off by a broker outage, a reboot
or SIGKILL resumes where it was; blocks listed but unreadable or changed are fetched again.

Nothing waits without a deadline: every request has one (doubling per retry, up to a cap), each
block is asked for a bounded number of times while connected, and a fetch that gives up raises
``DownloadFailed`` with a line saying why. Blocks that arrive changed, twice or out of order are
harmless: each is checked against its hash and written at its own offset.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Optional, Set

from edgeml.core import update_contract as uc
from edgeml.core.atomic import write_atomic

log = logging.getLogger("edgeml-agent.updates")


class DownloadFailed(Exception):
    """The fetch gave up; the message says why, in one line."""


class Cancelled(Exception):
    """The host no longer wants this transfer."""


def _disk_error(exc: OSError) -> DownloadFailed:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadFailed(f"the disk is full ({exc.strerror}); free space in the agent's data_dir")
    return DownloadFailed(f"cannot write the download: {exc.strerror or exc}")


class Download:
    """One transfer's bytes on disk and the set of blocks already there."""

    def __init__(self, folder: Path, transfer: uc.Transfer):
        self.transfer = transfer
        self.part = Path(folder) / f"{transfer.id}.part"
        self.marks = Path(folder) / f"{transfer.id}.blocks"
        self.done: Set[int] = set()
        self.bytes_written = 0
        try:
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != transfer.size:
                    os.ftruncate(fd, 0)
                    if transfer.size and hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(fd, 0, transfer.size)
                    else:
                        os.ftruncate(fd, transfer.size)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.part.unlink(missing_ok=True)
            raise _disk_error(exc) from exc
        self._resume()

    def _resume(self) -> None:
        try:
            listed = json.loads(self.marks.read_text()) if self.marks.exists() else []
        except (OSError, ValueError):
            listed = []
        with open(self.part, "rb") as f:
            for index in sorted(set(i for i in listed if isinstance(i, int) and 0 <= i < self.transfer.blocks)):
                offset, length = self.transfer.span(index)
                f.seek(offset)
                if uc.block_hash(f.read(length)) == self.transfer.hashes[index]:
                    self.done.add(index)
        if listed and len(self.done) < len(listed):
            log.warning("updates: %d listed blocks of %s did not check out; fetching them again",
                        len(listed) - len(self.done), self.transfer.id[:12])

    @property
    def missing(self):
        return [i for i in range(self.transfer.blocks) if i not in self.done]

    @property
    def complete(self) -> bool:
        return len(self.done) == self.transfer.blocks

    def accept(self, index: int, data: bytes) -> bool:
        """Write a block that checks out against its hash; False (and nothing written) otherwise."""
        if not 0 <= index < self.transfer.blocks or index in self.done:
            return False
        offset, length = self.transfer.span(index)
        if len(data) != length or uc.block_hash(data) != self.transfer.hashes[index]:
            return False
        try:
            fd = os.open(self.part, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.done.add(index)
            write_atomic(self.marks, json.dumps(sorted(self.done)).encode(), 0o600)
        except OSError as exc:
            self.done.discard(index)
            raise _disk_error(exc) from exc
        self.bytes_written += length
        return True

    def read(self) -> bytes:
        return self.part.read_bytes()

    def remove(self) -> None:
        self.part.unlink(missing_ok=True)
        self.marks.unlink(missing_ok=True)

    def progress(self) -> dict:
        return {"blocks_done": len(self.done), "blocks": self.transfer.blocks,
                "bytes": sum(self.transfer.span(i)[1] for i in self.done), "size": self.transfer.size}


class MqttFetch:
    """Ask the host for the blocks still missing, a window at a time, over the device's link."""

    def __init__(self, link, download: Download, *, window: int = 8, timeout: float = 5.0,
                 max_timeout: float = 60.0, max_attempts: int = 6,
                 on_progress: Callable[[dict], None] = lambda p: None):
        self.link, self.download = link, download
        self.window = min(window, uc.MAX_BLOCKS_PER_REQUEST)
        self.timeout, self.max_timeout, self.max_attempts = timeout, max_timeout, max_attempts
        self.on_progress = on_progress
        self.inbox: "queue.Queue" = queue.Queue()
        self.stats = {"requests": 0, "request_bytes": 0, "blocks": 0, "block_bytes": 0, "corrupt": 0, "duplicate": 0}

    def receive(self, payload: bytes, properties) -> None:
        """A message on ``chunks`` (network thread): hand it to ``run``."""
        self.inbox.put((payload, properties))

    def run(self, cancelled: threading.Event) -> None:
        transfer, download = self.download.transfer, self.download
        attempts: Dict[int, int] = {}
        deadlines: Dict[int, float] = {}
        while not download.complete:
            if cancelled.is_set():
                raise Cancelled()
            now = time.monotonic()
            connected = self.link.connected
            for index in [i for i, d in deadlines.items() if d <= now]:
                del deadlines[index]
                if index in download.done or not connected:
                    continue  # a request made before a disconnect is not held against the host
                attempts[index] = attempts.get(index, 0) + 1
                if attempts[index] >= self.max_attempts:
                    raise DownloadFailed(
                        f"block {index} of {transfer.id[:12]} did not arrive after {attempts[index]} requests; "
                        "the host may not be serving it (is `edgeml fleet serve` running?)")
            if connected:
                want = [i for i in download.missing if i not in deadlines][:max(0, self.window - len(deadlines))]
                if want:
                    payload = uc.encode_request(transfer.id, want, secrets.token_hex(4))
                    if self.link.publish("chunks/req", payload):
                        self.stats["requests"] += 1
                        self.stats["request_bytes"] += len(payload)
                        wait = min(self.timeout * 2 ** max((attempts.get(i, 0) for i in want), default=0),
                                   self.max_timeout)
                        deadlines.update({i: now + wait for i in want})
            until = min(deadlines.values(), default=now + 0.2)
            try:
                payload, properties = self.inbox.get(timeout=max(0.0, min(until - time.monotonic(), 0.2)))
            except queue.Empty:
                continue
            self._take(payload, properties, deadlines)

    def _take(self, payload: bytes, properties, deadlines: Dict[int, float]) -> None:
        props = dict(getattr(properties, "UserProperty", None) or [])
        if getattr(properties, "ContentType", None) == uc.ERROR_CONTENT_TYPE:
            try:
                body = json.loads(payload)
            except ValueError:
                body = {}
            if body.get("id") == self.download.transfer.id:
                raise DownloadFailed(f"the host cannot serve {body['id'][:12]}: {str(body.get('error'))[:200]}")
            return
        if props.get("id") != self.download.transfer.id:
            return  # a late block of an earlier transfer
        try:
            index = int(props.get("block", -1))
        except ValueError:
            return
        self.stats["blocks"] += 1
        self.stats["block_bytes"] += len(payload)
        if index in self.download.done:
            self.stats["duplicate"] += 1
            return
        if self.download.accept(index, payload):
            deadlines.pop(index, None)
            self.on_progress(self.download.progress())
        else:
            self.stats["corrupt"] += 1
            deadlines.pop(index, None)  # ask again at once (it counts as an attempt only by timing out)
            log.warning("updates: block %d of %s arrived changed; asking again", index, self.download.transfer.id[:12])


class HttpFetch:
    """Range requests against the transfer's URL (a CDN, or ``edgeml fleet serve --http``)."""

    def __init__(self, url: str, download: Download, *, ca_file=None, timeout: float = 10.0, max_attempts: int = 5,
                 on_progress: Callable[[dict], None] = lambda p: None):
        self.url, self.download = url, download
        self.timeout, self.max_attempts, self.on_progress = timeout, max_attempts, on_progress
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.stats = {"requests": 0, "block_bytes": 0, "corrupt": 0}

    def run(self, cancelled: threading.Event) -> None:
        transfer = self.download.transfer
        for index in self.download.missing:
            offset, length = transfer.span(index)
            for attempt in range(self.max_attempts):
                if cancelled.is_set():
                    raise Cancelled()
                try:
                    data = self._get(offset, length)
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    problem = str(getattr(exc, "reason", exc))
                else:
                    if self.download.accept(index, data):
                        self.on_progress(self.download.progress())
                        break
                    self.stats["corrupt"] += 1
                    problem = "the block arrived changed"
                cancelled.wait(min(0.5 * 2 ** attempt, 10.0))
            else:
                raise DownloadFailed(f"{self.url}: block {index} failed {self.max_attempts} times ({problem[:200]})")

    def _get(self, offset: int, length: int) -> bytes:
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        self.stats["requests"] += 1
        with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
            body = response.read(self.download.transfer.size + 1)
            if response.status == 200 and len(body) == self.download.transfer.size:  # the server ignored Range
                body = body[offset:offset + length]
            elif response.status != 206:
                raise ValueError(f"HTTP {response.status}")
        self.stats["block_bytes"] += len(body)
        return body


def cleanup(folder: Path, keep: Optional[str] = None) -> None:
    for path in Path(folder).glob("*"):
        if keep is None or not path.name.startswith(keep):
            path.unlink(missing_ok=True)
