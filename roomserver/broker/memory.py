"""The single-process broker: there are no other nodes, so there is nothing to carry.

The hub delivers every chat to its local members itself, straight after the store assigned its seq; this
broker keeps the subscription bookkeeping (so the seam behaves the same with one node) and always reports
healthy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer


class MemoryBroker:
    """``Broker`` for one process (see ``roomserver.interfaces.Broker``)."""

    name = "memory"
    clustered = False

    def __init__(self) -> None:
        self.rooms: set[str] = set()

    def start(self, on_message: Callable[[str, int, bytes], None], on_resubscribed: Callable[[], None],
              on_subscribed: Callable[[str], None]) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        self.rooms.clear()
        return defer.succeed(None)

    def subscribe(self, room: str) -> None:
        self.rooms.add(room)

    def unsubscribe(self, room: str) -> None:
        self.rooms.discard(room)

    def publish(self, room: str, seq: int, payload: bytes) -> defer.Deferred[None]:
        return defer.succeed(None)

    def health(self) -> dict[str, Any]:
        return {"backend": "memory", "ok": True}
