"""The embedded SQLite store (``--store sqlite:roomserver.db``, what ``twistd roomserver`` uses by default).

All SQL runs in threads through ``twisted.enterprise.adbapi``, so the reactor never waits for the disk:

- one **writer** connection (a pool of exactly one thread): appends, room records and pruning run there one
  after another, so appends happen in call order and their Deferreds fire in that order. Each append batch is
  one ``BEGIN IMMEDIATE`` transaction: the seq counter (``rooms.last_seq``), the messages and their msg_ids
  are committed together or not at all, so a failed append assigns no seq;
- a small pool of **reader** connections for history reads. The database is in WAL mode, so readers never
  block the writer and see every transaction committed before they start (read-your-writes).

``PATH`` may be a SQLite URI filename (``file:/var/lib/roomserver.db?...``).

``synchronous=NORMAL`` in WAL mode: a committed message survives a crash of the process (what a restart of
``twistd roomserver`` needs); only a power failure may lose the last transactions.

The history window (``history_size``, ``history_ttl``) is enforced on every read; rows outside it are deleted
on append (size) and by a periodic prune (ttl, old msg_ids), so the file stays bounded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.python.failure import Failure

from ..core.history import Appended, HistoryPage, NewMessage, page_of, with_seq
from ..interfaces import RoomRecord, StoreError
from ..periodic import every

T = TypeVar("T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
PRUNE_INTERVAL = 60.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    keep INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{}',
    last_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);
CREATE TABLE IF NOT EXISTS msg_ids (
    room TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (room, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS msg_ids_ts ON msg_ids (ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def _configure(connection: Any) -> None:
    """Called by adbapi in the pool's thread for every new connection."""
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA synchronous = NORMAL")


class SQLiteStore:
    """``Store`` in one SQLite file (see ``roomserver.interfaces.Store`` for the guarantees)."""

    def __init__(
        self,
        path: str,
        reactor: Any,
        *,
        clock: Any = None,
        history_size: int = 1000,
        history_ttl: float | None = None,
        dedupe_window: float = 300.0,
        readers: int = 2,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.dedupe_window = dedupe_window
        self._readers = readers
        self._writer: adbapi.ConnectionPool | None = None
        self._reader: adbapi.ConnectionPool | None = None
        self._pruner: task.LoopingCall | None = None
        # The last failure of the writes and of the reads, each cleared only by a success of its own kind: a
        # read that works says nothing of the writes (the database locked by another process, a full disk).
        self._errors: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _pool(self, size: int) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "sqlite3", self.path, check_same_thread=False, isolation_level=None, uri=self.path.startswith("file:"),
            cp_min=1, cp_max=size, cp_openfun=_configure, cp_noisy=False, cp_reactor=self._reactor,
        )

    @defer.inlineCallbacks
    def open(self) -> Any:
        if self._writer is not None:
            return
        if Path(self.path).is_dir():
            raise StoreError(f"cannot use the SQLite store {self.path!r}: it is a directory")
        self._writer = self._pool(1)
        try:
            yield self._write(self._create_schema)
        except StoreError:
            self._close_pools()
            raise
        self._reader = self._pool(self._readers)
        interval = PRUNE_INTERVAL if self.history_ttl is None else min(PRUNE_INTERVAL, max(self.history_ttl, 1.0))
        self._pruner = every(self._clock, interval, self.prune, "prune the SQLite store")

    def close(self) -> defer.Deferred[None]:
        if self._pruner is not None and self._pruner.running:
            self._pruner.stop()
        self._pruner = None
        self._close_pools()
        return defer.succeed(None)

    def _close_pools(self) -> None:
        for pool in (self._writer, self._reader):
            if pool is not None and pool.running:
                pool.close()
        self._writer = self._reader = None

    def _create_schema(self, db: Any) -> None:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch to WAL mode (journal_mode is {mode})")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the database has schema version {version}, newer than this roomserver's {SCHEMA_VERSION}")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # Prove the database is writable now, not at the first chat message.
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_at', ?)", (str(self._clock.seconds()),))
        db.execute("COMMIT")

    # -- running SQL in the pools' threads -------------------------------------------------------------------

    def _write(self, work: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        if self._writer is None:
            return defer.fail(StoreError(f"the SQLite store {self.path!r} is not open"))
        return self._run(self._writer, "writes", work, *args)

    def _read(self, work: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        if self._reader is None:
            return defer.fail(StoreError(f"the SQLite store {self.path!r} is not open"))
        return self._run(self._reader, "reads", work, *args)

    def _run(self, pool: adbapi.ConnectionPool, kind: str, work: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        def succeeded(result: T) -> T:
            self._errors.pop(kind, None)
            return result

        def translate(failure: Failure) -> Failure:
            self._errors[kind] = str(failure.value)
            if failure.check(sqlite3.Error):
                raise StoreError(f"SQLite store {self.path!r}: {failure.value}") from failure.value
            return failure

        # adbapi hands ``work`` its Connection wrapper, which forwards everything to the sqlite3 connection.
        d: defer.Deferred[T] = pool.runWithConnection(work, *args)
        return d.addCallbacks(succeeded, translate)

    def health(self) -> dict[str, Any]:
        """For /healthz: unhealthy while the last write or the last read failed (until one of the same kind
        succeeds again); ``error`` says which, the writes' first."""
        report: dict[str, Any] = {"backend": type(self).__name__, "ok": not self._errors, "path": self.path}
        kind = "writes" if "writes" in self._errors else next(iter(self._errors), None)
        if kind is not None:
            report["error"] = f"{kind}: {self._errors[kind]}"
        return report

    # -- Store -----------------------------------------------------------------------------------------------

    def append(self, room: str, batch: Sequence[NewMessage]) -> defer.Deferred[list[Appended]]:
        return self._write(self._append, room, list(batch), self._clock.seconds())

    def _append(self, db: Any, room: str, batch: list[NewMessage], now: float) -> list[Appended]:
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT last_seq FROM rooms WHERE name = ?", (room,)).fetchone()
            if row is None:
                db.execute("INSERT INTO rooms (name) VALUES (?)", (room,))
            last_seq = row[0] if row is not None else 0
            dedupe_from = now - self.dedupe_window
            results: list[Appended] = []
            for message in batch:
                if message.msg_id is not None:
                    seen = db.execute(
                        "SELECT m.seq, p.payload FROM msg_ids AS m LEFT JOIN messages AS p "
                        "ON p.room = m.room AND p.seq = m.seq WHERE m.room = ? AND m.msg_id = ? AND m.ts >= ?",
                        (room, message.msg_id, dedupe_from),
                    ).fetchone()
                    if seen is not None:
                        results.append(Appended(seen[0], seen[1] or b"", duplicate=True))
                        continue
                last_seq += 1
                payload = with_seq(message.body, last_seq)
                db.execute("INSERT INTO messages (room, seq, ts, payload) VALUES (?, ?, ?, ?)",
                           (room, last_seq, message.ts, payload))
                if message.msg_id is not None:
                    db.execute("INSERT OR REPLACE INTO msg_ids (room, msg_id, seq, ts) VALUES (?, ?, ?, ?)",
                               (room, message.msg_id, last_seq, message.ts))
                results.append(Appended(last_seq, payload))
            db.execute("UPDATE rooms SET last_seq = ? WHERE name = ?", (last_seq, room))
            db.execute("DELETE FROM messages WHERE room = ? AND seq <= ?", (room, last_seq - self.history_size))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return results

    def read(
        self, room: str, since: int | None = None, before: int | None = None, limit: int = 100
    ) -> defer.Deferred[HistoryPage]:
        return self._read(self._read_page, room, since, before, limit, self._clock.seconds())

    def _read_page(
        self, db: Any, room: str, since: int | None, before: int | None, limit: int, now: float
    ) -> HistoryPage:
        db.execute("BEGIN")  # one snapshot for every statement below
        try:
            row = db.execute("SELECT last_seq FROM rooms WHERE name = ?", (room,)).fetchone()
            last_seq = row[0] if row is not None else 0
            oldest_ts = now - self.history_ttl if self.history_ttl is not None else float("-inf")
            floor = last_seq - self.history_size  # the size window, even before trimming caught up
            first = db.execute("SELECT min(seq) FROM messages WHERE room = ? AND seq > ? AND ts >= ?",
                               (room, floor, oldest_ts)).fetchone()[0]
            first_seq = first if first is not None else last_seq + 1
            low = max(since if since is not None else 0, first_seq - 1)
            high = before if before is not None else last_seq + 1
            if since is not None:
                rows = db.execute(
                    "SELECT seq, payload FROM messages WHERE room = ? AND seq > ? AND seq < ? AND ts >= ? "
                    "ORDER BY seq LIMIT ?", (room, low, high, oldest_ts, limit + 1)).fetchall()
            else:
                rows = db.execute(
                    "SELECT seq, payload FROM messages WHERE room = ? AND seq > ? AND seq < ? AND ts >= ? "
                    "ORDER BY seq DESC LIMIT ?", (room, low, high, oldest_ts, limit + 1)).fetchall()
                rows.reverse()
        finally:
            db.execute("COMMIT")
        return page_of([(seq, bytes(payload)) for seq, payload in rows], since is not None, limit,
                       first_seq, last_seq)

    def save_room(self, record: RoomRecord) -> defer.Deferred[None]:
        return self._write(self._save_room, record.name, record.keep, orjson.dumps(record.meta).decode())

    @staticmethod
    def _save_room(db: Any, name: str, keep: bool, meta: str) -> None:
        db.execute("INSERT INTO rooms (name, keep, meta) VALUES (?, ?, ?) "
                   "ON CONFLICT (name) DO UPDATE SET keep = excluded.keep, meta = excluded.meta",
                   (name, int(keep), meta))

    def delete_room(self, name: str) -> defer.Deferred[None]:
        return self._write(self._delete_room, name)

    @staticmethod
    def _delete_room(db: Any, name: str) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE rooms SET keep = 0, meta = '{}' WHERE name = ?", (name,))
            db.execute("DELETE FROM messages WHERE room = ?", (name,))
            db.execute("DELETE FROM msg_ids WHERE room = ?", (name,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def load_rooms(self) -> defer.Deferred[list[RoomRecord]]:
        return self._read(self._load_rooms)

    @staticmethod
    def _load_rooms(db: Any) -> list[RoomRecord]:
        rows = db.execute("SELECT name, meta, last_seq FROM rooms WHERE keep = 1 ORDER BY name").fetchall()
        return [RoomRecord(name, True, orjson.loads(meta), last_seq) for name, meta, last_seq in rows]

    def room_idle(self, name: str) -> None:
        """History on disk stays until ``history_size``/``history_ttl`` remove it: nothing to do."""

    def room_used(self, name: str) -> None:
        """Nothing was let go: nothing to keep."""

    def prune(self) -> defer.Deferred[int]:
        """Delete messages beyond ``history_ttl`` and msg_ids beyond the dedupe window; returns rows deleted."""
        return self._write(self._prune, self._clock.seconds())

    def _prune(self, db: Any, now: float) -> int:
        deleted: int = 0
        if self.history_ttl is not None:
            deleted += int(db.execute("DELETE FROM messages WHERE ts < ?", (now - self.history_ttl,)).rowcount)
        deleted += int(db.execute("DELETE FROM msg_ids WHERE ts < ?", (now - self.dedupe_window,)).rowcount)
        return deleted
