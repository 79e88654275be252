"""The Redis store beyond the shared contract: two nodes sharing seqs, unreachable Redis, a Redis restart."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task

from roomserver.core.history import NewMessage
from roomserver.core.messages import chat_body
from roomserver.interfaces import StoreError
from roomserver.redislink import LinkProtocol, RedisLink, RedisURL
from roomserver.store.redis import RedisStore

from .redis_support import REDIS_URL, RedisServer, free_port, scan


def msg(text: str, msg_id: str | None = None) -> NewMessage:
    return NewMessage(chat_body("r", "alice", text, msg_id), msg_id, 0.0)


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_seq_per_room_and_read_each_others_history(prefix: str) -> None:
    clock = task.Clock()
    a = RedisStore(f"{REDIS_URL}?prefix={prefix}", reactor, clock=clock)
    b = RedisStore(f"{REDIS_URL}?prefix={prefix}", reactor, clock=clock)
    await a.open()
    await b.open()
    try:
        results = await defer.gatherResults([
            (a if i % 2 else b).append("r", [msg(f"m{i}", f"id-{i}")]) for i in range(40)])
        assert sorted(r[0].seq for r in results) == list(range(1, 41)), "one gap-free seq across nodes"
        again = await a.append("r", [msg("m3", "id-3")])
        assert again[0].duplicate and again[0].seq == results[3][0].seq, "dedupe across nodes"
        page = await b.read("r", since=0, limit=100)
        assert [m.seq for m in page.messages] == list(range(1, 41))
        await a.delete_room("r")
        link = RedisLink(RedisURL.parse(REDIS_URL), reactor)
        link.start()
        await link.when_connected(5)
        try:
            keys = sorted(k.decode() for k in await scan(link, prefix))
        finally:
            await link.stop()
        assert keys == [prefix + "meta", prefix + "seq"], "a deleted room leaves only its seq counter"
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_redis_fails_open_with_a_clear_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", reactor)
    store.open_timeout = 0.5
    with pytest.raises(StoreError, match=r"cannot use the Redis store at redis://127\.0\.0\.1"):
        await store.open()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_redis_going_away_fails_appends_at_once_and_the_store_reconnects(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = RedisStore(server.url, reactor)
    try:
        await store.open()
        assert (await store.append("r", [msg("a")]))[0].seq == 1
        server.stop()
        started = reactor.seconds()
        failed: Any = None
        for _ in range(100):  # the loss is noticed within a reactor turn or two
            try:
                await store.append("r", [msg("b")])
            except StoreError as exc:
                failed = exc
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert failed is not None and reactor.seconds() - started < 2, "fails fast, never hangs"
        assert not store.health()["ok"]
        server.start()  # an empty Redis: it lost everything (no persistence), the store carries on
        await store.link.when_connected(5)
        assert store.health()["ok"] and store.health()["outages"] >= 1
        assert (store.health()["reply_timeouts"], store.health()["behind"]) == (0, 0), "a lost link is no timeout"
        assert (await store.append("r", [msg("c")]))[0].seq == 1
    finally:
        await store.close()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_scripts_flushed_from_redis_are_loaded_again_on_the_fly(tmp_path: Path) -> None:
    """``SCRIPT FLUSH`` (or a Redis that lost its script cache) answers EVALSHA with NOSCRIPT: the store loads
    the script again and the call succeeds, in order (a dedicated redis-server: the flush touches no one else)."""
    server = RedisServer(tmp_path)
    server.start()
    store = RedisStore(server.url, reactor)
    admin = RedisLink(RedisURL.parse(server.url), reactor)
    try:
        await store.open()
        admin.start()
        await admin.when_connected(5)
        assert (await store.append("r", [msg("a")]))[0].seq == 1
        assert await admin.command("SCRIPT", "FLUSH") in ("OK", b"OK")  # str or bytes, by txredisapi parser
        sha = store.scripts._shas[store.scripts.scripts[0]]
        assert await admin.command("SCRIPT", "EXISTS", sha) == [0]
        appended = await defer.gatherResults([store.append("r", [msg(text)]) for text in "bcd"])
        assert [result[0].seq for result in appended] == [2, 3, 4]
        assert [m.seq for m in (await store.read("r", since=0)).messages] == [1, 2, 3, 4]
        assert await admin.command("SCRIPT", "EXISTS", sha) == [1]
    finally:
        await admin.stop()
        await store.close()
        server.stop()


@given(st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=50), st.integers(), st.floats(allow_nan=False),
                          st.binary(max_size=20).map(bytearray)), min_size=1, max_size=20))
def test_the_link_encodes_commands_byte_for_byte_as_txredisapi(args: list[Any]) -> None:
    assert LinkProtocol(charset=None)._build_command(*args) == \
        txredisapi.RedisProtocol(charset=None)._build_command(*args)


async def say_in_r(sender: Any, text: str, request_id: int) -> dict[str, Any]:
    """Chat ``text`` to room "r" (its msg_id the text itself) and return the answer (the chats passing by are
    skipped)."""
    await sender.send({"type": "chat", "room": "r", "text": text, "id": request_id, "msg_id": text})
    answer: dict[str, Any] = await sender.recv()
    while answer["type"] == "chat":
        answer = await sender.recv()
    return answer


class AnswerLost:
    """A store whose next append is carried out but answered with a failure, as when the Redis connection
    drops after the script ran and before its reply came back."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.lose_next = False

    def append(self, room: str, batch: Any) -> defer.Deferred[Any]:
        done = self.store.append(room, batch)
        if not self.lose_next:
            return done
        self.lose_next = False

        def lost(_: Any) -> None:
            raise StoreError("Redis connection lost (a reply was owed)")

        return done.addCallback(lost)


@pytest_twisted.ensureDeferred
async def test_one_node_delivers_a_chat_whose_append_answer_was_lost(make_server: Any, prefix: str) -> None:
    """``--store redis`` with the memory broker: a chat stored without its answer reaches the members before
    the next one (read from the store on the gap) or with its retry (the duplicate's seq was never delivered)."""
    from .support import WSClient, url_of

    server = await make_server(room_protocol=True, store=f"{REDIS_URL}?prefix={prefix}")
    lossy = AnswerLost(server.durable.pipeline.store)
    server.durable.pipeline.store = lossy
    sender, reader = await WSClient.connect(url_of(server)), await WSClient.connect(url_of(server))
    for ws in (sender, reader):
        await ws.recv()
        await ws.request({"type": "join", "room": "r"})

    say = functools.partial(say_in_r, sender)

    assert (await say("one", 1))["seq"] == 1
    lossy.lose_next = True
    assert (await say("two", 2))["code"] == "unavailable"
    assert (await say("three", 3))["seq"] == 3
    assert [((event := await reader.recv())["seq"], event["text"]) for _ in range(3)] == [
        (1, "one"), (2, "two"), (3, "three")], "the gap is read from the store, in order"
    lossy.lose_next = True
    assert (await say("four", 4))["code"] == "unavailable"
    retried = await say("four", 5)
    assert (retried["seq"], retried.get("duplicate")) == (4, True)
    event = await reader.recv()
    assert (event["seq"], event["text"]) == (4, "four"), "the retry's duplicate was never delivered: now it is"
    assert not server.relay.sequences, "gap filled: delivered directly again"


@pytest_twisted.ensureDeferred
async def test_a_cluster_not_fused_delivers_a_retried_chat_whose_append_answer_was_lost(make_server: Any) -> None:
    """Store and broker on different Redis databases (``fused`` false: the node publishes after the append): a
    chat stored without its answer reaches every member, on every node, with its retry's duplicate ack. Nothing
    else would bring it: the store did not publish it, and no later chat shows the nodes the gap."""
    from .redis_support import delete_prefix, unique_prefix
    from .support import WSClient, url_of

    prefix = unique_prefix()
    store, broker = f"redis://127.0.0.1:6379/9?prefix={prefix}", f"redis://127.0.0.1:6379/10?prefix={prefix}"
    try:
        a = await make_server(room_protocol=True, store=store, broker=broker, rate_limit=0)
        b = await make_server(room_protocol=True, store=store, broker=broker, rate_limit=0)
        assert not a.relay.fused and not b.relay.fused
        lossy = AnswerLost(a.durable.pipeline.store)
        a.durable.pipeline.store = lossy
        sender, on_a, on_b = [await WSClient.connect(url_of(node)) for node in (a, a, b)]
        for ws in (sender, on_a, on_b):
            await ws.recv()
            assert (await ws.request({"type": "join", "room": "r"}))["type"] == "joined"

        say = functools.partial(say_in_r, sender)

        assert (await say("one", 1))["seq"] == 1
        lossy.lose_next = True
        assert (await say("two", 2))["code"] == "unavailable"
        retried = await say("two", 3)
        assert (retried["seq"], retried.get("duplicate")) == (2, True)
        for member in (on_a, on_b):
            assert [((event := await member.recv())["seq"], event["text"]) for _ in range(2)] == [
                (1, "one"), (2, "two")]
        for ws in (sender, on_a, on_b):
            await ws.close()
    finally:
        for url in (store, broker):
            await delete_prefix(prefix, url)
