"""Faults between the nodes of a cluster and Redis, against a dedicated ``redis-server`` each test starts.

Two nodes (in this process, each with its own Redis connections) share the Redis store and broker:

- Redis stops: both nodes keep serving their connections, report ``degraded``, and a chat gets error
  ``unavailable`` (never a silent loss); once Redis is back they reconnect, resubscribe and report ``ok``, the
  retried chat (same ``msg_id``) is stored once and every member ends with the full sequence.
- ``CLIENT KILL TYPE pubsub`` while a publisher runs: the nodes notice, resubscribe, and fetch what their
  members missed from the room streams: every member still ends with the full sequence.
- A join on a node that cannot read the room's last seq (its baseline) is refused ``unavailable``, not answered
  ``joined``: the chats stored before the node's connections come back would lie below a later baseline. A
  join with ``since`` whose replay could be read takes that read as the baseline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor

from roomserver import WebSocketServer
from roomserver.interfaces import StoreError
from roomserver.redislink import RedisLink, RedisURL

from .cluster_support import Member, RetryingPublisher, publish
from .redis_support import RedisServer
from .support import WSClient, aio, metric, url_of
from .web_support import http


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def answer(sender: WSClient, message: dict[str, Any]) -> Any:
    """Send ``message`` and return the reply to it (skipping the chats the sender receives as a member)."""
    await sender.send(message)
    for _ in range(100):
        reply = await sender.recv()
        if reply["type"] != "chat":
            return reply
    raise AssertionError("no reply")


@pytest_twisted.async_yield_fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


async def two_nodes(make_server: Any, redis: RedisServer) -> list[WebSocketServer]:
    return [await make_server(room_protocol=True, store=redis.url, broker=redis.url, rate_limit=0)
            for _ in range(2)]


@pytest_twisted.ensureDeferred
async def test_redis_down_then_back_degrades_refuses_chats_and_loses_nothing(
        make_server: Any, redis_server: RedisServer) -> None:
    a, b = await two_nodes(make_server, redis_server)
    member = Member([url_of(b)], "outage", 10)
    task = asyncio.ensure_future(member.run())
    await aio(asyncio.wait_for(member.ready.wait(), 5))
    sender = await WSClient.connect(url_of(a))
    await sender.recv()  # welcome
    assert (await sender.request({"type": "join", "room": "outage"}))["type"] == "joined"
    for i in range(1, 6):
        ack = await answer(sender, {"type": "chat", "room": "outage", "text": f"m{i}", "id": i, "msg_id": f"m{i}"})
        assert ack["type"] == "ack" and ack["seq"] == i
    await aio(until(lambda: member.last_seq == 5))

    redis_server.stop()
    await aio(until(lambda: not a.broker.health()["ok"] and not b.broker.health()["ok"], timeout=10))
    response = await http(a, "GET", "/healthz")
    assert response.code == 503 and response.json()["status"] == "degraded"
    assert response.json()["broker"]["ok"] is False and response.json()["store"]["ok"] is False
    metrics = (await http(a, "GET", "/metrics")).text
    assert metric(metrics, "roomserver_backend_up", 'backend="broker",kind="redis"') == 0
    assert metric(metrics, "roomserver_backend_up", 'backend="store",kind="redis"') == 0
    error = await answer(sender, {"type": "chat", "room": "outage", "text": "m6", "id": 6, "msg_id": "m6"})
    assert (error["type"], error["code"], error["msg_id"]) == ("error", "unavailable", "m6")
    # Local connections are still served: joining a room with members on this node works (its baseline is
    # known); a room new to the node cannot be followed until Redis is back, and its join is refused.
    other = await WSClient.connect(url_of(a))
    await other.recv()  # welcome
    assert (await other.request({"type": "join", "room": "outage", "id": 1}))["type"] == "joined"
    refused = await other.request({"type": "join", "room": "local-only", "id": 2})
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "unavailable", 2)
    await other.close()

    redis_server.start()
    # RELIABILITY R2: every node resubscribed and its store reconnected within 5 s of Redis answering again
    # (about 1 s here: the links retry at most 2 s apart).
    await aio(until(lambda: all(node.broker.health()["ok"] and node.durable.store.health()["ok"]
                                for node in (a, b)), timeout=5))
    assert (await http(b, "GET", "/healthz")).code == 200
    metrics = (await http(b, "GET", "/metrics")).text
    assert metric(metrics, "roomserver_backend_up", 'backend="broker",kind="redis"') == 1
    for i in range(6, 11):
        ack = await answer(sender, {"type": "chat", "room": "outage", "text": f"m{i}", "id": i, "msg_id": f"m{i}"})
        assert (ack["type"], ack["seq"]) == ("ack", i)
    await aio(asyncio.wait_for(task, 10))
    assert member.texts == [f"m{i}" for i in range(1, 11)]
    assert b.broker.health()["outages"] >= 1 and b.broker.health()["resubscriptions"] >= 2
    await sender.close()


@pytest_twisted.ensureDeferred
async def test_killed_pubsub_connections_resubscribe_and_replay_what_members_missed(
        make_server: Any, redis_server: RedisServer) -> None:
    a, b = await two_nodes(make_server, redis_server)
    total = 400
    killer = RedisLink(RedisURL.parse(redis_server.url), reactor, name="test killer")
    killer.start()
    await killer.when_connected(5)
    try:
        members = [Member([url_of(node)], "kill-pubsub", total) for node in (a, b, b)]
        tasks = [asyncio.ensure_future(member.run()) for member in members]
        await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 5))
        publisher = asyncio.ensure_future(publish(url_of(a), "kill-pubsub", [f"m{i}" for i in range(1, total + 1)],
                                                  window=10))
        await aio(until(lambda: members[1].last_seq >= total // 4, timeout=30))
        outages = b.broker.health()["outages"]
        killed_at = reactor.seconds()
        killed = await killer.command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 2, "both nodes' subscriber connections were killed"
        await aio(until(lambda: b.broker.health()["outages"] > outages, timeout=10))
        lost_at = b.broker.subscriber.lost_at
        assert lost_at is not None and lost_at - killed_at < 2, "the node noticed within 2 s"
        acked = await aio(asyncio.wait_for(publisher, 30))
        await aio(asyncio.wait_for(asyncio.gather(*tasks), 30))
        assert sorted(acked.values()) == list(range(1, total + 1))
        for member in members:
            assert member.texts == [f"m{i}" for i in range(1, total + 1)]
        assert b.broker.health()["ok"] and b.broker.health()["resubscriptions"] >= 2
        assert b.relay.stats()["gap_fetches"] >= 1, "the missed messages came from the room stream"
    finally:
        await killer.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_lost_its_data_makes_members_resume_instead_of_going_silent(
        make_server: Any, tmp_path: Path) -> None:
    """Redis restarted empty (no persistence): seqs start again at 1. A node must not drop the new messages as
    duplicates: it closes its members with 1012 and they resume (``recovered: false``) into the new stream."""
    redis = RedisServer(tmp_path, persistent=False)
    redis.start()
    try:
        a, b = await two_nodes(make_server, redis)
        member = await WSClient.connect(url_of(b))
        session = (await member.recv())["session"]
        assert (await member.request({"type": "join", "room": "reset"}))["type"] == "joined"
        sender = await WSClient.connect(url_of(a))
        await sender.recv()
        await sender.request({"type": "join", "room": "reset"})
        for i in range(1, 4):
            assert (await answer(sender, {"type": "chat", "room": "reset", "text": f"old{i}", "id": i}))["seq"] == i
        assert [(await member.recv())["seq"] for _ in range(3)] == [1, 2, 3]

        redis.stop()
        redis.start()  # empty
        await aio(until(lambda: b.broker.health()["ok"], timeout=10))
        code, _ = await member.closed(timeout=5)
        assert code == 1012
        assert b.relay.stats()["resets"] == 1
        again = await WSClient.connect(url_of(b))
        await again.recv()
        resumed = await again.request({"type": "resume", "session": session, "rooms": {"reset": 3}})
        assert (resumed["type"], resumed["recovered"]) == ("resumed", False)
        assert (await sender.closed(timeout=5))[0] == 1012, "the sender was a member on the other node"
        await aio(until(lambda: a.relay.stats()["resets"] == 1, timeout=5))
        sender = await WSClient.connect(url_of(a))
        await sender.recv()
        await sender.request({"type": "join", "room": "reset"})
        ack = await answer(sender, {"type": "chat", "room": "reset", "text": "new1", "id": 9})
        assert ack["seq"] == 1
        message = await again.recv()
        assert (message["text"], message["seq"]) == ("new1", 1), "the new stream reaches the member"
        for client in (again, sender):
            await client.close()
    finally:
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_five_times_mid_broadcast_loses_and_repeats_nothing(
        make_server: Any, redis_server: RedisServer) -> None:
    """RELIABILITY R1, five times in one run: Redis (append-only, fsync always) is killed and started again
    while a publisher sends through node A and members listen on both nodes. Chats refused meanwhile are sent
    again with their ``msg_id``; one stored just before a kill whose answer was lost comes back as a
    duplicate with its seq. Every member gets every seq once, in order."""
    a, b = await two_nodes(make_server, redis_server)
    total, restarts = 300, 5
    members = [Member([url_of(node)], "restarts", total) for node in (a, b, b)]
    tasks = [asyncio.ensure_future(member.run()) for member in members]
    await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 5))
    publisher = RetryingPublisher(url_of(a), "restarts", total, window=10)
    publishing = asyncio.ensure_future(publisher.run())
    for restart in range(1, restarts + 1):
        await aio(until(lambda r=restart: members[1].last_seq >= r * total // (restarts + 1), timeout=30))
        outages = [node.broker.health()["outages"] for node in (a, b)]
        redis_server.stop()  # SIGKILL
        redis_server.start()
        await aio(until(lambda o=outages: all(node.broker.health()["ok"] and node.broker.health()["outages"] > seen
                                              for node, seen in zip((a, b), o, strict=True)), timeout=10))
    await aio(asyncio.wait_for(publishing, 60))
    await aio(asyncio.wait_for(asyncio.gather(*tasks), 30))
    assert sorted(publisher.acked.values()) == list(range(1, total + 1))
    by_seq = {seq: f"m{number}" for number, seq in publisher.acked.items()}
    for member in members:
        assert member.texts == [by_seq[seq] for seq in range(1, total + 1)]
    assert publisher.refused >= 1, "the restarts did refuse chats"
    assert b.broker.health()["resubscriptions"] >= restarts + 1


@pytest_twisted.ensureDeferred
async def test_a_join_whose_baseline_cannot_be_read_is_refused_not_answered_with_a_hole(
        make_server: Any, redis_server: RedisServer) -> None:
    """Node B cannot reach Redis when a member joins there: the room's last seq cannot be read. Node A comes
    back first and stores chats; B comes back later, its subscription down as well until then. Answered
    ``joined`` at once, the member would never get those chats (B's later read puts the baseline above them):
    the join is refused ``unavailable`` instead (the member is out of the room, presence included), and a join
    once B is back gets every chat sent after its ``joined``."""
    a, b = await two_nodes(make_server, redis_server)
    sender = await WSClient.connect(url_of(a))
    await sender.recv()  # welcome
    assert (await sender.request({"type": "join", "room": "r"}))["type"] == "joined"
    for link in (b.durable.store.link, b.broker.subscriber, b.broker.publisher):
        link._backoff = lambda attempts: 3.0  # B reconnects later than A
    redis_server.stop()
    await aio(until(lambda: not b.durable.store.link.connected and not b.broker.subscriber.connected, timeout=5))
    member = await WSClient.connect(url_of(b))
    await member.recv()  # welcome
    refused = await member.request({"type": "join", "room": "r", "id": 1, "presence": True})
    assert (refused["type"], refused["code"], refused["room"], refused["id"]) == ("error", "unavailable", "r", 1)
    room = b.get_room("r")
    assert room is None or not room.clients, "the member is not in the room"
    assert b.presence_tracker.members("r") == [] and "r" not in b.relay.sequences

    redis_server.start()
    await aio(until(lambda: a.durable.store.link.connected, timeout=10))
    for i in range(1, 4):  # stored while B is still cut off
        ack = await answer(sender, {"type": "chat", "room": "r", "text": f"m{i}", "id": i, "msg_id": f"m{i}"})
        assert (ack["type"], ack["seq"]) == ("ack", i)
    await aio(until(lambda: b.broker.health()["ok"] and b.durable.store.health()["ok"], timeout=15))
    joined = await member.request({"type": "join", "room": "r", "id": 2})
    assert (joined["type"], joined["id"]) == ("joined", 2)
    ack = await answer(sender, {"type": "chat", "room": "r", "text": "m4", "id": 4, "msg_id": "m4"})
    assert (ack["type"], ack["seq"]) == ("ack", 4)
    message = await member.recv()
    assert (message["type"], message["seq"], message["text"]) == ("chat", 4, "m4")
    for client in (member, sender):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_replay_read_is_the_baseline_when_the_rooms_own_read_keeps_failing(
        make_server: Any, redis_server: RedisServer) -> None:
    """A join with ``since`` on node B: its replay read works while B's read of the room's last seq (the
    baseline) keeps failing, and B's subscription is down too. Chats stored meanwhile on A lay below the
    baseline B read later, and never reached the member. The replay's read now gives the baseline: B's
    resubscription fetches what came after it."""
    a, b = await two_nodes(make_server, redis_server)
    sender = await WSClient.connect(url_of(a))
    await sender.recv()  # welcome
    assert (await sender.request({"type": "join", "room": "r"}))["type"] == "joined"
    store = b.durable.store
    read = store.read
    baseline_fails = True

    def failing_baseline(room: str, since: int | None = None, **kwargs: Any) -> Any:
        if baseline_fails and since is None and kwargs.get("limit") == 1:
            return defer.fail(StoreError("the room's last seq cannot be read"))
        return read(room, since=since, **kwargs)

    store.read = failing_baseline
    killer = RedisLink(RedisURL.parse(redis_server.url), reactor, name="test killer")
    killer.start()
    try:
        await killer.when_connected(5)
        b.broker.subscriber._backoff = lambda attempts: 2.0  # B resubscribes two seconds later
        await killer.command("CLIENT", "KILL", "TYPE", "pubsub")
        await aio(until(lambda: not b.broker.subscribed, timeout=5))
        member = await WSClient.connect(url_of(b))
        await member.recv()  # welcome
        joined = await member.request({"type": "join", "room": "r", "since": 0, "id": 1})
        assert (joined["type"], joined["recovered"]) == ("joined", True)
        for i in range(1, 4):  # stored while B hears nothing
            ack = await answer(sender, {"type": "chat", "room": "r", "text": f"m{i}", "id": i, "msg_id": f"m{i}"})
            assert (ack["type"], ack["seq"]) == ("ack", i)
        baseline_fails = False  # a baseline read now would say 3
        assert [(await member.recv(timeout=10))["seq"] for _ in range(3)] == [1, 2, 3]
    finally:
        store.read = read
        killer.stop()


@pytest_twisted.ensureDeferred
async def test_a_join_held_behind_a_replay_and_refused_is_answered_with_the_replay(
        make_server: Any, redis_server: RedisServer) -> None:
    """A join with ``since`` replays; a plain join of the same room waits for the room's baseline, whose read
    fails: it is refused and the member taken out. The replay then answered ``joined`` to a member out of the
    room. Now both are refused once the replay is done, the member out of the room."""
    b = await make_server(room_protocol=True, store=redis_server.url, broker=redis_server.url, rate_limit=0)
    store = b.durable.store
    read = store.read
    held: list[tuple[defer.Deferred[Any], str, Any, dict[str, Any]]] = []

    def reads(room: str, since: int | None = None, **kwargs: Any) -> Any:
        if since is None and kwargs.get("limit") == 1:
            return defer.fail(StoreError("the room's last seq cannot be read"))
        held.append((defer.Deferred(), room, since, kwargs))
        return held[-1][0]

    store.read = reads
    try:
        member = await WSClient.connect(url_of(b))
        welcome = await member.recv()
        await member.send({"type": "join", "room": "r", "since": 0, "id": 1})
        await member.send({"type": "join", "room": "r", "id": 2})
        await aio(until(lambda: held and not b.relay._baseline_waiters))
        store.read = read
        for waiting, room, since, kwargs in held:
            waiting.callback(await read(room, since=since, **kwargs))
        answers = [await member.recv(), await member.recv()]
        assert [(answer["type"], answer.get("code"), answer["id"]) for answer in answers] == [
            ("error", "unavailable", 1), ("error", "unavailable", 2)]
        assert not b.registry.is_member(b.get_client(welcome["id"]), "r")
    finally:
        store.read = read
