"""The broadcast hot path (roomserver/fanout.py) and write batching (transport.WriteBatcher): what the
performance work changed must not change what clients receive, in what order, or the slow-consumer guard.

Unit tests drive ``GuardedConnection`` with a ``StringTransport`` and a ``Clock``; integration tests use real
sockets on loopback.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from roomserver.transport import DirectWriteTransport, GuardedConnection, SendBufferWatch
from roomserver.web import TrackingFactory

from .support import RawClient, WSClient, aio, frame, url_of


class CountingTransport(StringTransport):
    """Counts the writes that reach it: batching is about how many there are."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def guarded(clock: task.Clock | None) -> tuple[GuardedConnection, CountingTransport]:
    return guarded_by(TrackingFactory(Factory.forProtocol(Protocol), reactor=clock))


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


def test_a_long_iteration_sends_its_batch_after_the_longest_hold_not_at_its_end() -> None:
    """A reconnect storm's iteration: hundreds of handshakes, each writing to its own connection. Batches older
    than ``max_hold`` leave as the iteration goes on; within the hold, nothing leaves before its end."""
    clock = task.Clock()
    factory = TrackingFactory(Factory.forProtocol(Protocol), reactor=clock)
    assert factory.batcher is not None
    pairs = [guarded_by(factory) for _ in range(100)]
    for connection, _ in pairs[:40]:
        connection.write(b"welcome")  # quick handshakes: the hold (20 ms) is not over
    assert all(transport.value() == b"" for _, transport in pairs)
    clock.rightNow += 0.015  # the handshakes cost time; no reactor turn in between (no advance())
    for connection, _ in pairs[40:63]:
        connection.write(b"welcome")
    assert all(transport.value() == b"" for _, transport in pairs)
    clock.rightNow += 0.006  # the 64th write finds the batch 21 ms old: the 64 leave now
    pairs[63][0].write(b"welcome")
    assert [transport.value() for _, transport in pairs[:64]] == [b"welcome"] * 64
    for connection, _ in pairs[64:]:
        connection.write(b"welcome")
    assert all(transport.value() == b"" for _, transport in pairs[64:])
    clock.advance(0)  # the end of the iteration: the rest
    assert [transport.value() for _, transport in pairs] == [b"welcome"] * 100
    assert all(transport.writes == 1 for _, transport in pairs)


def guarded_by(factory: TrackingFactory) -> tuple[GuardedConnection, CountingTransport]:
    connection: GuardedConnection = factory.buildProtocol(None)
    transport = CountingTransport()
    connection.makeConnection(transport)
    return connection, transport


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


class KernelSocket:
    """A socket whose kernel buffer takes ``room`` more bytes (``BlockingIOError`` when it takes none)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.wire = b""

    def send(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError
        taken = min(self.room, len(data))
        self.room -= taken
        self.wire += data[:taken]
        return taken


class TwistedBuffer:
    """What ``send_now`` looks at on a ``tcp.Connection``: Twisted's own buffers, and its write path."""

    TLS = False
    connected = True
    disconnecting = False

    def __init__(self, socket: KernelSocket) -> None:
        self.socket = socket
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._tempDataBuffer.append(data)

    def doWrite(self) -> None:
        """Twisted's next write attempt: its buffer goes to the kernel (which has room for all of it here)."""
        pending = self.dataBuffer + b"".join(self._tempDataBuffer)
        self.dataBuffer, self._tempDataBuffer = b"", []
        self.socket.wire += pending


def direct_connection(kernel_room: int) -> tuple[GuardedConnection, TwistedBuffer]:
    connection, _ = guarded(None)
    transport = TwistedBuffer(KernelSocket(kernel_room))
    connection.transport = transport  # type: ignore[assignment]
    connection._direct = True
    connection.watch = SendBufferWatch(1 << 20, lambda: None)
    return connection, transport


def test_direct_sends_never_overtake_bytes_waiting_in_twisteds_buffer() -> None:
    connection, transport = direct_connection(kernel_room=4)
    connection.write(b"hello")  # the kernel takes "hell", Twisted's buffer keeps "o"
    assert transport.socket.wire == b"hell" and transport._tempDataBuffer == [b"o"]
    transport.socket.room = 100  # the peer read: the kernel has room again, Twisted has not written yet
    connection.write(b" world")  # must queue behind "o", not go straight to the kernel
    assert transport.socket.wire == b"hell"
    transport.doWrite()
    assert transport.socket.wire == b"hello world"
    connection.write(b"!")  # Twisted's buffer is empty again: straight to the kernel
    assert transport.socket.wire == b"hello world!" and transport._tempDataBuffer == []


def test_a_full_or_closing_socket_leaves_the_bytes_to_twisted() -> None:
    connection, transport = direct_connection(kernel_room=0)
    connection.write(b"later")
    assert transport.socket.wire == b"" and transport._tempDataBuffer == [b"later"]

    connection, transport = direct_connection(kernel_room=100)
    transport.disconnecting = True
    connection.write(b"bye")
    assert transport.socket.wire == b"" and transport._tempDataBuffer == [b"bye"]


def test_a_redis_command_goes_straight_to_the_socket_in_order_with_twisteds_buffer() -> None:
    transport = TwistedBuffer(KernelSocket(4))
    direct = DirectWriteTransport(transport)
    direct.write(b"PING\r\n")  # the kernel takes 4 bytes, Twisted keeps the rest
    assert transport.socket.wire == b"PING" and transport._tempDataBuffer == [b"\r\n"]
    transport.socket.room = 100
    direct.writeSequence([b"GET ", b"k\r\n"])  # behind the queued bytes, not ahead of them
    assert transport.socket.wire == b"PING"
    transport.doWrite()
    direct.write(b"QUIT\r\n")
    assert transport.socket.wire == b"PING\r\nGET k\r\nQUIT\r\n"
    assert direct.connected and direct.socket is transport.socket, "the rest is the transport's own"


async def _joined_raw(server: Any, room: str, recv_buffer: int | None = None) -> RawClient:
    raw = await RawClient.connect(server, recv_buffer=recv_buffer)
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


@pytest_twisted.ensureDeferred
async def test_socket_send_buffer_bounds_the_kernel_queue(make_server: Any) -> None:
    server = await make_server(room_protocol=True, socket_send_buffer=64 * 1024)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    (wrapper,) = list(server.connections.protocols)
    # Linux doubles SO_SNDBUF for its bookkeeping; without the option it would autotune up to tcp_wmem's max.
    assert wrapper.transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 64 * 1024
    await ws.close()


@pytest_twisted.ensureDeferred
async def test_direct_sends_and_twisted_buffer_keep_every_byte_in_order(make_server: Any) -> None:
    """Flushes go straight to the socket while Twisted's buffer is empty, and to Twisted's buffer once the
    kernel takes only part of them. With a tiny kernel buffer, chats arriving one by one and a member that
    reads in slow bursts, both paths alternate many times; every message must arrive whole, once, in order."""
    server = await make_server(room_protocol=True, rate_limit=0, socket_send_buffer=4096,
                               max_message_size=64 * 1024)
    reader = await _joined_raw(server, "big", recv_buffer=4096)
    sender = await _joined_raw(server, "big")
    texts = [f"{i:04d}" + "x" * (1000 + 97 * i) for i in range(120)]  # 1 to 12.5 KB each, 0.8 MB in all

    async def send_one_by_one() -> None:
        for text in texts:
            sender.send(frame(0x1, json.dumps({"type": "chat", "room": "big", "text": text}).encode()))
            assert json.loads((await sender.read_frame())[1])["text"] == text  # its own copy: one at a time

    async def read_in_slow_bursts() -> list[dict[str, Any]]:
        events = []
        for index in range(len(texts)):
            if index % 10 == 0:
                await aio(asyncio.sleep(0.02))  # let the kernel buffer fill while the server keeps sending
            events.append(json.loads((await reader.read_frame())[1]))
        return events

    sending = defer.ensureDeferred(send_one_by_one())
    events = await read_in_slow_bursts()
    await sending
    assert [event["text"] for event in events] == texts
    assert [event["seq"] for event in events] == list(range(1, len(texts) + 1))
    reader.close()
    sender.close()


def test_autobahn_uses_its_native_masking_and_utf8_validation() -> None:
    """Autobahn >= 25 accelerates masking and UTF-8 validation with its own NVX extension (it no longer looks
    for wsaccel); a build without it would make every incoming message several times more expensive."""
    from autobahn import websocket
    from autobahn.websocket import utf8validator, xormasker

    assert websocket.USES_NVX
    assert utf8validator.Utf8Validator.__module__ == "autobahn.nvx._utf8validator"
    assert xormasker.create_xor_masker.__module__ == "autobahn.nvx._xormasker"
