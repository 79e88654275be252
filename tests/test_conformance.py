"""RFC 6455 conformance of the real room endpoint (not the testee), with hand-built frames on a raw socket.

The Autobahn cases need an echo server, so they run against the testee; these tests prove that the endpoint
users connect to (the JSON room protocol, welcome message first) fails bad input with the right close code,
answers a close frame and then closes the TCP connection itself, and that nobody else in the room is affected.
The servers use a long close-handshake timeout, so a TCP close seen within the test's few seconds is the server
reacting to the frames, not a timer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from roomserver import WebSocketServer

from .rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    close_payload,
)
from .support import WSClient, eventually, url_of

LIMIT = 1024


async def room_server(make_server: Any, close_handshake_timeout: float = 30.0) -> WebSocketServer:
    server: WebSocketServer = await make_server(room_protocol=True, max_message_size=LIMIT,
                                                close_handshake_timeout=close_handshake_timeout)
    return server


async def joined(server: WebSocketServer) -> RawWebSocket:
    """A raw connection that got its welcome and joined room ``r``."""
    ws = await RawWebSocket.connect(server.port or 0)
    welcome = await ws.read_frame()
    assert welcome.opcode == OP_TEXT and json.loads(welcome.payload)["type"] == "welcome"
    ws.send_frame(OP_TEXT, b'{"type":"join","room":"r"}')
    assert json.loads((await ws.read_frame()).payload)["type"] == "joined"
    return ws


def chat(text: bytes) -> bytes:
    return b'{"type":"chat","room":"r","text":"' + text + b'"}'


# (name, frames to send, expected close code)
BAD_INPUT: list[tuple[str, list[dict[str, Any]], int]] = [
    ("invalid UTF-8 (surrogate ED A0 80)", [{"opcode": OP_TEXT, "payload": chat(b"\xed\xa0\x80")}], 1007),
    ("invalid UTF-8 (overlong C0 AF)", [{"opcode": OP_TEXT, "payload": chat(b"\xc0\xaf")}], 1007),
    ("invalid UTF-8 in a later fragment", [
        {"opcode": OP_TEXT, "payload": b'{"type":"chat",', "fin": False},
        {"opcode": OP_CONTINUATION, "payload": b'"text":"\xf4\x90\x80\x80"}'}], 1007),
    ("UTF-8 truncated at the end of the message", [{"opcode": OP_TEXT, "payload": b'"\xf0\x9f\x98'}], 1007),
    ("message over max_message_size", [{"opcode": OP_TEXT, "payload": chat(b"x" * LIMIT)}], 1009),
    ("fragments adding up to more than max_message_size", [
        {"opcode": OP_TEXT, "payload": b"x" * 600, "fin": False},
        {"opcode": OP_CONTINUATION, "payload": b"x" * 600}], 1009),
    ("length header of 2**63-1", [{"opcode": OP_BINARY, "payload": b"", "declared_length": 2**63 - 1}], 1009),
    ("unmasked frame", [{"opcode": OP_TEXT, "payload": chat(b"hi"), "mask": False}], 1002),
    ("RSV1 without an extension", [{"opcode": OP_TEXT, "payload": chat(b"hi"), "rsv": 4}], 1002),
    ("RSV2", [{"opcode": OP_TEXT, "payload": chat(b"hi"), "rsv": 2}], 1002),
    ("RSV3 on a ping", [{"opcode": OP_PING, "payload": b"", "rsv": 1}], 1002),
    ("reserved data opcode 3", [{"opcode": 0x3, "payload": b""}], 1002),
    ("reserved control opcode 0xB", [{"opcode": 0xB, "payload": b""}], 1002),
    ("fragmented ping", [{"opcode": OP_PING, "payload": b"a", "fin": False}], 1002),
    ("ping payload over 125 bytes", [{"opcode": OP_PING, "payload": b"p" * 126}], 1002),
    ("continuation without a start", [{"opcode": OP_CONTINUATION, "payload": b"x"}], 1002),
    ("new message inside a fragmented one", [
        {"opcode": OP_TEXT, "payload": b"x", "fin": False}, {"opcode": OP_TEXT, "payload": b"y"}], 1002),
    ("close code 999", [{"opcode": OP_CLOSE, "payload": close_payload(999)}], 1002),
    ("close code 1005 (reserved)", [{"opcode": OP_CLOSE, "payload": close_payload(1005)}], 1002),
    ("close code 5000", [{"opcode": OP_CLOSE, "payload": close_payload(5000)}], 1002),
    ("close with a 1-byte payload", [{"opcode": OP_CLOSE, "payload": b"\x03"}], 1002),
    ("close reason with invalid UTF-8", [{"opcode": OP_CLOSE, "payload": close_payload(1000, b"\xff")}], 1007),
]


@pytest.mark.parametrize(("name", "frames", "code"), BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
@pytest_twisted.ensureDeferred
async def test_bad_input_closes_with_its_code(make_server: Any, name: str, frames: list[dict[str, Any]],
                                              code: int) -> None:
    """Each violation closes the connection with its RFC 6455 code; the other member of the room sees nothing
    of it and keeps chatting."""
    # After a length header of 2**63-1 every later byte is payload, so the client's close reply can never be
    # seen: the server drops the connection when its close-handshake timeout (1 s here) runs out.
    unanswerable = any(frame.get("declared_length") for frame in frames)
    server = await room_server(make_server, close_handshake_timeout=1.0 if unanswerable else 30.0)
    bystander = await WSClient.connect(url_of(server))
    assert (await bystander.recv())["type"] == "welcome"
    assert (await bystander.request({"type": "join", "room": "r"}))["type"] == "joined"
    offender = await joined(server)
    received_before = server.get_stats().messages_received
    for frame in frames:
        offender.send_frame(**frame)
    await offender.expect_close(code)
    await eventually(lambda: server.get_stats().connections == 1)
    assert server.get_stats().messages_received == received_before, "nothing of the bad input was delivered"
    await bystander.send({"type": "chat", "room": "r", "text": "still here"})
    assert (await bystander.recv())["text"] == "still here", "the bystander got nothing from the offender"


@pytest_twisted.ensureDeferred
async def test_close_frame_is_answered_and_the_server_closes_tcp(make_server: Any) -> None:
    """A client's close (with a valid code and reason) is echoed with the same code, then the server closes the
    TCP connection without waiting for anything else from the client."""
    server = await room_server(make_server)
    ws = await joined(server)
    ws.send_frame(OP_CLOSE, close_payload(1000, "bye ✓".encode()))
    reply = await ws.read_frame()
    assert reply.opcode == OP_CLOSE and reply.close_code == 1000
    assert await ws.at_eof(), "the server must close the TCP connection after the closing handshake"
    await eventually(lambda: server.get_stats().connections == 0 and server.get_stats().rooms == 0)


@pytest_twisted.ensureDeferred
async def test_empty_close_frame_is_answered(make_server: Any) -> None:
    server = await room_server(make_server)
    ws = await joined(server)
    ws.send_frame(OP_CLOSE, b"")
    reply = await ws.read_frame()
    assert reply.opcode == OP_CLOSE and reply.close_code in (None, 1000)
    assert await ws.at_eof()


@pytest_twisted.ensureDeferred
async def test_ping_gets_its_pong_and_pongs_are_ignored(make_server: Any) -> None:
    """2.x on the room endpoint: a ping (even between fragments of a message) is answered with a pong carrying
    the same payload; an unsolicited pong is ignored; the connection stays usable."""
    server = await room_server(make_server)
    ws = await joined(server)
    ws.send_frame(OP_PONG, b"unsolicited")
    ws.send_frame(OP_PING, b"\x00\xffbinary ping")
    pong = await ws.read_frame()
    assert (pong.opcode, pong.payload) == (OP_PONG, b"\x00\xffbinary ping")
    ws.send_frame(OP_TEXT, b'{"type":"chat","room":"r",', fin=False)
    ws.send_frame(OP_PING, b"mid")
    mid = await ws.read_frame()
    assert (mid.opcode, mid.payload) == (OP_PONG, b"mid")
    ws.send_frame(OP_CONTINUATION, b'"text":"frag"}')
    event = json.loads((await ws.read_frame()).payload)
    assert (event["type"], event["text"]) == ("chat", "frag")
    ws.send_frame(OP_CLOSE, close_payload(1000))
    assert (await ws.read_frame()).close_code == 1000


@pytest_twisted.ensureDeferred
async def test_message_of_exactly_the_limit_is_accepted(make_server: Any) -> None:
    server = await room_server(make_server)
    ws = await joined(server)
    text = b"y" * (LIMIT - len(chat(b"")))
    ws.send_frame(OP_TEXT, chat(text))
    event = json.loads((await ws.read_frame()).payload)
    assert event["text"] == text.decode()
