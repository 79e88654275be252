"""The built-in JSON room protocol over real sockets: welcome, join/leave/chat, seq, every error code."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from .support import WSClient, eventually, url_of


async def connect(server: Any) -> tuple[WSClient, str]:
    ws = await WSClient.connect(url_of(server))
    welcome = await ws.recv()
    assert welcome["type"] == "welcome" and isinstance(welcome["id"], str)
    return ws, welcome["id"]


@pytest_twisted.ensureDeferred
async def test_join_chat_leave_with_sequence_numbers(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    (a, a_id), (b, _) = await connect(server), await connect(server)
    assert await a.request({"type": "join", "room": "lobby", "id": "j1"}) == {
        "type": "joined", "room": "lobby", "size": 1, "id": "j1"}
    assert await b.request({"type": "join", "room": "lobby"}) == {"type": "joined", "room": "lobby", "size": 2}
    for seq in (1, 2, 3):
        await a.send({"type": "chat", "room": "lobby", "text": f"m{seq}"})
        expected = {"type": "chat", "room": "lobby", "from": a_id, "text": f"m{seq}", "seq": seq}
        assert await a.recv() == expected, "the sender gets its own message too"
        assert await b.recv() == expected
    assert await b.request({"type": "leave", "room": "lobby", "id": 9}) == {"type": "left", "room": "lobby", "id": 9}
    await a.send({"type": "chat", "room": "lobby", "text": "after"})
    assert (await a.recv())["seq"] == 4
    assert (await b.request({"type": "chat", "room": "lobby", "text": "x"}))["code"] == "not_in_room"
    stats = server.get_stats()
    assert stats.connections == 2 and stats.rooms == 1
    assert stats.messages_received == 8
    # welcome x2, joined x2, chats 3x2, left, chat 1, error 1
    assert stats.messages_sent == 2 + 2 + 6 + 1 + 1 + 1


@pytest_twisted.ensureDeferred
async def test_every_error_code_and_the_connection_stays_open(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    ws, _ = await connect(server)
    cases = [
        ("{not json", "invalid_json"),
        ({"type": "join", "room": "bad room!", "id": 1}, "invalid_message"),
        ({"type": "join", "room": "x" * 65}, "invalid_message"),
        ({"no": "type"}, "invalid_message"),
        ({"type": "teleport", "id": "t"}, "unknown_type"),
        ({"type": "chat", "room": "elsewhere", "text": "hi"}, "not_in_room"),
        (b"\x01\x02", "unsupported"),
    ]
    for message, code in cases:
        reply = await ws.request(message)
        assert reply["type"] == "error" and reply["code"] == code, (message, reply)
        assert isinstance(reply["message"], str) and reply["message"]
        if isinstance(message, dict) and "id" in message:
            assert reply["id"] == message["id"]
    assert (await ws.request({"type": "join", "room": "ok"}))["type"] == "joined"
    assert server.get_stats().errors == {
        "invalid_json": 1, "invalid_message": 3, "unknown_type": 1, "not_in_room": 1, "unsupported": 1}


@pytest_twisted.ensureDeferred
async def test_library_handlers_run_beside_the_room_protocol(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    seen: list[str] = []
    server.on("connection", lambda client: client.on("message", seen.append))
    ws, _ = await connect(server)
    await ws.request({"type": "join", "room": "r"})
    assert seen == ['{"type": "join", "room": "r"}']


@pytest_twisted.ensureDeferred
async def test_rooms_are_cleaned_up_when_their_last_member_leaves(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    a, _ = await connect(server)
    b, _ = await connect(server)
    await a.request({"type": "join", "room": "one"})
    await b.request({"type": "join", "room": "one"})
    await a.request({"type": "join", "room": "two"})
    assert server.get_stats().rooms == 2
    await a.request({"type": "leave", "room": "two"})
    assert server.get_stats().rooms == 1
    await a.close()
    await b.close()
    await eventually(lambda: server.get_stats().rooms == 0 and server.get_stats().connections == 0)


@pytest_twisted.ensureDeferred
async def test_broadcast_from_the_library_reaches_protocol_clients(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    ws, _ = await connect(server)
    await ws.request({"type": "join", "room": "news"})
    assert server.broadcast("news", {"type": "announcement", "text": "hello"}) == 1
    assert await ws.recv() == {"type": "announcement", "text": "hello"}
