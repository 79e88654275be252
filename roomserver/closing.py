"""End the TCP connection gracefully once a WebSocket closing handshake has completed.

Autobahn drops the TCP connection with an abort (an RST, and Twisted discards whatever is still in the write
buffer) as soon as a server has both sent and received a close frame. That loses our own close frame whenever
the two happen in the same instant, which is exactly the case when the peer's close frame is itself the error:
an invalid close code, a close reason that is not UTF-8, a 1-byte close payload. Autobahn answers those with a
1002/1007 close frame and then aborts at once, so the client never sees the code (and an RST can make the
client's kernel discard data it received but had not read yet).

After a clean closing handshake there is nothing left to protect against, so ``GracefulCloseMixin`` closes with
``loseConnection`` (write buffer flushed, then FIN: the server still closes the TCP connection first, as RFC 6455
section 7.1.1 wants), bounded by the close-handshake timeout in case the peer stops reading. Every other abort
(timeouts, ``abort()``, unclean ends) stays an abort.

``ReleasedOnClose`` lets reference counting free a closed connection (see its docstring).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

DEFAULT_FLUSH_TIMEOUT = 2.0
"""Seconds to wait for the final flush when no close-handshake timeout is configured."""


class GracefulCloseMixin:
    """Mixed into the Autobahn server protocol (before it in the bases)."""

    _flush_deadline: Any = None

    def _closeConnection(self, abort: bool = False) -> None:
        """Called from Autobahn's ``dropConnection`` to end the TCP connection."""
        this: Any = self
        if abort and this.wasClean and this.transport is not None:
            this.transport.loseConnection()
            timeout = this.closeHandshakeTimeout or DEFAULT_FLUSH_TIMEOUT
            self._flush_deadline = this.factory.reactor.callLater(timeout, self._flush_timed_out)
            return
        super()._closeConnection(abort)  # type: ignore[misc]

    def _flush_timed_out(self) -> None:
        self._flush_deadline = None
        transport: Any = getattr(self, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        """Called from Twisted once the TCP connection is gone."""
        deadline, self._flush_deadline = self._flush_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        super().connectionLost(reason)  # type: ignore[misc]


CLOSE_FRAME_START = 0x88  # FIN, no RSV bit, opcode 8: how a client's close frame begins


class DeafAfterFailure:
    """Mixed into the Autobahn server protocol (before it in the bases): once the server has failed the
    connection, no more data is processed but the client's close frame.

    RFC 6455 section 7.1.7: an endpoint that fails the connection (a protocol violation, a limit: Autobahn's
    ``_fail_connection``) sends its close frame and SHOULD NOT go on processing data from the peer. Autobahn,
    with ``failByDrop=False`` (so the client learns the code), parses everything that keeps arriving until the
    closing handshake times out: an attacker that carries on after the fragment cap's 1008 (a million empty
    continuation frames, RELIABILITY P9) kept a core busy for the whole close-handshake timeout (about 2 s of
    CPU per connection, bench/attacks.py). Here parsing stops at the frame that failed the connection (the rest
    of that read, up to 64 KiB of further frames, is dropped) and so does every later read, except one that
    begins with a close frame: the client's answer, so a client that complies still completes the closing
    handshake at once. Dropped bytes are still read from the socket (the peer never fills our receive buffer,
    and no unread data turns our close into an RST that could destroy our close frame in flight): a ``recv``
    per read, no Python per frame."""

    def consumeData(self) -> None:
        """Autobahn's loop over the buffered frames, stopped (and the buffer dropped) once a frame failed the
        connection. Between two ``processData`` calls nothing is half-parsed, so dropping is safe there."""
        this: Any = self
        if this.state not in (this.STATE_OPEN, this.STATE_CLOSING) or this.failedByMe:
            super().consumeData()  # type: ignore[misc]
            return
        while this.processData() and this.state != this.STATE_CLOSED:
            if this.failedByMe:
                this.data = b""
                this.current_frame = None
                return

    ignored_octets = 0
    """Bytes read and dropped unparsed after the failure."""

    def dataReceived(self, data: bytes) -> None:
        this: Any = self
        if this.failedByMe and this.state == this.STATE_CLOSING:
            if not data or data[0] != CLOSE_FRAME_START:
                self.ignored_octets += len(data)
                return
            # Whatever frame the failure interrupted is abandoned: parse this read from its first byte.
            this.data = b""
            this.current_frame = None
        super().dataReceived(data)  # type: ignore[misc]


class ReleasedOnClose:
    """Mixed into an Autobahn server protocol (before it in the bases): a closed connection is no reference cycle.

    Autobahn resolves ``is_closed`` with the protocol itself (protocol, Deferred, protocol), a cycle that only the
    cyclic garbage collector can reclaim: every closed connection, its transport wrapper and buffers would wait
    in the oldest generation for a full collection, or, with the heap frozen (``roomserver.heap``), for the next
    thaw. Once it has fired its callbacks have run: a fired Deferred without the protocol takes its place (a
    later ``addCallback`` gets None), and reference counting frees the connection at once
    (tests/test_concurrency.py, tests/test_http.py)."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[misc]
        this: Any = self
        if this.is_closed.called:
            this.is_closed = succeed(None)
