"""``Client``: the application's handle on one WebSocket connection (the seed API's ``client``).

It wraps the Autobahn protocol instead of being it, because Autobahn's protocol classes already own an
``on()``/``fire()`` event system with other semantics. Everything here is safe to call after the connection
closed: sends are then ignored and return False.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .core.auth import Identity
from .core.codecs import Codec
from .core.errors import CloseCode
from .core.messages import encode
from .core.ratelimit import ErrorBudget
from .events import EventEmitter

if TYPE_CHECKING:
    from .server import WebSocketServer
    from .websocket import RoomServerProtocol

CLIENT_EVENTS = frozenset({"message", "close"})


def serialize(message: Any) -> tuple[bytes, bool]:
    """Turn an application message into (payload, is_binary): bytes go as binary frames, str as text as-is,
    anything else as JSON text."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message), True
    if isinstance(message, str):
        return message.encode("utf-8"), False
    return encode(message), False


class Client:
    """One connected client: ``id``, ``rooms``, ``send``, ``close`` and its ``message``/``close`` events."""

    __slots__ = (
        "__weakref__",
        "_events",
        "_protocol",
        "_server",
        "address",
        "auth_deadline",
        "claiming",
        "close_code",
        "close_reason",
        "codec",
        "error_budget",
        "expiry",
        "id",
        "identity",
        "inbox",
        "inbox_paused",
        "peer",
        "request",
        "subprotocol",
    )

    def __init__(self, protocol: RoomServerProtocol, server: WebSocketServer, request: Any = None) -> None:
        self.id: str = secrets.token_urlsafe(16)
        self._protocol: RoomServerProtocol | None = protocol
        self._server = server
        self._events = EventEmitter(CLIENT_EVENTS)
        self.request = request
        self.peer: str = getattr(protocol, "peer", "")
        self.address: str = getattr(protocol, "client_address", "")
        """The client's IP address: its TCP peer's, or behind ``trusted_proxies`` the one they forwarded."""
        self.close_code: int | None = None
        """Set when the connection ended: the code of the close that ended it, the server's when the server
        closed first (1002 for a protocol violation, 1008, 1009, 1001 when draining...), else the client's,
        1006 for a connection lost without a close frame."""
        self.close_reason: str | None = None
        self.identity: Identity | None = getattr(protocol, "identity", None)
        """Who the client is (None until it authenticated, when authentication is on)."""
        self.subprotocol: str | None = getattr(protocol, "subprotocol", None)
        self.codec: Codec = server.codecs.get(self.subprotocol)
        self.auth_deadline: Any = None
        self.claiming = False
        """A resume waits for the cluster's claim of its session: later messages wait in ``inbox``, in order."""
        self.error_budget: ErrorBudget | None = None
        """Client-caused error replies left before a 1008 close (None: no limit)."""
        self.expiry: Any = None
        self.inbox: deque[tuple[bytes, bool]] | None = None
        """Messages waiting while an asynchronous authorization decision is pending (order is kept)."""
        self.inbox_paused = False
        """The connection is not read while its ``inbox`` holds more than ``access.INBOX_PAUSE`` bytes."""

    def __repr__(self) -> str:
        return f"<Client {self.id} {self.peer}{'' if self.open else ' closed'}>"

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register a handler: ``message`` gets the data (str for text, bytes for binary); ``close`` gets no
        arguments (``close_code`` and ``close_reason`` say why)."""
        return self._events.on(event, handler) if handler is not None else self._events.on(event)

    def reading(self, on: bool) -> None:
        """Read the connection's socket again (``on``), or stop reading it: what the peer sends then waits in
        the kernel's buffers and, once they are full, in the peer's (TCP's own flow control)."""
        transport: Any = self._protocol.transport if self._protocol is not None else None
        tcp = getattr(transport, "transport", transport)  # under a GuardedConnection: the TCP transport
        if tcp is not None:
            (tcp.resumeProducing if on else tcp.pauseProducing)()

    @property
    def open(self) -> bool:
        return self._protocol is not None and self._protocol.accepts_data

    @property
    def user(self) -> str:
        """The user behind this connection: the token's ``sub``, or the client id when anonymous."""
        return self.identity.user if self.identity is not None else self.id

    @property
    def rooms(self) -> frozenset[str]:
        """Names of the rooms this client is in."""
        return self._server.registry.rooms_of(self)

    def send(self, message: Any) -> bool:
        """Send one message: bytes as binary, str as text, anything else encoded with the client's codec (JSON
        text by default, msgpack binary for ``roomserver.msgpack.v1`` clients). False if closed."""
        if self.codec is not self._server.json_codec and not isinstance(message, (bytes, bytearray, memoryview, str)):
            return self._server.send_payload(self, self.codec.encode(message), self.codec.binary, encoded=True)
        payload, is_binary = serialize(message)
        return self._server.send_payload(self, payload, is_binary)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake with ``code`` (any valid close code, 1001/1008/1011 included)."""
        if self._protocol is not None:
            self._protocol.close_with(code, reason)

    # -- used by the server ----------------------------------------------------------------------------------

    def _detach(self) -> None:
        self._protocol = None


def __getattr__(name: str) -> Any:
    """``from roomserver.client import RoomClient`` also finds the Python *client* (``roomserver.roomclient``):
    this module already names the server's handle on a connection, so the client lives next door."""
    if name in ("RoomClient", "RoomClientError"):
        from . import roomclient

        return getattr(roomclient, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
