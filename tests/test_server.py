"""Integration tests of the library API (the seed's example) over real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import websockets

from roomserver import Client, ServerStats, WebSocketServer

from .support import WSClient, aio, eventually, url_of


@pytest_twisted.ensureDeferred
async def test_seed_example_stats_are_exact(make_server: Any) -> None:
    """The seed's example: one client connects, joins, sends one chat broadcast back to it -> (1, 1, 1, 2)."""
    server: WebSocketServer = await make_server(path="/ws", max_clients=1000, ping_interval=30.0)

    @server.on("connection")
    def on_connection(client: Client) -> None:
        @client.on("message")
        def on_message(data: str) -> None:
            message = json.loads(data)
            if message["type"] == "join":
                room = server.create_room(message["room"])
                room.clients.add(client)
            elif message["type"] == "chat":
                server.broadcast(message["room"], {"type": "chat", "from": client.id, "text": message["text"]})

    ws = await WSClient.connect(url_of(server))
    await ws.send({"type": "join", "room": "lobby"})
    await ws.send({"type": "chat", "room": "lobby", "text": "hi"})
    received = await ws.recv()
    assert received["type"] == "chat" and received["text"] == "hi"
    assert server.get_stats() == ServerStats(connections=1, rooms=1, messages_sent=1, messages_received=2)
    await ws.close()
    await eventually(lambda: server.get_stats().connections == 0)
    assert server.get_stats().rooms == 0, "the room emptied by the disconnect must be cleaned up"


@pytest_twisted.ensureDeferred
async def test_port_zero_binds_an_ephemeral_port(make_server: Any) -> None:
    server = await make_server(port=0)
    assert isinstance(server.port, int) and server.port > 0


@pytest_twisted.ensureDeferred
async def test_library_sends_nothing_on_its_own(make_server: Any) -> None:
    """Without the room protocol there is no welcome: the first thing a client gets is what a handler sends."""
    server = await make_server()
    server.on("connection", lambda client: client.send({"hello": client.id}))
    ws = await WSClient.connect(url_of(server))
    first = await ws.recv()
    assert set(first) == {"hello"}
    assert server.get_stats().messages_sent == 1


@pytest_twisted.ensureDeferred
async def test_broadcast_exclude_count_and_binary(make_server: Any) -> None:
    server = await make_server()
    clients: list[Client] = []
    server.on("connection", clients.append)
    a, b, c = [await WSClient.connect(url_of(server)) for _ in range(3)]
    await eventually(lambda: len(clients) == 3)
    room = server.create_room("r")
    for client in clients:
        room.clients.add(client)
    assert server.broadcast("r", {"n": 1}, exclude=clients[0]) == 2
    assert await b.recv() == {"n": 1} and await c.recv() == {"n": 1}
    assert server.broadcast(room, b"\x00\x01") == 3
    for ws in (a, b, c):
        assert await ws.recv_raw() == b"\x00\x01"
    assert server.broadcast("r", "plain text", exclude=clients[1:]) == 1
    assert await a.recv_raw() == "plain text"
    assert server.broadcast("no-such-room", {"x": 1}) == 0
    assert clients[0].rooms == frozenset({"r"})


@pytest_twisted.ensureDeferred
async def test_client_ids_are_unique_and_unguessable(make_server: Any) -> None:
    server = await make_server()
    ids: list[str] = []
    server.on("connection", lambda client: ids.append(client.id))
    for _ in range(20):
        ws = await WSClient.connect(url_of(server))
        await ws.close()
    await eventually(lambda: len(ids) == 20)
    assert len(set(ids)) == 20
    assert all(len(i) >= 22 for i in ids), "ids carry at least 128 random bits"


@pytest_twisted.ensureDeferred
async def test_handler_exception_is_logged_and_harms_nobody(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    good: list[str] = []

    @server.on("connection")
    def on_connection(client: Client) -> None:
        client.on("message", lambda data: 1 / 0)
        client.on("message", good.append)

    a = await WSClient.connect(url_of(server))
    b = await WSClient.connect(url_of(server))
    await a.recv(), await b.recv()
    await a.request({"type": "join", "room": "x"})
    await b.request({"type": "join", "room": "x"})
    await a.send({"type": "chat", "room": "x", "text": "still alive"})
    assert (await a.recv())["text"] == "still alive"
    assert (await b.recv())["text"] == "still alive"
    await eventually(lambda: len(good) == 3)
    assert server.get_stats().connections == 2


@pytest_twisted.ensureDeferred
async def test_close_event_and_cleanup_after_abrupt_drop(make_server: Any) -> None:
    """A client whose TCP connection dies with no close frame leaves every room; empty rooms go away."""
    server = await make_server(room_protocol=True)
    closed: list[str] = []
    server.on("connection", lambda client: client.on("close", lambda: closed.append(client.id)))
    keeper = server.create_room("kept", keep=True)
    a = await WSClient.connect(url_of(server))
    b = await WSClient.connect(url_of(server))
    a_id = (await a.recv())["id"]
    await b.recv()
    for room in ("kept", "shared", "alone"):
        await a.request({"type": "join", "room": room})
    await b.request({"type": "join", "room": "shared"})
    assert server.get_stats().rooms == 3
    a.abort()
    await eventually(lambda: closed == [a_id])
    assert server.get_stats().connections == 1
    assert server.get_room("alone") is None
    assert server.get_room("kept") is keeper and len(keeper.clients) == 0
    shared = server.get_room("shared")
    assert shared is not None and [c.id for c in shared.clients] == [server.get_client(c.id).id for c in shared.clients]
    assert all(c.id != a_id for c in shared.clients)
    assert server.registry.member_count() == 1


@pytest_twisted.ensureDeferred
async def test_client_send_close_and_rooms(make_server: Any) -> None:
    server = await make_server()
    clients: list[Client] = []
    server.on("connection", clients.append)
    ws = await WSClient.connect(url_of(server))
    await eventually(lambda: clients)
    client = clients[0]
    assert client.send({"a": 1}) and client.send("t") and client.send(b"b")
    assert await ws.recv() == {"a": 1}
    assert await ws.recv_raw() == "t"
    assert await ws.recv_raw() == b"b"
    client.close(4000, "bye")
    assert await ws.closed() == (4000, "bye")
    await eventually(lambda: not client.open)
    assert client.send({"late": True}) is False
    assert (client.close_code, client.close_reason) == (4000, "bye"), "a str, as when the peer closed first"


@pytest_twisted.ensureDeferred
async def test_a_long_close_reason_is_cut_at_a_character_boundary(make_server: Any) -> None:
    """123 bytes of reason fit a close frame: cutting "é" * 100 (200 bytes) in the middle of a character sent
    invalid UTF-8, which a conforming peer takes for a protocol error."""
    server = await make_server()
    clients: list[Client] = []
    server.on("connection", clients.append)
    for code in (1008, 4000):  # 1008 goes through Autobahn's sendCloseFrame, 4000 through its sendClose
        ws = await WSClient.connect(url_of(server))
        await eventually(lambda: len(clients) == 1)
        clients.pop().close(code, "é" * 100)
        assert await ws.closed() == (code, "é" * 61)


@pytest_twisted.ensureDeferred
async def test_wrong_path_gets_404(make_server: Any) -> None:
    server = await make_server(path="/ws")
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server, "/other"))
    assert info.value.response.status_code == 404
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server, "/ws/deeper"))
    assert info.value.response.status_code == 404


@pytest_twisted.ensureDeferred
async def test_nested_path(make_server: Any) -> None:
    server = await make_server(path="/api/v1/socket", room_protocol=True)
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"


@pytest_twisted.ensureDeferred
async def test_max_clients_refuses_with_503_and_keeps_nothing(make_server: Any) -> None:
    server = await make_server(max_clients=2)
    a = await WSClient.connect(url_of(server))
    await WSClient.connect(url_of(server))
    for _ in range(5):
        with pytest.raises(websockets.InvalidStatus) as info:
            await WSClient.connect(url_of(server))
        assert info.value.response.status_code == 503
    await eventually(lambda: len(server.connections.protocols) == 2)
    assert server.get_stats().connections == 2
    await a.close()
    await eventually(lambda: server.get_stats().connections == 1)
    await WSClient.connect(url_of(server))  # a slot freed up
    assert server.get_stats().connections == 2


@pytest_twisted.ensureDeferred
async def test_a_hundred_over_max_clients_all_get_503_and_the_members_keep_chatting(make_server: Any) -> None:
    """RELIABILITY H4: max_clients 20, then 100 more at once: each extra one gets 503, none of the 20 is dropped,
    and they still chat."""
    import asyncio

    server = await make_server(max_clients=20, room_protocol=True)
    members = [await WSClient.connect(url_of(server)) for _ in range(20)]
    for ws in members:
        await ws.recv()
        await ws.request({"type": "join", "room": "full"})

    async def refused() -> int:
        try:
            await websockets.connect(url_of(server), open_timeout=10)
        except websockets.InvalidStatus as error:
            return error.response.status_code
        return 101

    statuses = await aio(asyncio.gather(*(refused() for _ in range(100))))
    assert statuses == [503] * 100
    assert server.get_stats().drops["server_full"] == 100
    await members[0].send({"type": "chat", "room": "full", "text": "still here"})
    for ws in members:
        assert (await ws.recv())["text"] == "still here"
    assert server.get_stats().connections == 20


@pytest_twisted.ensureDeferred
async def test_heartbeat_drops_a_silent_peer(make_server: Any) -> None:
    """A peer that completes the handshake and then never answers pings (a pulled cable) is dropped and
    cleaned up within two intervals."""
    import asyncio

    server = await make_server(ping_interval=1.0, room_protocol=True)
    closed: list[str] = []
    server.on("connection", lambda client: client.on("close", lambda: closed.append(client.id)))
    reader, writer = await aio(asyncio.open_connection("127.0.0.1", server.port))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status = await aio(reader.readuntil(b"\r\n\r\n"))
    assert status.startswith(b"HTTP/1.1 101")
    started = asyncio.get_event_loop().time()
    # never read again, never answer a ping: wait (bounded) for the server to drop us
    await eventually(lambda: len(closed) == 1, timeout=5)
    # txaio's batched timers round deadlines down to the whole second, so "within two intervals" is the bound
    assert asyncio.get_event_loop().time() - started <= 1.0 * 2 + 0.2
    assert server.get_stats().connections == 0
    writer.close()


@pytest_twisted.ensureDeferred
async def test_heartbeat_keeps_a_responsive_peer(make_server: Any) -> None:
    server = await make_server(ping_interval=1.0, room_protocol=True)
    ws = await WSClient.connect(url_of(server))  # websockets answers pings automatically
    await ws.recv()
    await aio(__import__("asyncio").sleep(3.5))  # several ping rounds
    assert server.get_stats().connections == 1
    assert (await ws.request({"type": "join", "room": "a"}))["type"] == "joined"


@pytest_twisted.ensureDeferred
async def test_stop_sends_1001_to_everyone(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    clients = [await WSClient.connect(url_of(server)) for _ in range(5)]
    for ws in clients:
        await ws.recv()
    await server.stop()
    for ws in clients:
        code, _ = await ws.closed()
        assert code == 1001
    assert server.get_stats().connections == 0
    assert not server.connections.protocols
    with pytest.raises(OSError):
        await WSClient.connect(url_of(server))


@pytest_twisted.ensureDeferred
async def test_stop_aborts_clients_that_never_answer(make_server: Any) -> None:
    """stop() fires even when a client never answers the close: it is aborted after shutdown_timeout."""
    import asyncio

    server = await make_server(shutdown_timeout=0.3, close_handshake_timeout=5)
    reader, writer = await aio(asyncio.open_connection("127.0.0.1", server.port))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await aio(reader.readuntil(b"\r\n\r\n"))
    _, idle_writer = await aio(asyncio.open_connection("127.0.0.1", server.port))  # HTTP, no request
    await eventually(lambda: len(server.connections.protocols) == 2)
    loop = asyncio.get_event_loop()
    begun = loop.time()
    await server.stop()
    assert loop.time() - begun < 2
    assert not server.connections.protocols
    writer.close()
    idle_writer.close()
