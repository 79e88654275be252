"""``roomserver.periodic.every``: housekeeping keeps its schedule through failing runs (fake clock); the SQLite
store's prune is one such job, seen here going on after a lock made one run fail."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent

from roomserver.core.history import NewMessage
from roomserver.core.messages import chat_body
from roomserver.interfaces import StoreError
from roomserver.periodic import every
from roomserver.store.sqlite import SQLiteStore


def test_a_run_that_raises_or_fails_is_logged_and_the_next_comes_on_time() -> None:
    clock = task.Clock()
    runs: list[float] = []
    outcomes: list[Any] = [RuntimeError("a bug hit once"), defer.fail(StoreError("database is locked")), None]

    def work() -> Any:
        runs.append(clock.seconds())
        outcome = outcomes.pop(0) if outcomes else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    events: list[dict[str, Any]] = []
    loop = every(clock, 60, work, "do the chores", log=Logger(observer=cast(ILogObserver, events.append)))
    clock.advance(0)
    assert runs == [], "the first run comes after one interval"
    for _ in range(4):
        clock.advance(60)
    loop.stop()
    assert runs == [60, 120, 180, 240]
    said = [(event["log_level"], formatEvent(event)) for event in events]
    assert said == [(LogLevel.critical, "could not do the chores; trying again in 60 s"),
                    (LogLevel.warn, "could not do the chores; trying again in 60 s: database is locked")]
    assert "a bug hit once" in events[0]["log_failure"].getErrorMessage(), "a bug keeps its traceback"
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_the_sqlite_prune_goes_on_after_a_run_failed(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    store = SQLiteStore(str(tmp_path / "prune.db"), reactor, clock=clock, dedupe_window=30)
    await store.open()
    try:
        prune = store._prune
        failures = [sqlite3.OperationalError("database is locked")]

        def locked_once(db: Any, now: float) -> int:
            if failures:
                raise failures.pop()
            return prune(db, now)

        store._prune = locked_once  # type: ignore[method-assign]
        await store.append("r", [NewMessage(chat_body("r", "alice", "hi", "m-1"), "m-1", clock.seconds())])
        clock.advance(61)  # the first prune: locked
        await store._write(lambda db: None)  # the writer thread has done it
        assert not failures
        clock.advance(60)  # the next one still comes, and the msg_id past the dedupe window goes
        await store._write(lambda db: None)
        rows = await store._read(lambda db: db.execute("SELECT COUNT(*) FROM msg_ids").fetchone()[0])
        assert rows == 0
    finally:
        await store.close()
