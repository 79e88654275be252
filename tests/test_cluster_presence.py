"""Presence across the nodes of a Redis cluster (roomserver/broker/presence.py), with two in-process nodes on
one Redis prefix: one member per user over all nodes, each event once at every subscriber, cluster-wide member
lists, dead nodes reaped once, a resync after Redis lost this node's writes, and no key left behind."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest_twisted

from roomserver import WebSocketServer
from roomserver.redislink import RedisLink

from .auth_support import connect_as, token
from .auth_support import received_within as quiet
from .cluster_support import Node
from .redis_support import REDIS_URL, RedisServer, delete_prefix_now, redis_link, scan, unique_prefix
from .support import WSClient, aio, eventually, start_server


async def presence_keys(link: RedisLink, prefix: str) -> list[str]:
    return sorted(key.decode()[len(prefix):] for key in await scan(link, prefix)
                  if key.decode()[len(prefix):].startswith(("p:", "pu:", "pn:")))


@pytest_twisted.async_yield_fixture
async def make_node(prefix: str) -> Any:
    """Start in-process nodes on the test's Redis prefix; stopped before the prefix's keys are deleted."""
    started: list[WebSocketServer] = []

    async def make(**options: Any) -> WebSocketServer:
        started.append(await start_server(**options))
        return started[-1]

    yield make
    for server in started:
        await server.stop()


async def two_nodes(make_node: Any, prefix: str, secret_file: str, **options: Any) -> tuple[Any, Any]:
    url = f"{REDIS_URL}?prefix={prefix}"
    nodes = [await make_node(room_protocol=True, store=url, broker=url, rate_limit=0, jwt_secret_file=secret_file,
                             **options) for _ in range(2)]
    return nodes[0], nodes[1]


@pytest_twisted.ensureDeferred
async def test_a_user_on_two_nodes_is_one_member_and_every_event_comes_once(
        make_node: Any, prefix: str, secret_file: str) -> None:
    a, b = await two_nodes(make_node, prefix, secret_file)
    link = await redis_link()
    try:
        watch_a = await connect_as(a, "watch-a")
        watch_b = await connect_as(b, "watch-b")
        joined = await watch_a.request({"type": "join", "room": "lobby", "presence": True})
        assert [m["user"] for m in joined["members"]] == ["watch-a"]
        joined = await watch_b.request({"type": "join", "room": "lobby", "presence": True})
        assert [m["user"] for m in joined["members"]] == ["watch-a", "watch-b"], "the member list spans the nodes"
        assert await watch_a.recv() == {"type": "presence", "room": "lobby", "event": "join", "user": "watch-b"}

        alice_a = await connect_as(a, "alice")
        await alice_a.request({"type": "join", "room": "lobby", "meta": {"name": "Alice"}})
        event = {"type": "presence", "room": "lobby", "event": "join", "user": "alice", "meta": {"name": "Alice"}}
        assert await watch_a.recv() == event
        assert await watch_b.recv() == event
        alice_b = await connect_as(b, "alice")
        await alice_b.request({"type": "join", "room": "lobby", "meta": {"name": "Alice"}})
        alice_b2 = await connect_as(b, "alice")
        await alice_b2.request({"type": "join", "room": "lobby"})
        listed = await watch_b.request({"type": "presence", "room": "lobby", "id": 1})
        assert listed["id"] == 1
        assert {m["user"]: m["connections"] for m in listed["members"]} == {"watch-a": 1, "watch-b": 1, "alice": 3}
        assert await quiet(watch_a) == [] and await quiet(watch_b) == [], "alice's other connections: no event"

        await alice_a.request({"type": "leave", "room": "lobby"})
        await alice_b.close()
        assert await quiet(watch_a) == [] and await quiet(watch_b) == [], "alice is still there on node b"
        await alice_b2.close()
        leave = {"type": "presence", "room": "lobby", "event": "leave", "user": "alice"}
        assert await watch_a.recv() == leave
        assert await watch_b.recv() == leave
        assert await quiet(watch_a) == [] and await quiet(watch_b) == [], "the leave fires once"
        await alice_a.close()

        await watch_b.close()
        assert await watch_a.recv() == {"type": "presence", "room": "lobby", "event": "leave", "user": "watch-b"}
        await watch_a.close()
        await eventually(lambda: len(a.registry) == 0 and len(b.registry) == 0)
        await eventually(lambda: a.presence_tracker.room_count() == 0)
        keys: list[str] = ["not yet read"]
        for _ in range(100):
            keys = await presence_keys(link, prefix)
            if not keys:
                break
            await aio(asyncio.sleep(0.02))
        assert keys == [], "everyone left: no presence key is left in Redis"
    finally:
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_join_with_since_and_presence_lists_every_nodes_members_before_the_replay(
        make_node: Any, prefix: str, secret_file: str) -> None:
    a, b = await two_nodes(make_node, prefix, secret_file)
    bob = await connect_as(a, "bob")
    await bob.request({"type": "join", "room": "r1", "meta": {"n": 1}})
    await bob.request({"type": "chat", "room": "r1", "text": "hi", "id": 1})  # chat, then its ack
    carol = await connect_as(b, "carol")
    joined = await carol.request({"type": "join", "room": "r1", "since": 0, "presence": True})
    assert joined["type"] == "joined" and joined["recovered"] is True
    assert joined["members"] == [{"user": "bob", "connections": 1, "meta": {"n": 1}},
                                 {"user": "carol", "connections": 1, "meta": {}}]
    assert (await carol.recv())["text"] == "hi"


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_members_are_reaped_once_and_a_user_also_elsewhere_stays(
        make_node: Any, prefix: str, secret_file: str) -> None:
    """A node that stopped heartbeating (written here by hand: a dead node's entries and its past deadline)
    is reaped by the live nodes: its only-there users leave once, at every subscriber; users also on a live
    node stay."""
    a, b = await two_nodes(make_node, prefix, secret_file, presence_ttl=2)
    link = await redis_link()
    try:
        watch_a = await connect_as(a, "watch-a")
        await watch_a.request({"type": "join", "room": "lobby", "presence": True})
        watch_b = await connect_as(b, "watch-b")
        await watch_b.request({"type": "join", "room": "lobby", "presence": True})
        await watch_a.recv()  # watch-b's join
        dave = await connect_as(a, "dave")
        await dave.request({"type": "join", "room": "lobby"})
        assert (await watch_b.recv())["user"] == "dave"
        await watch_a.recv()
        p = prefix.encode()
        ghost = b"deadbeef0000"
        for user in (b"zed", b"dave"):
            await link.command("HSET", p + b"p:lobby", ghost + b"|" + user, b'{"c":1,"m":{}}')
            await link.command("HINCRBY", p + b"pu:lobby", user, 1)
            await link.command("SADD", p + b"pn:" + ghost, b"lobby\n" + user)
        await link.command("ZADD", p + b"pnodes", 1, ghost)
        listed = await watch_b.request({"type": "presence", "room": "lobby"})
        before = {m["user"]: m["connections"] for m in listed["members"]}
        # The ghost may already be reaped by now (its deadline is long past): then zed's leave is on its way.
        assert before.get("dave") in (1, 2) and before.get("zed", 1) == 1
        leave = {"type": "presence", "room": "lobby", "event": "leave", "user": "zed"}
        if "zed" in before:
            assert await watch_a.recv(timeout=5) == leave
            assert await watch_b.recv(timeout=5) == leave
        assert await quiet(watch_a, 1.2) == [] and await quiet(watch_b) == [], "once, and dave stays"
        listed = await watch_a.request({"type": "presence", "room": "lobby"})
        assert {m["user"]: m["connections"] for m in listed["members"]} == {"watch-a": 1, "watch-b": 1, "dave": 1}
        assert await link.command("EXISTS", p + b"pn:" + ghost) == 0
        assert await link.command("ZSCORE", p + b"pnodes", ghost) is None
        assert a.cluster_presence.reaped + b.cluster_presence.reaped >= (1 if "zed" in before else 0)
    finally:
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_redis_away_keeps_local_presence_and_the_node_resyncs_when_it_is_back(
        make_server: Any, tmp_path: Path, secret_file: str) -> None:
    redis = RedisServer(tmp_path)  # not persistent: a restart loses every key, as an emptied Redis would
    redis.start()
    prefix = unique_prefix()
    url = f"{redis.url}?prefix={prefix}"
    try:
        a = await make_server(room_protocol=True, store=url, broker=url, rate_limit=0, jwt_secret_file=secret_file)
        watcher = await connect_as(a, "watcher")
        await watcher.request({"type": "join", "room": "r", "presence": True})
        redis.stop()
        await eventually(lambda: not a.broker.publisher.connected, timeout=5)
        erin = await connect_as(a, "erin")
        joined = await erin.request({"type": "join", "room": "r", "presence": True})
        assert {m["user"] for m in joined["members"]} == {"watcher", "erin"}, "this node's members meanwhile"
        assert await watcher.recv() == {"type": "presence", "room": "r", "event": "join", "user": "erin"}, \
            "local presence events go on without Redis"
        redis.start()
        await eventually(lambda: a.cluster_presence.syncs >= 1 and not a.cluster_presence.dirty, timeout=15)
        assert a.broker.health()["presence"]["in_sync"] is True
        assert a.broker.health()["presence"]["failures"] >= 1, "erin's join could not be written at first"
        link = await redis_link(redis.url)
        try:
            fields = await link.command("HGETALL", (prefix + "p:r").encode())
            users = sorted(bytes(fields[i]).decode().partition("|")[2] for i in range(0, len(fields), 2))
            assert users == ["erin", "watcher"], "the node's whole presence is back in Redis"
            assert orjson.loads(fields[1]) == {"c": 1, "m": {}}
        finally:
            await link.stop()
        assert await quiet(watcher) == [], "the resync does not announce erin's join here a second time"
    finally:
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_presence_changes_missed_while_the_subscriber_was_down_reach_the_watchers_once(
        make_server: Any, tmp_path: Path, secret_file: str) -> None:
    """Node A's subscriber connection is killed (``CLIENT KILL TYPE pubsub``, as Redis does at its pubsub
    output-buffer limit); while it is down, carol leaves and bob joins on node B: their events never reach A.
    Once A has resubscribed, its watcher is told the difference: bob's join and carol's leave, once each."""
    redis = RedisServer(tmp_path)
    redis.start()
    url = f"{redis.url}?prefix={unique_prefix()}"
    link = await redis_link(redis.url)
    try:
        a, b = [await make_server(room_protocol=True, store=url, broker=url, rate_limit=0,
                                  jwt_secret_file=secret_file) for _ in range(2)]
        watcher = await connect_as(a, "watcher")
        await watcher.request({"type": "join", "room": "r", "presence": True})
        carol = await connect_as(b, "carol")
        await carol.request({"type": "join", "room": "r", "meta": {"n": 3}})
        assert await watcher.recv() == {"type": "presence", "room": "r", "event": "join", "user": "carol",
                                        "meta": {"n": 3}}
        a.broker.subscriber._backoff = lambda attempts: 1.0  # A resubscribes a second later
        assert int(await link.command("CLIENT", "KILL", "TYPE", "pubsub")) == 2
        await eventually(lambda: not a.broker.subscribed, timeout=5)
        await carol.close()
        bob = await connect_as(b, "bob")
        await bob.request({"type": "join", "room": "r", "meta": {"n": 2}})
        assert not a.broker.subscribed, "both changes were published while A could not hear them"
        await eventually(lambda: a.broker.health()["ok"], timeout=10)
        told = await quiet(watcher, 1.0)
        assert sorted(told, key=lambda event: event["user"]) == [
            {"type": "presence", "room": "r", "event": "join", "user": "bob", "meta": {"n": 2}},
            {"type": "presence", "room": "r", "event": "leave", "user": "carol"}]
        assert a.cluster_presence.caught_up == 2
        await bob.close()
        assert await watcher.recv() == {"type": "presence", "room": "r", "event": "leave", "user": "bob"}
        assert await quiet(watcher) == [], "each event once"
    finally:
        await link.stop()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_beat_that_finds_its_own_deadline_past_gives_the_others_a_ttl_instead_of_reaping_them(
        prefix: str) -> None:
    """``BEAT`` after Redis was away longer than the ttl: every node's deadline has passed, the beating node's
    own too. It reaps no one (they were not dead, Redis was away) and gives each a full ttl from now."""
    from roomserver.broker.presence import BEAT

    link = await redis_link()
    p = prefix.encode()
    try:
        await link.command("ZADD", p + b"pnodes", 1, b"me", 2, b"peer")
        await link.command("HSET", p + b"p:lobby", b"peer|bob", b'{"c":1,"m":{}}')
        await link.command("HINCRBY", p + b"pu:lobby", b"bob", 1)
        await link.command("SADD", p + b"pn:peer", b"lobby\nbob")

        async def beat(node: bytes) -> list[int]:
            return [int(x) for x in await link.command("EVAL", BEAT, 1, p + b"pnodes", p, node, 2250, 1000, 3000)]

        assert await beat(b"me") == [0, 0, 0, 1], "nobody reaped: this node's own deadline had passed too"
        seconds, micros = await link.command("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        assert now_ms + 2500 < float(await link.command("ZSCORE", p + b"pnodes", b"peer")) <= now_ms + 3000
        assert await link.command("HGET", p + b"pu:lobby", b"bob") == b"1", "bob stays"
        assert await beat(b"me") == [0, 0, 0, 0], "the next beat is a plain one: nobody is past the deadline"
        await link.command("ZADD", p + b"pnodes", 2, b"peer")  # the peer really stopped beating
        assert await beat(b"me") == [0, 1, 0, 0], "a node past its deadline while this one beat is reaped"
    finally:
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_outage_longer_than_the_ttl_makes_no_member_leave(
        make_server: Any, tmp_path: Path, secret_file: str) -> None:
    """Redis (persistent) is away for longer than ``presence_ttl`` while both nodes and their clients stay up.
    When it is back, the first node to beat must not reap the other: no watcher sees any leave or join."""
    redis = RedisServer(tmp_path, persistent=True)
    redis.start()
    url = f"{redis.url}?prefix={unique_prefix()}"
    try:
        a, b = [await make_server(room_protocol=True, store=url, broker=url, rate_limit=0,
                                  jwt_secret_file=secret_file, presence_ttl=3.0) for _ in range(2)]
        for node in (a, b):  # both back within a fraction of the ttl (backoff and jitter can take 3 s)
            for link in (node.durable.store.link, node.broker.subscriber, node.broker.publisher):
                link._backoff = lambda attempts: 0.2
        watcher = await connect_as(a, "watcher")
        await watcher.request({"type": "join", "room": "r", "presence": True})
        bob = await connect_as(b, "bob")
        await bob.request({"type": "join", "room": "r", "presence": True})
        assert (await watcher.recv())["user"] == "bob"
        redis.stop()
        await aio(asyncio.sleep(4.0))  # longer than the ttl (3 s)
        beats = [node.cluster_presence.beats for node in (a, b)]
        redis.start()
        await eventually(lambda: all(node.broker.health()["ok"] and node.cluster_presence.beats > before
                                     for node, before in zip((a, b), beats, strict=True)), timeout=10)
        assert await quiet(watcher, 2.0) == [] and await quiet(bob) == [], "no leave, no join"
        assert a.cluster_presence.reaped + b.cluster_presence.reaped == 0
        assert a.cluster_presence.graces + b.cluster_presence.graces >= 1
        listed = await watcher.request({"type": "presence", "room": "r"})
        assert [member["user"] for member in listed["members"]] == ["bob", "watcher"]
    finally:
        redis.stop()


# -- three twistd nodes, one killed with SIGKILL ----------------------------------------------------------------

TTL = 3.0


async def ws_as(url: str, user: str) -> tuple[WSClient, str]:
    """A connection to ``url`` as ``user``; returns it and its session token."""
    ws = await WSClient.connect(url, additional_headers={"Authorization": f"Bearer {token(user)}"})
    welcome = await ws.recv()
    assert welcome["type"] == "welcome"
    return ws, welcome["session"]


async def in_thread(blocking: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, blocking)


def redis_keys(prefix: str) -> list[str]:
    listed = subprocess.run(["redis-cli", "--scan", "--pattern", prefix + "*"], capture_output=True, check=True,
                            timeout=10).stdout.decode().split()
    return sorted(key[len(prefix):] for key in listed)


@pytest_twisted.ensureDeferred
async def test_killed_nodes_members_leave_everywhere_once_within_the_ttl_and_resumed_ones_stay(
        tmp_path: Path, secret_file: str) -> None:
    prefix = unique_prefix()
    url = f"{REDIS_URL}?prefix={prefix}"
    nodes = [Node(url, tmp_path, f"node{i}", "--jwt-secret-file", secret_file, "--presence-ttl", str(TTL)).start()
             for i in range(3)]
    loop = asyncio.get_running_loop()
    try:
        for node in nodes:
            await aio(in_thread(node.wait))
        watchers = []
        for i in (0, 1):
            watcher, _ = await ws_as(nodes[i].url, f"watch{i}")
            await watcher.request({"type": "join", "room": "kp", "presence": True})
            watchers.append(watcher)
        assert (await watchers[0].recv())["user"] == "watch1"
        on_dead = {}
        sessions = {}
        for user in ("victim", "resumer", "both"):
            on_dead[user], sessions[user] = await ws_as(nodes[2].url, user)
            assert (await on_dead[user].request({"type": "join", "room": "kp"}))["type"] == "joined"
        both_alive, _ = await ws_as(nodes[1].url, "both")
        assert (await both_alive.request({"type": "join", "room": "kp"}))["type"] == "joined"
        for watcher in watchers:
            joins = [event["user"] for event in await quiet(watcher, 0.5)]
            assert sorted(joins) == ["both", "resumer", "victim"], "each join once at every watcher"
        listed = await watchers[1].request({"type": "presence", "room": "kp"})
        assert {m["user"]: m["connections"] for m in listed["members"]} == {
            "watch0": 1, "watch1": 1, "victim": 1, "resumer": 1, "both": 2}

        await aio(in_thread(nodes[2].kill))
        killed_at = loop.time()
        resumed, _ = await ws_as(nodes[0].url, "resumer")  # the client of the dead node moves, within the ttl
        reply = await resumed.request({"type": "resume", "session": sessions["resumer"], "rooms": {"kp": 0}})
        assert reply["type"] == "resumed" and reply["room"] == "kp"
        leave = {"type": "presence", "room": "kp", "event": "leave", "user": "victim"}
        for watcher in watchers:
            assert await watcher.recv(timeout=TTL + 3) == leave
        assert loop.time() - killed_at < TTL + 1.5, "the dead node's members left within presence_ttl (+ slack)"
        for watcher in watchers:
            assert await quiet(watcher, 1.0) == [], "the leave fires once; resumer and both never left"
        listed = await watchers[0].request({"type": "presence", "room": "kp"})
        assert {m["user"]: m["connections"] for m in listed["members"]} == {
            "watch0": 1, "watch1": 1, "resumer": 1, "both": 1}
        alive = {f"pn:{await aio(in_thread(partial(node_id, node)))}" for node in nodes[:2]}
        keys = redis_keys(prefix)
        assert [key for key in keys if key.startswith("pn:") and key not in alive] == [], "the dead node's index"

        for client in (resumed, both_alive, *watchers):
            await client.close()
        for node in nodes[:2]:
            await aio(in_thread(node.stop))
        keys = redis_keys(prefix)
        assert [key for key in keys if key.startswith(("p:", "pu:", "pn:", "pnodes"))] == [], \
            "everyone left and the nodes stopped: no presence key is left"
    finally:
        for node in nodes:
            node.stop()
        delete_prefix_now(prefix)
    for node in nodes:
        assert not node.tracebacks(), node.tracebacks()


def node_id(node: Node) -> str:
    _, health = node.health()
    return str(health["broker"]["node"])
