"""The update contract between the host and a device: what the host wants a device to run, how the
device fetches it block by block, what it reports back, and the rules a new model must meet on
live traffic before it counts as good.

Light on purpose (stdlib only): the device agent and the rollout controller both import it.

The desired model (host -> device, retained on ``.../desired``, JSON)::

    {"schema": 1, "fleet", "device", "rollout", "issued",
     "target":  {"name", "version", "sha256", "content_sha256", "size", "format"},
     "full":    {"id", "kind": "full", "size", "block_size", "hashes": [...], "url"?},
     "delta":   {"id", "kind": "delta", "size", "block_size", "hashes", "base"} or null,
     "health":  {"window_s", "min_requests", "rules": "error_rate>0.05,...", "latency_budget"},
     "order":   a signed rollback order (``edgeml.core.orders``) or null,
     "shadow":  {"sample"} (optional): run the target beside the active model on this share of
                live requests, off the response path, and report how the two agree; never switch}

``content_sha256`` names the artifact's unpacked ZIP, which is what the signature covers and what
a delta rebuilds; ``sha256`` the shipped (zstd) file. A transfer's ``id`` is the sha256 of the
bytes it moves (the file, or the patch), ``hashes`` the first 16 hex digits of each block's
sha256: a block that arrives changed is caught and asked for again, and the whole is then
checked by its sha256 and by the artifact's signature. An empty retained payload means nothing
is desired.

Blocks (device -> host on ``.../chunks/req``, JSON ``{"id", "blocks": [i, ...], "token"}``, at
most ``MAX_BLOCKS_PER_REQUEST``; host -> device on ``.../chunks``: the raw bytes of one block,
with MQTT 5 user properties ``id``, ``block`` and ``token``, or a JSON ``{"id", "error"}`` with
content type ``application/json`` when the host cannot serve it).

What a device reports: its retained ``state`` gains ``content_sha256`` and ``update`` (the
fields of an event), and every transition is an event on ``.../events``::

    {"ts", "rollout", "state", "target_version", "content_sha256", "progress": {"blocks_done",
     "blocks", "bytes"}, "result"?, "error"?, "evidence"?}
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

SCHEMA = 1
BLOCK_SIZE = 64 << 10  # 64 KiB: a block per MQTT message (AWS IoT streams allow up to 128 KiB)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1 << 10, 1 << 20
HASH_CHARS = 16
MAX_BLOCKS_PER_REQUEST = 32
MAX_DESIRED_BYTES = 1 << 20
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
ERROR_CONTENT_TYPE = "application/json"

# The device's update states, in the order a good update goes through them (DESIGN.md).
IDLE, DOWNLOADING, VERIFYING, STAGED, SELF_TESTING, ACTIVATING, OBSERVING, COMMITTED, ROLLING_BACK, FAILED = (
    "idle", "downloading", "verifying", "staged", "self_testing", "activating", "observing", "committed",
    "rolling_back", "failed")
# A shadow update stops after its self-test in this steady state: the candidate runs beside the
# active model until the host promotes it (a rollout of the same model) or asks for another.
SHADOWING = "shadowing"
STATES = (IDLE, DOWNLOADING, VERIFYING, STAGED, SELF_TESTING, SHADOWING, ACTIVATING, OBSERVING, COMMITTED,
          ROLLING_BACK, FAILED)
# How an update ended, as the device reports it (``result``); only the first counts as evidence.
# ``ended``: a shadow the host no longer wants (the candidate was dropped, the active model stays).
RESULTS = ("committed", "committed_unobserved", "rolled_back", "failed", "refused", "cancelled", "ended")


# --- blocks ------------------------------------------------------------------------------------


def block_count(size: int, block_size: int) -> int:
    return max(1, math.ceil(size / block_size))


def block_hashes(data: bytes, block_size: int) -> List[str]:
    return [block_hash(data[i:i + block_size]) for i in range(0, max(len(data), 1), block_size)]


def block_hash(block: bytes) -> str:
    return hashlib.sha256(block).hexdigest()[:HASH_CHARS]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Transfer:
    """Bytes a device fetches: the artifact itself (``full``) or a patch against a model it holds."""

    id: str
    kind: str
    size: int
    block_size: int
    hashes: List[str]
    base: Optional[str] = None  # delta: the content_sha256 the patch applies to
    url: Optional[str] = None  # full: also at this http(s) URL (Range requests)

    @classmethod
    def of(cls, data: bytes, kind: str = "full", block_size: int = BLOCK_SIZE, **extra) -> "Transfer":
        return cls(sha256(data), kind, len(data), block_size, block_hashes(data, block_size), **extra)

    @property
    def blocks(self) -> int:
        return len(self.hashes)

    def span(self, index: int) -> Tuple[int, int]:
        """(offset, length) of block ``index``."""
        start = index * self.block_size
        return start, max(0, min(self.block_size, self.size - start))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict, kind: str) -> "Transfer":
        t = cls(id=d.get("id"), kind=d.get("kind"), size=d.get("size"), block_size=d.get("block_size"),
                hashes=d.get("hashes"), base=d.get("base"), url=d.get("url"))
        ok = (isinstance(t.id, str) and SHA_RE.match(t.id) and t.kind == kind and type(t.size) is int and t.size >= 0
              and type(t.block_size) is int and MIN_BLOCK_SIZE <= t.block_size <= MAX_BLOCK_SIZE
              and isinstance(t.hashes, list) and len(t.hashes) == block_count(t.size, t.block_size)
              and all(isinstance(h, str) and len(h) == HASH_CHARS for h in t.hashes)
              and (t.base is None or (isinstance(t.base, str) and SHA_RE.match(t.base)))
              and (t.url is None or (isinstance(t.url, str) and t.url.startswith(("http://", "https://")))))
        if not ok or (kind == "delta") != (t.base is not None):
            raise ValueError(f"desired: the {kind} transfer is malformed")
        return t


# --- rules -------------------------------------------------------------------------------------

# metric -> (where it is judged, units allowed): "x" relative to the model replaced, "ms", "%"
METRICS = {
    "error_rate": ("device", ("", "x", "%")),   # share of requests the runtime failed (5xx); 4xx are the client's
    "latency_p95": ("device", ("x", "ms")),     # p95 latency on live traffic
    "nan_rate": ("device", ("", "%")),          # share of responses holding NaN or infinity
    "class_shift": ("device", ("",)),           # Jensen-Shannon distance of predicted classes vs the artifact's baseline
    "failed": ("fleet", ("%", "")),             # share of the rollout's started devices that failed or rolled back
    # A/B (edgeml.fleet.compare): the new version's devices against those not switched, broken only
    # when the difference is past the factor and significant (p < 0.01), not on a fixed threshold
    "ab_latency": ("cohort", ("x",)),          # new cohort's p50 latency over the old cohort's
    "ab_error_rate": ("cohort", ("x",)),       # new cohort's error rate over the old cohort's
}
DEFAULT_RULES = "error_rate>0.05,latency_p95>1.5x,nan_rate>0,failed>10%"
# A relative latency rule holds a model to account only for more than this much: windows are
# measured at different moments of a shared machine, and sub-millisecond p95 differences are noise.
LATENCY_SLACK_MS = 1.0
# A p95 of fewer requests is one of the slowest few: a busy moment, not the model. Live latency
# is judged only on at least this many requests.
LATENCY_MIN_REQUESTS = 100
_RULE = re.compile(r"^\s*([a-z_0-9]+)\s*>\s*([0-9]*\.?[0-9]+)\s*(x|ms|%)?\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    threshold: float  # a fraction for "%" (10% -> 0.1), milliseconds for "ms", a factor for "x"
    unit: str = ""

    @property
    def where(self) -> str:
        return METRICS[self.metric][0]

    def __str__(self) -> str:
        value = self.threshold * 100 if self.unit == "%" else self.threshold
        return f"{self.metric}>{value:g}{self.unit}"


def parse_rules(text: str) -> List[Rule]:
    """``"error_rate>0.05,latency_p95>1.5x,failed>10%"`` -> rules; ValueError naming a bad one."""
    rules = []
    for part in (p for p in (text or "").split(",") if p.strip()):
        m = _RULE.match(part)
        if not m:
            raise ValueError(f"rule {part.strip()!r} should look like error_rate>0.05, latency_p95>1.5x or failed>10%")
        metric, value, unit = m[1], float(m[2]), m[3] or ""
        if metric not in METRICS:
            raise ValueError(f"rule {part.strip()!r}: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        if unit not in METRICS[metric][1]:
            units = " or ".join(repr(u) if u else "a plain number" for u in METRICS[metric][1])
            raise ValueError(f"rule {part.strip()!r}: {metric} takes {units}")
        if unit == "%":
            value /= 100.0
        rules.append(Rule(metric, value, unit))
    return rules


def rules_text(rules: Sequence[Rule]) -> str:
    return ",".join(str(r) for r in rules)


def violations(rules: Sequence[Rule], evidence: dict, early: bool = False) -> List[str]:
    """The device rules ``evidence`` breaks, each as one readable line. ``evidence`` holds the
    new model's figures and ``reference`` those of the model it replaced, on this device.
    ``early`` (the window is still open): not the class distribution, which is a whole window's."""
    ref = evidence.get("reference") or {}
    broken = []
    for rule in rules:
        if rule.where != "device" or (early and rule.metric == "class_shift"):
            continue
        value = evidence.get({"latency_p95": "latency_p95_ms"}.get(rule.metric, rule.metric))
        if rule.metric == "latency_p95" and rule.unit == "x" and ref.get("source") == "selftest":
            # the replaced model served too little to compare live traffic with: compare both on the
            # self-test inputs, measured the same way on this device
            value = evidence.get("selftest_ms")
        elif rule.metric == "latency_p95" and (evidence.get("requests") or 0) < LATENCY_MIN_REQUESTS:
            continue
        if value is None:
            continue
        if rule.unit == "x":
            base = ref.get({"latency_p95": "latency_p95_ms"}.get(rule.metric, rule.metric))
            if base is None:
                continue
            if rule.metric == "error_rate":
                base = max(base, 1.0 / max(ref.get("requests") or 1, 1))  # no errors before: one in the window's worth
            limit, shown = rule.threshold * base, f"{rule.threshold:g}x the replaced model's {base:.4g}"
            if rule.metric == "latency_p95":
                limit = max(limit, base + LATENCY_SLACK_MS)
        else:
            limit, shown = rule.threshold, f"{rule}"
        if value > limit:
            broken.append(f"{rule.metric} {value:.4g} > {shown}")
    return broken


# --- durations and waves -----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text) -> float:
    """``"5m"``, ``"30s"``, ``"2h"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(f"duration {text!r} should look like 300, 30s, 5m or 2h")
        seconds = float(m[1]) * _SECONDS[m[2]]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} must be 0 or more")
    return seconds


def parse_waves(text: str) -> List[Tuple[float, str]]:
    """``"1,10%,50%,100%"`` -> [(1, "n"), (0.1, "%"), ...]: each wave's cumulative size, as a device
    count or a share of the targets. The last must reach every target (100% is added if not)."""
    waves = []
    for part in (p.strip() for p in (text or "100%").split(",") if p.strip()):
        if part.endswith("%"):
            value = float(part[:-1]) / 100.0
            if not 0 < value <= 1:
                raise ValueError(f"wave {part!r} must be a share above 0% and at most 100%")
            waves.append((value, "%"))
        else:
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"wave {part!r} must be a device count (1, 5, ...) or a share (10%)")
            waves.append((float(part), "n"))
    if not waves:
        raise ValueError("give at least one wave, e.g. 1,10%,100%")
    if waves[-1] != (1.0, "%"):
        waves.append((1.0, "%"))
    return waves


def wave_sizes(waves: Sequence[Tuple[float, str]], targets: int) -> List[int]:
    """Cumulative device counts per wave for ``targets`` devices; waves that add nobody are dropped."""
    sizes, previous = [], 0
    for value, kind in waves:
        n = int(value) if kind == "n" else math.ceil(value * targets)
        n = min(max(n, previous), targets)
        if n > previous or not sizes:
            sizes.append(n)
            previous = n
    if sizes[-1] < targets:
        sizes.append(targets)
    return sizes


# --- the desired model ---------------------------------------------------------------------------


@dataclass
class Health:
    window_s: float = 300.0
    min_requests: int = 0
    rules: str = DEFAULT_RULES
    latency_budget: float = 5.0  # self-test: the new model may be this many times slower than the old

    def device_rules(self) -> List[Rule]:
        return [r for r in parse_rules(self.rules) if r.where == "device"]


@dataclass
class Desired:
    fleet: str
    device: str
    rollout: str
    issued: float
    target: Dict[str, object]
    full: Optional[Transfer]
    delta: Optional[Transfer] = None
    health: Health = field(default_factory=Health)
    order: Optional[dict] = None
    shadow: Optional[dict] = None  # {"sample": share of requests}: run beside the active model, never switch

    def encode(self) -> bytes:
        body = {"schema": SCHEMA, "fleet": self.fleet, "device": self.device, "rollout": self.rollout,
                "issued": self.issued, "target": self.target,
                "full": self.full.to_dict() if self.full else None,
                "delta": self.delta.to_dict() if self.delta else None,
                "health": asdict(self.health), "order": self.order}
        if self.shadow is not None:
            body["shadow"] = self.shadow
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @property
    def version(self) -> int:
        return self.target["version"]

    @property
    def content_sha256(self) -> str:
        return self.target["content_sha256"]


def decode_desired(payload: bytes) -> Optional[Desired]:
    """The desired model, None for an empty (cleared) message; ValueError for anything malformed."""
    if not payload:
        return None
    if len(payload) > MAX_DESIRED_BYTES:
        raise ValueError(f"desired message of {len(payload)} bytes is too large")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"desired message is not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ValueError("desired message is not of schema 1")
    target, health = body.get("target"), body.get("health") or {}
    if not (isinstance(target, dict) and isinstance(target.get("name"), str) and type(target.get("version")) is int
            and target["version"] >= 0 and all(isinstance(target.get(k), str) and SHA_RE.match(target[k])
                                                for k in ("sha256", "content_sha256"))
            and target.get("format") in ("tflite", "onnx") and type(target.get("size")) is int):
        raise ValueError("desired: target needs name, version, sha256, content_sha256, size and format")
    if not (isinstance(body.get("rollout"), str) and isinstance(body.get("issued"), (int, float))
            and isinstance(body.get("fleet"), str) and isinstance(body.get("device"), str)):
        raise ValueError("desired: rollout, issued, fleet and device are required")
    try:
        h = Health(window_s=parse_duration(health.get("window_s", 300.0)),
                   min_requests=int(health.get("min_requests", 0)), rules=str(health.get("rules", DEFAULT_RULES)),
                   latency_budget=float(health.get("latency_budget", 5.0)))
        parse_rules(h.rules)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"desired: health is malformed: {exc}") from exc
    full = Transfer.from_dict(body["full"], "full") if body.get("full") else None
    delta = Transfer.from_dict(body["delta"], "delta") if body.get("delta") else None
    if full is not None and full.id != target["sha256"]:
        raise ValueError("desired: the full transfer is not the target's file")
    order = body.get("order")
    if order is not None and not isinstance(order, dict):
        raise ValueError("desired: order must be an object")
    shadow = body.get("shadow")
    if shadow is not None:
        sample = shadow.get("sample") if isinstance(shadow, dict) else None
        if not (isinstance(sample, (int, float)) and not isinstance(sample, bool) and 0 < sample <= 1):
            raise ValueError("desired: shadow needs a sample share above 0 and at most 1")
        shadow = {"sample": float(sample)}
    return Desired(body["fleet"], body["device"], body["rollout"], float(body["issued"]), target, full, delta, h,
                   order, shadow)


# --- blocks on the wire ----------------------------------------------------------------------------


def encode_request(transfer_id: str, blocks: Sequence[int], token: str) -> bytes:
    return json.dumps({"id": transfer_id, "blocks": list(blocks), "token": token}, separators=(",", ":")).encode()


def decode_request(payload: bytes) -> Tuple[str, List[int], str]:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"block request is not JSON: {exc}") from exc
    blocks = body.get("blocks") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and isinstance(body.get("id"), str) and SHA_RE.match(body["id"])
            and isinstance(blocks, list) and 0 < len(blocks) <= MAX_BLOCKS_PER_REQUEST
            and all(type(b) is int and b >= 0 for b in blocks) and isinstance(body.get("token", ""), str)
            and len(body.get("token", "")) <= 64):
        raise ValueError(f"not a block request: {str(body)[:120]}")
    return body["id"], blocks, body.get("token", "")


def encode_event(**fields) -> bytes:
    return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"),
                      allow_nan=False, default=str).encode("utf-8")
