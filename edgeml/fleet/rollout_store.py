"""The rollout tables of the fleet store: fleets and their keys, artifacts (the bytes devices fetch),
deltas, groups, rollouts with their waves, each device's assignment, update events, controllers.

Everything a controller knows lives here, so a controller restarted mid-rollout carries on where
it was, and several controllers against one PostgreSQL share the work: each pass over a rollout
holds its row (``FOR UPDATE SKIP LOCKED``), so one controller advances it at a time and the others
move on; a controller that dies releases it with its connection.
"""
from __future__ import annotations

import json
import time
from typing import Dict, Iterable, List, Optional

ROLLOUT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fleets (
        fleet TEXT PRIMARY KEY, key_id TEXT NOT NULL, public_key TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS artifacts (
        content_sha256 TEXT PRIMARY KEY, sha256 TEXT NOT NULL, name TEXT NOT NULL, version BIGINT NOT NULL,
        format TEXT NOT NULL, size BIGINT NOT NULL, key_id TEXT NOT NULL, data BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS deltas (
        base TEXT NOT NULL, target TEXT NOT NULL, sha256 TEXT NOT NULL, patch BYTEA NOT NULL,
        PRIMARY KEY (base, target))""",
    """CREATE TABLE IF NOT EXISTS device_groups (
        fleet TEXT NOT NULL, name TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (fleet, name, device))""",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, fleet TEXT NOT NULL, kind TEXT NOT NULL, artifact TEXT NOT NULL, state TEXT NOT NULL,
        plan TEXT NOT NULL, wave INTEGER NOT NULL, wave_started DOUBLE PRECISION, signed_order TEXT,
        reason TEXT, created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS assignments (
        rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
        from_name TEXT, from_version BIGINT, from_content TEXT, from_sha256 TEXT, desired_at DOUBLE PRECISION,
        detail TEXT, updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (rollout, device))""",
    """CREATE TABLE IF NOT EXISTS update_events (
        fleet TEXT NOT NULL, device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, rollout TEXT,
        state TEXT, body TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS controllers (id TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL)""",
)
# columns added to the telemetry store's devices table for updates
DEVICE_COLUMNS = {"content_sha256": "TEXT", "update_status": "TEXT"}
ACTIVE = ("running", "paused", "aborting", "shadowing")


class RolloutTables:
    """Mixed into ``Store``: the SQL of rollouts, spelled for both SQLite and PostgreSQL."""

    # --- fleets, artifacts, deltas, groups -----------------------------------------------------

    def fleet_key(self, fleet: str) -> Optional[dict]:
        with self.transaction(write=False):
            row = self._execute("SELECT key_id, public_key FROM fleets WHERE fleet = ?", (fleet,)).fetchone()
        return None if row is None else {"key_id": row[0], "public_key": row[1]}

    def set_fleet_key(self, fleet: str, key_id: str, public_key_pem: str) -> None:
        self._execute("INSERT INTO fleets (fleet, key_id, public_key, created) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (fleet) DO NOTHING", (fleet, key_id, public_key_pem, time.time()))

    def put_artifact(self, art, data: bytes) -> None:
        m = art.manifest
        self._execute(
            "INSERT INTO artifacts (content_sha256, sha256, name, version, format, size, key_id, data, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_sha256) DO NOTHING",
            (art.content_sha256, art.sha256, m["name"], m["version"], art.model_format, len(data), art.key_id,
             data, time.time()))

    def artifact_info(self, content_sha256: str) -> Optional[dict]:
        with self.transaction(write=False):
            row = self._execute("SELECT content_sha256, sha256, name, version, format, size, key_id FROM artifacts "
                                "WHERE content_sha256 = ?", (content_sha256,)).fetchone()
        return None if row is None else dict(zip(("content_sha256", "sha256", "name", "version", "format", "size",
                                                  "key_id"), row))

    def find_artifact(self, name: str, version: int) -> Optional[dict]:
        with self.transaction(write=False):
            row = self._execute("SELECT content_sha256 FROM artifacts WHERE name = ? AND version = ? "
                                "ORDER BY created DESC", (name, version)).fetchone()
        return None if row is None else self.artifact_info(row[0])

    def blob(self, transfer_id: str) -> Optional[bytes]:
        """The bytes of an artifact file or a patch, by their sha256 (a transfer's id)."""
        with self.transaction(write=False):
            row = self._execute("SELECT data FROM artifacts WHERE sha256 = ?", (transfer_id,)).fetchone()
            if row is None:
                row = self._execute("SELECT patch FROM deltas WHERE sha256 = ?", (transfer_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_delta(self, base: str, target: str, sha256: str, patch: bytes) -> None:
        self._execute("INSERT INTO deltas (base, target, sha256, patch) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (base, target) DO NOTHING", (base, target, sha256, patch))

    def deltas_to(self, target: str) -> Dict[str, dict]:
        """{base content_sha256: {"sha256", "size"}} of the patches that build ``target``."""
        with self.transaction(write=False):
            rows = self._execute(f"SELECT base, sha256, {self.length}(patch) FROM deltas WHERE target = ?",
                                 (target,)).fetchall()
        return {base: {"sha256": sha, "size": size} for base, sha, size in rows}

    def add_to_group(self, fleet: str, name: str, devices: Iterable[str]) -> None:
        with self.transaction():
            for device in devices:
                self._execute("INSERT INTO device_groups (fleet, name, device) VALUES (?, ?, ?) "
                              "ON CONFLICT DO NOTHING", (fleet, name, device))

    def remove_from_group(self, fleet: str, name: str, devices: Iterable[str]) -> int:
        removed = 0
        with self.transaction():
            for device in devices:
                removed += self._execute("DELETE FROM device_groups WHERE fleet = ? AND name = ? AND device = ?",
                                         (fleet, name, device)).rowcount
        return removed

    def groups(self, fleet: Optional[str] = None) -> Dict[str, List[str]]:
        with self.transaction(write=False):
            rows = self._execute("SELECT fleet, name, device FROM device_groups ORDER BY fleet, name, device").fetchall()
        out: Dict[str, List[str]] = {}
        for f, name, device in rows:
            if fleet is None or f == fleet:
                out.setdefault(name if fleet else f"{f}/{name}", []).append(device)
        return out

    def known_devices(self, fleet: str) -> List[dict]:
        """The fleet's devices the collector has seen, with the model each reports."""
        with self.transaction(write=False):
            rows = self._execute("SELECT device, presence, model_name, model_version, content_sha256, sha256, "
                                 "update_status FROM devices WHERE fleet = ? ORDER BY device", (fleet,)).fetchall()
        return [{"device": d, "presence": p, "model_name": n, "model_version": v, "content_sha256": c, "sha256": s,
                 "update": json.loads(u) if u else None} for d, p, n, v, c, s, u in rows]

    # --- rollouts ------------------------------------------------------------------------------

    def create_rollout(self, rollout: dict, assignments: List[dict]) -> None:
        now = time.time()
        with self.transaction():
            self._execute(
                "INSERT INTO rollouts (id, fleet, kind, artifact, state, plan, wave, wave_started, signed_order, "
                "reason, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rollout["id"], rollout["fleet"], rollout["kind"], rollout["artifact"], "running",
                 json.dumps(rollout["plan"]), 0, None, json.dumps(rollout["signed_order"])
                 if rollout.get("signed_order") else None, None, now, now))
            for a in assignments:
                self._execute(
                    "INSERT INTO assignments (rollout, device, wave, state, from_name, from_version, from_content, "
                    "from_sha256, desired_at, detail, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rollout["id"], a["device"], a["wave"], "pending", a.get("from_name"), a.get("from_version"),
                     a.get("from_content"), a.get("from_sha256"), None, None, now))

    def rollout_ids(self, states=ACTIVE) -> List[str]:
        marks = ", ".join("?" * len(states))
        with self.transaction(write=False):
            rows = self._execute(f"SELECT id FROM rollouts WHERE state IN ({marks}) ORDER BY created",
                                 tuple(states)).fetchall()
        return [r[0] for r in rows]

    def lock_rollout(self, rollout_id: str) -> Optional[dict]:
        """Inside a transaction: the rollout, held until the transaction ends; None when another
        controller holds it (PostgreSQL) or it does not exist."""
        row = self._execute(
            f"SELECT id, fleet, kind, artifact, state, plan, wave, wave_started, signed_order, reason, created, updated "
            f"FROM rollouts WHERE id = ?{self.skip_locked}", (rollout_id,)).fetchone()
        return None if row is None else _rollout(row)

    def rollout(self, rollout_id: str) -> Optional[dict]:
        with self.transaction(write=False):
            row = self._execute(
                "SELECT id, fleet, kind, artifact, state, plan, wave, wave_started, signed_order, reason, created, "
                "updated FROM rollouts WHERE id = ? OR id LIKE ?", (rollout_id, f"{rollout_id}%")).fetchall()
        if len(row) != 1:
            return None
        return _rollout(row[0])

    def rollouts(self, fleet: Optional[str] = None) -> List[dict]:
        with self.transaction(write=False):
            rows = self._execute(
                "SELECT id, fleet, kind, artifact, state, plan, wave, wave_started, signed_order, reason, created, "
                "updated FROM rollouts ORDER BY created").fetchall()
        return [_rollout(r) for r in rows if fleet is None or r[1] == fleet]

    def update_rollout(self, rollout_id: str, **values) -> None:
        values["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        self._execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*values.values(), rollout_id))

    def assignments(self, rollout_id: str) -> List[dict]:
        rows = self._execute(
            "SELECT device, wave, state, from_name, from_version, from_content, from_sha256, desired_at, detail, "
            "updated FROM assignments WHERE rollout = ? ORDER BY wave, device", (rollout_id,)).fetchall()
        return [{"device": d, "wave": w, "state": s, "from_name": fn, "from_version": fv, "from_content": fc,
                 "from_sha256": fs, "desired_at": da, "detail": json.loads(detail) if detail else {}, "updated": u}
                for d, w, s, fn, fv, fc, fs, da, detail, u in rows]

    def update_assignment(self, rollout_id: str, device: str, **values) -> None:
        if "detail" in values:
            values["detail"] = json.dumps(values["detail"])
        values["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        self._execute(f"UPDATE assignments SET {sets} WHERE rollout = ? AND device = ?",
                      (*values.values(), rollout_id, device))

    def reset_desired(self, rollout_id: str) -> None:
        self._execute("UPDATE assignments SET desired_at = NULL WHERE rollout = ?", (rollout_id,))

    def device_status(self, fleet: str, devices: List[str]) -> Dict[str, dict]:
        """Each device's presence and reported model and update status, for one controller pass."""
        rows = self._execute("SELECT device, presence, model_name, model_version, content_sha256, update_status, "
                             "last_seen FROM devices WHERE fleet = ?", (fleet,)).fetchall()
        wanted = set(devices)
        return {d: {"presence": p, "model_name": n, "model_version": v, "content_sha256": c,
                    "update": json.loads(u) if u else {}, "last_seen": s}
                for d, p, n, v, c, u, s in rows if d in wanted}

    def busy_devices(self, fleet: str, exclude: str) -> Dict[str, str]:
        """Devices of ``fleet`` assigned in another active rollout (a device follows one rollout at a time)."""
        marks = ", ".join("?" * len(ACTIVE))
        with self.transaction(write=False):
            rows = self._execute(
                f"SELECT a.device, r.id FROM assignments a JOIN rollouts r ON r.id = a.rollout "
                f"WHERE r.fleet = ? AND r.id != ? AND r.state IN ({marks})", (fleet, exclude, *ACTIVE)).fetchall()
        return dict(rows)

    # --- events and controllers ----------------------------------------------------------------

    def add_event(self, fleet: str, device: str, body: dict) -> None:
        self._execute("INSERT INTO update_events (fleet, device, ts, rollout, state, body) VALUES (?, ?, ?, ?, ?, ?)",
                      (fleet, device, float(body.get("ts") or time.time()), body.get("rollout"), body.get("state"),
                       json.dumps(body)))

    def events(self, rollout_id: str, limit: int = 200) -> List[dict]:
        with self.transaction(write=False):
            rows = self._execute("SELECT body FROM update_events WHERE rollout = ? ORDER BY ts DESC LIMIT ?",
                                 (rollout_id, limit)).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    def controller_seen(self, controller_id: str) -> None:
        with self.transaction():
            self._execute("INSERT INTO controllers (id, seen) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET "
                          "seen = excluded.seen", (controller_id, time.time()))

    def controllers_since(self, seconds: float) -> List[str]:
        with self.transaction(write=False):
            rows = self._execute("SELECT id FROM controllers WHERE seen >= ?", (time.time() - seconds,)).fetchall()
        return [r[0] for r in rows]


def _rollout(row) -> dict:
    keys = ("id", "fleet", "kind", "artifact", "state", "plan", "wave", "wave_started", "signed_order", "reason",
            "created", "updated")
    r = dict(zip(keys, row))
    r["plan"] = json.loads(r["plan"])
    r["signed_order"] = json.loads(r["signed_order"]) if r["signed_order"] else None
    return r
