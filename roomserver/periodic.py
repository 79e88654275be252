"""``every``: periodic housekeeping that survives a failing run.

Twisted's ``LoopingCall`` stops for good at the first run that raises or returns a failed Deferred. For the
store's prune, the memory store's sweep and the resume-session sweep that meant one transient failure (a SQLite
lock held past ``busy_timeout``, a disk I/O error, a bug hit once) and nothing was pruned or swept again while
the process lived: msg_ids, expired messages and sessions grew without bound (and the dashboard's sampler froze),
and nothing said so. Here each failure is logged (a ``StoreError`` as one warning line, at most every few
seconds, through ``OutageLog``; anything else with its traceback) and the next run comes on schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .outagelog import OutageLog


def every(clock: Any, interval: float, work: Callable[[], Any], what: str, log: Logger | None = None, *,
          now: bool = False) -> task.LoopingCall:
    """Start running ``work`` every ``interval`` seconds on ``clock`` (the first run at once if ``now``, else after
    one interval); ``what`` names it in the log ("prune the SQLite store"). ``stop()`` the returned loop to end
    it."""
    outages = OutageLog(log or Logger(namespace="roomserver.periodic"), clock)
    message = f"could not {what}; trying again in {interval:g} s"

    def run() -> Any:
        try:
            result = work()
        except Exception:
            outages.failed(message, Failure())
            return None
        if isinstance(result, defer.Deferred):
            return result.addErrback(lambda failure: outages.failed(message, failure))
        return result

    loop = task.LoopingCall(run)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop
