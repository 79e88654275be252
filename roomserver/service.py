"""``RoomServerService``: a ``twisted.application`` service around a ``WebSocketServer``.

twistd starts it with the reactor and, on SIGTERM, calls ``stopService`` and waits for the Deferred it returns,
which is what drains the clients (reconnect hint, 1001, in batches) before the process exits.

With ``freeze_heap`` (what ``twistd roomserver`` sets unless ``--no-gc-freeze``, since the process is the server's
own), everything alive once the server listens is exempted from the garbage collector's scans, and so is what
survives each full collection, thawed every ``thaw_every`` seconds, or up to ``thaw_most`` while the thaws find
little garbage (``roomserver.heap``). With ``malloc_trim_every`` (``--malloc-trim-interval``, 60 s for twistd),
C ``malloc``'s free pages go back to the system that often (``heap.MallocTrimmer``).

A start that fails (the store cannot be opened, the port is taken) logs one critical line and stops the
reactor. twistd itself has no way to exit with a status other than 0 after its reactor stopped, so with
``exit_status_on_failure`` (what ``twistd roomserver`` sets) the process ends with status 1 once twistd has
finished its own clean-up (an ``atexit`` hook: log flushed, pid file removed), and supervisors see the failure.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer

from .heap import FreezeAfterFullCollections, MallocTrimmer, freeze_startup_heap
from .server import WebSocketServer


class RoomServerService(service.Service):
    """Runs one ``WebSocketServer`` for as long as the service is running."""

    name = "roomserver"

    def __init__(self, server: WebSocketServer, exit_status_on_failure: int | None = None,
                 freeze_heap: bool = False, thaw_every: float = 900.0, thaw_most: float | None = None,
                 malloc_trim_every: float = 0.0) -> None:
        self.server = server
        self.on_listening: Callable[[], None] | None = None
        self.exit_status_on_failure = exit_status_on_failure
        self.freeze_heap = freeze_heap
        self.thaw_every = thaw_every
        self.thaw_most = thaw_most
        self.freezer: FreezeAfterFullCollections | None = None
        self.trimmer = MallocTrimmer(server.reactor, malloc_trim_every)
        self.failed = False

    def startService(self) -> None:
        super().startService()
        self._started = self.server.start()
        self._started.addCallbacks(self._listening, self._failed_to_start)

    def _listening(self, server: WebSocketServer) -> None:
        if self.freeze_heap:
            from twisted.logger import Logger

            Logger().info("froze {count} objects of the start-up heap (gc.freeze)", count=freeze_startup_heap())
            self.freezer = FreezeAfterFullCollections(self.server.reactor, self.thaw_every, self.thaw_most)
            self.freezer.start()
        self.trimmer.start()
        if self.on_listening is not None:
            self.on_listening()

    def _failed_to_start(self, failure: Any) -> None:
        from twisted.internet.error import CannotListenError
        from twisted.logger import Logger

        from .interfaces import StoreError

        if failure.check(StoreError, CannotListenError):
            # An operator's problem (a path, a permission, a port in use), not a bug: one line, no traceback.
            Logger().critical("roomserver could not start: {error}", error=failure.value)
        else:
            Logger().failure("roomserver could not start", failure)
        self.failed = True
        if self.exit_status_on_failure is not None:
            atexit.register(_exit_with, self.exit_status_on_failure)
        reactor: Any = self.server.reactor
        if reactor.running:
            reactor.stop()
        else:  # failed within startService (a port in use fails at once), before twistd ran the reactor
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self.freezer is not None:
            self.freezer.stop()
        self.trimmer.stop()
        if self.failed:
            return defer.succeed(None)  # nothing was started: _start undid what it had begun
        return self.server.stop()


def _exit_with(status: int) -> None:
    """An ``atexit`` hook of a process whose service failed to start: flush what may be buffered, then end it
    with ``status`` (registered last, it runs first: nothing after it needs to run in a process that did not
    start)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
