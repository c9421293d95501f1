"""The response cache: answers to requests seen before, without running the model (opt-in).

Off unless ``cache_bytes > 0``: inputs may be private, and a cache keeps answers derived from
them in memory. Bounded in bytes (the outputs' bytes plus the 32-byte key of each entry), least
recently used first out; an answer bigger than the whole bound is not kept.

The key is a SHA-256 of the model artifact's sha256, the requested output names (in order) and
every input's name, dtype, shape and bytes after validation (so uint8 pixels and the same pixels
as float32 are one entry): a new model never answers from another model's entries (each loaded
model also starts with an empty cache). Entries are private read-only copies, and every hit
returns fresh copies, so a caller that changes its answer changes nothing for the next caller.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

KEY_BYTES = 32


def request_key(model_sha256: str, outputs: List[str], feed: Dict[str, np.ndarray]) -> Optional[bytes]:
    """The entry's key; None for a request that is not cached (an input of Python objects, whose
    bytes are pointers, not values)."""
    if any(np.asarray(x).dtype.hasobject for x in feed.values()):
        return None
    h = hashlib.sha256()

    def field(data: bytes) -> None:  # length-prefixed, so no two requests hash the same fields
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    field(model_sha256.encode())
    field("\0".join(outputs).encode())
    for name, x in feed.items():
        x = np.ascontiguousarray(x)
        field(name.encode())
        field(x.dtype.str.encode())
        field(",".join(map(str, x.shape)).encode())
        field(_raw(x))
    return h.digest()


def _raw(x: np.ndarray):
    if not x.size:
        return b""
    try:
        return memoryview(x).cast("B")  # no copy
    except (TypeError, ValueError):  # a buffer format memoryview cannot cast
        return x.tobytes()


class ResponseCache:
    """LRU of answers, at most ``max_bytes``; ``hits`` and ``misses`` count lookups."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("a response cache needs a bound above 0 bytes")
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: "OrderedDict[bytes, Tuple[Dict[str, np.ndarray], Optional[float], int]]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: bytes) -> Optional[Tuple[Dict[str, np.ndarray], Optional[float]]]:
        """Fresh copies of the cached outputs and the model's milliseconds when they were computed,
        or None (a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        outputs, run_ms, _ = entry
        return {name: np.array(v) for name, v in outputs.items()}, run_ms

    def put(self, key: bytes, outputs: Dict[str, np.ndarray], run_ms: Optional[float] = None) -> bool:
        """Keep a copy of ``outputs``; False when it is bigger than the whole cache."""
        size = KEY_BYTES + sum(np.asarray(v).nbytes for v in outputs.values())
        if size > self.max_bytes:
            return False
        kept = {}
        for name, v in outputs.items():
            kept[name] = np.array(v)  # a copy: the caller keeps the array it was given
            kept[name].flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[key] = (kept, run_ms, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1
        return True

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_bytes": self.bytes,
                    "cache_entries": len(self._entries), "cache_evictions": self.evictions,
                    "cache_max_bytes": self.max_bytes}
