"""``OutageLog``: how the hub logs its store's failures without burying the log while the store is away.

While Redis is unreachable (or a SQLite file is locked) every chat fails the same way, and each used to log
its own traceback: a thousand chats a second made a thousand tracebacks a second, hiding everything else and
costing more than the chats. A ``StoreError`` is an expected failure with a message written for operators, so
it is logged as one warning line, without a traceback, at most once per ``interval`` seconds for each kind of
operation, saying how many more failed since the last line. Anything else is a bug: it keeps its traceback,
every time.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from .interfaces import StoreError

INTERVAL = 5.0


class OutageLog:
    """Logs store failures through ``log``; ``clock`` is anything with ``seconds()`` (the reactor)."""

    def __init__(self, log: Logger, clock: Any, interval: float = INTERVAL) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}  # what -> when its last line was logged
        self._unsaid: dict[str, int] = {}  # what -> failures since that line

    def failed(self, what: str, failure: Failure, **fields: Any) -> None:
        """Log that ``what`` (a format string, e.g. "could not store a message for room {room}") failed."""
        if not failure.check(StoreError):
            self.log.failure(what, failure, **fields)
            return
        now = self.clock.seconds()
        last = self._last.get(what)
        if last is not None and now - last < self.interval:
            self._unsaid[what] = self._unsaid.get(what, 0) + 1
            return
        self._last[what] = now
        unsaid = self._unsaid.pop(what, 0)
        since = f" ({unsaid} more like it in the last {now - last:.0f} s)" if unsaid and last is not None else ""
        self.log.warn(what + ": {error}{since}", error=failure.getErrorMessage(), since=since, **fields)
