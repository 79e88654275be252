"""Per-connection guards below the WebSocket layer: the HTTP handshake deadline and the send-buffer watch.

``HandshakeDeadlineChannel`` is the HTTP channel of the site. A connection gets ``open_handshake_timeout``
seconds to deliver a complete request head, however slowly it trickles bytes (slowloris): Twisted's own channel
timeout is an idle timeout that every byte resets, and Autobahn's handshake timeout only starts once
``twisted.web`` has handed the connection over. The head is also capped at ``max_handshake_size`` bytes.

``GuardedConnection`` wraps every TCP connection (see ``web.TrackingFactory``). Once the connection is a
WebSocket, ``watch_send_buffer`` registers a push producer with the real transport: Twisted pauses it when the
kernel stops taking our bytes and its own buffer passes its threshold, and resumes it when the buffer drained.
Every byte written while paused (broadcasts, replies, pongs alike) is counted; once the estimate passes
``max_send_buffer`` the client is a slow consumer and ``on_overflow`` runs once. Memory per client is thereby
bounded whether a client stops reading or floods pings it never reads the pongs of.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer

# Twisted's FileDescriptor pauses its producer once more than this many bytes wait in its own buffer.
TWISTED_WRITE_THRESHOLD = 2**16
MAX_BODY = 64 * 1024  # the largest request body any resource here takes (the admin API's JSON)
CHUNK_FRAMING = 4096  # what a chunked body's framing may add to it before it is counted as too large
LINGER = 2.0  # seconds a refused request's connection drains what the peer still sends, after our answer


@implementer(IPushProducer)
class SendBufferWatch:
    """Registered with the real transport; counts what is queued while Twisted says the peer is not reading."""

    __slots__ = ("limit", "on_overflow", "paused", "queued", "tripped")

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.paused = False
        self.queued = 0
        self.tripped = False

    def pauseProducing(self) -> None:
        # Twisted calls this on every write while its buffer is over the threshold: only the first call counts.
        if not self.paused:
            self.paused = True
            self.queued = TWISTED_WRITE_THRESHOLD

    def resumeProducing(self) -> None:
        self.paused = False
        self.queued = 0

    def stopProducing(self) -> None:
        self.paused = False

    def wrote(self, size: int) -> None:
        self.queued += size
        if self.queued > self.limit and not self.tripped:
            self.tripped = True
            self.on_overflow()


def send_now(transport: Any, data: bytes) -> bytes:
    """Hand ``data`` to the kernel at once when Twisted has nothing queued for this socket; return what the kernel
    did not take (the caller then writes it through Twisted's buffer, in order, as before).

    Twisted's own ``write`` only queues the bytes and registers the socket with epoll for writing; the send
    happens in the next poll, and the socket is unregistered again: two ``epoll_ctl`` calls and a pass through
    the reactor's dispatch for every flush. When a member gets one message per reactor iteration (many small
    rooms, a fixed low rate), or a Redis connection one command, that is most of a write's cost. The order of
    bytes is kept: this path is taken only when Twisted's buffers are empty. ``transport`` must be a plain TCP
    ``tcp.Connection`` (TLS must go through the TLS layer); never once the connection is closing.
    """
    if transport.disconnecting or not transport.connected or transport.dataBuffer or transport._tempDataBuffer:
        return data
    try:
        sent = transport.socket.send(data)
    except OSError:
        # EAGAIN (the kernel buffer is full), or the connection broke: Twisted's buffer takes the bytes, and
        # its next write attempt finds and reports the error the usual way.
        return data
    return data[sent:] if sent < len(data) else b""


def is_plain_tcp(transport: Any) -> bool:
    """Whether ``send_now`` may write to ``transport`` (a TCP connection with no TLS layer)."""
    return isinstance(transport, tcp.Connection) and not transport.TLS


class DirectWriteTransport:
    """A plain TCP transport whose ``write`` goes straight to the socket when Twisted has nothing queued
    (``send_now``); everything else is the transport's own. For a client protocol that writes through
    ``self.transport`` (txredisapi: one ``write`` per Redis command)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        rest = send_now(self._transport, data)
        if rest:
            self._transport.write(rest)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class WriteBatcher:
    """Flushes every connection that has batched bytes once, at the end of the current reactor iteration.

    ``reactor.callLater(0, ...)`` runs in the reactor's next ``runUntilCurrent``, which comes after all the I/O
    events of the current iteration and before the next poll: everything written to a connection while
    handling them (a burst of broadcasts, replies, pongs) leaves in one ``send``, as uWebSockets' "cork" does.

    An iteration can be long: in a reconnect storm one poll returns thousands of new connections, each a
    handshake of a few hundred microseconds, and the first client's welcome would wait for the last one's
    handshake. So the batch is held at most ``max_hold`` seconds: every ``CHECK_EVERY`` connections added, a
    batch older than that leaves at once (the end-of-iteration flush still comes for the rest). ``max_hold``
    is well above a fan-out iteration (a few chats to 1,000 members take a few milliseconds), so big-room
    batching is untouched.
    """

    CHECK_EVERY = 32

    __slots__ = ("dirty", "max_hold", "reactor", "scheduled", "started")

    def __init__(self, reactor: Any, max_hold: float = 0.02) -> None:
        self.reactor = reactor
        self.dirty: list[GuardedConnection] = []
        self.scheduled = False
        self.started = 0.0
        self.max_hold = max_hold

    def add(self, connection: GuardedConnection) -> None:
        dirty = self.dirty
        dirty.append(connection)
        if not self.scheduled:
            self.scheduled = True
            self.started = self.reactor.seconds()
            self.reactor.callLater(0, self.flush)
        elif not len(dirty) % self.CHECK_EVERY:
            now = self.reactor.seconds()
            if now - self.started > self.max_hold:
                self._flush_dirty()
                self.started = now

    def flush(self) -> None:
        self.scheduled = False
        self._flush_dirty()

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for connection in dirty:
            connection.flush()


class GuardedConnection(ProtocolWrapper):
    """A tracked connection that batches its writes per reactor iteration and can watch how much the server
    has queued for a peer that does not read.

    Writes (from the HTTP channel, then from Autobahn and the fan-out) are appended to a per-connection batch
    and leave together when ``WriteBatcher`` flushes, in the order they were written, as one
    ``transport.write``: a burst of broadcasts costs one pass through Twisted's write path per connection
    instead of one per message. Back-pressure and the send-buffer watch see the same bytes as before, one
    reactor turn later. A flush that finds Twisted's buffer empty goes straight to the socket (``send_now``).
    """

    watch: SendBufferWatch | None = None
    batcher: WriteBatcher | None = None
    _batch: list[bytes] | None = None
    _direct = False  # plain TCP (no TLS layer in between): flushes may go straight to the socket

    def watch_send_buffer(self, limit: int, on_overflow: Callable[[], None], socket_buffer: int = 0) -> None:
        """Start counting queued bytes (called once the connection became a WebSocket).

        The HTTP channel registered itself as the transport's producer before the upgrade; it no longer owns
        the connection, so the watch takes its place. ``socket_buffer`` (``SO_SNDBUF``, 0 = the kernel's
        autotuning) bounds what the kernel holds for a peer that does not read: beyond it, bytes queue in
        Twisted's buffer where the watch counts them.
        """
        transport: Any = self.transport
        if transport is None:
            return
        self.watch = SendBufferWatch(limit, on_overflow)
        self._direct = is_plain_tcp(transport)
        if self._direct and socket_buffer > 0:
            transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        transport.unregisterProducer()
        transport.registerProducer(self.watch, True)

    def write(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
        elif self.batcher is not None:
            self._batch = [data]
            self.batcher.add(self)
        else:
            self._send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Send what was batched (called by the ``WriteBatcher``, and before the connection is closed)."""
        batch, self._batch = self._batch, None
        if batch:
            self._send(batch[0] if len(batch) == 1 else b"".join(batch))

    def loseConnection(self) -> None:
        self.flush()
        super().loseConnection()

    def abortConnection(self) -> None:
        self._batch = None
        transport: Any = self.transport
        transport.abortConnection()

    def _send(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        watch = self.watch
        if self._direct and watch is not None and not watch.paused:
            # Slow consumers are still found: once the kernel stops taking bytes they go to Twisted's buffer,
            # which pauses the watch, which counts from there on.
            data = send_now(transport, data)
            if not data:
                return
        transport.write(data)
        if watch is not None and watch.paused:
            watch.wrote(len(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.watch = None
        self._batch = None
        super().connectionLost(reason)  # unregisters from the factory, then tells the wrapped protocol
        ended = getattr(self.factory, "connection_ended", None)
        if ended is not None:
            ended()  # after the wrapped protocol heard of the loss (web.TrackingFactory.when_empty)


class HandshakeDeadlineChannel(HTTPChannel):
    """An HTTP channel that must receive each complete request, head and body, within ``handshake_timeout``
    seconds, with a body of at most ``max_body`` bytes.

    Nothing this server serves takes a body larger than the admin API's (``MAX_BODY``), and Twisted reads a
    whole body (to a temporary file beyond 100 KB) before any resource sees the request, token check included:
    without the cap anyone could stream gigabytes to disk and CPU, and without the deadline trickle a body
    forever. A declared ``Content-Length`` over the cap is refused with 413 before a byte of it is read; a
    chunked body is counted as it comes."""

    handshake_timeout: float = 5.0
    on_timeout: Callable[[], None] | None = None
    _deadline: Any = None
    _served = False  # a request was answered: an idle keep-alive connection is closed, but is no attack
    _head_started = False  # bytes of the next request head arrived since the deadline was armed
    _extensions = 0  # deadlines extended because a whole request head was waiting unread
    MAX_EXTENSIONS = 2
    max_body = MAX_BODY
    _body: int | None = None  # bytes of the current request's body read so far, while there is one
    _refused = False  # answered 413: whatever else arrives is dropped unread

    def dataReceived(self, data: bytes) -> None:
        self._head_started = True
        super().dataReceived(data)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than a whole request head may be (``MAX_LENGTH`` is the head's cap): headers that
        never end their line. Twisted would drop the connection without a word."""
        self._refuse_oversize_head()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's answer to every bad request head is 400; a head over ``totalHeadersSize`` gets the status
        that says so (RFC 6585, 431), anything else stays 400."""
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse_oversize_head()
        else:
            super()._respondToBadRequestAndDisconnect()

    def _refuse_oversize_head(self) -> None:
        self._disarm()
        transport: Any = self.transport
        if transport is not None:
            transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                            b"Content-Length: 0\r\n\r\n")
            self.loseConnection()

    def allHeadersReceived(self) -> None:
        if self.length == 0:  # no body (every WebSocket upgrade): the request is complete
            self._disarm()
        elif self.length is not None and self.length > self.max_body:
            self._refuse_body()
            return
        else:
            self._body = 0  # the deadline stays armed until the body is in
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._body is not None:
            self._body += len(data)
            if self._body > self.max_body + CHUNK_FRAMING:
                self._refuse_body()
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._body = None
        self._disarm()
        super().allContentReceived()

    def _refuse_body(self) -> None:
        """Answer 413 and close after a lingering half-close: the peer may still be sending its body, and
        closing a socket with unread bytes resets the connection, discarding our answer on its way. So our
        side is closed for writing (the answer, then FIN), what still comes is dropped unread, and the
        connection is aborted ``LINGER`` seconds later if the peer has not closed it by then."""
        self._disarm()
        self._refused = True
        self._body = None
        transport: Any = self.transport
        if transport is None:
            return
        transport.write(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        if isinstance(transport, GuardedConnection):
            transport.flush()
        connection = getattr(transport, "transport", transport)
        if not is_plain_tcp(connection):
            self.loseConnection()
            return
        connection.loseWriteConnection()
        self._deadline = self.callLater(LINGER, transport.abortConnection)

    def requestDone(self, request: Any) -> None:
        self._served = True
        super().requestDone(request)
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self._arm()  # a kept-alive connection gets the same deadline for its next request

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._head_started = False
        self._extensions = 0
        if self.handshake_timeout > 0:
            self._deadline = self.callLater(self.handshake_timeout, self._expired)

    def _head_waiting(self) -> bool:
        """Whether a complete request head (up to its blank line) waits unread in the socket. A slow client
        (slowloris) never has one: what it trickles never ends the head, so it is dropped as before."""
        connection = getattr(self.transport, "transport", None)  # the TCP connection under GuardedConnection
        if not isinstance(connection, tcp.Connection) or connection.TLS:
            return False
        try:
            waiting = connection.socket.recv(self.totalHeadersSize, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return False
        return b"\r\n\r\n" in waiting

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _expired(self) -> None:
        self._deadline = None
        if self._extensions < self.MAX_EXTENSIONS and self._head_waiting():
            # The client kept the deadline: its whole request head is in the socket, not yet read because this
            # reactor iteration is long (a reconnect storm's thousands of handshakes). Ours to read, not to drop.
            self._extensions += 1
            self._deadline = self.callLater(self.handshake_timeout, self._expired)
            return
        if self.on_timeout is not None and (self._head_started or not self._served):
            self.on_timeout()
        if self.transport is not None:
            self.transport.abortConnection()
