"""Durable telemetry on the device: a bounded on-disk queue of records waiting for the host.

The ``Recorder`` (``recorder.py``) fills it; the queue survives restarts;
``device_agent.mqtt_link`` publishes from it and deletes records only once the host has said
it committed them (its ``ack``, which names this queue's ``epoch``). Record kinds and fields
are those of ``edgeml.core.mqtt_contract``.

Durability: SQLite in WAL mode with ``synchronous=NORMAL``. A commit is in the WAL before it
returns, so a killed process loses nothing committed; after a power loss the database is intact
but the last commits (since the last WAL sync) may be gone. Paying an fsync per 100 ms flush
(FULL) would wear SD cards for telemetry that is best effort anyway. What must survive a power
loss is that sequence numbers are never reused (collectors deduplicate on them, so a reused
number would hide a new record): numbers are handed out from a ceiling committed with FULL
(an fsync every ``SEQ_BLOCK`` numbers); a reopened queue continues above the ceiling, exactly
where it stopped after ``close()``, with a gap after a crash.

Bound: over ``max_bytes`` the oldest records go, and a ``dropped`` record reports them
(count, first_seq..last_seq). A drop while the broker is down is exact; records (or a report)
that were in flight at that moment may still arrive, so the count is then an upper bound.
"""
from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from edgeml.core.mqtt_contract import KINDS, MAX_BATCH_BYTES

log = logging.getLogger(__name__)

SEQ_BLOCK = 10_000  # sequence numbers per durable ceiling: one fsync per this many records
RECORD_OVERHEAD = 48  # what seq, ts, kind and punctuation add to a record's body in a batch
DROPPED_ROOM = 256  # kept free under max_bytes for the `dropped` record a drop writes
MAX_RECORD_BYTES = MAX_BATCH_BYTES // 4  # so one record always fits a batch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class TelemetryQueue:
    """Records waiting for the broker, oldest first, at most ``max_bytes`` (drop-oldest).

    Thread-safe: serving threads append while the publisher peeks and deletes.
    """

    def __init__(self, path, max_bytes: int = 64 << 20):
        if max_bytes < 16 * DROPPED_ROOM:
            raise ValueError(f"max_bytes {max_bytes} is too small for a telemetry queue")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._has_records = threading.Condition(self._lock)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back after checkpoints
        self._db.execute("PRAGMA cache_size=-512")  # KiB; appends and oldest-first reads need few pages, RSS counts
        self._db.executescript(_SCHEMA)
        self.epoch = f"{self._epoch():016x}"
        self._ceiling = self._meta("seq_ceiling")
        self._next_seq = self._ceiling + 1
        self._dropped_total = self._meta("dropped_total")
        self._drop_logged = -float("inf")
        # the one `dropped` report that may still be queued (later drops fold into it)
        self._report_seq = self._db.execute("SELECT MAX(seq) FROM records WHERE kind = 'dropped'").fetchone()[0]
        self._records, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records").fetchone()

    def _epoch(self) -> int:
        """This queue's random id, made once with the database: the host's acks name it, so an
        ack meant for an earlier queue (a device reset, a restored backup) deletes nothing."""
        epoch = self._meta("epoch")
        if not epoch:
            epoch = secrets.randbits(62) | 1
            self._db.execute("PRAGMA synchronous=FULL")
            self._set_meta("epoch", epoch)
            self._db.execute("PRAGMA synchronous=NORMAL")
        return epoch

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def append(self, records: Iterable[dict]) -> List[int]:
        """Store records (``kind``, optional ``ts``, the kind's fields) in one transaction; their seqs."""
        now = time.time()
        rows = []
        for record in records:
            if record.get("kind") not in KINDS:
                raise ValueError(f"unknown record kind {record.get('kind')!r}")
            body = _dumps({k: v for k, v in record.items() if k not in ("seq", "ts", "kind")})
            if len(body) > MAX_RECORD_BYTES:
                raise ValueError(f"a {record['kind']} record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
            rows.append([None, float(record.get("ts", now)), record["kind"], body, len(body) + RECORD_OVERHEAD])
        if not rows:
            return []
        with self._lock:
            seqs = list(range(self._next_seq, self._next_seq + len(rows)))
            for row, seq in zip(rows, seqs):
                row[0] = seq
            self._write(rows)
            self._has_records.notify_all()
            return seqs

    def _write(self, rows: list) -> None:
        """Insert, drop the oldest when over the bound, all in one transaction."""
        last = rows[-1][0] + 1  # +1: the `dropped` record this append may write
        raise_ceiling = last > self._ceiling
        if raise_ceiling:  # this commit hands out numbers above the durable ceiling: fsync it
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records (seq, ts, kind, body, size) VALUES (?, ?, ?, ?, ?)", rows)
                if raise_ceiling:
                    self._set_meta("seq_ceiling", last + SEQ_BLOCK)
                added = sum(row[4] for row in rows)
                excess = self._bytes + added - (self.max_bytes - DROPPED_ROOM)
                drop = self._drop_oldest(excess, last) if self._bytes + added > self.max_bytes else None
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        finally:
            if raise_ceiling:
                self._db.execute("PRAGMA synchronous=NORMAL")
        if raise_ceiling:
            self._ceiling = last + SEQ_BLOCK
        self._next_seq = rows[-1][0] + 1
        self._records += len(rows)
        self._bytes += added
        if drop:
            self._apply_drop(last, *drop)

    def _drop_oldest(self, excess: int, seq: int) -> Tuple[int, int, int, int]:
        """Delete the oldest records holding ``excess`` bytes; write the ``dropped`` record ``seq``
        reporting them. The previous report, if still queued, is folded into it, so a long outage
        leaves one report, not one per flush. -> (deleted rows, their bytes, records lost now,
        the report's size)."""
        freed = deleted = folded = 0
        first = None
        old = self._db.execute("SELECT body, size FROM records WHERE seq = ?", (self._report_seq,)).fetchone()
        if old:
            self._db.execute("DELETE FROM records WHERE seq = ?", (self._report_seq,))
            report = json.loads(old[0])
            folded, first, freed, deleted = report["count"], report["first_seq"], old[1], 1
        lost = 0
        through = None
        rows = self._db.execute("SELECT seq, size FROM records ORDER BY seq")
        for row_seq, size in rows:
            if freed >= excess:
                break
            first = row_seq if first is None else first
            through, freed, lost = row_seq, freed + size, lost + 1
        rows.close()
        if through is not None:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (through,))
        last_seq = through if through is not None else report["last_seq"]  # only the old report went
        body = _dumps({"count": folded + lost, "first_seq": first, "last_seq": last_seq})
        size = len(body) + RECORD_OVERHEAD
        self._db.execute("INSERT INTO records (seq, ts, kind, body, size) VALUES (?, ?, 'dropped', ?, ?)",
                         (seq, time.time(), body, size))
        self._set_meta("dropped_total", self._dropped_total + lost)
        return deleted + lost, freed, lost, size

    def _apply_drop(self, seq: int, deleted: int, freed: int, lost: int, size: int) -> None:
        self._report_seq = seq
        self._next_seq = seq + 1
        self._records += 1 - deleted
        self._bytes += size - freed
        self._dropped_total += lost
        if time.monotonic() - self._drop_logged >= 60:  # a long outage drops on every flush: log once a minute
            self._drop_logged = time.monotonic()
            log.warning("telemetry queue full (%d bytes): dropping the oldest records, %d so far",
                        self.max_bytes, self._dropped_total)

    def peek(self, max_records: int = 500, max_bytes: int = 256 << 10) -> List[dict]:
        """The oldest records, at most ``max_records`` and ``max_bytes`` (at least one record)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, ts, kind, body, size FROM records ORDER BY seq LIMIT ?",
                                    (max_records,)).fetchall()
        return _batch(rows, max_bytes)

    def peek_after(self, cursor: Optional[int], max_records: int = 500,
                   max_bytes: int = 256 << 10) -> Tuple[Optional[int], List[dict]]:
        """The oldest records above ``cursor`` (None: from the oldest), and ``after``: the largest
        seq still queued below the first of them, None when nothing older is queued (see
        ``edgeml.core.mqtt_contract``)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, ts, kind, body, size FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (-1 if cursor is None else cursor, max_records)).fetchall()
            after = self._db.execute("SELECT MAX(seq) FROM records WHERE seq < ?",
                                     (rows[0][0] if rows else 0,)).fetchone()[0] if rows else None
        return after, _batch(rows, max_bytes)

    def has_records_after(self, cursor: Optional[int]) -> bool:
        with self._lock:
            return self._has_after(cursor)

    def _has_after(self, cursor: Optional[int]) -> bool:
        return self._db.execute("SELECT EXISTS (SELECT 1 FROM records WHERE seq > ?)",
                                (-1 if cursor is None else cursor,)).fetchone()[0] == 1

    def count_through(self, seq: int) -> int:
        """How many queued records have a seq up to ``seq`` (sent, not yet acknowledged by the host)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records WHERE seq <= ?", (seq,)).fetchone()[0]

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove these records; how many were still queued."""
        return self._delete("seq IN (SELECT value FROM json_each(?))", _dumps(list(seqs)))

    def delete_through(self, seq: int) -> int:
        """Remove every record up to ``seq`` (the host committed them); how many were still queued."""
        return self._delete("seq <= ?", seq)

    def _delete(self, where: str, arg) -> int:
        with self._lock:
            sizes = self._db.execute(f"DELETE FROM records WHERE {where} RETURNING size", (arg,)).fetchall()
            self._records -= len(sizes)
            self._bytes -= sum(s for (s,) in sizes)
            return len(sizes)

    def wait_for_records(self, timeout: float, after: Optional[int] = None) -> bool:
        """Block until the queue holds a record (above seq ``after``) or ``timeout`` passes; whether it does."""
        with self._has_records:
            return self._has_records.wait_for(
                lambda: self._records > 0 and (after is None or self._next_seq - 1 > after and self._has_after(after)),
                timeout)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"records": self._records, "bytes": self._bytes,
                    "dropped_total": self._dropped_total, "next_seq": self._next_seq}

    def close(self) -> None:
        """Lower the durable ceiling to the next number, so a reopened queue continues without a gap."""
        with self._lock:
            if self._db is None:
                return
            self._db.execute("PRAGMA synchronous=FULL")
            self._set_meta("seq_ceiling", self._next_seq - 1)
            self._db.close()
            self._db = None

    def __enter__(self) -> "TelemetryQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch(rows, max_bytes: int) -> List[dict]:
    """Records from ``(seq, ts, kind, body, size)`` rows up to ``max_bytes`` (at least one)."""
    batch, total = [], 0
    for seq, ts, kind, body, size in rows:
        total += size
        if batch and total > max_bytes:
            break
        batch.append({"seq": seq, "ts": ts, "kind": kind, **json.loads(body)})
    return batch
