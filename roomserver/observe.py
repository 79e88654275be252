"""Observers: how metrics, logs and the dashboard learn what the hub does, without living inside it.

The hub (``server.py``) calls a handful of hooks on ``server.observers`` at the moments that matter: started,
stopping, a connection opened or closed, an opening handshake that failed, a broadcast done. Everything that
only counts messages reads ``server.get_stats()`` when asked (a scrape, a dashboard tick) instead of being told
about each message, so the per-message cost of observing stays at one ``perf_counter`` pair and one histogram
observation per *broadcast*, never per recipient.

An observer that raises is logged and otherwise ignored: monitoring must never take down a connection.

``ConnectionLog`` is the observer behind the structured connection log: one ``info`` event when a connection
opens and one when it closes, with its close code, reason and duration. It never logs request headers or the
query string, where tokens travel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

if TYPE_CHECKING:
    from .client import Client
    from .core.rooms import Room
    from .server import WebSocketServer
    from .websocket import RoomServerProtocol

# Labels of failed opening handshakes, by the HTTP status the hub refused them with.
REFUSAL_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    429: "rate_limited",
    503: "unavailable",
}


def handshake_failure_reason(protocol: RoomServerProtocol) -> str:
    """A short, bounded label saying why a connection never completed its opening handshake."""
    status = protocol.refused_status
    if status is not None:
        return REFUSAL_REASONS.get(status, f"http_{status}")
    detail = str(getattr(protocol, "wasNotCleanReason", "") or "").lower()
    if "timeout" in detail:
        return "timeout"
    if detail:
        return "invalid_request"
    return "aborted"  # the peer went away before sending a complete request


class ServerObserver:
    """The hooks the hub calls; every one does nothing here, so observers override only what they need."""

    def started(self, server: WebSocketServer) -> None:
        """The server is listening."""

    def stopping(self, server: WebSocketServer) -> None:
        """``stop()`` began: no new connections are accepted."""

    def connection_opened(self, client: Client) -> None:
        """A WebSocket connection completed its opening handshake."""

    def connection_closed(self, client: Client, was_clean: bool) -> None:
        """An open connection ended; ``client.close_code`` and ``client.close_reason`` say how."""

    def handshake_failed(self, protocol: RoomServerProtocol) -> None:
        """A connection ended before its opening handshake completed (refused, timed out, invalid)."""

    def broadcast_done(self, room: Room, recipients: int, seconds: float) -> None:
        """One broadcast was framed and written to ``recipients`` members in ``seconds``."""


class Observers(ServerObserver):
    """The hub's list of observers; it calls each one and isolates their failures."""

    log = Logger()

    def __init__(self) -> None:
        self._observers: list[ServerObserver] = []

    def __bool__(self) -> bool:
        return bool(self._observers)

    def __iter__(self) -> Any:
        return iter(tuple(self._observers))

    def add(self, observer: ServerObserver) -> ServerObserver:
        self._observers.append(observer)
        return observer

    def remove(self, observer: ServerObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _call(self, hook: str, *args: Any) -> None:
        for observer in tuple(self._observers):
            try:
                getattr(observer, hook)(*args)
            except Exception:
                self.log.failure("observer {observer!r} failed in {hook}", observer=observer, hook=hook)

    def started(self, server: WebSocketServer) -> None:
        self._call("started", server)

    def stopping(self, server: WebSocketServer) -> None:
        self._call("stopping", server)

    def connection_opened(self, client: Client) -> None:
        self._call("connection_opened", client)

    def connection_closed(self, client: Client, was_clean: bool) -> None:
        self._call("connection_closed", client, was_clean)

    def handshake_failed(self, protocol: RoomServerProtocol) -> None:
        self._call("handshake_failed", protocol)

    def broadcast_done(self, room: Room, recipients: int, seconds: float) -> None:
        for observer in self._observers:
            try:
                observer.broadcast_done(room, recipients, seconds)
            except Exception:
                self.log.failure("observer {observer!r} failed in broadcast_done", observer=observer)


class ConnectionLog(ServerObserver):
    """One structured log event per connection open and per close (with code, reason and duration).

    Events carry their data as fields (``event="connection_closed"``, ``client``, ``code``...), so the JSON
    log format (``--log-format json``) turns them into machine-readable lines. The opening time is kept here,
    per open connection (the ``Client`` itself is the key: a connection that continues a cluster session takes
    the session's client id after it opened), and forgotten at close.
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._opened_at: dict[Client, float] = {}

    def connection_opened(self, client: Client) -> None:
        self._opened_at[client] = self._reactor.seconds()
        self.log.info("connection {client} opened from {address} ({peer})", event="connection_opened",
                      client=client.id, address=client.address, peer=client.peer)

    def connection_closed(self, client: Client, was_clean: bool) -> None:
        opened = self._opened_at.pop(client, None)
        duration = round(self._reactor.seconds() - opened, 3) if opened is not None else None
        self.log.info(
            "connection {client} closed: code {code} ({reason}) after {duration}s, clean={clean}",
            event="connection_closed", client=client.id, peer=client.peer, code=client.close_code,
            reason=client.close_reason or "", duration=duration, clean=was_clean,
        )

    def handshake_failed(self, protocol: RoomServerProtocol) -> None:
        self.log.info("handshake from {peer} failed: {reason}", event="handshake_failed",
                      peer=getattr(protocol, "peer", ""), reason=handshake_failure_reason(protocol))
