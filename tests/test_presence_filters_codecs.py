"""Presence, message filtering and subprotocols over real sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
import websockets

from roomserver.core.filters import Rejected

from .auth_support import connect_as
from .auth_support import received_within as drain
from .support import WSClient, eventually, logged_errors, url_of


@pytest_twisted.ensureDeferred
async def test_presence_is_per_user_and_leave_fires_once(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    watcher = await connect_as(server, "watcher")
    joined = await watcher.request({"type": "join", "room": "r", "presence": True, "meta": {"role": "mod"}})
    assert joined["members"] == [{"user": "watcher", "connections": 1, "meta": {"role": "mod"}}]
    tab1 = await connect_as(server, "alice", meta={"name": "Alice"})
    await tab1.request({"type": "join", "room": "r"})
    assert await watcher.recv() == {"type": "presence", "room": "r", "event": "join", "user": "alice",
                                    "meta": {"name": "Alice"}}
    tab2 = await connect_as(server, "alice")
    await tab2.request({"type": "join", "room": "r"})
    members = (await watcher.request({"type": "presence", "room": "r", "id": 5}))
    assert members["id"] == 5
    assert {m["user"]: m["connections"] for m in members["members"]} == {"watcher": 1, "alice": 2}
    assert server.presence("r") == members["members"]
    tab1.abort()  # one tab drops: alice is still present, no event
    await eventually(lambda: {m["user"]: m["connections"] for m in server.presence("r")}["alice"] == 1)
    assert await drain(watcher) == []
    await tab2.request({"type": "leave", "room": "r"})
    assert await watcher.recv() == {"type": "presence", "room": "r", "event": "leave", "user": "alice"}
    assert await drain(watcher) == [], "the leave fires once"


@pytest_twisted.ensureDeferred
async def test_a_member_the_application_takes_out_of_a_room_leaves_presence_and_its_subscriptions(
        make_server: Any, secret_file: str) -> None:
    """``room.clients`` is the seed API's set: a ``discard`` by the application is a leave for everyone else
    (it stayed present for good, its filter and presence subscription kept, and its closed Client with them)."""
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    watcher = await connect_as(server, "watcher")
    await watcher.request({"type": "join", "room": "r", "presence": True})
    kicked = await connect_as(server, "kicked")
    await kicked.request({"type": "join", "room": "r", "presence": True, "filter": {"types": ["chat"]}})
    assert (await watcher.recv())["event"] == "join"
    [client] = [c for c in server.get_room("r").clients if c.identity.user == "kicked"]
    server.get_room("r").clients.discard(client)
    assert await watcher.recv() == {"type": "presence", "room": "r", "event": "leave", "user": "kicked"}
    assert [m["user"] for m in server.presence("r")] == ["watcher"]
    assert client not in server.room_protocol.subscriptions.get("r", {})
    assert client not in server.presence_tracker.subscribers("r")
    await watcher.request({"type": "leave", "room": "r"})
    await eventually(lambda: server.get_room("r") is None and server.presence_tracker.room_count() == 0)
    assert await drain(kicked) == [], "nothing more of the room reaches it"
    assert (await kicked.request({"type": "join", "room": "r", "id": 1}))["type"] == "joined", "it may join again"


@pytest_twisted.ensureDeferred
async def test_a_member_kicked_by_a_join_handler_is_refused_and_never_present(make_server: Any,
                                                                            secret_file: str) -> None:
    """The server's ``join`` event fires as the member enters the room, before the join's presence: a handler
    that takes it out again (kick-on-join) left it present for good, subscribed, its filter kept."""
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    watcher = await connect_as(server, "watcher")
    await watcher.request({"type": "join", "room": "r", "presence": True})
    server.on("join", lambda client, room: client.identity.user == "banned" and server.remove_from_room(client, room))
    banned = await connect_as(server, "banned")
    refused = await banned.request({"type": "join", "room": "r", "presence": True, "filter": {"types": ["chat"]},
                                    "id": 1})
    assert (refused["type"], refused["code"], refused["room"], refused["id"]) == ("error", "forbidden", "r", 1)
    resumed = await banned.request({"type": "resume", "session": "unknown", "rooms": {"r": 0}, "id": 2})
    assert (resumed["type"], resumed["code"], resumed["room"]) == ("error", "forbidden", "r"), "a resume too"
    [client] = [c for c in server.clients.values() if c.identity.user == "banned"]
    assert client not in server.presence_tracker.subscribers("r")
    assert client not in server.room_protocol.subscriptions.get("r", {})
    assert [m["user"] for m in server.presence("r")] == ["watcher"]
    assert await drain(watcher) == [], "the watcher saw no join (and no leave)"


@pytest_twisted.ensureDeferred
async def test_presence_needs_membership_and_meta_is_size_limited(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_meta_size=64)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    assert (await ws.request({"type": "presence", "room": "r"}))["code"] == "not_in_room"
    assert (await ws.request({"type": "join", "room": "r", "meta": {"x": "y" * 100}}))["code"] == "invalid_message"
    assert (await ws.request({"type": "join", "room": "r", "meta": "str"}))["code"] == "invalid_message"


@pytest_twisted.ensureDeferred
async def test_server_join_and_leave_events(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    events: list[tuple[str, str]] = []
    server.on("join", lambda client, room: events.append(("join", room)))
    server.on("leave", lambda client, room: events.append(("leave", room)))
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    await ws.request({"type": "join", "room": "a"})
    await ws.request({"type": "join", "room": "b"})
    await ws.request({"type": "leave", "room": "a"})
    ws.abort()
    await eventually(lambda: len(events) == 4)
    assert events == [("join", "a"), ("join", "b"), ("leave", "a"), ("leave", "b")]


@pytest_twisted.ensureDeferred
async def test_filters_reject_and_rewrite(make_server: Any, tmp_path: Path) -> None:
    words = tmp_path / "words"
    words.write_text("spam\nscam\n")
    server = await make_server(room_protocol=True, max_text_length=20, blocked_words_file=str(words))

    def no_shouting(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        if message["text"].startswith("!"):
            raise Rejected("no commands here")
        return {**message, "text": message["text"].lower()}

    server.add_filter(no_shouting)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    await ws.request({"type": "join", "room": "r"})
    too_long = await ws.request({"type": "chat", "room": "r", "text": "x" * 21, "id": 1})
    assert too_long["code"] == "filtered" and too_long["id"] == 1
    assert (await ws.request({"type": "chat", "room": "r", "text": "cheap SCAM here"}))["code"] == "filtered"
    assert (await ws.request({"type": "chat", "room": "r", "text": "!kick"}))["message"] == "no commands here"
    assert (await ws.request({"type": "chat", "room": "r", "text": "HeLLo"}))["text"] == "hello"
    assert server.get_stats().errors["filtered"] == 3


@pytest_twisted.ensureDeferred
async def test_a_filter_that_fails_refuses_the_chat_and_keeps_the_sender(make_server: Any) -> None:
    server = await make_server(room_protocol=True)

    def buggy(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        if "boom" in message["text"]:
            raise KeyError("a bug in the application's filter")
        return message

    server.add_filter(buggy)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    await ws.request({"type": "join", "room": "r"})
    with logged_errors() as errors:
        refused = await ws.request({"type": "chat", "room": "r", "text": "boom", "id": 1})
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "internal_error", 1)
    assert len(errors) == 1, "logged with its traceback"
    assert (await ws.request({"type": "chat", "room": "r", "text": "fine"}))["text"] == "fine", "still connected"


@pytest_twisted.ensureDeferred
async def test_allowed_types_filter(make_server: Any) -> None:
    server = await make_server(room_protocol=True, allowed_types=("vote",))
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    await ws.request({"type": "join", "room": "r"})
    assert (await ws.request({"type": "chat", "room": "r", "text": "hi"}))["code"] == "filtered"


@pytest_twisted.ensureDeferred
async def test_subscription_filter_by_type(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    picky = await WSClient.connect(url_of(server))
    await picky.recv()
    await picky.request({"type": "join", "room": "r", "filter": {"types": ["alert"]}})
    talker = await WSClient.connect(url_of(server))
    await talker.recv()
    await talker.request({"type": "join", "room": "r"})
    await talker.request({"type": "chat", "room": "r", "text": "chatter"})
    assert server.broadcast("r", {"type": "alert", "text": "fire"}) == 2
    assert await picky.recv() == {"type": "alert", "text": "fire"}, "the chat was filtered out for this member"
    bad = await picky.request({"type": "join", "room": "s", "filter": {"types": "alert"}})
    assert bad["code"] == "invalid_message"


@pytest_twisted.ensureDeferred
async def test_msgpack_and_json_clients_share_a_room(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    json_client = await WSClient.connect(url_of(server), subprotocols=["roomserver.json.v1"])
    assert json_client.ws.subprotocol == "roomserver.json.v1"
    await json_client.recv()
    packed = await WSClient.connect(url_of(server), subprotocols=["roomserver.msgpack.v1"])
    assert packed.ws.subprotocol == "roomserver.msgpack.v1"
    welcome = msgpack.unpackb(await packed.recv_raw())
    assert welcome["type"] == "welcome"
    await packed.send(msgpack.packb({"type": "join", "room": "mix", "id": 1}))
    assert msgpack.unpackb(await packed.recv_raw()) == {"type": "joined", "room": "mix", "size": 1, "id": 1}
    await json_client.request({"type": "join", "room": "mix"})
    before = server.counters.bytes_sent
    await json_client.send({"type": "chat", "room": "mix", "text": "from json"})
    raw_json, raw_msgpack = await json_client.recv_raw(), await packed.recv_raw()
    as_json, as_msgpack = json.loads(raw_json), msgpack.unpackb(raw_msgpack)
    assert as_json["text"] == as_msgpack["text"] == "from json" and as_json["seq"] == as_msgpack["seq"]
    assert server.counters.bytes_sent - before == len(raw_json) + len(raw_msgpack), "what each member was sent"
    await packed.send(msgpack.packb({"type": "chat", "room": "mix", "text": "from msgpack"}))
    assert (await json_client.recv())["text"] == "from msgpack"
    assert msgpack.unpackb(await packed.recv_raw())["text"] == "from msgpack", "the sender gets its copy too"
    await packed.send('{"type":"join"}')
    assert msgpack.unpackb(await packed.recv_raw())["code"] == "unsupported", "text frames in the msgpack protocol"
    await packed.send(b"\xc1")
    assert msgpack.unpackb(await packed.recv_raw())["code"] == "invalid_json"


@pytest_twisted.ensureDeferred
async def test_plain_text_reaches_msgpack_members_as_a_string_and_everyone_else_too(make_server: Any) -> None:
    """``broadcast(room, "plain text")`` is not JSON: a msgpack member gets the string, and neither it nor the
    members after it in the room lose the message."""
    server = await make_server(room_protocol=True)
    packed = await WSClient.connect(url_of(server), subprotocols=["roomserver.msgpack.v1"])
    welcome = msgpack.unpackb(await packed.recv_raw())
    await packed.send(msgpack.packb({"type": "join", "room": "mix", "id": 1}))
    msgpack.unpackb(await packed.recv_raw())
    plain = [await WSClient.connect(url_of(server)) for _ in range(4)]
    for ws in plain:
        await ws.recv()
        await ws.request({"type": "join", "room": "mix"})
    assert server.broadcast("mix", "plain text") == 5
    assert msgpack.unpackb(await packed.recv_raw()) == "plain text"
    for ws in plain:
        assert await ws.recv_raw() == "plain text"
    assert server.get_stats().messages_sent >= 5
    packed_client = server.get_client(welcome["id"])
    assert packed_client is not None
    packed_client.send("just for you")
    assert msgpack.unpackb(await packed.recv_raw()) == "just for you"


@pytest_twisted.ensureDeferred
async def test_unknown_subprotocols_are_refused_and_none_means_json(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server), subprotocols=["mqtt", "stomp"])
    assert info.value.response.status_code == 400
    plain = await WSClient.connect(url_of(server))
    assert plain.ws.subprotocol is None and (await plain.recv())["type"] == "welcome"


@pytest_twisted.ensureDeferred
async def test_custom_codec_registry(make_server: Any) -> None:
    class Reversed:
        """A toy codec: JSON text, reversed (what matters is that the registry is used, not the format)."""

        binary = False

        def encode(self, message: Any) -> bytes:
            import json

            return json.dumps(message).encode()[::-1]

        def decode(self, payload: bytes) -> Any:
            import json

            return json.loads(payload[::-1])

    server = await make_server(room_protocol=True)
    server.add_protocol("reversed.v1", Reversed())
    ws = await WSClient.connect(url_of(server), subprotocols=["reversed.v1"])
    assert ws.ws.subprotocol == "reversed.v1"
    codec = Reversed()
    assert codec.decode((await ws.recv_raw()).encode())["type"] == "welcome"
    await ws.send(codec.encode({"type": "join", "room": "r", "id": 1}).decode())
    assert codec.decode((await ws.recv_raw()).encode()) == {"type": "joined", "room": "r", "size": 1, "id": 1}
