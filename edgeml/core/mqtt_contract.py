"""The MQTT contract between devices and the host: topics, payloads, record kinds.

Light on purpose (stdlib + zstandard): the device agent and the host collector both import it,
so the two sides cannot drift apart. MQTT 5, QoS 1 everywhere.

Topics (``{fleet}`` and ``{device}`` are ids of ``ID_RE``)::

    edgeml/v1/{fleet}/{device}/presence    device -> host, retained   {"status": "online"|"offline", ...}
    edgeml/v1/{fleet}/{device}/state       device -> host, retained   {"model", "version", "sha256", "ready", ...}
    edgeml/v1/{fleet}/{device}/telemetry   device -> host             a zstd-compressed batch of records
    edgeml/v1/{fleet}/{device}/events      device -> host             update progress (``edgeml.core.updates``); alerts
                                                                      (``{"event": "alert", "alert": {...}}``) as they happen
    edgeml/v1/{fleet}/{device}/ack         host -> device, retained   {"epoch", "seq"}: telemetry committed
    edgeml/v1/{fleet}/{device}/desired     host -> device, retained   the model this device should run
    edgeml/v1/{fleet}/{device}/chunks/req  device -> host             artifact blocks it lacks
    edgeml/v1/{fleet}/{device}/chunks      host -> device             the blocks
    edgeml/v1/{fleet}/{device}/feedback/req  host -> device           {"request": id}: send your feedback reservoir
    edgeml/v1/{fleet}/{device}/feedback    device -> host             zstd(.npz) of it, user property request=id

A telemetry batch is ``zstd(json({"schema": 1, "fleet", "device", "epoch", "after", "records": [...]}))``.
Every record has ``seq`` (per device, from 1, strictly increasing, never reused, also across restarts),
``ts`` (unix seconds) and ``kind``:

    inference    model, version, latency_ms, outputs {name: {"top1", "score"} | {"mean", "min", "max"}}
    error        model (or null), status (the HTTP status), error (message), latency_ms
    input_stats  model, version, window_s, count, inputs {name: {"mean", "std", "min", "max"}} per feature
                 (over at most 4,096 values per channel and request, at an even stride)
    system       rss_bytes, cpu_percent, disk_free_bytes, queue_records, queue_bytes, dropped_total;
                 with the response cache on, also cache_hits and cache_misses (counts since the model
                 started serving)
    dropped      count, first_seq, last_seq: records the bounded queue dropped (oldest first) while offline
    baseline     model, version, sha256, baseline {"inputs": {name: {"axis", "bins"}}, "outputs"}: the
                 artifact's histograms, sent when a model starts serving, so the host judges windows with them
    drift        model, version, sha256, window_s, samples, inputs {name: {"axis", "counts"}},
                 outputs {name: {"classes" | "confidence" (+ "confidence_sum") | "values": counts}}, scores,
                 skipped (requests not counted: the counting thread was behind):
                 one window's counts in the artifact's baseline bins (edgeml.core.drift); they add up
    feedback     model, version, labelled, correct, accuracy, reservoir: live accuracy of a window's labels
    alert        model, version, alert (input_drift | prediction_drift | confidence_drop), state (raised |
                 cleared), since, features (the worst, with their scores), samples
    shadow       model, version (the active one), shadow_version, shadow_sha256, rollout, window_s, sampled,
                 compared, dropped, errors, rows, agreed (top-1), cosine_sum, cosine_min, active_ms and
                 shadow_ms ({bucket: count} in ``edgeml.core.shadow``'s log buckets): one window of a
                 candidate run beside the active model on sampled requests; the counts add up

A PUBACK is not delivery: a broker killed before it handed a message on loses it. So a device
keeps every record until the host says it has committed it. ``epoch`` names the device's queue
(a new queue, a new epoch); ``after`` is the largest seq still queued on the device below the
batch's first record, or null when nothing older is queued. The host keeps, per device, the
watermark ``W``: every record with seq <= W is committed or will never come (dropped, or a seq
never handed out). A committed batch moves W to its last seq when its ``after`` is null or <= W
(``advance_watermark``, which also chains batches committed out of order). The host publishes W
on the device's retained ``ack`` topic; the device deletes records up to W and sends again,
after a timeout, what the broker took but the host never confirmed.

Collectors deduplicate by (fleet, device, seq), so a batch published twice (a lost PUBACK, a
device killed mid-publish) is stored once.
"""
from __future__ import annotations

import json
import re
from typing import List, Optional, Tuple

import zstandard

SCHEMA = 1
PREFIX = "edgeml/v1"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EPOCH_RE = re.compile(r"^[0-9a-f]{1,32}$")
CHANNELS = ("presence", "state", "telemetry", "events", "ack", "desired", "chunks", "chunks/req", "feedback/req",
            "feedback")
KINDS = ("inference", "error", "input_stats", "system", "dropped", "baseline", "drift", "alert", "feedback",
         "shadow")
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
    channel = "/".join(parts[4:])
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX or channel not in CHANNELS:
        raise ValueError(f"not an edgeml topic: {name!r}")
    if not (ID_RE.match(parts[2]) and ID_RE.match(parts[3])):
        raise ValueError(f"bad fleet or device id in topic {name!r}")
    return parts[2], parts[3], channel


def subscription(channel: str, shared: bool = False, group: str = SHARED_GROUP) -> str:
    """All devices' ``channel``; shared subscriptions spread telemetry over several collectors
    (retained presence/state are not sent to shared subscriptions, so those stay plain)."""
    base = f"{PREFIX}/+/+/{channel}"
    return f"$share/{group}/{base}" if shared else base


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def encode_batch(fleet: str, device: str, records: List[dict], level: int = 3, *,
                 epoch: Optional[str] = None, after: Optional[int] = None) -> bytes:
    batch = {"schema": SCHEMA, "fleet": fleet, "device": device, "records": records}
    if epoch is not None:
        batch.update(epoch=epoch, after=after)
    body = json.dumps(batch, separators=(",", ":"), allow_nan=False).encode("utf-8")
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
    epoch, after = batch.get("epoch"), batch.get("after")
    if epoch is not None and not (isinstance(epoch, str) and EPOCH_RE.match(epoch)):
        raise ValueError(f"batch epoch {str(epoch)[:40]!r} is not 1-32 hex digits")
    if after is not None and not (type(after) is int and after >= 0):
        raise ValueError(f"batch 'after' {str(after)[:40]!r} is not a seq")
    seqs = [r["seq"] for r in batch["records"]]
    if any(b <= a for a, b in zip(seqs, seqs[1:])) or (after is not None and seqs and seqs[0] <= after):
        raise ValueError("batch seqs must rise, above 'after'")
    return batch


def encode_ack(epoch: str, seq: int, ts: float) -> bytes:
    """The host's retained acknowledgement: every record of queue ``epoch`` up to ``seq`` is settled."""
    return json.dumps({"epoch": epoch, "seq": seq, "ts": ts}, separators=(",", ":")).encode("utf-8")


def decode_ack(payload: bytes) -> Tuple[str, int]:
    """``(epoch, seq)``; ValueError for anything else."""
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an ack: {exc}") from exc
    if not (isinstance(body, dict) and isinstance(body.get("epoch"), str) and EPOCH_RE.match(body["epoch"])
            and type(body.get("seq")) is int and body["seq"] >= 0):
        raise ValueError(f"not an ack: {str(body)[:120]}")
    return body["epoch"], body["seq"]


def advance_watermark(watermark: int, pending: List[Tuple[int, int]], after: Optional[int],
                      last: int) -> Tuple[int, List[Tuple[int, int]]]:
    """The watermark after committing the batch ``(after, last]``, and the batches still waiting.

    ``pending`` holds committed batches that could not move the watermark yet (their ``after``
    was above it: an earlier batch was lost or is late). Each one whose ``after`` the watermark
    has reached moves it on, so batches committed out of order chain up.
    """
    waiting = sorted(pending + [(-1 if after is None else after, last)])
    moved = True
    while moved:
        moved = False
        for batch in list(waiting):
            if batch[0] <= watermark:
                watermark = max(watermark, batch[1])
                waiting.remove(batch)
                moved = True
    return watermark, [b for b in waiting if b[1] > watermark]


def presence(status: str, fleet: str, device: str, ts: float, **extra) -> bytes:
    return json.dumps({"status": status, "fleet": fleet, "device": device, "ts": ts, **extra},
                      separators=(",", ":")).encode("utf-8")
