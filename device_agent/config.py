"""The agent's settings: a TOML file, overridden by command-line flags, checked before anything starts.

    artifact = "/var/lib/edgeml/model.edgeml"     # required
    public_key = "/etc/edgeml/signing.pub"        # required: the artifact must verify against it
    data_dir = "/var/lib/edgeml"                  # required: the telemetry queue lives here
    device_id = "dev1"                            # required
    fleet = "default"
    api = "127.0.0.1:8500"                        # the local KServe v2 API; "off" disables it
    threads = 1
    log_level = "info"

    [mqtt]                                        # leave out to run offline (telemetry is kept)
    broker = "mqtts://broker.example:8883"        # mqtt:// or mqtts://
    username = "dev1"
    password_file = "/etc/edgeml/mqtt-password"   # a file, so the secret is not in ps or the unit
    ca_file = "/etc/edgeml/ca.pem"                # TLS; with cert_file and key_file: mutual TLS
    cert_file = "/etc/edgeml/dev1.pem"
    key_file = "/etc/edgeml/dev1.key"
    ack_timeout_s = 30                            # telemetry the host has not confirmed by then is sent again

    [telemetry]
    queue_max_bytes = 67108864                    # drop-oldest beyond this, and count what was dropped
    stats_window_s = 60
    system_interval_s = 30
    max_body_bytes = 16777216                     # larger requests get 413

    [updates]                                     # fleet updates (with a broker)
    fetch_timeout_s = 5                           # a block request unanswered this long is asked again (doubling)
    fetch_attempts = 6                            # ... this many times, then the download is reported failed

    [monitoring]                                  # drift of inputs and predictions, on the device
    drift = true                                  # false: no counting on the request path
    drift_window_s = 60                           # each window's histograms go to telemetry when it closes
    drift_windows = 10                            # alerts judge the sum of the last this many windows
    drift_min_samples = 200                       # fewer samples than this in them: no judgement
    js_threshold = 0.1                            # Jensen-Shannon distance past which a feature has drifted
    psi_threshold = 0.2                           # ... or PSI past this
    confidence_drop = 0.1                         # mean top-1 confidence this far below the baseline's
    clear_ratio = 0.7                             # an alert clears once every score is below this share of its threshold

    [server]                                      # the local API beyond a loopback demo
    token_file = "/etc/edgeml/api-tokens"         # bearer tokens, one per line (re-read on SIGHUP); required
                                                  # when api listens beyond loopback
    open_health = false                           # true: /v2/health/* answer without a token (for probes)
    tls_cert_file = "/etc/edgeml/api.pem"         # HTTPS with this certificate and key
    tls_key_file = "/etc/edgeml/api.key"
    tls_client_ca_file = "/etc/edgeml/clients.pem"  # mutual TLS: clients need a certificate it signed
    backlog = 128                                 # connections the kernel queues before the agent accepts them
    max_connections = 128                         # open at once (a thread each); beyond, 503 with Retry-After
    workers = 8                                   # requests running the model at once; beyond, 503 with Retry-After
    request_timeout_s = 10                        # a request's headers and body must arrive within this
    instances = 1                                 # interpreters of the model, one thread each (cores in use)
    max_batch = 0                                 # dynamic batching: merge concurrent requests up to this many rows
    max_delay_ms = 1.0                            # ... waiting at most this long for more (0 rows: off)
    cache_bytes = 0                               # response cache bound (0: off; inputs may be private)

    [feedback]                                    # ground truth for earlier requests (off: inputs can be private)
    enabled = false                               # true: responses carry an id; POST .../feedback labels it
    sample = 1.0                                  # share of requests kept waiting for a label
    pending = 1000                                # requests waiting for a label, the oldest forgotten first
    max_bytes = 16777216                          # the reservoir of labelled samples on disk, inputs included

Relative paths in the file are relative to the file.
"""
from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

from edgeml.core.errors import InputError, UsageError
from edgeml.core.mqtt_contract import ID_RE

LEVELS = ("debug", "info", "warning", "error")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
PATH_KEYS = ("artifact", "public_key", "data_dir", "password_file", "ca_file", "cert_file", "key_file", "token_file",
             "tls_cert_file", "tls_key_file", "tls_client_ca_file")


@dataclass
class AgentConfig:
    artifact: Optional[Path] = None
    public_key: Optional[Path] = None
    data_dir: Optional[Path] = None
    device_id: Optional[str] = None
    fleet: str = "default"
    api: str = "127.0.0.1:8500"
    threads: int = 1
    log_level: str = "info"
    broker: Optional[str] = None
    username: Optional[str] = None
    password_file: Optional[Path] = None
    ca_file: Optional[Path] = None
    cert_file: Optional[Path] = None
    key_file: Optional[Path] = None
    ack_timeout_s: float = 30.0
    queue_max_bytes: int = 64 << 20
    stats_window_s: float = 60.0
    system_interval_s: float = 30.0
    max_body_bytes: int = 16 << 20
    fetch_timeout_s: float = 5.0
    fetch_attempts: int = 6
    drift: bool = True
    drift_window_s: float = 60.0
    drift_windows: int = 10
    drift_min_samples: int = 200
    js_threshold: float = 0.1
    psi_threshold: float = 0.2
    confidence_drop: float = 0.1
    clear_ratio: float = 0.7
    feedback: bool = False
    feedback_sample: float = 1.0
    feedback_pending: int = 1000
    feedback_max_bytes: int = 16 << 20
    token_file: Optional[Path] = None
    open_health: bool = False
    tls_cert_file: Optional[Path] = None
    tls_key_file: Optional[Path] = None
    tls_client_ca_file: Optional[Path] = None
    backlog: int = 128
    max_connections: int = 128
    workers: int = 8
    request_timeout_s: float = 10.0
    instances: int = 1
    max_batch: int = 0
    max_delay_ms: float = 1.0
    cache_bytes: int = 0
    source: Optional[Path] = field(default=None, compare=False)  # the TOML file, for SIGHUP

    @property
    def api_address(self) -> Optional[Tuple[str, int]]:
        if self.api in ("off", ""):
            return None
        host, _, port = self.api.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    def password(self) -> Optional[str]:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(f"cannot read password_file {self.password_file}: {exc.strerror}") from exc

    def to_dict(self) -> dict:
        return {f.name: (str(v) if isinstance(v, Path) else v)
                for f in fields(self) if (v := getattr(self, f.name)) is not None or f.name != "source"}


SECTIONS = {
    "": ("artifact", "public_key", "data_dir", "device_id", "fleet", "api", "threads", "log_level"),
    "mqtt": ("broker", "username", "password_file", "ca_file", "cert_file", "key_file", "ack_timeout_s"),
    "telemetry": ("queue_max_bytes", "stats_window_s", "system_interval_s", "max_body_bytes"),
    "updates": ("fetch_timeout_s", "fetch_attempts"),
    "monitoring": ("drift", "drift_window_s", "drift_windows", "drift_min_samples", "js_threshold", "psi_threshold",
                   "confidence_drop", "clear_ratio"),
    "feedback": ("enabled", "sample", "pending", "max_bytes"),
    "server": ("token_file", "open_health", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "backlog",
               "max_connections", "workers", "request_timeout_s", "instances", "max_batch", "max_delay_ms",
               "cache_bytes"),
}
# keys of a section that mean another config key (the section names them plainly)
SECTION_KEYS = {("feedback", "enabled"): "feedback", ("feedback", "sample"): "feedback_sample",
                ("feedback", "pending"): "feedback_pending", ("feedback", "max_bytes"): "feedback_max_bytes"}


def load_config(path: Optional[Path], flags: Dict[str, object]) -> AgentConfig:
    """The file's values, then the flags given (None = not given), then the checks."""
    values: Dict[str, object] = {}
    if path is not None:
        values.update(_read_toml(Path(path)))
    values.update({k: v for k, v in flags.items() if v is not None})
    for key, value in values.items():
        _check_type(key, value)
    types = {f.name: f for f in fields(AgentConfig)}
    for key in PATH_KEYS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    config = AgentConfig(**{k: v for k, v in values.items() if k in types}, source=Path(path) if path else None)
    check(config)
    return config


def check(c: AgentConfig) -> None:
    for key in ("artifact", "public_key", "data_dir", "device_id"):
        if getattr(c, key) is None:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"no {key} given: set {key} in the config file or pass {flag}")
    for what, value in (("device_id", c.device_id), ("fleet", c.fleet)):
        if not ID_RE.match(str(value)):
            raise UsageError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if c.api not in ("off", ""):
        host, sep, port = c.api.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise UsageError(f"api {c.api!r} must be HOST:PORT such as 127.0.0.1:8500, or off")
    if c.broker is not None:
        url = urlparse(c.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise UsageError(f"broker {c.broker!r} must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    if (c.cert_file is None) != (c.key_file is None):
        raise UsageError("mutual TLS needs both cert_file and key_file")
    if (c.tls_cert_file is None) != (c.tls_key_file is None):
        raise UsageError("HTTPS needs both tls_cert_file and tls_key_file")
    if c.tls_client_ca_file is not None and c.tls_cert_file is None:
        raise UsageError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
    address = c.api_address
    if address is not None and address[0] not in LOOPBACK and c.token_file is None:
        raise UsageError(f"api {c.api} listens beyond loopback: anyone on the network could use the model; set "
                         "token_file (bearer tokens) in [server], or --api-token-file, or bind 127.0.0.1")
    for key, low in (("backlog", 1), ("max_connections", 1), ("workers", 1), ("instances", 1), ("max_batch", 0),
                     ("cache_bytes", 0)):
        if int(getattr(c, key)) < low:
            raise UsageError(f"{key} must be at least {low}, got {getattr(c, key)}")
    if c.log_level not in LEVELS:
        raise UsageError(f"log_level {c.log_level!r} must be one of {', '.join(LEVELS)}")
    for key, low in (("threads", 1), ("queue_max_bytes", 1 << 16), ("max_body_bytes", 1024), ("fetch_attempts", 1)):
        if int(getattr(c, key)) < low:
            raise UsageError(f"{key} must be at least {low}, got {getattr(c, key)}")
    for key in ("drift_windows", "drift_min_samples"):
        if int(getattr(c, key)) < 1:
            raise UsageError(f"{key} must be at least 1, got {getattr(c, key)}")
    if not 0 < float(c.feedback_sample) <= 1:
        raise UsageError(f"feedback sample must be above 0 and at most 1, got {c.feedback_sample}")
    for key, low in (("feedback_pending", 1), ("feedback_max_bytes", 1024)):
        if int(getattr(c, key)) < low:
            raise UsageError(f"{key} must be at least {low}, got {getattr(c, key)}")
    if not 0 < float(c.clear_ratio) <= 1:
        raise UsageError(f"clear_ratio must be above 0 and at most 1, got {c.clear_ratio}")
    if not float(c.max_delay_ms) >= 0:
        raise UsageError(f"max_delay_ms must be 0 or more, got {c.max_delay_ms}")
    for key in ("stats_window_s", "system_interval_s", "ack_timeout_s", "fetch_timeout_s", "drift_window_s",
                "js_threshold", "psi_threshold", "confidence_drop", "request_timeout_s"):
        if not float(getattr(c, key)) > 0:
            raise UsageError(f"{key} must be above 0, got {getattr(c, key)}")
    for key in ("artifact", "public_key", "password_file", "ca_file", "cert_file", "key_file", "token_file",
                "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        value = getattr(c, key)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{key} {value} does not exist or is not a file")


INTS = ("threads", "queue_max_bytes", "max_body_bytes", "fetch_attempts", "drift_windows", "drift_min_samples",
        "feedback_pending", "feedback_max_bytes", "backlog", "max_connections", "workers", "instances", "max_batch",
        "cache_bytes")
FLOATS = ("stats_window_s", "system_interval_s", "ack_timeout_s", "fetch_timeout_s", "drift_window_s",
          "js_threshold", "psi_threshold", "confidence_drop", "clear_ratio", "feedback_sample", "request_timeout_s",
          "max_delay_ms")
BOOLS = ("drift", "feedback", "open_health")


def _check_type(key: str, value) -> None:
    if key in BOOLS:
        ok, want = isinstance(value, bool), "true or false"
    elif key in INTS:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif key in FLOATS:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, (str, Path)), "a string"
    if not ok:
        raise UsageError(f"{key} must be {want}, got {value!r}")


def _read_toml(path: Path) -> Dict[str, object]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    values: Dict[str, object] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in SECTIONS or not key:
                raise UsageError(f"config file {path}: unknown section [{key}]; use [mqtt], [telemetry], [updates], [monitoring], [server] or [feedback]")
            for sub, sub_value in value.items():
                values[SECTION_KEYS.get((key, sub)) or _known(path, key, sub)] = sub_value
        else:
            values[_known(path, "", key)] = value
    for key in PATH_KEYS:  # relative to the file, not to wherever the daemon was started
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str(path.parent / values[key])
    return values


def _known(path: Path, section: str, key: str) -> str:
    allowed = SECTIONS[section]
    if key not in allowed:
        where = f"[{section}]" if section else "the top level"
        close = difflib.get_close_matches(key, [k for keys in SECTIONS.values() for k in keys], n=1)
        hint = f" (did you mean {close[0]!r}{'' if close[0] in allowed else ' in another section'}?)" if close else ""
        raise UsageError(f"config file {path}: unknown key {key!r} in {where}{hint}")
    return key
