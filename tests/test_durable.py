"""Durable rooms over real sockets: acks, history, idempotent publish, replay on join, resume, store failures
and kept rooms surviving a restart, on both the memory and the SQLite store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from roomserver import WebSocketServer

from .support import WSClient, eventually, start_server, url_of


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:{tmp_path / 'rooms.db'}"


async def connect(server: Any) -> tuple[WSClient, dict[str, Any]]:
    ws = await WSClient.connect(url_of(server))
    welcome = await ws.recv()
    assert welcome["type"] == "welcome"
    return ws, welcome


async def joined(server: Any, room: str = "r") -> tuple[WSClient, dict[str, Any]]:
    ws, welcome = await connect(server)
    reply = await ws.request({"type": "join", "room": room})
    assert reply["type"] == "joined"
    return ws, welcome


async def chat(ws: WSClient, text: str, room: str = "r", **extra: Any) -> None:
    await ws.send({"type": "chat", "room": room, "text": text, **extra})


@pytest_twisted.ensureDeferred
async def test_welcome_carries_an_unguessable_session(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    (_, first), (_, second) = await connect(server), await connect(server)
    assert isinstance(first["session"], str) and len(first["session"]) >= 32
    assert first["session"] != second["session"]


@pytest_twisted.ensureDeferred
async def test_chat_with_id_is_broadcast_without_id_then_acknowledged_with_its_seq(make_server: Any,
                                                                                   store: str) -> None:
    server = await make_server(room_protocol=True, store=store)
    (a, welcome), (b, _) = await joined(server), await joined(server)
    await chat(a, "hello", id="c1")
    event = {"type": "chat", "room": "r", "from": welcome["id"], "text": "hello", "seq": 1}
    assert await a.recv() == event, "the sender's broadcast copy carries no request id"
    assert await a.recv() == {"type": "ack", "id": "c1", "seq": 1}
    assert await b.recv() == event
    await chat(a, "no id")
    assert (await a.recv())["seq"] == 2, "without an id there is no ack, only the broadcast"
    assert (await b.recv())["seq"] == 2


@pytest_twisted.ensureDeferred
async def test_history_pages_return_the_events_exactly_as_broadcast(make_server: Any, store: str) -> None:
    server: WebSocketServer = await make_server(room_protocol=True, store=store, history_size=20)
    a, _ = await joined(server)
    broadcast = []
    for i in range(1, 26):
        await chat(a, f"m{i}")
        broadcast.append(await a.recv_raw())
    outsider, _ = await connect(server)  # history needs no membership
    page = await outsider.request({"type": "history", "room": "r", "since": 10, "limit": 5, "id": "h"})
    assert page == {"type": "history", "room": "r", "messages": [
        {"type": "chat", "room": "r", "from": page["messages"][0]["from"], "text": f"m{i}", "seq": i}
        for i in range(11, 16)], "more": True, "id": "h"}
    latest = await outsider.request({"type": "history", "room": "r", "limit": 3})
    assert [m["seq"] for m in latest["messages"]] == [23, 24, 25] and latest["more"]
    older = await outsider.request({"type": "history", "room": "r", "before": 23, "limit": 100})
    assert [m["seq"] for m in older["messages"]] == list(range(6, 23)) and not older["more"], \
        "history_size=20 keeps seqs 6..25"
    everything = await outsider.request({"type": "history", "room": "r", "since": 0, "limit": 1000})
    assert not everything["more"]
    raw = await outsider.request({"type": "history", "room": "r", "since": 24})
    assert raw["messages"] == [json.loads(broadcast[-1])]
    empty = await outsider.request({"type": "history", "room": "never-used"})
    assert empty == {"type": "history", "room": "never-used", "messages": [], "more": False}
    library = await server.history("r", since=23)
    assert [m["text"] for m in library.messages] == ["m24", "m25"] and not library.more
    assert library.last_seq == 25


@pytest_twisted.ensureDeferred
async def test_a_retried_msg_id_is_acknowledged_with_the_original_seq_and_not_broadcast(
        make_server: Any, store: str) -> None:
    server = await make_server(room_protocol=True, store=store)
    (a, _), (b, _) = await joined(server), await joined(server)
    await chat(a, "once", id=1, msg_id="uuid-1")
    first = await a.recv()
    assert first["seq"] == 1 and first["msg_id"] == "uuid-1"
    assert await a.recv() == {"type": "ack", "id": 1, "seq": 1, "msg_id": "uuid-1"}
    await chat(a, "once", id=2, msg_id="uuid-1")
    assert await a.recv() == {"type": "ack", "id": 2, "seq": 1, "msg_id": "uuid-1", "duplicate": True}
    await chat(a, "once", msg_id="uuid-1")
    assert await a.recv() == {"type": "ack", "seq": 1, "msg_id": "uuid-1", "duplicate": True}, \
        "a duplicate is always acknowledged, even without a request id"
    await chat(a, "twice", msg_id="uuid-2")
    assert [(await b.recv())["seq"], (await b.recv())["seq"]] == [1, 2], "b never saw the retries"


@pytest_twisted.ensureDeferred
async def test_join_with_since_replays_then_goes_live_and_reports_lost_gaps(make_server: Any, store: str) -> None:
    server = await make_server(room_protocol=True, store=store, history_size=5)
    a, _ = await joined(server)
    for i in range(1, 8):
        await chat(a, f"m{i}")
        await a.recv()
    late, _ = await connect(server)
    reply = await late.request({"type": "join", "room": "r", "since": 4, "id": "j"})
    assert reply == {"type": "joined", "room": "r", "size": 2, "id": "j", "recovered": True}
    assert [(await late.recv())["seq"] for _ in range(3)] == [5, 6, 7]
    await chat(a, "live")
    assert (await late.recv())["seq"] == 8
    gap, _ = await connect(server)
    reply = await gap.request({"type": "join", "room": "r", "since": 1})
    assert reply["recovered"] is False and reply["first_seq"] == 4, "history_size=5 keeps 4..8"
    assert [(await gap.recv())["seq"] for _ in range(5)] == [4, 5, 6, 7, 8]
    ahead, _ = await connect(server)
    reply = await ahead.request({"type": "join", "room": "r", "since": 50})
    assert reply["recovered"] is False and reply["first_seq"] == 4, "a seq from another stream is not recovered"
    assert [(await ahead.recv())["seq"] for _ in range(5)] == [4, 5, 6, 7, 8], \
        "what follows starts at first_seq, as the reply says (docs/protocol.md)"
    await chat(a, "live again")
    assert (await ahead.recv())["seq"] == 9


@pytest_twisted.ensureDeferred
async def test_resume_after_a_dropped_connection_recovers_everything_once(make_server: Any, store: str) -> None:
    server = await make_server(room_protocol=True, store=store)
    (a, welcome), (b, _) = await joined(server), await joined(server)
    await chat(b, "m1")
    assert (await a.recv())["seq"] == 1
    a.abort()
    await eventually(lambda: server.get_stats().connections == 1)
    for i in range(2, 5):
        await chat(b, f"m{i}")
    again, _ = await connect(server)
    await again.send({"type": "resume", "session": welcome["session"], "rooms": {"r": 1}, "id": "res"})
    assert await again.recv() == {"type": "resumed", "room": "r", "continued": True, "id": "res",
                                  "recovered": True}
    assert [(await again.recv())["text"] for _ in range(3)] == ["m2", "m3", "m4"]
    await chat(b, "m5")
    assert (await again.recv())["seq"] == 5
    third, _ = await connect(server)
    reply = await third.request({"type": "resume", "session": welcome["session"], "rooms": {"r": 5}})
    assert reply == {"type": "resumed", "room": "r", "continued": False, "recovered": True}, \
        "a session continues once; a second resume still rejoins, as a new member"


@pytest_twisted.ensureDeferred
async def test_resuming_a_session_whose_connection_looks_open_closes_that_connection(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    old, welcome = await joined(server)
    new, _ = await connect(server)
    await new.send({"type": "resume", "session": welcome["session"], "rooms": {"r": 0}})
    assert (await new.recv())["continued"] is True
    assert (await old.closed())[0] == 4509


@pytest_twisted.ensureDeferred
async def test_a_resume_past_resume_ttl_is_not_continued(make_server: Any) -> None:
    server = await make_server(room_protocol=True, resume_ttl=0)
    old, welcome = await joined(server)
    await old.close()
    await eventually(lambda: server.get_stats().connections == 0)
    new, _ = await connect(server)
    reply = await new.request({"type": "resume", "session": welcome["session"], "rooms": {}})
    assert reply == {"type": "resumed", "continued": False}


@pytest_twisted.ensureDeferred
async def test_a_room_joined_again_keeps_its_history_in_memory_past_the_idle_grace(make_server: Any) -> None:
    """The memory store lets the history of a room without members go after the resume ttl; members who come
    back (a network blip, everyone resumed) and only read must not lose it."""
    server = await make_server(room_protocol=True)
    writer, _ = await joined(server)
    await chat(writer, "kept", id=1)
    assert (await writer.recv())["type"] == "chat" and (await writer.recv())["type"] == "ack"
    await writer.request({"type": "leave", "room": "r"})
    reader, _ = await joined(server)
    server.durable.store.idle_grace = 0  # the grace has passed ...
    server.durable.store.sweep()  # ... when the store's sweep comes
    reply = await reader.request({"type": "history", "room": "r"})
    assert [message["text"] for message in reply["messages"]] == ["kept"]
    await reader.request({"type": "leave", "room": "r"})
    server.durable.store.sweep()
    assert (await writer.request({"type": "history", "room": "r"}))["messages"] == [], "no member: let go"


@pytest_twisted.ensureDeferred
async def test_a_join_whose_replay_fails_leaves_no_presence_or_subscription_behind(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    watcher, _ = await connect(server)
    assert (await watcher.request({"type": "join", "room": "r", "presence": True}))["type"] == "joined"
    store = server.durable.store
    read = store.read
    store.read = lambda *args, **kwargs: defer.fail(RuntimeError("disk gone"))
    joiner, welcome = await connect(server)
    await joiner.send({"type": "join", "room": "r", "since": 0, "presence": True, "id": 1})
    refused = await joiner.recv()
    store.read = read
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "unavailable", 1)
    seen = [await watcher.recv(), await watcher.recv()]
    assert [(event["event"], event["user"]) for event in seen] == [("join", welcome["id"]), ("leave", welcome["id"])]
    assert welcome["id"] not in {member["user"] for member in server.presence("r")}
    assert server.get_client(welcome["id"]) not in server.presence_tracker.subscribers("r")
    assert (await joiner.request({"type": "join", "room": "r", "since": 0, "id": 2}))["type"] == "joined", \
        "it may retry"


@pytest_twisted.ensureDeferred
async def test_joins_queued_behind_a_failed_replay_are_all_refused(make_server: Any, tmp_path: Path) -> None:
    server = await make_server(room_protocol=True, store=f"sqlite:{tmp_path / 'rooms.db'}")
    store = server.durable.store
    read = store.read
    pending: list[defer.Deferred[Any]] = []

    def held_read(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        pending.append(defer.Deferred())
        return pending[-1]

    store.read = held_read
    joiner, welcome = await connect(server)
    await joiner.send({"type": "join", "room": "r", "since": 0, "id": 1})
    await joiner.send({"type": "join", "room": "r", "since": 0, "id": 2})
    await eventually(lambda: len(pending) == 1 and server.durable.replaying.get("r", {}).get(
        server.get_client(welcome["id"])) is not None and server.durable.replaying["r"][
        server.get_client(welcome["id"])].followers)
    store.read = read
    pending[0].errback(RuntimeError("disk gone"))
    answers = [await joiner.recv(), await joiner.recv()]
    assert [(answer["type"], answer.get("code"), answer["id"]) for answer in answers] == [
        ("error", "unavailable", 1), ("error", "unavailable", 2)]
    assert not server.registry.is_member(server.get_client(welcome["id"]), "r")
    assert (await joiner.request({"type": "history", "room": "r", "id": 3}))["type"] == "history"


@pytest_twisted.ensureDeferred
async def test_a_deleted_room_tells_its_members_and_keeps_no_presence(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    (a, _), (b, _) = await connect(server), await connect(server)
    assert (await a.request({"type": "join", "room": "r", "presence": True}))["type"] == "joined"
    assert (await b.request({"type": "join", "room": "r", "presence": True, "filter": {"types": ["chat"]}}))[
        "type"] == "joined"
    assert (await a.recv())["event"] == "join"
    await server.delete_room("r")
    for ws in (a, b):
        event = await ws.recv()
        while event["type"] == "presence":  # the other one's leave, if it was taken out first
            event = await ws.recv()
        assert event == {"type": "left", "room": "r", "reason": "deleted"}
    assert server.presence("r") == [] and not server.presence_tracker.subscribers("r")
    assert server.room_protocol is not None and "r" not in server.room_protocol.subscriptions
    assert server.get_room("r") is None
    await a.send({"type": "chat", "room": "r", "text": "anyone?"})
    assert (await a.recv())["code"] == "not_in_room"
    server.create_room("app").clients.add("an application's own member")  # not a Client: told nothing
    await server.delete_room("app")
    assert server.get_room("app") is None


@pytest_twisted.ensureDeferred
async def test_broadcast_order_is_seq_order_with_many_senders_on_sqlite(make_server: Any, tmp_path: Path) -> None:
    """Appends to SQLite are asynchronous; concurrent senders must still produce one gap-free, ordered stream."""
    server = await make_server(room_protocol=True, store=f"sqlite:{tmp_path / 'order.db'}")
    clients = [(await joined(server))[0] for _ in range(4)]
    for round_ in range(50):
        for index, ws in enumerate(clients):
            await chat(ws, f"{index}-{round_}")
    for ws in clients:
        received = [(await ws.recv())["seq"] for _ in range(200)]
        assert received == list(range(1, 201))


@pytest_twisted.ensureDeferred
async def test_a_store_failure_is_an_error_to_the_sender_never_a_silent_drop(make_server: Any,
                                                                             tmp_path: Path) -> None:
    path = tmp_path / "failing.db"
    server = await make_server(room_protocol=True, store=f"sqlite:{path}")
    (a, _), (b, _) = await joined(server), await joined(server)
    await chat(a, "stored")
    assert (await a.recv())["seq"] == 1 and (await b.recv())["seq"] == 1
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER fail BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    await chat(a, "lost?", id="x", msg_id="m-2")
    error = await a.recv()
    health = server.durable.store.health()
    assert health["ok"] is False and "disk I/O error" in health["error"], "/healthz turns degraded"
    assert error["type"] == "error" and error["code"] == "unavailable"
    assert (error["id"], error["room"], error["msg_id"]) == ("x", "r", "m-2")
    assert "disk" not in error["message"], "internals stay in the server's log"
    history = await a.request({"type": "history", "room": "r"})
    assert [m["text"] for m in history["messages"]] == ["stored"]
    assert server.durable.store.health()["ok"] is False, "a read that works says nothing of the writes"
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER fail")
    await chat(a, "retried", id="y", msg_id="m-2")
    assert (await a.recv())["seq"] == 2, "the failed message used no seq: the stream stays gap-free"
    assert (await b.recv()) == {"type": "chat", "room": "r", "from": history["messages"][0]["from"],
                                "text": "retried", "msg_id": "m-2", "seq": 2}
    assert server.durable.store.health()["ok"] is True
    assert server.get_stats().errors["unavailable"] == 1


@pytest_twisted.ensureDeferred
async def test_kept_rooms_history_and_seq_survive_a_restart_on_sqlite(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'restart.db'}"
    server = await start_server(room_protocol=True, store=store)
    try:
        server.create_room("kept", keep=True, meta={"title": "Kept"})
        server.create_room("plain")
        ws, _ = await joined(server, "kept")
        for i in range(3):
            await chat(ws, f"m{i}", room="kept")
            await ws.recv()
    finally:
        await server.stop()
    server = await start_server(room_protocol=True, store=store)
    try:
        room = server.get_room("kept")
        assert room is not None and room.keep and room.meta == {"title": "Kept"} and room.last_seq == 3
        assert server.get_room("plain") is None, "rooms that were not kept are not recreated"
        ws, _ = await joined(server, "kept")
        await chat(ws, "after", room="kept")
        assert (await ws.recv())["seq"] == 4
        assert [m["text"] for m in (await server.history("kept", since=0)).messages] == ["m0", "m1", "m2", "after"]
        await server.delete_room("kept")
    finally:
        await server.stop()
    server = await start_server(room_protocol=True, store=store)
    try:
        assert server.get_room("kept") is None
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_unusable_database_fails_start(tmp_path: Path) -> None:
    from roomserver.interfaces import StoreError

    with pytest.raises(StoreError, match="directory"):
        await start_server(room_protocol=True, store=f"sqlite:{tmp_path}")


@pytest_twisted.ensureDeferred
async def test_admin_api_creates_and_deletes_kept_rooms(make_server: Any, tmp_path: Path) -> None:
    from .web_support import http

    token = "kept-rooms-admin-token-0123456789"
    (tmp_path / "token").write_text(token)
    server = await make_server(room_protocol=True, admin_token_file=str(tmp_path / "token"))
    made = await http(server, "PUT", "/admin/rooms/news", json.dumps({"meta": {"topic": "t"}}).encode(), token=token)
    assert made.code == 200 and made.json() == {"name": "news", "members": 0, "seq": 0, "keep": True,
                                                "meta": {"topic": "t"}}
    again = await http(server, "PUT", "/admin/rooms/news", token=token)
    assert again.code == 200 and again.json()["meta"] == {"topic": "t"}, "no meta given: the room keeps its own"
    assert (await http(server, "PUT", "/admin/rooms/news", b'{"meta": {}}', token=token)).json()["meta"] == {}
    assert (await http(server, "PUT", "/admin/rooms/bad%20name", token=token)).code == 400
    assert (await http(server, "PUT", "/admin/rooms/x", b'{"meta": [1]}', token=token)).code == 400
    deleted = await http(server, "DELETE", "/admin/rooms/news", token=token)
    assert deleted.json() == {"deleted": "news"} and server.get_room("news") is None
    assert (await http(server, "DELETE", "/admin/rooms/news", token=token)).code == 404


@pytest_twisted.ensureDeferred
async def test_joins_whose_replay_a_leave_overtook_are_answered_not_in_room(make_server: Any,
                                                                           tmp_path: Path) -> None:
    # error_limit=2: two errors the client earned would close it; these two are not its fault.
    server = await make_server(room_protocol=True, store=f"sqlite:{tmp_path / 'rooms.db'}", error_limit=2)
    a, _ = await joined(server)
    await chat(a, "m1")
    await a.recv()
    store = server.durable.store
    read = store.read
    pending: list[tuple[defer.Deferred[Any], Any, Any]] = []

    def held_read(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        pending.append((defer.Deferred(), args, kwargs))
        return pending[-1][0]

    store.read = held_read
    joiner, welcome = await connect(server)
    await joiner.send({"type": "join", "room": "r", "since": 0, "id": 1})
    await joiner.send({"type": "join", "room": "r", "since": 0, "id": 2})
    await joiner.send({"type": "leave", "room": "r", "id": 3})
    assert (await joiner.recv()) == {"type": "left", "room": "r", "id": 3}
    store.read = read  # the join queued behind the held replay reads for itself
    [(held, args, kwargs)] = pending
    held.callback(await read(*args, **kwargs))
    answers = [await joiner.recv(), await joiner.recv()]
    assert [(answer["type"], answer.get("code"), answer["id"], answer["room"]) for answer in answers] == [
        ("error", "not_in_room", 1, "r"), ("error", "not_in_room", 2, "r")], \
        "answered, but not joined: after its left the client would take that for being in the room again"
    await chat(a, "m2")
    assert (await a.recv())["seq"] == 2
    assert (await joiner.request({"type": "history", "room": "r", "id": 4}))["type"] == "history", \
        "nothing else was sent to the member that left"
    assert not server.registry.is_member(server.get_client(welcome["id"]), "r")


@pytest_twisted.ensureDeferred
async def test_two_replays_of_one_room_in_a_row_are_both_answered_in_order(make_server: Any, tmp_path: Path) -> None:
    server = await make_server(room_protocol=True, store=f"sqlite:{tmp_path / 'twice.db'}")
    a, _ = await joined(server)
    for i in range(1, 4):
        await chat(a, f"m{i}")
        await a.recv()
    late, _ = await connect(server)
    await late.send({"type": "join", "room": "r", "since": 2, "id": 1})
    await late.send({"type": "join", "room": "r", "since": 1, "id": 2})
    received = [await late.recv() for _ in range(5)]
    assert [(m["type"], m.get("id"), m.get("seq")) for m in received] == [
        ("joined", 1, None), ("chat", None, 3), ("joined", 2, None), ("chat", None, 2), ("chat", None, 3)]


@pytest_twisted.ensureDeferred
async def test_presence_sees_no_flicker_when_a_dropped_user_resumes(make_server: Any, tmp_path: Path) -> None:
    from .test_auth import SECRET, make_token

    (tmp_path / "secret").write_text(SECRET)
    server = await make_server(room_protocol=True, jwt_secret_file=str(tmp_path / "secret"))

    async def authed(user: str) -> tuple[WSClient, dict[str, Any]]:
        ws = await WSClient.connect(url_of(server), additional_headers={"Authorization": f"Bearer {make_token(user)}"})
        return ws, await ws.recv()

    bob, _ = await authed("bob")
    assert (await bob.request({"type": "join", "room": "r", "presence": True}))["type"] == "joined"
    alice, welcome = await authed("alice")
    await alice.request({"type": "join", "room": "r"})
    assert (await bob.recv())["event"] == "join"
    alice.abort()
    await eventually(lambda: server.get_stats().connections == 1)
    again, _ = await authed("alice")
    reply = await again.request({"type": "resume", "session": welcome["session"], "rooms": {"r": 0}})
    assert reply["continued"] is True
    await chat(bob, "anyone?")
    assert (await bob.recv())["text"] == "anyone?", "bob saw neither a leave nor a join of alice"
    assert [(m["user"], m["connections"]) for m in server.presence("r")] == [("bob", 1), ("alice", 1)]
    await again.close()  # a deliberate close: alice leaves at once
    assert (await bob.recv()) == {"type": "presence", "room": "r", "event": "leave", "user": "alice"}


@pytest_twisted.ensureDeferred
async def test_a_history_reply_stays_within_max_message_size(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_message_size=2000)
    a, _ = await joined(server)
    for i in range(1, 11):
        await chat(a, f"{i}-" + "x" * 500)
        await a.recv()
    forward = await a.request({"type": "history", "room": "r", "since": 0, "limit": 10})
    assert [m["seq"] for m in forward["messages"]] == [1, 2, 3] and forward["more"]
    latest = await a.request({"type": "history", "room": "r", "limit": 10})
    assert [m["seq"] for m in latest["messages"]] == [8, 9, 10] and latest["more"]


@pytest_twisted.ensureDeferred
async def test_a_chat_accepted_at_the_size_limit_is_in_history_and_replays(make_server: Any) -> None:
    """Its event is over ``max_message_size`` (``from`` and ``seq`` added): Autobahn refused to send it but in
    the pre-framed fan-out, so a history request got no answer and a replay stopped there."""
    server = await make_server(room_protocol=True, max_message_size=2000)
    sender, _ = await joined(server)
    await chat(sender, "x" * 1950)
    await chat(sender, "after")
    assert [len((await sender.recv())["text"]) for _ in range(2)] == [1950, 5]
    page = await sender.request({"type": "history", "room": "r", "id": 9})
    assert [len(message["text"]) for message in page["messages"]] in ([1950, 5], [5]), page["more"]
    late, _ = await connect(server)
    assert (await late.request({"type": "join", "room": "r", "since": 0}))["recovered"]
    assert [(await late.recv())["seq"] for _ in range(2)] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_a_history_reply_counts_its_own_envelope_against_max_message_size(make_server: Any) -> None:
    """A long room name and request id are part of the reply too: pages whose payloads fill the limit to within
    a few bytes still leave a reply a client with the same limit accepts."""
    limit = 2000
    server = await make_server(room_protocol=True, max_message_size=limit, rate_limit=0)
    ws, _ = await connect(server)
    request_id = "q" * 100
    for size in range(700, 900, 20):
        room = f"{size:03d}".ljust(64, "r")
        assert (await ws.request({"type": "join", "room": room}))["type"] == "joined"
        for _ in range(3):
            await chat(ws, "x" * size, room=room)
            await ws.recv()
        await ws.send({"type": "history", "room": room, "limit": 10, "id": request_id})
        raw = await ws.recv_raw()
        assert len(raw.encode()) <= limit, (size, len(raw))
        assert json.loads(raw)["messages"], "at least one message"


@pytest_twisted.ensureDeferred
async def test_a_replay_honours_the_join_filter(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    a, _ = await joined(server)
    await chat(a, "one")
    await a.recv()
    quiet, _ = await connect(server)
    reply = await quiet.request({"type": "join", "room": "r", "since": 0, "filter": {"types": ["notice"]}})
    assert reply["recovered"] is True
    server.broadcast("r", {"type": "notice", "room": "r", "text": "hello"})
    assert (await quiet.recv())["type"] == "notice", "the filtered-out chat was not replayed"


@pytest_twisted.ensureDeferred
async def test_app_broadcasts_queued_during_a_replay_honour_the_join_filter(make_server: Any) -> None:
    """A member replaying history (join with ``since``) gets the application broadcasts sent meanwhile after its
    replay: only the types its join filter asks for, and in order among its chats."""
    server = await make_server(room_protocol=True)
    a, _ = await joined(server)
    await chat(a, "one")
    assert (await a.recv())["seq"] == 1
    store = server.durable.store
    real_read = store.read
    gate: defer.Deferred[None] = defer.Deferred()

    def held_read(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """The real read, answered only once ``gate`` fires: the replay stays in flight meanwhile."""
        return real_read(*args, **kwargs).addCallback(lambda page: gate.addCallback(lambda _: page))

    store.read = held_read
    quiet, _ = await connect(server)
    await quiet.send({"type": "join", "room": "r", "since": 0, "filter": {"types": ["alert", "chat"]}})
    await eventually(lambda: server.durable.replaying.get("r"))
    server.broadcast("r", {"type": "note", "n": 1})
    server.broadcast("r", {"type": "alert", "n": 1})
    await chat(a, "two")
    seen = [await a.recv() for _ in range(3)]
    assert seen[-1]["seq"] == 2, "the chat was broadcast while the replay was in flight"
    server.broadcast("r", b"\x00binary")
    server.broadcast("r", {"type": "note", "n": 2})
    server.broadcast("r", {"type": "alert", "n": 2})
    store.read = real_read
    gate.callback(None)

    reply = await quiet.recv()
    assert (reply["type"], reply["recovered"]) == ("joined", True)
    received = [await quiet.recv() for _ in range(4)]
    assert [(m["type"], m.get("text") or m.get("n")) for m in received] == [
        ("chat", "one"), ("alert", 1), ("chat", "two"), ("alert", 2)]
    server.broadcast("r", {"type": "alert", "n": 3})
    assert await quiet.recv() == {"type": "alert", "n": 3}, "no filtered-out broadcast was queued before it"


class RecordingStore:
    """A store that records each append batch and answers when told (``answer``)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pending: list[tuple[defer.Deferred[list[Any]], int]] = []

    def append(self, room: str, batch: list[Any]) -> defer.Deferred[list[Any]]:
        from roomserver.core.history import Appended

        start = sum(len(b) for b in self.batches)
        self.batches.append([message.body for message in batch])
        done: defer.Deferred[list[Any]] = defer.Deferred()
        self.pending.append((done, start))
        results = [Appended(start + i + 1, b"", False) for i in range(len(batch))]
        done.addCallback(lambda _: results)
        return done

    def answer(self) -> None:
        done, _ = self.pending.pop(0)
        done.callback(None)


def test_chats_of_one_reactor_turn_go_to_the_store_as_one_batch() -> None:
    """The first chat of a turn waits for the turn's end, so the chats that arrived with it share its append
    (one store round trip, one broadcast burst); chats arriving while a batch is in flight form the next one."""
    from twisted.internet import task

    from roomserver.core.history import NewMessage
    from roomserver.durable import AppendPipeline

    clock = task.Clock()
    store = RecordingStore()
    pipeline = AppendPipeline(store, clock.callLater)  # type: ignore[arg-type]
    seqs: list[int] = []
    for text in (b"a", b"b", b"c"):
        pipeline.submit("r", NewMessage(text, None, 0.0)).addCallback(lambda result: seqs.append(result.seq))
    assert store.batches == [] and pipeline.busy("r"), "gathering until the turn ends"
    clock.advance(0)
    assert store.batches == [[b"a", b"b", b"c"]]
    pipeline.submit("r", NewMessage(b"d", None, 0.0)).addCallback(lambda result: seqs.append(result.seq))
    pipeline.submit("r", NewMessage(b"e", None, 0.0)).addCallback(lambda result: seqs.append(result.seq))
    store.answer()
    assert seqs == [1, 2, 3] and store.batches[1] == [b"d", b"e"], "in flight meanwhile: the next batch"
    store.answer()
    clock.advance(0)
    assert seqs == [1, 2, 3, 4, 5] and not pipeline.busy("r")
    assert pipeline.idle().called
