"""Every limit of docs/limits.md over real sockets, each asserting the exact error or close code."""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

import pytest
import pytest_twisted
import websockets

from roomserver import CloseCode
from roomserver.core.ratelimit import ErrorBudget

from .support import RawClient, WSClient, aio, eventually, frame, logged_errors, url_of


async def joined(server: Any, room: str = "r", **connect: Any) -> WSClient:
    ws = await WSClient.connect(url_of(server), **connect)
    assert (await ws.recv())["type"] == "welcome"
    assert (await ws.request({"type": "join", "room": room}))["type"] == "joined"
    return ws


@pytest_twisted.ensureDeferred
async def test_oversize_message_closes_with_1009(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_message_size=1024)
    ws = await joined(server)
    await ws.send({"type": "chat", "room": "r", "text": "x" * 900})
    assert (await ws.recv())["seq"] == 1
    await ws.send({"type": "chat", "room": "r", "text": "x" * 2000})
    assert (await ws.closed())[0] == CloseCode.MESSAGE_TOO_BIG


@pytest_twisted.ensureDeferred
async def test_fragmented_message_over_the_limit_closes_with_1009(make_server: Any) -> None:
    """Small frames cannot add up to more than max_message_size: the server never buffers past the limit."""
    server = await make_server(room_protocol=True, max_message_size=4096)
    raw = await RawClient.connect(server)
    await raw.read_frame()  # welcome
    raw.send(frame(0x1, b"a" * 64, fin=False))
    for _ in range(100):
        raw.send(frame(0x0, b"a" * 64, fin=False))
    assert await raw.close_code() == CloseCode.MESSAGE_TOO_BIG


@pytest_twisted.ensureDeferred
async def test_too_many_fragments_closes_with_1008(make_server: Any) -> None:
    """Zero-length continuation frames never reach a size limit; the fragment cap stops them."""
    server = await make_server(room_protocol=True, max_fragments=16)
    raw = await RawClient.connect(server)
    await raw.read_frame()
    raw.send(frame(0x1, b"{", fin=False) + frame(0x0, b"", fin=False) * 1000)
    assert await raw.close_code() == CloseCode.POLICY_VIOLATION
    assert server.get_stats().drops["too_many_fragments"] == 1


@pytest_twisted.ensureDeferred
async def test_after_failing_a_connection_the_server_parses_nothing_but_the_close(make_server: Any) -> None:
    """RFC 6455 section 7.1.7 (RELIABILITY P9's CPU budget): once the fragment cap failed the connection, the
    frames after the offending one in the same read are not parsed, nor are later reads (read and dropped); the
    client's close frame still completes the closing handshake at once (the close-handshake timeout here is
    30 s, so the end of the connection within a few seconds is the answer being parsed)."""
    server = await make_server(room_protocol=True, max_fragments=16, close_handshake_timeout=30.0)
    raw = await RawClient.connect(server)
    await raw.read_frame()
    [client] = server.clients.values()
    protocol = client._protocol
    assert protocol is not None
    raw.send(frame(0x1, b"{", fin=False) + frame(0x0, b"", fin=False) * 5000)  # 30 KB: one read
    assert await raw.close_code() == CloseCode.POLICY_VIOLATION
    assert protocol.fragments == 17, "parsing stopped at the frame over the cap"
    later = frame(0x0, b"", fin=False) * 5000
    raw.send(later)
    await eventually(lambda: protocol.ignored_octets >= len(later))  # (and any rest of the first write)
    assert protocol.fragments == 17
    raw.send(frame(0x8, (1008).to_bytes(2, "big")))
    assert await raw.at_eof(timeout=5)
    await eventually(lambda: server.get_stats().connections == 0)
    assert client.close_code == CloseCode.POLICY_VIOLATION


@pytest_twisted.ensureDeferred
async def test_fragments_within_the_cap_are_reassembled(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_fragments=16)
    raw = await RawClient.connect(server)
    await raw.read_frame()
    message = json.dumps({"type": "join", "room": "frag"}).encode()
    parts = [message[i:i + 4] for i in range(0, len(message), 4)]
    assert len(parts) <= 16
    raw.send(frame(0x1, parts[0], fin=False) + b"".join(
        frame(0x0, part, fin=i == len(parts) - 1) for i, part in enumerate(parts[1:], start=1)))
    opcode, payload = await raw.read_frame()
    assert opcode == 0x1 and json.loads(payload)["type"] == "joined"


@pytest_twisted.ensureDeferred
async def test_room_full(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_room_clients=2)
    await joined(server, "small")
    await joined(server, "small")
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    reply = await ws.request({"type": "join", "room": "small", "id": 1})
    assert reply["code"] == "room_full" and reply["id"] == 1
    assert len(server.get_room("small").clients) == 2
    assert (await ws.request({"type": "join", "room": "other"}))["type"] == "joined", "the connection stays usable"


@pytest_twisted.ensureDeferred
async def test_too_many_rooms_per_client_and_in_total(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_rooms_per_client=3, max_rooms=4)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    for name in ("a", "b", "c"):
        assert (await ws.request({"type": "join", "room": name}))["type"] == "joined"
    assert (await ws.request({"type": "join", "room": "d"}))["code"] == "too_many_rooms"
    other = await WSClient.connect(url_of(server))
    await other.recv()
    assert (await other.request({"type": "join", "room": "d"}))["type"] == "joined"
    assert (await other.request({"type": "join", "room": "e"}))["code"] == "too_many_rooms"
    assert (await other.request({"type": "join", "room": "a"}))["type"] == "joined", "existing rooms still open"
    assert server.get_stats().rooms == 4


@pytest_twisted.ensureDeferred
async def test_rate_limit_drops_with_an_error_then_recovers(make_server: Any) -> None:
    server = await make_server(room_protocol=True, rate_limit=5, rate_burst=5, flood_factor=100)
    ws = await joined(server)  # the join took one token
    for i in range(8):
        await ws.send({"type": "chat", "room": "r", "text": str(i)})
    replies = [await ws.recv() for _ in range(8)]
    chats = [r for r in replies if r["type"] == "chat"]
    errors = [r for r in replies if r["type"] == "error"]
    assert [c["text"] for c in chats] == ["0", "1", "2", "3"]
    assert {e["code"] for e in errors} == {"rate_limited"} and len(errors) == 4
    await aio(asyncio.sleep(0.5))  # refills 2.5 tokens at 5/s
    await ws.send({"type": "chat", "room": "r", "text": "later"})
    assert (await ws.recv())["text"] == "later"
    assert server.get_room("r").last_seq == 5, "dropped messages never reached the room"


@pytest_twisted.ensureDeferred
async def test_flooding_client_is_closed_with_1008_and_others_are_unaffected(make_server: Any) -> None:
    server = await make_server(room_protocol=True, rate_limit=20, rate_burst=20, flood_factor=3)
    bystander = await joined(server)
    flooder = await joined(server)
    for i in range(500):
        try:
            await flooder.send({"type": "chat", "room": "r", "text": f"flood {i}"})
        except websockets.ConnectionClosed:
            break
    code, _ = await flooder.closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert server.get_stats().drops["flood"] == 1
    seqs = []
    while True:
        try:
            message = await bystander.recv(timeout=0.5)
        except TimeoutError:
            break
        seqs.append(message["seq"])
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) <= 20 + 5, "no more than the bucket (plus its refill) reached the room"
    await bystander.send({"type": "chat", "room": "r", "text": "still here"})
    assert (await bystander.recv())["text"] == "still here"


@pytest_twisted.ensureDeferred
async def test_slowloris_is_cut_at_the_open_handshake_timeout(make_server: Any) -> None:
    """A connection that trickles its request head never completes it: closed at the deadline."""
    server = await make_server(open_handshake_timeout=1.0)
    raw = await RawClient.open_tcp(server)
    loop = asyncio.get_event_loop()
    started = loop.time()
    request = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    for byte in request:
        if raw.reader.at_eof():
            break
        raw.send(bytes([byte]))
        await aio(asyncio.sleep(0.02))
    await raw.at_eof(timeout=3)
    elapsed = loop.time() - started
    assert 0.9 <= elapsed <= 1.6, elapsed
    assert server.get_stats().drops["handshake_timeout"] == 1
    await eventually(lambda: not server.connections.protocols)


@pytest_twisted.ensureDeferred
async def test_five_hundred_slowloris_sockets_are_all_cut_while_real_clients_get_in(make_server: Any) -> None:
    """RELIABILITY H1, scaled to 500 sockets: each sends part of a request head and never ends it. Every one is
    cut at the deadline (none is mistaken for a head waiting unread), and clients connecting during the attack
    are served."""
    server = await make_server(open_handshake_timeout=1.0, room_protocol=True, max_clients=2000)
    attackers = [await RawClient.open_tcp(server) for _ in range(500)]
    for raw in attackers:
        raw.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    legit = [await joined(server, f"r{i}") for i in range(20)]
    for raw in attackers:
        assert await raw.at_eof(timeout=5)
    await eventually(lambda: server.get_stats().drops.get("handshake_timeout") == 500, timeout=5)
    for i, ws in enumerate(legit):
        assert (await ws.request({"type": "chat", "room": f"r{i}", "text": "alive"}))["text"] == "alive"
    assert server.get_stats().connections == 20


@pytest_twisted.ensureDeferred
async def test_completed_handshake_is_not_cut(make_server: Any) -> None:
    server = await make_server(open_handshake_timeout=1.0, room_protocol=True)
    ws = await joined(server)
    await aio(asyncio.sleep(1.5))
    assert (await ws.request({"type": "chat", "room": "r", "text": "alive"}))["text"] == "alive"


@pytest.mark.parametrize("head", [
    b"GET /ws HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(200)),
    b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 64 * 1024,
], ids=["many headers", "one endless header line"])
@pytest_twisted.ensureDeferred
async def test_oversize_request_head_gets_431_and_is_closed(make_server: Any, head: bytes) -> None:
    """RELIABILITY H2: a head over ``max_handshake_size`` (many headers, or 64 KiB of one header that never ends
    its line) gets 431 at the cap and the connection is closed; the server still serves."""
    server = await make_server(max_handshake_size=16 * 1024, room_protocol=True)
    raw = await RawClient.open_tcp(server)
    raw.send(head)
    response = await aio(asyncio.wait_for(raw.reader.read(100), 5))
    assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), response
    assert await raw.at_eof()
    await eventually(lambda: not server.connections.protocols)
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 101),
        ("https://app.example.com", 101),
        ("https://evil.example", 403),
        ("https://app.example.com.evil.com", 403),
        ("null", 403),
    ],
)
@pytest_twisted.ensureDeferred
async def test_allowed_origins(make_server: Any, origin: str | None, status: int) -> None:
    server = await make_server(allowed_origins=("https://app.example.com",))
    headers = f"Origin: {origin}\r\n" if origin is not None else ""
    raw = await RawClient.open_tcp(server)
    raw.send(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n".encode())
    head = await aio(asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 5))
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head


@pytest_twisted.ensureDeferred
async def test_same_origin_is_the_default(make_server: Any) -> None:
    server = await make_server()
    await WSClient.connect(url_of(server), origin=f"http://127.0.0.1:{server.port}")
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server), origin="http://127.0.0.1:1")
    assert info.value.response.status_code == 403
    assert server.get_stats().drops["origin_refused"] == 1


SLOW_CONSUMER_OPTIONS = {"room_protocol": True, "max_send_buffer": 256 * 1024, "rate_limit": 0,
                         "max_message_size": 128 * 1024}


async def stalled_member(server: Any) -> tuple[RawClient, WSClient]:
    """A member of room "r" that reads no more (a 4 KiB receive buffer), and a publisher in the same room."""
    stalled = await RawClient.connect(server, recv_buffer=4096)
    await stalled.read_frame()
    stalled.send(frame(0x1, json.dumps({"type": "join", "room": "r"}).encode()))
    await stalled.read_frame()
    return stalled, await joined(server)


async def publish_until_dropped(server: Any, publisher: WSClient, reader: WSClient | None = None) -> None:
    """32 KiB chats to room "r" until the server drops the stalled member as a slow consumer (at most 12.8 MiB:
    far beyond every kernel buffer on loopback); ``reader`` keeps reading them."""
    text = "x" * 32 * 1024
    for _ in range(400):
        await publisher.send({"type": "chat", "room": "r", "text": text})
        await publisher.recv()
        if reader is not None:
            await reader.recv()
        if server.get_stats().drops.get("slow_consumer"):
            break
    assert server.get_stats().drops["slow_consumer"] == 1


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_dropped_with_4008_and_others_keep_pace(make_server: Any) -> None:
    """A member that stops reading is dropped once its queue passes max_send_buffer; the reader keeps up."""
    server = await make_server(**SLOW_CONSUMER_OPTIONS)
    reader = await joined(server)
    stalled, publisher = await stalled_member(server)
    await publish_until_dropped(server, publisher, reader)
    await eventually(lambda: len(server.get_room("r").clients) == 2, timeout=5)
    # the close frame sits behind everything queued; the connection is gone within the close timeout
    await eventually(lambda: server.get_stats().connections == 2, timeout=5)
    await publisher.send({"type": "chat", "room": "r", "text": "after"})
    assert (await reader.recv())["text"] == "after"
    stalled.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_consumer_that_reads_again_in_time_gets_4008_after_what_was_queued(make_server: Any) -> None:
    """The 4008 on the wire: the close frame leaves behind everything already queued for the member, so a client
    that reads again within close_handshake_timeout gets its messages in order, then the close code, and knows
    to reconnect and resume."""
    server = await make_server(**SLOW_CONSUMER_OPTIONS)
    stalled, publisher = await stalled_member(server)
    await publish_until_dropped(server, publisher)
    seqs = []
    while True:
        opcode, payload = await stalled.read_frame()
        if opcode == 0x8:
            break
        seqs.append(json.loads(payload)["seq"])
    assert int.from_bytes(payload[:2], "big") == 4008
    assert payload[2:].decode().startswith("slow consumer")
    assert seqs == list(range(1, len(seqs) + 1))  # in order, none missing before the close
    stalled.close()


@pytest_twisted.ensureDeferred
async def test_ping_flooder_that_never_reads_is_a_slow_consumer(make_server: Any) -> None:
    server = await make_server(max_send_buffer=128 * 1024, max_message_size=16 * 1024)
    raw = await RawClient.connect(server, recv_buffer=4096)
    ping = frame(0x9, b"p" * 125)
    for _ in range(200):
        raw.send(ping * 100)
        await aio(asyncio.sleep(0))
        if server.get_stats().drops.get("slow_consumer"):
            break
    await eventually(lambda: server.get_stats().drops.get("slow_consumer") == 1, timeout=5)
    await eventually(lambda: not server.connections.protocols, timeout=5)
    raw.close()


@pytest_twisted.ensureDeferred
async def test_open_files_limit_is_raised_at_start(make_server: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    await make_server()
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert new_soft == (new_hard if new_hard != resource.RLIM_INFINITY else new_soft)


@pytest_twisted.ensureDeferred
async def test_peer_that_never_answers_the_close_is_dropped_after_the_close_timeout(make_server: Any) -> None:
    server = await make_server(close_handshake_timeout=1.0)
    clients: list[Any] = []
    server.on("connection", clients.append)
    raw = await RawClient.connect(server)
    await eventually(lambda: clients)
    loop = asyncio.get_event_loop()
    started = loop.time()
    clients[0].close(4000, "bye")
    opcode, payload = await raw.read_frame()
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 4000
    assert await raw.at_eof(timeout=3)  # we never answered: the server drops the TCP connection
    # txaio's timers round the deadline down to the whole second: at most the timeout, never more
    assert loop.time() - started <= 1.0 + 0.3
    await eventually(lambda: server.get_stats().connections == 0)


@pytest.mark.parametrize(
    "probe",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",  # a TLS ClientHello
        bytes(range(256)) * 4 + b"\r\n\r\n",  # garbage
        b"GET /ws HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(2000)) + b"\r\n",  # 2,000 headers
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # no key, no version
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_refused_without_errors_or_leaks(make_server: Any, probe: bytes) -> None:
    """Protocol garbage gets an HTTP 4xx (or the connection closed) and logs no unhandled error."""
    server = await make_server(room_protocol=True)
    with logged_errors() as problems:
        for _ in range(20):
            raw = await RawClient.open_tcp(server)
            raw.send(probe)
            response = await aio(asyncio.wait_for(raw.reader.read(64), 5))
            assert response == b"" or response.startswith(b"HTTP/1.1 4"), response
            raw.close()
        await eventually(lambda: not server.connections.protocols, timeout=5)
    assert problems == []
    assert server.get_stats().connections == 0


def test_send_buffer_must_hold_two_of_the_largest_messages() -> None:
    from roomserver import ServerOptions

    with pytest.raises(ValueError, match="max_send_buffer"):
        ServerOptions(max_message_size=4 * 1024 * 1024, max_send_buffer=4 * 1024 * 1024)
    assert ServerOptions(max_message_size=2 * 1024 * 1024, max_send_buffer=4 * 1024 * 1024)


def test_error_budget_closes_on_the_limit_th_error_in_the_window_and_spread_errors_never_do() -> None:
    budget = ErrorBudget(limit=20, window=5.0)
    assert all(budget.spend(0.25 * n) for n in range(19))
    assert not budget.spend(4.9)  # the 20th error within 5 s
    steady = ErrorBudget(limit=20, window=5.0)
    assert all(steady.spend(0.27 * n) for n in range(1000))  # any 20 of them span more than 5 s


@pytest_twisted.ensureDeferred
async def test_a_client_that_keeps_earning_errors_is_closed_with_1008(make_server: Any) -> None:
    """RELIABILITY A5: 19 bad requests in a row are answered and the connection stays usable; the 20th error
    within 5 s closes it with 1008. Server-side errors (here a full room) do not count."""
    server = await make_server(room_protocol=True, max_room_clients=1, max_rooms=2)
    other = await joined(server)  # room "r" is now full
    client = await WSClient.connect(url_of(server))
    await client.recv()  # welcome
    for _ in range(5):
        assert (await client.request({"type": "join", "room": "r"}))["code"] == "room_full"
    assert (await client.request({"type": "join", "room": "mine"}))["type"] == "joined"  # the server's last room
    for n in range(25):  # the server holds max_rooms: not the client's doing either
        assert (await client.request({"type": "join", "room": f"more-{n}"}))["code"] == "too_many_rooms"
    assert (await client.request({"type": "leave", "room": "mine"}))["type"] == "left"
    for n in range(19):
        reply = await client.request({"type": "chat", "room": "elsewhere", "text": str(n)})
        assert reply["code"] == "not_in_room"
    assert (await client.request({"type": "join", "room": "mine"}))["type"] == "joined"  # still usable
    assert (await client.request("not json"))["code"] == "invalid_json"  # the 20th: answered, then closed
    code, reason = await client.closed()
    assert (code, reason) == (CloseCode.POLICY_VIOLATION, "too many errors")
    assert server.get_stats().drops["too_many_errors"] == 1
    await other.send({"type": "chat", "room": "r", "text": "unaffected"})
    assert (await other.recv())["text"] == "unaffected"
