"""Resume sessions shared by the nodes of a Redis cluster (roomserver/broker/sessions.py), with two in-process
nodes on one Redis prefix: a client of node A that dropped continues on node B (same client id, no presence
leave or join), once; two nodes racing for one session give one winner; no session key is left behind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest_twisted
from twisted.internet import defer

from roomserver import WebSocketServer
from roomserver.core.session import ShareSession
from roomserver.redislink import RedisLink

from .auth_support import received_within as quiet
from .redis_support import REDIS_URL, redis_link, scan
from .support import WSClient, aio, eventually, start_server, url_of


async def session_keys(link: RedisLink, prefix: str) -> list[bytes]:
    return [key for key in await scan(link, prefix) if key.decode()[len(prefix):].startswith("s:")]


@pytest_twisted.async_yield_fixture
async def nodes(prefix: str) -> Any:
    """Two nodes on the test's prefix (stopped before its keys are deleted), and a Redis link."""
    url = f"{REDIS_URL}?prefix={prefix}"
    started: list[WebSocketServer] = []
    link = await redis_link()

    async def make(**options: Any) -> WebSocketServer:
        started.append(await start_server(room_protocol=True, store=url, broker=url, rate_limit=0, **options))
        return started[-1]

    yield make, link
    await link.stop()
    for server in started:
        await server.stop()


async def connect(server: WebSocketServer) -> tuple[WSClient, dict[str, Any]]:
    ws = await WSClient.connect(url_of(server))
    welcome = await ws.recv()
    assert welcome["type"] == "welcome"
    return ws, welcome


async def dropped_member(a: WebSocketServer, room: str) -> tuple[dict[str, Any], int]:
    """An anonymous client of ``a`` in ``room`` that sent one chat, then dropped (no close frame)."""
    ws, welcome = await connect(a)
    await ws.request({"type": "join", "room": room})
    await ws.send({"type": "chat", "room": room, "text": "before", "id": 1})
    chat = await ws.recv()
    ack = await ws.recv()
    assert chat["from"] == welcome["id"] and ack["type"] == "ack"
    ws.abort()
    await eventually(lambda: welcome["id"] not in a.clients)
    return welcome, int(ack["seq"])


@pytest_twisted.ensureDeferred
async def test_a_dropped_client_continues_on_another_node_with_its_id_and_no_presence_flap(
        nodes: Any, prefix: str) -> None:
    make, link = nodes
    a, b = await make(), await make()
    watcher, _ = await connect(b)
    joined = await watcher.request({"type": "join", "room": "lobby", "presence": True})
    assert [m["user"] for m in joined["members"]] == [joined_user := joined["members"][0]["user"]]
    welcome, seq = await dropped_member(a, "lobby")
    old_id = welcome["id"]
    assert (await watcher.recv()) == {"type": "presence", "room": "lobby", "event": "join", "user": old_id}
    assert (await watcher.recv())["text"] == "before"
    assert await quiet(watcher) == [], "the drop is held: no leave"
    assert len(await session_keys(link, prefix)) == 1, "the detached session is recorded in Redis"

    moved, new_welcome = await connect(b)
    assert new_welcome["id"] != old_id
    await moved.send({"type": "resume", "session": welcome["session"], "rooms": {"lobby": seq}, "id": "r"})
    await moved.send({"type": "chat", "room": "lobby", "text": "after", "id": 2})  # waits behind the claim
    assert await moved.recv() == {"type": "resumed", "room": "lobby", "continued": True, "id": "r",
                                  "client": old_id, "recovered": True}
    chat = await moved.recv()
    assert (chat["text"], chat["from"]) == ("after", old_id), "the same client id, in order behind the resume"
    assert (await moved.recv())["type"] == "ack"
    seen = await watcher.recv()
    assert (seen["text"], seen["from"]) == ("after", old_id)
    assert b.get_client(old_id) is not None and b.get_client(new_welcome["id"]) is None
    # Node a forgets its copy and lets go of the presence it held, with no leave anywhere.
    await eventually(lambda: not a.presence_tracker.members("lobby"))
    assert await quiet(watcher) == [], "no leave, no join"
    listed = await watcher.request({"type": "presence", "room": "lobby", "id": 3})
    assert {m["user"]: m["connections"] for m in listed["members"]} == {joined_user: 1, old_id: 1}
    assert await session_keys(link, prefix) == [], "claimed: no session key left"

    for node in (a, b):
        again, _ = await connect(node)
        reply = await again.request({"type": "resume", "session": welcome["session"], "rooms": {}})
        assert reply == {"type": "resumed", "continued": False}, "a session continues once, cluster-wide"
        await again.close()

    # Its new session continues on node a in turn, still with the same id.
    await moved.send({"type": "chat", "room": "lobby", "text": "x", "id": 4})
    assert (await moved.recv())["text"] == "x"
    last = (await moved.recv())["seq"]
    assert (await watcher.recv())["text"] == "x"
    moved.abort()
    await eventually(lambda: old_id not in b.clients)
    back, _ = await connect(a)
    reply = await back.request({"type": "resume", "session": new_welcome["session"], "rooms": {"lobby": last}})
    assert reply == {"type": "resumed", "room": "lobby", "continued": True, "client": old_id, "recovered": True}
    await eventually(lambda: old_id not in {m["user"] for m in b.presence_tracker.members("lobby")})
    assert await quiet(watcher) == [], "moving back: no leave, no join either"


@pytest_twisted.ensureDeferred
async def test_two_nodes_racing_for_one_session_give_one_winner(nodes: Any, prefix: str) -> None:
    make, link = nodes
    a, b = await make(), await make()
    for round_ in range(5):
        welcome, _ = await dropped_member(a, f"race{round_}")
        (on_a, _), (on_b, _) = await connect(a), await connect(b)
        request = {"type": "resume", "session": welcome["session"], "rooms": {}}
        await defer.DeferredList([defer.ensureDeferred(on_a.send(request)), defer.ensureDeferred(on_b.send(request))])
        replies = [await on_a.recv(), await on_b.recv()]
        assert sorted(reply["continued"] for reply in replies) == [False, True], replies
        winner = next(reply for reply in replies if reply["continued"])
        assert winner["client"] == welcome["id"]
        assert f"{prefix}s:{welcome['session']}".encode() not in await session_keys(link, prefix)
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_an_unclaimed_session_key_expires_with_resume_ttl(nodes: Any, prefix: str) -> None:
    make, link = nodes
    a = await make(resume_ttl=1)
    await dropped_member(a, "r")
    [key] = await session_keys(link, prefix)
    assert 0 < int(await link.command("PTTL", key)) <= 1000
    keys: list[bytes] = [key]
    for _ in range(40):
        keys = await session_keys(link, prefix)
        if not keys:
            break
        await aio(asyncio.sleep(0.1))
    assert keys == [], "expired with the session"


@pytest_twisted.ensureDeferred
async def test_an_authenticated_users_record_is_claimed_by_that_user_only(nodes: Any, prefix: str) -> None:
    make, link = nodes
    a = await make()
    sessions = a.cluster_sessions
    assert sessions is not None
    await sessions.share(ShareSession("tok", "c1", "alice", ("r",)))
    assert await sessions.claim("tok", "mallory") is None
    assert len(await session_keys(link, prefix)) == 1, "left for alice"
    record = await sessions.claim("tok", "alice")
    assert record == {"id": "c1", "user": "alice", "rooms": ["r"], "node": a.broker.node_id}  # type: ignore[attr-defined]
    assert await sessions.claim("tok", "alice") is None, "once"


@pytest_twisted.ensureDeferred
async def test_memory_broker_has_no_shared_sessions() -> None:
    server = await start_server(room_protocol=True)
    try:
        assert server.cluster_sessions is None and server.room_protocol is not None
        assert server.room_protocol.shared is False
    finally:
        await server.stop()


async def drained_member(make: Any, handover: float) -> tuple[str, WebSocketServer, WSClient, dict[str, Any], int,
                                                              Any]:
    """Nodes a (``drain_handover=handover``) and b; a watcher of room lobby's presence on b; a client of a in
    lobby, then ``a.stop()``: the client got the reconnect hint and the 1001 close. Returns node a's id, node b,
    the watcher, the client's welcome, the room's last seq and the stop's Deferred."""
    a, b = await make(drain_interval=0.2, drain_handover=handover), await make()
    watcher, _ = await connect(b)
    await watcher.request({"type": "join", "room": "lobby", "presence": True})
    ws, welcome = await connect(a)
    joined = await ws.request({"type": "join", "room": "lobby"})
    assert (await watcher.recv())["event"] == "join"
    stopping = a.stop()
    assert (await ws.recv())["type"] == "reconnect"
    assert (await ws.closed())[0] == 1001
    return a.broker.node_id, b, watcher, welcome, int(joined.get("seq", 0)), stopping  # type: ignore[attr-defined]


async def node_entries(link: RedisLink, prefix: str, node: str) -> tuple[Any, int, list[bytes]]:
    """Node ``node`` in the cluster's presence: its deadline, whether its index exists, its fields in lobby."""
    deadline = await link.command("ZSCORE", f"{prefix}pnodes", node)
    index = int(await link.command("EXISTS", f"{prefix}pn:{node}"))
    fields = [f for f in await link.command("HKEYS", f"{prefix}p:lobby") if bytes(f).startswith(node.encode())]
    return deadline, index, fields


@pytest_twisted.ensureDeferred
async def test_a_drained_node_leaves_the_cluster_presence_once_its_sessions_continued_elsewhere(
        nodes: Any, prefix: str) -> None:
    """The G1 drain's presence: a node that stops waits (``drain_handover``, here far longer than needed) for
    the sessions it holds to be continued on other nodes, then leaves the cluster's presence at once: the
    user is listed once, with one connection, and nobody saw a leave."""
    make, link = nodes
    node_a, b, watcher, welcome, seq, stopping = await drained_member(make, handover=60)
    assert not stopping.called, "waiting for the session to be continued"
    assert (await node_entries(link, prefix, node_a))[1] == 1, "its held presence is still node a's"

    moved, _ = await connect(b)
    reply = await moved.request({"type": "resume", "session": welcome["session"], "rooms": {"lobby": seq}})
    assert (reply["continued"], reply["client"]) == (True, welcome["id"])
    await eventually(lambda: stopping.called)  # well within the 60 s handover: at the taken notice
    await stopping
    assert await node_entries(link, prefix, node_a) == (None, 0, []), "node a left the cluster's presence"
    listed = await watcher.request({"type": "presence", "room": "lobby", "id": 1})
    assert {m["user"]: m["connections"] for m in listed["members"]}[welcome["id"]] == 1
    assert await quiet(watcher) == [], "no leave, no join"


@pytest_twisted.ensureDeferred
async def test_sessions_nobody_continues_within_the_handover_are_left_to_the_reaper(
        nodes: Any, prefix: str) -> None:
    """A drained client that has not come back when ``drain_handover`` ends may still come back: its presence
    stays the stopped node's, for the reaper (``presence_ttl``), and nobody sees a leave before that."""
    make, link = nodes
    node_a, _, watcher, welcome, _, stopping = await drained_member(make, handover=0.5)
    await stopping
    deadline, index, fields = await node_entries(link, prefix, node_a)
    assert deadline is not None and index == 1, "left for the reaper"
    assert fields == [f"{node_a}|{welcome['id']}".encode()]
    assert await quiet(watcher) == [], "no leave while the user may still resume"
