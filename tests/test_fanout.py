"""The broadcast hot path (roomserver/fanout.py) and write batching (transport.WriteBatcher): what the
performance work changed must not change what clients receive, in what order, or the slow-consumer guard.

Unit tests drive ``GuardedConnection`` with a ``StringTransport`` and a ``Clock``; integration tests use real
sockets on loopback.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from roomserver.transport import GuardedConnection
from roomserver.web import TrackingFactory

from .support import RawClient, WSClient, frame, url_of


class CountingTransport(StringTransport):
    """Counts the writes that reach it: batching is about how many there are."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def guarded(clock: task.Clock | None) -> tuple[GuardedConnection, CountingTransport]:
    factory = TrackingFactory(Factory.forProtocol(Protocol), reactor=clock)
    connection: GuardedConnection = factory.buildProtocol(None)
    transport = CountingTransport()
    connection.makeConnection(transport)
    return connection, transport


def test_writes_of_one_reactor_iteration_leave_together_in_order() -> None:
    clock = task.Clock()
    connection, transport = guarded(clock)
    connection.write(b"one,")
    connection.writeSequence([b"two,", b"three"])
    assert transport.value() == b""  # nothing leaves before the iteration ends
    clock.advance(0)
    assert transport.value() == b"one,two,three"
    assert transport.writes == 1
    connection.write(b"four")
    clock.advance(0)
    assert transport.value() == b"one,two,threefour" and transport.writes == 2


def test_close_sends_what_was_batched_first_and_abort_drops_it() -> None:
    clock = task.Clock()
    connection, transport = guarded(clock)
    connection.write(b"last words")
    connection.loseConnection()
    assert transport.value() == b"last words" and transport.disconnecting
    clock.advance(0)
    assert transport.value() == b"last words"

    connection, transport = guarded(clock)
    connection.write(b"never sent")
    connection.abortConnection()
    clock.advance(0)
    assert transport.value() == b""


def test_without_a_reactor_writes_go_straight_through() -> None:
    connection, transport = guarded(None)
    connection.write(b"now")
    assert transport.value() == b"now"


async def _joined_raw(server: Any, room: str) -> RawClient:
    raw = await RawClient.connect(server)
    await raw.read_frame()  # welcome
    raw.send(frame(0x1, json.dumps({"type": "join", "room": room}).encode()))
    opcode, payload = await raw.read_frame()
    assert opcode == 0x1 and json.loads(payload)["type"] == "joined"
    return raw


@pytest_twisted.ensureDeferred
async def test_broadcast_frames_are_plain_text_frames_with_the_event(make_server: Any) -> None:
    """The pre-framed bytes written straight to each transport are a valid unmasked text frame each member
    parses to the same event."""
    server = await make_server(room_protocol=True)
    members = [await _joined_raw(server, "hot") for _ in range(3)]
    members[0].send(frame(0x1, json.dumps({"type": "chat", "room": "hot", "text": "héllo"}).encode()))
    events = []
    for raw in members:
        opcode, payload = await raw.read_frame()
        assert opcode == 0x1
        events.append(json.loads(payload))
    assert events[0] == events[1] == events[2]
    assert events[0]["text"] == "héllo" and events[0]["seq"] == 1
    for raw in members:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_replies_and_broadcasts_keep_their_order(make_server: Any) -> None:
    """Requests pipelined in one TCP segment: every broadcast and reply comes back in the order the server
    produced them, although they leave in one batched write."""
    server = await make_server(room_protocol=True, rate_limit=0)
    raw = await RawClient.connect(server)
    await raw.read_frame()  # welcome
    requests: list[dict[str, Any]] = [{"type": "join", "room": "a", "id": 1}]
    requests += [{"type": "chat", "room": "a", "text": str(i)} for i in range(20)]
    requests += [{"type": "leave", "room": "a", "id": 2}, {"type": "chat", "room": "a", "text": "late", "id": 3}]
    raw.send(b"".join(frame(0x1, json.dumps(request).encode()) for request in requests))
    replies = [json.loads((await raw.read_frame())[1]) for _ in requests]
    assert replies[0]["type"] == "joined"
    assert [r["seq"] for r in replies[1:21]] == list(range(1, 21))
    assert replies[21] == {"type": "left", "room": "a", "id": 2}
    assert replies[22]["type"] == "error" and replies[22]["code"] == "not_in_room"
    raw.close()


@pytest_twisted.ensureDeferred
async def test_websocket_connections_have_tcp_nodelay(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    (wrapper,) = list(server.connections.protocols)
    assert wrapper.transport.getTcpNoDelay()
    await ws.close()


def test_autobahn_uses_its_native_masking_and_utf8_validation() -> None:
    """Autobahn >= 25 accelerates masking and UTF-8 validation with its own NVX extension (it no longer looks
    for wsaccel); a build without it would make every incoming message several times more expensive."""
    from autobahn import websocket
    from autobahn.websocket import utf8validator, xormasker

    assert websocket.USES_NVX
    assert utf8validator.Utf8Validator.__module__ == "autobahn.nvx._utf8validator"
    assert xormasker.create_xor_masker.__module__ == "autobahn.nvx._xormasker"
