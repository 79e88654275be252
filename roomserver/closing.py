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
