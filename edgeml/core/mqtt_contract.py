"""The MQTT contract between devices and the host: topics, payloads, record kinds.

Light on purpose (stdlib + zstandard): the device agent and the host collector both import it,
so the two sides cannot drift apart. MQTT 5, QoS 1 everywhere.

Topics (``{fleet}`` and ``{device}`` are ids of ``ID_RE``)::

    edgeml/v1/{fleet}/{device}/presence   device -> host, retained   {"status": "online"|"offline", ...}
    edgeml/v1/{fleet}/{device}/state      device -> host, retained   {"model", "version", "sha256", "ready", ...}
    edgeml/v1/{fleet}/{device}/telemetry  device -> host             a zstd-compressed batch of records
    edgeml/v1/{fleet}/{device}/desired    host -> device, retained   (rollouts, a later issue)

A telemetry batch is ``zstd(json({"schema": 1, "fleet", "device", "records": [...]}))``. Every
record has ``seq`` (per device, from 1, strictly increasing, never reused, also across restarts),
``ts`` (unix seconds) and ``kind``:

    inference    model, version, latency_ms, outputs {name: {"top1", "score"} | {"mean", "min", "max"}}
    error        model (or null), status (the HTTP status), error (message), latency_ms
    input_stats  model, version, window_s, count, inputs {name: {"mean", "std", "min", "max"}} per feature
    system       rss_bytes, cpu_percent, disk_free_bytes, queue_records, queue_bytes, dropped_total
    dropped      count, first_seq, last_seq: records the bounded queue dropped (oldest first) while offline

Collectors deduplicate by (fleet, device, seq), so a batch published twice (a lost PUBACK, a
device killed mid-publish) is stored once.
"""
from __future__ import annotations

import json
import re
from typing import List, Tuple

import zstandard

SCHEMA = 1
PREFIX = "edgeml/v1"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHANNELS = ("presence", "state", "telemetry", "events", "desired")
KINDS = ("inference", "error", "input_stats", "system", "dropped")
TELEMETRY_CONTENT_TYPE = "application/json+zstd"
MAX_BATCH_BYTES = 4 << 20  # a decompressed batch larger than this is refused (no zstd bombs)
SHARED_GROUP = "collectors"


def topic(fleet: str, device: str, channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{PREFIX}/{fleet}/{device}/{channel}"


def parse_topic(name: str) -> Tuple[str, str, str]:
    """``(fleet, device, channel)``; ValueError for a topic outside the contract."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in CHANNELS:
        raise ValueError(f"not an edgeml topic: {name!r}")
    if not (ID_RE.match(parts[2]) and ID_RE.match(parts[3])):
        raise ValueError(f"bad fleet or device id in topic {name!r}")
    return parts[2], parts[3], parts[4]


def subscription(channel: str, shared: bool = False, group: str = SHARED_GROUP) -> str:
    """All devices' ``channel``; shared subscriptions spread telemetry over several collectors
    (retained presence/state are not sent to shared subscriptions, so those stay plain)."""
    base = f"{PREFIX}/+/+/{channel}"
    return f"$share/{group}/{base}" if shared else base


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def encode_batch(fleet: str, device: str, records: List[dict], level: int = 3) -> bytes:
    body = json.dumps({"schema": SCHEMA, "fleet": fleet, "device": device, "records": records},
                      separators=(",", ":"), allow_nan=False).encode("utf-8")
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)


def decode_batch(payload: bytes) -> dict:
    """The batch dict; ValueError (with the reason) for anything that is not a valid batch."""
    try:
        size = zstandard.frame_content_size(payload)
        if size < 0 or size > MAX_BATCH_BYTES:
            raise ValueError(f"batch frame states {size} bytes (limit {MAX_BATCH_BYTES})")
        body = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_BATCH_BYTES)
        batch = json.loads(body)
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a telemetry batch: {exc}") from exc
    if not isinstance(batch, dict) or batch.get("schema") != SCHEMA or not isinstance(batch.get("records"), list):
        raise ValueError("not a telemetry batch of schema 1")
    for record in batch["records"]:
        if not (isinstance(record, dict) and type(record.get("seq")) is int and record["seq"] >= 1
                and record.get("kind") in KINDS and isinstance(record.get("ts"), (int, float))):
            raise ValueError(f"bad record in batch: {str(record)[:120]}")
    return batch


def presence(status: str, fleet: str, device: str, ts: float, **extra) -> bytes:
    return json.dumps({"status": status, "fleet": fleet, "device": device, "ts": ts, **extra},
                      separators=(",", ":")).encode("utf-8")
