"""Heartbeats on a fake clock: Autobahn's autoPing pings every interval and drops a peer that never pongs.

No sockets and no sleeping: the protocol talks to a ``StringTransport`` and txaio's timers run on a
``task.Clock`` (``txaio.testutil.replace_loop``).
"""

from __future__ import annotations

import struct

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from txaio.testutil import replace_loop

from roomserver import ServerOptions, WebSocketServer

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class FakeTransport(StringTransport):
    """A StringTransport that, like a real TCP transport, accepts unregisterProducer with none registered."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


def open_connection(server: WebSocketServer) -> tuple[object, StringTransport]:
    protocol = server.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = FakeTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(HANDSHAKE)
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return protocol, transport


def test_silent_peer_is_pinged_then_dropped_and_cleaned_up() -> None:
    txaio.use_twisted()
    clock = Clock()
    with replace_loop(clock):
        server = WebSocketServer(ServerOptions(port=0, ping_interval=10), reactor=MemoryReactorClock())
        protocol, transport = open_connection(server)
        assert server.get_stats().connections == 1
        clock.advance(10)
        assert transport.value()[:1] == b"\x89", "a ping frame goes out after one interval"
        assert not transport.disconnecting
        clock.advance(10)
        assert transport.disconnecting or transport.disconnected, "no pong within the timeout: dropped"
        protocol.connectionLost(Failure(ConnectionError("aborted")))  # type: ignore[attr-defined]
        assert server.get_stats().connections == 0
        assert server.registry.member_count() == 0


def test_peer_that_answers_pings_stays() -> None:
    txaio.use_twisted()
    clock = Clock()
    with replace_loop(clock):
        server = WebSocketServer(ServerOptions(port=0, ping_interval=10), reactor=MemoryReactorClock())
        protocol, transport = open_connection(server)
        for _ in range(5):
            clock.advance(10)
            frame = transport.value()
            assert frame[:1] == b"\x89"
            length = frame[1] & 0x7F
            transport.clear()
            protocol.dataReceived(masked_frame(0xA, frame[2:2 + length]))  # type: ignore[attr-defined]
            clock.advance(9)
            assert not transport.disconnecting
        assert server.get_stats().connections == 1


def test_with_the_defaults_a_half_open_peer_is_dropped_within_40_seconds() -> None:
    """RELIABILITY S2: ping every 30 s, and the pong timeout defaults to the interval capped at 10 s, so a peer
    that went silent (half-open TCP) is dropped 40 s after its last traffic, not 60."""
    options = ServerOptions(port=0)
    assert (options.ping_interval, options.effective_ping_timeout) == (30.0, 10.0)
    assert ServerOptions(port=0, ping_interval=5).effective_ping_timeout == 5
    assert ServerOptions(port=0, ping_timeout=25).effective_ping_timeout == 25
    txaio.use_twisted()
    clock = Clock()
    with replace_loop(clock):
        server = WebSocketServer(options, reactor=MemoryReactorClock())
        _, transport = open_connection(server)
        clock.advance(30)
        assert transport.value()[:1] == b"\x89" and not transport.disconnecting, "pinged, still waiting"
        clock.advance(9)
        assert not (transport.disconnecting or transport.disconnected)
        clock.advance(1)
        assert transport.disconnecting or transport.disconnected, "40 s after its last traffic: dropped"
