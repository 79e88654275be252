"""The ``Store`` contract (roomserver/interfaces.py), run against every backend.

A new backend joins by adding itself to ``BACKENDS``. Time is a ``task.Clock`` (no sleeping); the SQLite store
still runs its SQL in real threads on the test's reactor, the Redis store talks to the real Redis at
127.0.0.1:6379 under a key prefix of its own per test, deleted afterwards.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from roomserver.core.history import HistoryPage, NewMessage
from roomserver.core.messages import chat_body
from roomserver.interfaces import RoomRecord, Store, StoreError
from roomserver.store.memory import MemoryStore
from roomserver.store.redis import RedisStore
from roomserver.store.sqlite import SQLiteStore

from .redis_support import REDIS_URL, delete_prefix, unique_prefix

BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def make_store(backend: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Open a store of the backend under test on a fake clock (``make_store.clock``)."""
    opened: list[Store] = []
    clock = task.Clock()
    clock.advance(1_000_000)
    prefix = unique_prefix()

    async def make(**settings: Any) -> Store:
        store: Store
        if backend == "memory":
            store = MemoryStore(clock, **settings)
        elif backend == "redis":
            store = RedisStore(f"{REDIS_URL}?prefix={prefix}", reactor, clock=clock, **settings)
        else:
            store = SQLiteStore(str(tmp_path / "contract.db"), reactor, clock=clock, **settings)
        await store.open()
        opened.append(store)
        return store

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for store in opened:
        await store.close()
    if backend == "redis":
        await delete_prefix(prefix)


def msg(text: str, ts: float, msg_id: str | None = None) -> NewMessage:
    return NewMessage(chat_body("r", "alice", text, msg_id), msg_id, ts)


def texts(page: HistoryPage) -> list[str]:
    return [orjson.loads(m.payload)["text"] for m in page.messages]


def seqs(page: HistoryPage) -> list[int]:
    return [m.seq for m in page.messages]


@pytest_twisted.ensureDeferred
async def test_seqs_are_gap_free_per_room_and_payloads_exact(make_store: Any) -> None:
    store = await make_store()
    now = make_store.clock.seconds()
    first = await store.append("r", [msg("a", now), msg("b", now)])
    second = await store.append("r", [msg("c", now)])
    other = await store.append("s", [msg("x", now)])
    assert [a.seq for a in first + second] == [1, 2, 3] and other[0].seq == 1
    assert orjson.loads(first[1].payload) == {"type": "chat", "room": "r", "from": "alice", "text": "b", "seq": 2}
    page = await store.read("r", since=0)
    assert [m.payload for m in page.messages] == [a.payload for a in first + second], "byte for byte"
    assert (page.more, page.first_seq, page.last_seq) == (False, 1, 3)


@pytest_twisted.ensureDeferred
async def test_paging_forward_and_backward_with_limits(make_store: Any) -> None:
    store = await make_store()
    now = make_store.clock.seconds()
    await store.append("r", [msg(f"m{i}", now) for i in range(1, 11)])
    page = await store.read("r", since=2, limit=3)
    assert seqs(page) == [3, 4, 5] and page.more
    page = await store.read("r", since=8, limit=3)
    assert seqs(page) == [9, 10] and not page.more
    page = await store.read("r", limit=4)
    assert seqs(page) == [7, 8, 9, 10] and page.more, "no since: the latest, oldest first"
    page = await store.read("r", before=3, limit=4)
    assert seqs(page) == [1, 2] and not page.more
    page = await store.read("r", since=2, before=6, limit=10)
    assert seqs(page) == [3, 4, 5]
    empty = await store.read("nowhere", since=0)
    assert (empty.messages, empty.more, empty.first_seq, empty.last_seq) == ((), False, 1, 0)


@pytest_twisted.ensureDeferred
async def test_history_size_keeps_only_the_last_messages(make_store: Any) -> None:
    store = await make_store(history_size=5)
    now = make_store.clock.seconds()
    for i in range(1, 13):
        await store.append("r", [msg(f"m{i}", now)])
    page = await store.read("r", since=0, limit=100)
    assert seqs(page) == [8, 9, 10, 11, 12] and page.first_seq == 8 and page.last_seq == 12
    assert texts(await store.read("r", limit=2)) == ["m11", "m12"]


@pytest_twisted.ensureDeferred
async def test_history_ttl_hides_expired_messages_and_seq_still_continues(make_store: Any) -> None:
    store = await make_store(history_ttl=60, dedupe_window=30)
    clock = make_store.clock
    await store.append("r", [msg("old", clock.seconds())])
    clock.advance(40)
    await store.append("r", [msg("new", clock.seconds())])
    assert texts(await store.read("r", since=0)) == ["old", "new"]
    clock.advance(21)
    page = await store.read("r", since=0)
    assert texts(page) == ["new"] and page.first_seq == 2
    clock.advance(40)  # every message expired; the memory store's sweep and SQLite's prune run on the clock
    page = await store.read("r", since=0)
    assert (page.messages, page.first_seq, page.last_seq) == ((), 3, 2)
    assert (await store.append("r", [msg("later", clock.seconds())]))[0].seq == 3, "seqs are never reused"


@pytest_twisted.ensureDeferred
async def test_a_duplicate_msg_id_gets_the_original_seq_within_the_window(make_store: Any) -> None:
    store = await make_store(dedupe_window=30)
    clock = make_store.clock
    [first] = await store.append("r", [msg("hello", clock.seconds(), "u-1")])
    clock.advance(10)
    results = await store.append("r", [msg("hello", clock.seconds(), "u-1"), msg("next", clock.seconds(), "u-2"),
                                       msg("next", clock.seconds(), "u-2")])
    assert [(a.seq, a.duplicate) for a in results] == [(1, True), (2, False), (2, True)]
    assert results[0].payload == first.payload
    [other_room] = await store.append("s", [msg("hello", clock.seconds(), "u-1")])
    assert not other_room.duplicate, "msg_ids are scoped per room"
    clock.advance(31)
    [late] = await store.append("r", [msg("hello", clock.seconds(), "u-1")])
    assert (late.seq, late.duplicate) == (3, False)
    assert texts(await store.read("r", since=0)) == ["hello", "next", "hello"]


@pytest_twisted.ensureDeferred
async def test_kept_rooms_are_recorded_with_meta_and_last_seq(make_store: Any) -> None:
    store = await make_store()
    await store.save_room(RoomRecord("kept", True, {"title": "Kept room"}))
    await store.save_room(RoomRecord("plain", False))
    await store.append("kept", [msg("a", 0), msg("b", 0)])
    assert await store.load_rooms() == [RoomRecord("kept", True, {"title": "Kept room"}, 2)]
    await store.delete_room("kept")
    assert await store.load_rooms() == []
    page = await store.read("kept", since=0)
    assert page.messages == () and page.last_seq == 2
    assert (await store.append("kept", [msg("c", 0)]))[0].seq == 3, "a deleted room's seqs are not reused"


@pytest_twisted.ensureDeferred
async def test_sqlite_keeps_everything_across_reopening(tmp_path: Path) -> None:
    clock = task.Clock()
    path = str(tmp_path / "reopen.db")
    store = SQLiteStore(path, reactor, clock=clock)
    await store.open()
    await store.save_room(RoomRecord("kept", True, {"n": 1}))
    await store.append("kept", [msg("a", 0, "id-a"), msg("b", 0)])
    await store.close()
    store = SQLiteStore(path, reactor, clock=clock)
    await store.open()
    try:
        assert await store.load_rooms() == [RoomRecord("kept", True, {"n": 1}, 2)]
        results = await store.append("kept", [msg("a", 0, "id-a"), msg("c", 0)])
        assert [(a.seq, a.duplicate) for a in results] == [(1, True), (3, False)]
        assert texts(await store.read("kept", since=0)) == ["a", "b", "c"]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_failed_append_assigns_no_seq_and_fails_with_store_error(tmp_path: Path) -> None:
    """A real SQLite failure inside the append transaction (a trigger raising, as a full disk would)."""
    path = str(tmp_path / "fail.db")
    store = SQLiteStore(path, reactor, clock=task.Clock())
    await store.open()
    try:
        await store.append("r", [msg("a", 0)])
        with sqlite3.connect(path) as other:
            other.execute("CREATE TRIGGER fail BEFORE INSERT ON messages "
                          "BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END")
        with pytest.raises(StoreError, match="simulated disk failure"):
            await store.append("r", [msg("b", 0), msg("c", 0)])
        with sqlite3.connect(path) as other:
            other.execute("DROP TRIGGER fail")
        assert (await store.append("r", [msg("d", 0)]))[0].seq == 2, "the failed batch consumed no seq"
        assert texts(await store.read("r", since=0)) == ["a", "d"]
    finally:
        await store.close()


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
@pytest_twisted.ensureDeferred
async def test_sqlite_unusable_path_fails_to_open_with_a_clear_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path if where == "directory" else tmp_path / "file" / "room.db"
    store = SQLiteStore(str(path), reactor, clock=task.Clock())
    with pytest.raises(StoreError, match=str(path).replace("/", ".")):
        await store.open()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_refuses_a_read_only_database_at_open(tmp_path: Path) -> None:
    """Opened read-only (SQLite's own read-only mode, which even root cannot write through)."""
    path = tmp_path / "ro.db"
    sqlite3.connect(path).close()
    store = SQLiteStore(f"file:{path}?mode=ro", reactor, clock=task.Clock())
    with pytest.raises(StoreError, match=r"readonly|read-only"):
        await store.open()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_an_idle_room_keeps_its_seq_and_only_a_memory_store_lets_its_history_go(
        make_store: Any, backend: str) -> None:
    store = await make_store(idle_grace=120) if backend == "memory" else await make_store()
    clock = make_store.clock
    await store.append("r", [msg("a", clock.seconds())])
    store.room_idle("r")
    clock.advance(60)
    assert texts(await store.read("r", since=0)) == ["a"], "within the grace a resume still finds everything"
    clock.advance(121)
    page = await store.read("r", since=0)
    assert texts(page) == ([] if backend == "memory" else ["a"])
    assert page.last_seq == 1
    assert (await store.append("r", [msg("b", clock.seconds())]))[0].seq == 2


@pytest_twisted.ensureDeferred
async def test_a_room_with_a_member_again_keeps_its_history_though_no_one_appends(
        make_store: Any, backend: str) -> None:
    """Members who only read (or resumed, or ask for history) use a room as much as those who write."""
    store = await make_store(idle_grace=120) if backend == "memory" else await make_store()
    clock = make_store.clock
    await store.append("r", [msg("a", clock.seconds())])
    store.room_idle("r")
    clock.advance(100)
    store.room_used("r")
    clock.advance(200)
    assert texts(await store.read("r", since=0)) == ["a"]
    store.room_idle("r")
    clock.advance(181)
    assert texts(await store.read("r", since=0)) == ([] if backend == "memory" else ["a"]), "idle again: let go"


@pytest_twisted.ensureDeferred
async def test_a_room_used_again_within_the_grace_keeps_its_history(make_store: Any, backend: str) -> None:
    store = await make_store(idle_grace=120) if backend == "memory" else await make_store()
    clock = make_store.clock
    await store.append("r", [msg("a", clock.seconds())])
    store.room_idle("r")
    clock.advance(100)
    await store.append("r", [msg("b", clock.seconds())])
    clock.advance(200)
    assert texts(await store.read("r", since=0)) == ["a", "b"]
