"""Where the collector keeps a fleet's telemetry: SQLite (the default) or PostgreSQL, one schema.

Records are keyed by (fleet, device, seq), so a batch delivered twice is stored once
(``INSERT ... ON CONFLICT DO NOTHING``). Every method runs in one transaction; ``transaction()``
groups many calls into one, which is how the collector commits a whole window of messages
before it acknowledges any of them.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, List, Optional

from edgeml.core.errors import InputError, UsageError, first_line
from edgeml.core.mqtt_contract import advance_watermark

from .rollout_store import DEVICE_COLUMNS, ROLLOUT_SCHEMA, RolloutTables

URL_FORMS = ("sqlite:///relative/path.db, sqlite:////absolute/path.db "
             "or postgresql://user@host:port/database")
MAX_SEQ = (1 << 63) - 1

# Type names both databases understand (SQLite maps them to INTEGER and REAL affinity).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS telemetry (
        fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (fleet, device, seq))""",
    """CREATE TABLE IF NOT EXISTS devices (
        fleet TEXT NOT NULL, device TEXT NOT NULL, presence TEXT, model_name TEXT, model_version BIGINT,
        sha256 TEXT, last_seen DOUBLE PRECISION, dropped_total BIGINT NOT NULL DEFAULT 0,
        updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (fleet, device))""",
    # the telemetry watermark each device is told (mqtt_contract.advance_watermark): its queue's
    # epoch, the seq up to which everything is settled, and committed batches still above it
    """CREATE TABLE IF NOT EXISTS telemetry_acks (
        fleet TEXT NOT NULL, device TEXT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL,
        pending TEXT NOT NULL, PRIMARY KEY (fleet, device))""",
) + ROLLOUT_SCHEMA


def open_store(url: str, create: bool = True) -> "Store":
    """A store for ``sqlite:///path.db`` or ``postgresql://user@host:port/db`` (libpq URL; query
    parameters such as ``?options=-csearch_path%3Dname`` pass through). ``create=False`` refuses
    a SQLite file that does not exist instead of creating an empty one."""
    if not isinstance(url, str):
        raise UsageError(f"database URL {url!r} is not {URL_FORMS}")
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteStore(Path(url[len("sqlite:///"):]), create)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise UsageError(f"database URL {url!r} is not {URL_FORMS}")


def check_records(records: Iterable[dict]) -> None:
    """ValueError for a record a database would refuse; the collector rejects such a batch up
    front, because a failed transaction is retried and must only fail for passing reasons."""
    for record in records:
        if not 1 <= record["seq"] <= MAX_SEQ or not math.isfinite(record["ts"]):
            raise ValueError(f"record seq {record['seq']} or ts {record['ts']} out of range")
        json.dumps(record, allow_nan=False)


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _now() -> float:
    return datetime.now(timezone.utc).timestamp()


class Store(RolloutTables):
    """The SQL both databases share; subclasses connect and say how to spell a few things."""

    greatest = "MAX"  # the two-argument maximum
    for_update = ""  # row locks: SQLite has one writer at a time anyway
    skip_locked = ""
    length = "LENGTH"  # of a blob

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0

    # --- transactions -------------------------------------------------------------------
    @contextmanager
    def transaction(self, write: bool = True):
        """One database transaction around everything inside (nesting joins the outer one);
        ``write=False`` reads a snapshot without taking SQLite's write lock."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            conn = self._connection()
            self._begin(conn, write)
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                self._rollback(conn)
                raise
            self._depth = 0
            conn.commit()

    def _sql(self, text: str) -> str:
        return text

    def _execute(self, sql: str, params=()):
        return self._connection().execute(self._sql(sql), params)

    # --- writes -------------------------------------------------------------------------
    def insert_records(self, fleet: str, device: str, records: List[dict]) -> int:
        """Store new records, skip ones already stored; returns how many were new."""
        if not records:
            return 0
        with self.transaction():
            inserted = self._insert_rows(fleet, device, records)
            dropped = max((r.get("dropped_total") for r in records
                           if r["kind"] == "system" and type(r.get("dropped_total")) is int), default=0)
            self._execute(
                f"""INSERT INTO devices (fleet, device, last_seen, dropped_total, updated) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (fleet, device) DO UPDATE SET last_seen = {self._later('last_seen')},
                dropped_total = {self.greatest}(devices.dropped_total, excluded.dropped_total),
                updated = excluded.updated""",
                (fleet, device, float(max(r["ts"] for r in records)), dropped, _now()))
        return inserted

    def acknowledge(self, fleet: str, device: str, epoch: str, after: Optional[int], last: int) -> int:
        """Record that the batch ``(after, last]`` of queue ``epoch`` is committed; the device's
        watermark afterwards (what its ``ack`` says). A new epoch (a new queue on the device)
        starts from nothing."""
        with self.transaction():
            row = self._execute(f"SELECT epoch, seq, pending FROM telemetry_acks WHERE fleet = ? AND device = ?"
                                f"{self.for_update}", (fleet, device)).fetchone()
            seq, pending = (row[1], [tuple(b) for b in json.loads(row[2])]) if row and row[0] == epoch else (0, [])
            seq, pending = advance_watermark(seq, pending, after, last)
            self._execute(
                """INSERT INTO telemetry_acks (fleet, device, epoch, seq, pending) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (fleet, device) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
                pending = excluded.pending""", (fleet, device, epoch, seq, json.dumps(pending)))
        return seq

    def upsert_presence(self, fleet: str, device: str, status: str, ts: Optional[float] = None) -> None:
        """online/offline as the device (or its will) said; ``ts`` only ever moves last_seen forward."""
        self._upsert(fleet, device, {"presence": status}, ts)

    def upsert_state(self, fleet: str, device: str, model_name: Optional[str], model_version: Optional[int],
                     sha256: Optional[str], ts: Optional[float] = None, content_sha256: Optional[str] = None,
                     update: Optional[dict] = None) -> None:
        """The model a device runs and how its update goes, from its retained state message."""
        self._upsert(fleet, device, {"model_name": model_name, "model_version": model_version, "sha256": sha256,
                                     "content_sha256": content_sha256,
                                     "update_status": json.dumps(update) if update else None}, ts)

    def touch(self, fleet: str, device: str, ts: float) -> None:
        """last_seen = max(last_seen, ts)."""
        self._upsert(fleet, device, {}, ts)

    def _upsert(self, fleet: str, device: str, values: dict, ts: Optional[float]) -> None:
        names = ["fleet", "device", *values, "last_seen", "updated"]
        sets = "".join(f"{name} = excluded.{name}, " for name in values)
        with self.transaction():
            self._execute(
                f"""INSERT INTO devices ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})
                ON CONFLICT (fleet, device) DO UPDATE SET {sets}last_seen = {self._later('last_seen')},
                updated = excluded.updated""",
                (fleet, device, *values.values(), None if ts is None else float(ts), _now()))

    def _later(self, column: str) -> str:
        """The later of the stored and the new value, either of which may be NULL."""
        return (f"{self.greatest}(COALESCE(devices.{column}, excluded.{column}), "
                f"COALESCE(excluded.{column}, devices.{column}))")

    # --- reads --------------------------------------------------------------------------
    def devices(self) -> List[dict]:
        """Every device with its presence, model and counts; ``requests`` counts successful
        inferences and ``dropped`` the records it lost (the larger of the ``dropped`` records'
        counts and the last ``system`` record's ``dropped_total``)."""
        with self.transaction(write=False):
            rows = self._execute(
                """SELECT fleet, device, presence, model_name, model_version, sha256, last_seen,
                dropped_total, updated, update_status FROM devices ORDER BY fleet, device""").fetchall()
            kinds = self._execute("SELECT fleet, device, kind, COUNT(*) FROM telemetry "
                                  "GROUP BY fleet, device, kind").fetchall()
            gaps = self._execute("SELECT fleet, device, record FROM telemetry WHERE kind = 'dropped'").fetchall()
        counts, totals, lost = {}, {}, {}
        for fleet, device, kind, n in kinds:
            counts[(fleet, device, kind)] = n
            totals[(fleet, device)] = totals.get((fleet, device), 0) + n
        for fleet, device, record in gaps:
            count = json.loads(record).get("count")
            lost[(fleet, device)] = lost.get((fleet, device), 0) + (count if type(count) is int else 0)
        out = []
        for fleet, device, presence, name, version, sha256, last_seen, dropped_total, updated, update in rows:
            key = (fleet, device)
            update = json.loads(update) if update else {}
            out.append({
                "update_state": update.get("state"), "update_result": update.get("result"),
                "target_version": update.get("target_version"), "progress": update.get("progress"),
                "rollout": update.get("rollout"), "update_error": update.get("error"),
                "fleet": fleet, "device": device, "presence": presence, "model_name": name,
                "model_version": version, "sha256": sha256, "last_seen": _iso(last_seen),
                "requests": counts.get((*key, "inference"), 0), "errors": counts.get((*key, "error"), 0),
                "records": totals.get(key, 0),
                "dropped": max(lost.get(key, 0), dropped_total or 0), "updated": _iso(updated)})
        return out

    def records(self, kinds, fleet: Optional[str] = None, since: Optional[float] = None) -> List[tuple]:
        """``(fleet, device, record)`` of the given kinds, oldest first; ``since`` in unix seconds."""
        kinds = list(kinds)
        where = [f"kind IN ({', '.join('?' for _ in kinds)})"]
        params: list = list(kinds)
        if fleet is not None:
            where.append("fleet = ?")
            params.append(fleet)
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        with self.transaction(write=False):
            rows = self._execute(f"SELECT fleet, device, record FROM telemetry WHERE {' AND '.join(where)} "
                                 "ORDER BY ts, fleet, device, seq", tuple(params)).fetchall()
        return [(f, d, json.loads(r)) for f, d, r in rows]

    def _migrate(self) -> None:
        """Columns added since a database was created (CREATE TABLE IF NOT EXISTS keeps old tables as they are)."""
        have = self._columns("devices")
        for name, kind in DEVICE_COLUMNS.items():
            if name not in have:
                self._execute(f"ALTER TABLE devices ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SqliteStore(Store):
    """One file, WAL mode (readers never block the collector), a lock wait for other writers."""

    def __init__(self, path: Path, create: bool = True):
        super().__init__()
        self.path = path
        self.url = f"sqlite:///{path}"
        if not create and not path.is_file():
            raise InputError(f"no database at {path}; run `edgeml fleet collect --db {self.url}` first")
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the driver's
            self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # acks follow commits, so commits must last
            with self.transaction():
                for statement in SCHEMA:
                    self._conn.execute(statement)
                self._migrate()
        except sqlite3.Error as exc:
            raise InputError(f"cannot open SQLite database {path}: {first_line(exc)}; "
                             "check that its folder exists and is writable") from exc

    def _connection(self):
        return self._conn

    def _columns(self, table: str) -> set:
        return {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}

    def _begin(self, conn, write: bool) -> None:
        # A writer takes the lock up front: upgrading a read lock later can fail without waiting.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _rollback(self, conn) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _insert_rows(self, fleet, device, records) -> int:
        cursor = self._conn.executemany(
            "INSERT INTO telemetry (fleet, device, seq, ts, kind, record) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [(fleet, device, r["seq"], float(r["ts"]), r["kind"], json.dumps(r, separators=(",", ":")))
             for r in records])
        return cursor.rowcount  # executemany sums the rows each statement changed


class PostgresStore(Store):
    """psycopg 3; reconnects on the next transaction after the server went away."""

    greatest = "GREATEST"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    length = "OCTET_LENGTH"

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._conn = None
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(7341)")  # two stores creating the schema at once
            for statement in SCHEMA:
                self._execute(statement)
            self._migrate()

    def _columns(self, table: str) -> set:
        rows = self._execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                             "AND table_schema = current_schema()", (table,)).fetchall()
        return {r[0] for r in rows}

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _connection(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(self.url, connect_timeout=10)
        except psycopg.Error as exc:
            raise InputError(f"cannot connect to PostgreSQL at {self._where()}: {first_line(exc)}; "
                             "check that the server runs and the URL is right") from exc

    def _where(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(self.url)
        except Exception:  # a malformed URL: say so without echoing a password
            return "the given URL"
        return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _begin(self, conn, write: bool) -> None:
        pass  # psycopg opens a transaction with the first statement

    def _rollback(self, conn) -> None:
        if not (conn.closed or conn.broken):
            conn.rollback()

    def _insert_rows(self, fleet, device, records) -> int:
        # One statement for the whole batch: arrays unnested server-side, one round trip.
        cursor = self._execute(
            "INSERT INTO telemetry (fleet, device, seq, ts, kind, record) "
            "SELECT %s, %s, * FROM unnest(%s::bigint[], %s::float8[], %s::text[], %s::text[]) "
            "ON CONFLICT DO NOTHING",
            (fleet, device, [r["seq"] for r in records], [float(r["ts"]) for r in records],
             [r["kind"] for r in records], [json.dumps(r, separators=(",", ":")) for r in records]))
        return cursor.rowcount
