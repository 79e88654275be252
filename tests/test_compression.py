"""permessage-deflate (RFC 7692): negotiation, parameters honoured, the bomb limit, and compression switched off.

Integration tests use the ``websockets`` client, a real deflate implementation, on loopback; the "off" case uses
a raw socket, since no real client sends compressed frames without having negotiated them.
"""

from __future__ import annotations

import json
import tracemalloc
import zlib
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from roomserver import ServerOptions
from roomserver.compression import (
    MEM_LEVEL,
    SERVER_WINDOW_BITS,
    DeflateAcceptor,
    compression_hook,
    refuse_compression,
)
from roomserver.websocket import RoomServerFactory

from .rawws import OP_TEXT, RawWebSocket
from .support import WSClient, eventually, url_of

# -- the accept policy (pure) --------------------------------------------------------------------------------------


def negotiated(offer: PerMessageDeflateOffer, limit: int = 1000) -> tuple[str, PerMessageDeflate]:
    accept = DeflateAcceptor(limit)([offer])
    assert isinstance(accept, PerMessageDeflateOfferAccept)
    return accept.get_extension_string(), PerMessageDeflate.create_from_offer_accept(True, accept)


def test_default_offer_gets_the_servers_small_window_and_the_message_limit() -> None:
    header, pmce = negotiated(PerMessageDeflateOffer(), limit=4096)
    assert header == "permessage-deflate"
    assert pmce.server_max_window_bits == SERVER_WINDOW_BITS and pmce.mem_level == MEM_LEVEL
    assert pmce.client_max_window_bits == 15, "the server never shrinks the client's window"
    assert not pmce.server_no_context_takeover and not pmce.client_no_context_takeover
    assert pmce.max_message_size == 4096


@pytest.mark.parametrize(("request_bits", "expected_bits"), [(9, 9), (10, 10), (12, 12), (15, SERVER_WINDOW_BITS)])
def test_server_max_window_bits_request_is_honoured(request_bits: int, expected_bits: int) -> None:
    header, pmce = negotiated(PerMessageDeflateOffer(request_max_window_bits=request_bits))
    assert f"server_max_window_bits={request_bits}" in header
    assert pmce.server_max_window_bits == expected_bits <= request_bits


def test_server_no_context_takeover_request_is_honoured() -> None:
    header, pmce = negotiated(PerMessageDeflateOffer(accept_no_context_takeover=True,
                                                     request_no_context_takeover=True))
    assert "server_no_context_takeover" in header
    assert pmce.server_no_context_takeover
    assert "client_no_context_takeover" not in header and not pmce.client_no_context_takeover


def test_first_deflate_offer_wins_and_other_extensions_are_ignored() -> None:
    acceptor = DeflateAcceptor(1000)
    assert acceptor([]) is None
    assert acceptor([object()]) is None
    first = PerMessageDeflateOffer(request_max_window_bits=9)
    accept = acceptor([object(), first, PerMessageDeflateOffer()])
    assert accept is not None and accept.offer is first


def test_compression_off_declines_every_offer() -> None:
    assert refuse_compression([PerMessageDeflateOffer()]) is None
    assert compression_hook(False, 1000) is refuse_compression
    assert isinstance(compression_hook(True, 1000), DeflateAcceptor)
    with pytest.raises(ValueError):
        DeflateAcceptor(0)


def test_factory_hook_follows_server_options() -> None:
    """``RoomServerFactory.configure`` installs the hook for the options, and reconfiguring switches it."""
    assert ServerOptions().compression is False, "compression is off by default (docs/compliance.md says why)"

    class Bare(WebSocketServerFactory):  # type: ignore[misc]
        configure = RoomServerFactory.configure

    factory = Bare()
    for enabled in (True, False, True):
        factory.configure(ServerOptions(compression=enabled, max_message_size=777))
        hook = factory.perMessageCompressionAccept
        if enabled:
            assert isinstance(hook, DeflateAcceptor) and hook.max_message_size == 777
        else:
            assert hook is refuse_compression


# -- over the wire ---------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deflate_is_negotiated_with_the_clients_parameters_and_echoes(make_server: Any) -> None:
    server = await make_server(testee=True, compression=True)
    extension = ClientPerMessageDeflateFactory(server_no_context_takeover=True, server_max_window_bits=10,
                                               client_max_window_bits=True)
    ws = await WSClient.connect(url_of(server), extensions=[extension], compression=None)
    header = ws.ws.response.headers["Sec-WebSocket-Extensions"]
    assert header == "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
    text = "compress me " * 500
    for _ in range(3):  # several messages: the server resets its context each time, as asked
        await ws.send(text)
        assert await ws.recv_raw() == text
    await ws.send(b"\x00\x01" * 3000)
    assert await ws.recv_raw() == b"\x00\x01" * 3000


@pytest_twisted.ensureDeferred
async def test_room_broadcast_reaches_compressing_and_plain_members(make_server: Any) -> None:
    """A broadcast is framed once, but members that negotiated deflate get it compressed for them (Autobahn's
    sendPreparedMessage falls back to per-client compression); everybody reads the same event."""
    server = await make_server(room_protocol=True, compression=True)
    deflating = await WSClient.connect(url_of(server))  # websockets offers deflate by default
    plain = await WSClient.connect(url_of(server), compression=None)
    assert "permessage-deflate" in deflating.ws.response.headers["Sec-WebSocket-Extensions"]
    assert "Sec-WebSocket-Extensions" not in plain.ws.response.headers
    for ws in (deflating, plain):
        assert (await ws.recv())["type"] == "welcome"
        assert (await ws.request({"type": "join", "room": "r"}))["type"] == "joined"
    await plain.send({"type": "chat", "room": "r", "text": "ciao " * 200})
    assert (await deflating.recv())["text"] == (await plain.recv())["text"] == "ciao " * 200


@pytest_twisted.ensureDeferred
async def test_compression_bomb_is_rejected_with_1009_and_never_delivered(make_server: Any) -> None:
    """A chat whose compressed frame is far below max_message_size but inflates to 64 times it closes the sender
    with 1009; the room never sees any part of it and the other member stays connected."""
    limit = 64 * 1024
    server = await make_server(room_protocol=True, compression=True, max_message_size=limit)
    attacker = await WSClient.connect(url_of(server))
    member = await WSClient.connect(url_of(server), compression=None)
    for ws in (attacker, member):
        assert (await ws.recv())["type"] == "welcome"
        assert (await ws.request({"type": "join", "room": "r"}))["type"] == "joined"
    assert "permessage-deflate" in attacker.ws.response.headers["Sec-WebSocket-Extensions"]
    bomb = json.dumps({"type": "chat", "room": "r", "text": "a" * (64 * limit)})
    written: list[int] = []
    transport = attacker.ws.transport
    write = transport.write
    transport.write = lambda data: (written.append(len(data)), write(data))[1]
    received_before = server.get_stats().messages_received
    await attacker.send(bomb)
    assert 0 < sum(written) < limit // 4, f"the compressed frame ({sum(written)} bytes) is well within the limit"
    code, _ = await attacker.closed()
    assert code == 1009
    assert server.get_stats().messages_received == received_before
    with pytest.raises(TimeoutError):
        await member.recv_raw(timeout=0.3)
    assert (await member.request({"type": "chat", "room": "r", "text": "after"}))["text"] == "after"
    await eventually(lambda: server.get_stats().connections == 1)


@pytest_twisted.ensureDeferred
async def test_message_inflating_to_exactly_the_limit_is_delivered(make_server: Any) -> None:
    limit = 64 * 1024
    server = await make_server(compression=True, max_message_size=limit)
    received: list[Any] = []
    server.on("connection", lambda client: client.on("message", received.append))
    ws = await WSClient.connect(url_of(server))
    await ws.send("b" * limit)
    await eventually(lambda: len(received) == 1)
    assert received == ["b" * limit]
    await ws.send("b" * (limit + 1))
    assert (await ws.closed())[0] == 1009
    assert len(received) == 1


@pytest_twisted.ensureDeferred
async def test_compression_off_no_extension_and_rsv1_is_a_protocol_error(make_server: Any) -> None:
    """With compression off (the default), an offer gets a 101 without Sec-WebSocket-Extensions, and a frame with
    RSV1 set (what a client that compresses anyway would send) closes the connection with 1002."""
    server = await make_server(room_protocol=True)
    ws = await RawWebSocket.connect(server.port, headers={
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
    assert ws.header("Sec-WebSocket-Extensions") is None
    assert json.loads((await ws.read_frame()).payload)["type"] == "welcome"
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    deflated = (compressor.compress(b'{"type":"join","room":"r"}') + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    ws.send_frame(OP_TEXT, deflated, rsv=4)
    await ws.expect_close(1002)
    assert server.get_stats().messages_received == 0


@pytest_twisted.ensureDeferred
async def test_compression_on_uncompressed_frames_still_work(make_server: Any) -> None:
    """RSV1 is per message: after negotiating, a client may still send plain frames."""
    server = await make_server(testee=True, compression=True)
    ws = await RawWebSocket.connect(server.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert ws.header("Sec-WebSocket-Extensions") == "permessage-deflate"
    ws.send_frame(OP_TEXT, b"plain")
    echo = await ws.read_frame()
    assert echo.opcode == OP_TEXT
    assert echo.rsv == 4, "the server compresses what it sends"
    assert zlib.decompressobj(-15).decompress(echo.payload + b"\x00\x00\xff\xff") == b"plain"


def deflated(data: bytes) -> bytes:
    """``data`` as one permessage-deflate message body (raw deflate, sync flush, trailer stripped)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest_twisted.ensureDeferred
async def test_64_mib_bomb_in_a_64_kib_frame_costs_the_server_no_memory(make_server: Any) -> None:
    """RELIABILITY P10: a frame just under the 64 KiB limit that would inflate to 64 MiB (about 1000:1) closes the
    connection with 1009, and the server (in this process, so tracemalloc sees it) never holds more than a
    couple of MiB for it: inflation stops at the limit instead of expanding the whole frame."""
    limit = 64 * 1024
    server = await make_server(room_protocol=True, compression=True, max_message_size=limit)
    bomb = deflated(b"\0" * (64 * 1024 * 1024))
    assert len(bomb) < limit
    ws = await RawWebSocket.connect(server.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert ws.header("Sec-WebSocket-Extensions") == "permessage-deflate"
    assert json.loads(zlib.decompressobj(-15).decompress((await ws.read_frame()).payload + b"\x00\x00\xff\xff"))[
        "type"] == "welcome"
    tracemalloc.start()
    try:
        ws.send_frame(OP_TEXT, bomb, rsv=4)
        await ws.expect_close(1009)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, f"the server allocated {peak} bytes for a bomb it must not inflate"
    assert server.get_stats().messages_received == 0
