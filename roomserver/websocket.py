"""The thin Autobahn adapter: a protocol and a factory that forward everything to the server's hub.

No room logic lives here. Each callback says who calls it: Autobahn calls ``onConnect`` during the opening
handshake, ``onOpen`` once it completed, ``onMessage`` per complete message and ``onClose`` exactly once per
connection, including connections that never opened (so the hub's cleanup must be idempotent).

The factory is configured explicitly for every Autobahn default that would be wrong for a public server:
observable close codes (``failByDrop=False``), size limits, timeouts, heartbeats and whether permessage-deflate
is negotiated (``compression.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.util import extract_peer_certificate, transport_channel_id
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol

from . import autobahn_debug
from .closing import DeafAfterFailure, GracefulCloseMixin, ReleasedOnClose
from .compression import compression_hook
from .core.ratelimit import FloodGuard
from .inframe import whole_frame
from .options import ServerOptions
from .transport import GuardedConnection

if TYPE_CHECKING:
    from .client import Client
    from .server import WebSocketServer

autobahn_debug.install()

STATE_OPEN = WebSocketProtocol.STATE_OPEN


def _valid_utf8(payload: bytes) -> bool:
    """RFC 3629 UTF-8, as WebSocket text requires (Python's strict decoder rejects overlongs and surrogates)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Codes the peer-facing ``sendClose`` refuses (it only takes 1000 and 3000-4999) but a server must send.
_PROTOCOL_LEVEL_CODES = frozenset({1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class RoomServerProtocol(DeafAfterFailure, GracefulCloseMixin, ReleasedOnClose,  # type: ignore[misc]
                         WebSocketServerProtocol):
    """One WebSocket connection; ``client`` is the application's handle once the connection is open.

    ``GracefulCloseMixin`` makes sure the peer receives our close frame when its own close frame was invalid;
    ``DeafAfterFailure`` stops parsing what a peer sends after the server failed its connection."""

    factory: RoomServerFactory
    client: Client | None = None
    admitted: bool = False
    http_request: Any = None
    client_address = ""  # the client's IP: the TCP peer's, or the nearest untrusted X-Forwarded-For hop
    fragments: int = 0
    flood: FloodGuard | None = None
    refused_status: int | None = None  # the HTTP status of a ConnectionDeny raised by the hub, if any
    identity: Any = None  # the Identity proven in the handshake, if any
    subprotocol: str | None = None  # the negotiated Sec-WebSocket-Protocol, if any

    @property
    def accepts_data(self) -> bool:
        return bool(self.state == WebSocketProtocol.STATE_OPEN)

    def onConnect(self, request: Any) -> Any:
        """Called from Autobahn with the parsed upgrade request; raising ConnectionDeny refuses it."""
        return self.factory.hub.on_connect(self, request)

    def connectionMade(self) -> None:
        """Called from Twisted. Autobahn reads the transport's details (peer, TLS) here and only recognises TLS
        on the TLS protocol itself; our transport is the connection guard wrapping it (transport.py), which
        mirrors its interfaces. So Autobahn reads them from what the guard wraps, and writes still go through
        the guard afterwards."""
        guard = self.transport
        inner = getattr(guard, "transport", None)
        if not isinstance(guard, GuardedConnection) or inner is None:
            super().connectionMade()
            return
        self.transport = inner
        try:
            super().connectionMade()
        finally:
            self.transport = guard

    def _onOpen(self) -> None:
        """Called from Autobahn's Twisted layer once the handshake succeeded; it records the TLS channel id and
        peer certificate, which it can only read from the TLS protocol itself. Our transport is the connection
        guard wrapping it (transport.py), so look through the guard; then go on as Autobahn does."""
        details: Any = self._transport_details
        if details.is_secure:
            tls = getattr(self.transport, "transport", self.transport)
            details.channel_id = {"tls-unique": transport_channel_id(tls, details.is_server, "tls-unique")}
            details.peer_cert = extract_peer_certificate(tls)
        self.onOpen()

    def onOpen(self) -> None:
        """Called from Autobahn once the opening handshake succeeded."""
        self.factory.hub.on_open(self)

    def dataReceived(self, data: bytes) -> None:
        """Called from Twisted with every read. The common frames, whole chat-sized ones (``inframe``), are handed
        to ``onMessage`` here, one after another, with the bookkeeping Autobahn would do for each (traffic
        counters, the auto-ping restart, UTF-8 validation). From the first byte that is not such a frame (a
        partial frame, a control frame, invalid UTF-8), the rest of the read goes to Autobahn, as it does in any
        state in which Autobahn's frame machine holds something (a partial frame, a fragmented message,
        compression, frame logging, protocol-level listeners) or the connection is no longer open: the state is
        checked again after every message, since handling one can close the connection."""
        start = 0
        max_payload = self.factory.inframe_max_payload
        while (self.state == STATE_OPEN and not self.data and self.current_frame is None and not self.inside_message
               and self._perMessageCompress is None and self.applyMask and not self.logFrames
               and not self.logOctets and not self.trackedTimings and not self._listeners and not self.failedByMe):
            frame = whole_frame(data, start, max_payload)
            if frame is None:
                break
            is_binary, payload, end = frame
            if not is_binary and self.utf8validateIncoming and not _valid_utf8(payload):
                break  # Autobahn fails the connection with 1007
            stats = self.trafficStats
            stats.incomingOctetsWireLevel += end - start
            stats.incomingOctetsWebSocketLevel += len(payload)
            stats.incomingOctetsAppLevel += len(payload)
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            start = end
            self.onMessage(payload, is_binary)
            if start == len(data):
                return
        super().dataReceived(data[start:] if start else data)

    def onMessageBegin(self, isBinary: bool) -> None:
        """Called from Autobahn when a message starts; counts its frames from here."""
        self.fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        """Called from Autobahn per frame of a message: caps the number of frames (zero-length continuation
        frames cost the server work but never reach the size limits)."""
        self.fragments += 1
        if self.fragments > self.factory.max_fragments and not self.failedByMe:
            self.factory.hub.counters.dropped("too_many_fragments")
            self._fail_connection(1008, f"message split into more than {self.factory.max_fragments} frames")
            return
        super().onMessageFrameBegin(length)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Called from Autobahn with one complete, size-checked, UTF-8-validated message."""
        self.factory.hub.on_message(self, payload, isBinary)

    def sendMessage(self, payload: bytes, isBinary: bool = False, fragmentSize: int | None = None,
                    sync: bool = False, doNotCompress: bool = False) -> None:
        """Autobahn's, without its check of what we send against ``maxMessagePayloadSize``.

        That limit is ``max_message_size``: what a client may send (close 1009 beyond it). What the server sends
        is bigger at times, by design: a chat accepted at the limit becomes an event with ``from`` and ``seq``
        added, and a history page holding it is larger still. Autobahn raised ``PayloadExceededError`` for such a
        message wherever it went through ``sendMessage`` (a history reply, a replay), and the reply or the rest of
        the replay was lost; the pre-framed fan-out had sent the same event to every member all the same."""
        limit: int = self.maxMessagePayloadSize  # type: ignore[has-type]
        self.maxMessagePayloadSize = 0
        try:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
        finally:
            self.maxMessagePayloadSize = limit

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Called from Autobahn exactly once, for every connection, opened or not."""
        self.factory.hub.on_close(self, wasClean, code, reason)

    def close_with(self, code: int, reason: str = "") -> None:
        """Start a closing handshake with any code a server may send (Autobahn's ``sendClose`` refuses 1001,
        1008, 1009 and 1011, so those go through ``sendCloseFrame``)."""
        if self.state != WebSocketProtocol.STATE_OPEN:
            if self.state == WebSocketProtocol.STATE_CONNECTING:
                self.dropConnection(abort=True)
            return
        if code in _PROTOCOL_LEVEL_CODES:
            # At most 123 bytes of reason fit a close frame; cut at a character boundary, as sendClose does.
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)
        else:
            self.sendClose(code=code, reason=reason or None)

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        self.wasClean = False
        self.wasNotCleanReason = "aborted by the server"
        self.dropConnection(abort=True)


class RoomServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    """Creates one ``RoomServerProtocol`` per connection; holds the server-wide room registry and stats."""

    protocol = RoomServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, hub: WebSocketServer, options: ServerOptions, url: str | None = None) -> None:
        super().__init__(url=url, server="roomserver", reactor=hub.reactor)
        self.hub = hub
        self.registry = hub.registry
        self.stats = hub.counters
        self.configure(options)

    def configure(self, options: ServerOptions) -> None:
        """Set every Autobahn protocol option explicitly (its defaults suit a demo, not a public server).

        Origins are checked by the hub (``core.origins``), which also knows "same origin"; Autobahn's own check
        is left open so the two never disagree.
        """
        self.max_fragments = options.max_fragments
        limits = [limit for limit in (options.effective_max_frame_size, options.max_message_size) if limit > 0]
        self.inframe_max_payload = min(limits) if limits else 0
        """What ``RoomServerProtocol.dataReceived`` reads itself at most: beyond it Autobahn reads (and refuses)."""
        self.setProtocolOptions(
            webStatus=False,
            utf8validateIncoming=True,
            requireMaskedClientFrames=True,
            maskServerFrames=False,
            applyMask=True,
            maxFramePayloadSize=options.effective_max_frame_size,
            maxMessagePayloadSize=options.max_message_size,
            autoFragmentSize=0,
            failByDrop=False,
            echoCloseCodeReason=False,
            openHandshakeTimeout=options.open_handshake_timeout,
            closeHandshakeTimeout=options.close_handshake_timeout,
            tcpNoDelay=True,
            autoPingInterval=options.ping_interval,
            autoPingTimeout=options.effective_ping_timeout if options.ping_interval else 0,
            autoPingSize=12,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxConnections=0,
            perMessageCompressionAccept=compression_hook(options.compression, options.max_message_size),
        )
