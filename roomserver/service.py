"""``RoomServerService``: a ``twisted.application`` service around a ``WebSocketServer``.

twistd starts it with the reactor and, on SIGTERM, calls ``stopService`` and waits for the Deferred it returns,
which is what gives every client its 1001 close before the process exits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer

from .server import WebSocketServer


class RoomServerService(service.Service):
    """Runs one ``WebSocketServer`` for as long as the service is running."""

    name = "roomserver"

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.on_listening: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._started = self.server.start()
        self._started.addCallbacks(self._listening, self._failed_to_start)

    def _listening(self, server: WebSocketServer) -> None:
        if self.on_listening is not None:
            self.on_listening()

    def _failed_to_start(self, failure: Any) -> None:
        from twisted.logger import Logger

        from .interfaces import StoreError

        if failure.check(StoreError):
            # An operator's problem (a path, a permission), not a bug: one clear line, no traceback.
            Logger().critical("roomserver could not start: {error}", error=failure.value)
        else:
            Logger().failure("roomserver could not start", failure)
        reactor: Any = self.server.reactor
        if reactor.running:
            reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.server.stop()
