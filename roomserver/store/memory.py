"""The in-memory store: one bounded ``RoomHistory`` per room, in this process, gone when it exits.

What ``--store memory`` and the library's default use. Every method does its work synchronously and returns a
Deferred that has already fired, so the hub's append-then-broadcast path costs no reactor turn.

A periodic sweep drops the history of rooms whose messages and msg_ids have all expired, and of rooms that have
had no member for ``idle_grace`` seconds (from ``room_idle`` unless ``room_used`` came since; the resume ttl, so
members can still resume), so churning room names cannot grow memory without bound. Only their seq counter
(one integer per room name) stays, so a seq is never reused while the process lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task

from ..core.history import Appended, HistoryPage, NewMessage, RoomHistory
from ..interfaces import RoomRecord
from ..periodic import every

SWEEP_INTERVAL = 60.0


class MemoryStore:
    """``Store`` in process memory (see ``roomserver.interfaces.Store`` for the guarantees)."""

    def __init__(
        self,
        clock: Any,
        *,
        history_size: int = 1000,
        history_ttl: float | None = None,
        dedupe_window: float = 300.0,
        idle_grace: float = 120.0,
    ) -> None:
        self._clock = clock
        self.idle_grace = idle_grace
        self._idle_since: dict[str, float] = {}
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.dedupe_window = dedupe_window
        self._histories: dict[str, RoomHistory] = {}
        self._last_seqs: dict[str, int] = {}  # rooms whose history was swept away
        self._records: dict[str, RoomRecord] = {}
        self._sweeper: task.LoopingCall | None = None

    def __repr__(self) -> str:
        return "MemoryStore()"

    def open(self) -> defer.Deferred[None]:
        if self._sweeper is None:
            self._sweeper = every(self._clock, SWEEP_INTERVAL, self.sweep, "sweep the memory store")
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        return defer.succeed(None)

    def append(self, room: str, batch: Sequence[NewMessage]) -> defer.Deferred[list[Appended]]:
        return defer.succeed(self.append_now(room, batch))

    def append_now(self, room: str, batch: Sequence[NewMessage]) -> list[Appended]:
        """``append`` without the Deferred: what the hub's hot path calls (``interfaces.SyncAppend``)."""
        self._idle_since.pop(room, None)
        history = self._history(room)
        return [history.append(message) for message in batch]

    def read(
        self, room: str, since: int | None = None, before: int | None = None, limit: int = 100
    ) -> defer.Deferred[HistoryPage]:
        history = self._histories.get(room)
        if history is None:
            last_seq = self._last_seqs.get(room, 0)
            return defer.succeed(HistoryPage((), False, last_seq + 1, last_seq))
        return defer.succeed(history.read(since, before, limit, self._clock.seconds()))

    def save_room(self, record: RoomRecord) -> defer.Deferred[None]:
        self._records[record.name] = RoomRecord(record.name, record.keep, dict(record.meta))
        return defer.succeed(None)

    def delete_room(self, name: str) -> defer.Deferred[None]:
        self._records.pop(name, None)
        self._idle_since.pop(name, None)
        history = self._histories.pop(name, None)
        if history is not None:
            self._last_seqs[name] = history.last_seq
        return defer.succeed(None)

    def load_rooms(self) -> defer.Deferred[list[RoomRecord]]:
        return defer.succeed([
            RoomRecord(record.name, True, dict(record.meta), self._last_seq(record.name))
            for record in self._records.values() if record.keep
        ])

    def room_idle(self, name: str) -> None:
        if name in self._histories:
            self._idle_since[name] = self._clock.seconds()

    def room_used(self, name: str) -> None:
        self._idle_since.pop(name, None)

    def sweep(self) -> int:
        """Expire old messages and msg_ids everywhere; drop histories left empty and those of rooms idle for
        ``idle_grace``. Returns how many histories were dropped."""
        now = self._clock.seconds()
        dropped = 0
        for name, since in list(self._idle_since.items()):
            if now - since >= self.idle_grace:
                del self._idle_since[name]
                history = self._histories.pop(name, None)
                if history is not None:
                    self._last_seqs[name] = history.last_seq
                    dropped += 1
        for name, history in list(self._histories.items()):
            history.expire(now)
            if history.is_empty():
                self._last_seqs[name] = history.last_seq
                del self._histories[name]
                dropped += 1
        return dropped

    def _history(self, room: str) -> RoomHistory:
        history = self._histories.get(room)
        if history is None:
            history = RoomHistory(self.history_size, self.history_ttl, self.dedupe_window,
                                  last_seq=self._last_seqs.pop(room, 0))
            self._histories[room] = history
        return history

    def _last_seq(self, room: str) -> int:
        history = self._histories.get(room)
        return history.last_seq if history is not None else self._last_seqs.get(room, 0)
