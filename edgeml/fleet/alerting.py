"""What ``fleet serve`` tells the outside about alerts and the fleet: each alert posted as JSON to
``--alert-webhook URL``, and fleet gauges in Prometheus text at ``/metrics`` of ``--http``.

A webhook delivery is recorded in the store once the receiver answered 2xx, so a restarted
``fleet serve`` neither loses nor repeats one; a receiver that keeps failing gets a bounded
number of attempts (backing off), and the give-up is logged with the last error.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional
from urllib.parse import urlparse

from edgeml.core.errors import UsageError, first_line

log = logging.getLogger("edgeml.fleet")

WEBHOOK_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS alert_webhooks (
        fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL, state TEXT NOT NULL,
        attempts INTEGER NOT NULL, next_try DOUBLE PRECISION NOT NULL, error TEXT,
        PRIMARY KEY (fleet, device, seq))""",
)
LOOKBACK_S = 3600.0  # alerts older than this when fleet serve starts are not posted (a new webhook, an old store)


def check_webhook_url(url: str) -> str:
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--alert-webhook {url!r} must be an http:// or https:// URL")
    return url


class AlertWebhook:
    """Posts every alert record (raised and cleared) the store holds to ``url``, each once."""

    def __init__(self, store, url: str, *, timeout_s: float = 5.0, attempts: int = 5, interval_s: float = 0.5):
        self.store, self.url = store, check_webhook_url(url)
        self.timeout_s, self.attempts, self.interval_s = timeout_s, attempts, interval_s
        self.since = time.time() - LOOKBACK_S
        self.stats = {"posted": 0, "failed_attempts": 0, "gave_up": 0}
        with store.transaction():
            for statement in WEBHOOK_SCHEMA:
                store._execute(statement)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeml-alert-webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.deliver()
            except Exception as exc:  # the store away: the next pass tries again
                log.warning("alert webhook: pass failed (%s); retrying", first_line(exc))

    def deliver(self) -> int:
        """One pass: post what is due; how many were posted."""
        posted = 0
        for fleet, device, seq, record, attempts in self._due():
            if self._stop.is_set():
                break
            body = json.dumps({"fleet": fleet, "device": device, "seq": seq, **record}, default=str).encode()
            error = self._post(body)
            with self.store.transaction():
                if error is None:
                    self._mark(fleet, device, seq, "sent", attempts + 1, None)
                    posted += 1
                    self.stats["posted"] += 1
                    continue
                self.stats["failed_attempts"] += 1
                if attempts + 1 >= self.attempts:
                    self.stats["gave_up"] += 1
                    log.warning("alert webhook: gave up posting %s's %s alert (seq %d) to %s after %d attempts: %s",
                                device, record.get("alert"), seq, self.url, attempts + 1, error)
                    self._mark(fleet, device, seq, "failed", attempts + 1, error)
                else:
                    self._mark(fleet, device, seq, "retry", attempts + 1, error, delay=min(2.0 ** attempts, 60.0))
        return posted

    def _due(self) -> List[tuple]:
        now = time.time()
        with self.store.transaction(write=False):
            rows = self.store._execute(
                "SELECT t.fleet, t.device, t.seq, t.record, COALESCE(w.attempts, 0) FROM telemetry t "
                "LEFT JOIN alert_webhooks w ON w.fleet = t.fleet AND w.device = t.device AND w.seq = t.seq "
                "WHERE t.kind = 'alert' AND t.ts >= ? AND (w.state IS NULL OR (w.state = 'retry' AND w.next_try <= ?)) "
                "ORDER BY t.ts LIMIT 100", (self.since, now)).fetchall()
        return [(f, d, s, json.loads(r), a) for f, d, s, r, a in rows]

    def _mark(self, fleet, device, seq, state, attempts, error, delay: float = 0.0) -> None:
        self.store._execute(
            "INSERT INTO alert_webhooks (fleet, device, seq, state, attempts, next_try, error) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (fleet, device, seq) DO UPDATE SET state = excluded.state, attempts = excluded.attempts, "
            "next_try = excluded.next_try, error = excluded.error",
            (fleet, device, seq, state, attempts, time.time() + delay, error))

    def _post(self, body: bytes) -> Optional[str]:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "edgeml-fleet"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return first_line(exc)


def fleet_metrics(store) -> str:
    """Prometheus text: devices by presence, open alerts by kind, alerts raised, rollouts by state,
    records stored by kind, per fleet."""
    from .drift import alerts

    lines: List[str] = []

    def gauge(name: str, text: str, kind: str, samples) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {value}" if inner else f"{name} {value}")

    devices = store.devices()
    presence: dict = {}
    for d in devices:
        key = (d["fleet"], d["presence"] or "unknown")
        presence[key] = presence.get(key, 0) + 1
    gauge("edgeml_fleet_devices", "Devices the collector has seen, by presence", "gauge",
          [({"fleet": f, "presence": p}, n) for (f, p), n in sorted(presence.items())])
    listed = alerts(store)["alerts"]
    open_by: dict = {}
    raised_by: dict = {}
    for a in listed:
        raised_by[(a["fleet"], a["alert"])] = raised_by.get((a["fleet"], a["alert"]), 0) + 1
        if a["state"] == "open":
            open_by[(a["fleet"], a["alert"])] = open_by.get((a["fleet"], a["alert"]), 0) + 1
    gauge("edgeml_fleet_alerts_open", "Alerts raised by devices and not cleared, by kind", "gauge",
          [({"fleet": f, "alert": k}, n) for (f, k), n in sorted(open_by.items())])
    gauge("edgeml_fleet_alerts_raised_total", "Alerts raised by devices, by kind", "counter",
          [({"fleet": f, "alert": k}, n) for (f, k), n in sorted(raised_by.items())])
    states: dict = {}
    for r in store.rollouts():
        states[(r["fleet"], r["state"])] = states.get((r["fleet"], r["state"]), 0) + 1
    gauge("edgeml_fleet_rollouts", "Rollouts by state", "gauge",
          [({"fleet": f, "state": s}, n) for (f, s), n in sorted(states.items())])
    with store.transaction(write=False):
        kinds = store._execute("SELECT fleet, kind, COUNT(*) FROM telemetry GROUP BY fleet, kind").fetchall()
    gauge("edgeml_fleet_records_total", "Telemetry records stored, by kind", "counter",
          [({"fleet": f, "kind": k}, n) for f, k, n in sorted(kinds)])
    return "\n".join(lines) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
