"""GracefulCloseMixin on a fake transport: the close frame is flushed before the TCP close, and bounded in time.

(tests/test_conformance.py proves the same over real sockets: a client whose close frame is invalid receives the
1002/1007 close frame instead of a bare RST.)
"""

from __future__ import annotations

import struct

import txaio
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from txaio.testutil import replace_loop

from roomserver import ServerOptions, WebSocketServer

from .test_heartbeat_unit import masked_frame, open_connection


def close_code_of(data: bytes) -> int:
    assert data[:1] == b"\x88", data
    return int(struct.unpack("!H", data[2:4])[0])


def test_invalid_close_frame_gets_1002_flushed_then_fin_and_abort_only_after_the_timeout() -> None:
    txaio.use_twisted()
    with replace_loop(Clock()):
        reactor = MemoryReactorClock()
        server = WebSocketServer(ServerOptions(port=0, close_handshake_timeout=3), reactor=reactor)
        protocol, transport = open_connection(server)
        protocol.dataReceived(masked_frame(0x8, struct.pack("!H", 5000)))  # type: ignore[attr-defined]
        assert close_code_of(transport.value()) == 1002
        assert transport.disconnecting and not transport.disconnected, "loseConnection (flush + FIN), no abort"
        reactor.advance(2.9)
        assert not transport.disconnected
        reactor.advance(0.2)
        assert transport.disconnected, "a peer that stops reading is aborted after the close-handshake timeout"
        protocol.connectionLost(Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
        assert server.get_stats().connections == 0


def test_deadline_is_cancelled_when_the_connection_ends_in_time() -> None:
    txaio.use_twisted()
    with replace_loop(Clock()):
        reactor = MemoryReactorClock()
        server = WebSocketServer(ServerOptions(port=0, close_handshake_timeout=3), reactor=reactor)
        protocol, transport = open_connection(server)
        protocol.dataReceived(masked_frame(0x8, struct.pack("!H", 1000) + b"\xff"))  # type: ignore[attr-defined]
        assert close_code_of(transport.value()) == 1007
        assert reactor.getDelayedCalls(), "the flush deadline is pending"
        protocol.connectionLost(Failure(ConnectionError("closed")))  # type: ignore[attr-defined]
        assert not [call for call in reactor.getDelayedCalls() if call.active()], "no timer left behind"


def test_unclean_drop_still_aborts() -> None:
    """Only a completed closing handshake is flushed; e.g. ``abort()`` stays an abort."""
    txaio.use_twisted()
    with replace_loop(Clock()):
        server = WebSocketServer(ServerOptions(port=0), reactor=MemoryReactorClock())
        protocol, transport = open_connection(server)
        protocol.abort()  # type: ignore[attr-defined]
        assert transport.disconnected
