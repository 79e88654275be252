"""Many clients acting at once: ordering, and nothing left behind after abrupt drops or shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest_twisted
from twisted.internet import defer

from roomserver import Client

from .support import RawClient, WSClient, aio, eventually, frame, logged_errors, url_of

MEMBERS = 100
PUBLISHERS = 20
PER_PUBLISHER = 200


@pytest_twisted.ensureDeferred
async def test_twenty_publishers_one_room_everyone_sees_the_same_order(make_server: Any) -> None:
    """20 publishers x 200 messages into a room of 100 members: every member gets all 4,000 messages, in the
    same seq order with no gap or duplicate, and each publisher's messages keep their sending order."""
    server = await make_server(room_protocol=True, rate_limit=0, max_clients=200)
    members = [await WSClient.connect(url_of(server)) for _ in range(MEMBERS)]
    ids = []
    for ws in members:
        ids.append((await ws.recv())["id"])
        await ws.send({"type": "join", "room": "big"})
    for ws in members:
        assert (await ws.recv())["type"] == "joined"
    publishers = members[:PUBLISHERS]

    async def publish(ws: WSClient, number: int) -> None:
        for i in range(PER_PUBLISHER):
            await ws.send({"type": "chat", "room": "big", "text": f"{number}:{i}"})
            if i % 20 == 0:
                await aio(asyncio.sleep(0))  # interleave the publishers

    async def collect(ws: WSClient) -> list[dict[str, Any]]:
        return [await ws.recv(timeout=30) for _ in range(PUBLISHERS * PER_PUBLISHER)]

    results: list[Any] = await defer.gatherResults(
        [defer.ensureDeferred(publish(ws, n)) for n, ws in enumerate(publishers)]
        + [defer.ensureDeferred(collect(ws)) for ws in members],
        consumeErrors=True,
    )
    streams = results[PUBLISHERS:]
    expected_seqs = list(range(1, PUBLISHERS * PER_PUBLISHER + 1))
    reference = [(m["seq"], m["text"]) for m in streams[0]]
    for stream in streams:
        assert [m["seq"] for m in stream] == expected_seqs
        assert [(m["seq"], m["text"]) for m in stream] == reference, "every member sees the same order"
    for number in range(PUBLISHERS):
        sent_by_one = [m["text"] for m in streams[0] if m["text"].startswith(f"{number}:")]
        assert sent_by_one == [f"{number}:{i}" for i in range(PER_PUBLISHER)]
        assert all(m["from"] == ids[number] for m in streams[0] if m["text"].startswith(f"{number}:"))


@pytest_twisted.ensureDeferred
async def test_abrupt_drops_leave_no_rooms_clients_or_timers(make_server: Any) -> None:
    """Connections reset at every stage (mid-handshake, after join, mid-message) leave no trace: no client,
    no room, no tracked connection, no pending timer, no live protocol object."""
    from twisted.internet import reactor

    server = await make_server(room_protocol=True, ping_interval=30)
    baseline_calls = len(reactor.getDelayedCalls())
    for round_number in range(30):
        # half a handshake, then reset
        raw = await RawClient.open_tcp(server)
        raw.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        raw.writer.transport.abort()
        # joined, then reset mid-frame
        ws = await WSClient.connect(url_of(server))
        await ws.recv()
        await ws.request({"type": "join", "room": f"room-{round_number % 3}"})
        raw_joined = await RawClient.connect(server)
        await raw_joined.read_frame()
        raw_joined.send(b"\x81\xfe\x01\x00")  # header of a 256-byte frame, then nothing
        ws.abort()
        raw_joined.writer.transport.abort()
    await eventually(lambda: not server.connections.protocols, timeout=10)
    stats = server.get_stats()
    assert (stats.connections, stats.rooms) == (0, 0)
    assert server.registry.member_count() == 0 and not server.clients
    await eventually(lambda: len(reactor.getDelayedCalls()) <= baseline_calls, timeout=5)
    gc.collect()
    assert not [obj for obj in gc.get_objects() if isinstance(obj, Client) and obj._server is server]


@pytest_twisted.ensureDeferred
async def test_requests_after_a_close_frame_or_a_reset_never_reach_a_room(make_server: Any) -> None:
    """A join and a chat that follow the client's own close frame in the same read are not acted upon (the
    connection is closing), and a join sent just before a reset leaves no dead member behind: the room's only
    member sees no ghost chat, and the registry holds live connections only."""
    server = await make_server(room_protocol=True, rate_limit=0)
    watcher = await WSClient.connect(url_of(server))
    await watcher.recv()
    await watcher.request({"type": "join", "room": "r"})
    join = frame(0x1, json.dumps({"type": "join", "room": "r"}).encode())
    ghost = frame(0x1, json.dumps({"type": "chat", "room": "r", "text": "ghost"}).encode())
    for _ in range(20):  # the close frame first: what follows it in the same read is not acted upon
        closing = await RawClient.connect(server)
        await closing.read_frame()
        closing.send(frame(0x8, (1000).to_bytes(2, "big")) + join + ghost)
        assert await closing.close_code() == 1000
    await watcher.send({"type": "chat", "room": "r", "text": "last"})
    assert (await watcher.recv())["text"] == "last"  # no ghost before it
    for _ in range(20):  # a join, then a reset: processed or not, it leaves no dead member behind
        resetting = await RawClient.connect(server)
        await resetting.read_frame()
        resetting.send(join + ghost)
        resetting.writer.transport.abort()
    await eventually(lambda: server.get_stats().connections == 1, timeout=10)
    await eventually(lambda: len(server.get_room("r").clients) == 1, timeout=5)
    assert server.registry.member_count() == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_is_freed_by_reference_counting_alone(make_server: Any) -> None:
    """Connections, from the HTTP upgrade to their close (by the client, by the server, reset), leave no reference
    cycle behind: with the cyclic garbage collector off throughout, their protocol and ``Client`` objects are gone
    and nothing of theirs on the server side (HTTP channel and request included) is left for it to find.
    Otherwise every closed connection would wait in the oldest generation for a full collection, the pause that
    grows with the heap (roomserver/heap.py)."""
    from roomserver.websocket import RoomServerProtocol

    server = await make_server(room_protocol=True, ping_interval=30)
    stays = await WSClient.connect(url_of(server))  # keeps the room: rooms are not what is measured here
    await stays.recv()
    await stays.request({"type": "join", "room": "lobby"})
    leaving: list[WSClient] = []
    ids: list[str] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(6):
            ws = await WSClient.connect(url_of(server))
            ids.append((await ws.recv())["id"])
            await ws.request({"type": "join", "room": "lobby"})
            await ws.send({"type": "chat", "room": "lobby", "text": "bye"})
            await ws.recv()
            leaving.append(ws)
        await leaving[0].close()
        await leaving[1].close()
        leaving[2].abort()
        leaving[3].abort()
        for client_id in ids[4:]:
            server.clients[client_id].close(1000, "done")
        await eventually(lambda: len(server.clients) == 1 and len(server.connections.protocols) == 1, timeout=10)
        await aio(asyncio.sleep(0.1))
        protocols = [obj for obj in gc.get_objects() if type(obj) is RoomServerProtocol]
        clients = [obj for obj in gc.get_objects() if type(obj) is Client and obj._server is server]
        assert (len(protocols), len(clients)) == (1, 1), "only the member that stays is alive"
        del protocols, clients
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sorted({type(obj).__qualname__ for obj in gc.garbage
                       if type(obj).__module__.startswith(("roomserver", "autobahn", "twisted"))})
        assert left == [], f"reference cycles of closed connections: {left}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    await stays.close()


@pytest_twisted.ensureDeferred
async def test_stop_logs_no_error_and_leaves_nothing(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    clients = [await WSClient.connect(url_of(server)) for _ in range(10)]
    for ws in clients:
        await ws.recv()
        await ws.request({"type": "join", "room": "r"})
    with logged_errors() as problems:
        await server.stop()
    assert problems == []
    for ws in clients:
        assert (await ws.closed())[0] == 1001
    assert server.get_stats().connections == 0 and server.get_stats().rooms == 0
