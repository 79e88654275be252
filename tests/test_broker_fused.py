"""The Redis store publishing for the Redis broker (``RedisBroker.fuse``): one script run appends a batch and
publishes it, in seq order, as one ``m <node> <seq>:<length>:<payload>...`` message; against the shared Redis.

A store on another Redis server is not fused (the node then publishes itself, as before), and a malformed batch
is dropped from the broken entry on, with a warning, never a crash."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor, task

from roomserver.broker.redis import RedisBroker
from roomserver.core.history import NewMessage
from roomserver.core.messages import chat_body
from roomserver.redislink import RedisLink, RedisURL
from roomserver.store.redis import PUBLISH_BYTES, RedisStore
from roomserver.transport import DirectWriteTransport

from .redis_support import REDIS_URL
from .support import eventually


def msg(text: str, msg_id: str | None = None) -> NewMessage:
    return NewMessage(chat_body("r", "alice", text, msg_id), msg_id, 0.0)


class Node:
    """A store and a broker on the shared Redis, fused, recording what the broker hands on."""

    def __init__(self, url: str, name: str) -> None:
        self.store = RedisStore(url, reactor, clock=task.Clock())
        self.broker = RedisBroker(url, reactor, node_id=name)
        self.got: list[tuple[str, int, bytes]] = []
        assert self.broker.fuse(self.store)

    async def start(self, room: str) -> None:
        await self.store.open()
        await self.broker.start(lambda *message: self.got.append(message), lambda: None, lambda room: None)
        self.broker.subscribe(room)
        await eventually(lambda: self.broker.subscribed, timeout=5)
        for link in (self.store.link, self.broker.publisher, self.broker.subscriber):
            assert isinstance(link.protocol.transport, DirectWriteTransport), "commands go straight to the socket"

    async def stop(self) -> None:
        await self.broker.stop()
        await self.store.close()


@contextlib.asynccontextmanager
async def two_nodes(prefix: str, room: str) -> AsyncIterator[tuple[Node, Node]]:
    url = f"{REDIS_URL}?prefix={prefix}"
    a, b = Node(url, "node-a"), Node(url, "node-b")
    await a.start(room)
    await b.start(room)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


class Pushes(txredisapi.RedisProtocol):
    """Records every message Redis pushes on the channels it subscribed to (bytes: ``charset=None``)."""

    seen: list[bytes] = []
    subscribed = False

    def replyReceived(self, reply: Any) -> None:
        if isinstance(reply, list) and reply and reply[0] == b"message":
            self.seen.append(bytes(reply[2]))
        elif isinstance(reply, list) and reply and reply[0] == b"subscribe":
            Pushes.subscribed = True
        else:
            super().replyReceived(reply)


@pytest_twisted.ensureDeferred
async def test_an_append_publishes_its_new_messages_once_in_seq_order_to_every_node(prefix: str) -> None:
    async with two_nodes(prefix, "r") as (a, b):
        [first] = await a.store.append("r", [msg("one", "id-1")])
        batch = await a.store.append("r", [msg("one", "id-1"), msg("two", "id-2"), msg("three")])
        assert [(r.seq, r.duplicate) for r in batch] == [(1, True), (2, False), (3, False)]
        stored = [first.payload, batch[1].payload, batch[2].payload]
        await eventually(lambda: len(b.got) == 3, timeout=5)
        assert b.got == [("r", seq, payload) for seq, payload in zip((1, 2, 3), stored, strict=True)], \
            "in seq order, the duplicate not published again, payloads exactly as stored"
        await eventually(lambda: len(a.got) == 3, timeout=5)
        assert a.got == b.got, "the appending node reads its own messages from the channel too"
        assert b.broker.health()["received"] == 3 and a.broker.health()["received"] == 0
        assert a.broker.health()["published"] == 3 and a.broker.health()["fused"] is True


@pytest_twisted.ensureDeferred
async def test_a_large_batch_is_published_in_several_messages(prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    node = Node(url, "node-a")
    await node.store.open()
    link = RedisLink(RedisURL.parse(url), reactor, name="test subscriber", protocol_class=Pushes)
    Pushes.seen, Pushes.subscribed = [], False
    link.start()
    try:
        await link.when_connected(5)
        link.protocol.transport.write(link.protocol._build_command("SUBSCRIBE", prefix.encode() + b"c:r"))
        await eventually(lambda: Pushes.subscribed, timeout=5)
        size = PUBLISH_BYTES // 2 + 1000  # two payloads pass PUBLISH_BYTES: the third goes in a second message
        results = await node.store.append("r", [msg("x" * size) for _ in range(3)])
        await eventually(lambda: len(Pushes.seen) == 2, timeout=5)
        assert [message.count(b"x" * size) for message in Pushes.seen] == [2, 1]
        assert all(message.startswith(b"m node-a ") for message in Pushes.seen)
        assert Pushes.seen[1][len(b"m node-a "):] == b"3:%d:%s" % (len(results[2].payload), results[2].payload)
    finally:
        await link.stop()
        await node.store.close()


def test_a_store_on_another_redis_server_is_not_fused() -> None:
    broker = RedisBroker("redis://127.0.0.1:6379/0", task.Clock())
    assert not broker.fuse(RedisStore("redis://127.0.0.1:6379/1", task.Clock()))
    assert not broker.fuse(RedisStore("redis://127.0.0.2:6379/0", task.Clock()))
    assert broker.fuse(RedisStore("redis://127.0.0.1:6379/0?prefix=other:", task.Clock()))


def test_a_malformed_batch_delivers_what_came_before_the_break_and_nothing_after() -> None:
    broker = RedisBroker("redis://127.0.0.1:6379/0?prefix=t:", task.Clock())
    got: list[tuple[str, int, bytes]] = []
    broker._on_message = lambda *message: got.append(message)
    broker.rooms.add("r")
    broker._message(b"t:c:r", b"m other 1:5:hello2:2:hi")
    assert got == [("r", 1, b"hello"), ("r", 2, b"hi")]
    for broken in (b"m other 3:5:hey", b"m other x:1:a", b"m other 3:-:a", b"m other 3"):
        got.clear()
        broker._message(b"t:c:r", b"m other 1:1:a" + broken[len(b"m other "):])
        assert got == [("r", 1, b"a")], broken
    got.clear()
    broker._message(b"t:c:elsewhere", b"m other 1:1:a")
    assert got == [], "a room this node does not serve"


@pytest_twisted.ensureDeferred
async def test_fused_appends_and_publishes_from_two_nodes_interleave_in_seq_order(prefix: str) -> None:
    async with two_nodes(prefix, "r") as (a, b):
        await defer.gatherResults([
            (a if i % 2 else b).store.append("r", [msg(f"m{i}")]) for i in range(60)])
        for node in (a, b):
            await eventually(lambda node=node: len(node.got) == 60, timeout=5)  # type: ignore[misc]
            assert [seq for _, seq, _ in node.got] == list(range(1, 61)), "the channel is in seq order"
