"""Unit tests of the room protocol's parsing and decisions (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from roomserver.core import messages
from roomserver.core.errors import ErrorCode, ProtocolViolation
from roomserver.core.rooms import RoomRegistry
from roomserver.core.session import Publish, Reply, RoomProtocol
from roomserver.core.stats import ServerStats, StatsCounters


class Member:
    def __init__(self, name: str) -> None:
        self.id = name


def handle(protocol: RoomProtocol, member: Member, message: Any) -> list[Any]:
    payload = message if isinstance(message, (str, bytes)) else json.dumps(message)
    return protocol.handle(member, payload.encode() if isinstance(payload, str) else payload)


def error_code(effects: list[Any]) -> str:
    assert len(effects) == 1 and isinstance(effects[0], Reply)
    assert effects[0].event["type"] == "error"
    return str(effects[0].event["code"])


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE),
        ({"room": "r"}, ErrorCode.INVALID_MESSAGE),
        ({"type": 5}, ErrorCode.INVALID_MESSAGE),
        ({"type": "dance"}, ErrorCode.UNKNOWN_TYPE),
        ({"type": "join"}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": ""}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": "x" * 65}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": "bad name"}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": "émoji"}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": ["r"]}, ErrorCode.INVALID_MESSAGE),
        ({"type": "chat", "room": "r"}, ErrorCode.INVALID_MESSAGE),
        ({"type": "chat", "room": "r", "text": 5}, ErrorCode.INVALID_MESSAGE),
        ({"type": "chat", "room": "r", "text": "hi"}, ErrorCode.NOT_IN_ROOM),
        ({"type": "leave", "room": "r"}, ErrorCode.NOT_IN_ROOM),
        ({"type": "join", "room": "r", "id": {"x": 1}}, ErrorCode.INVALID_MESSAGE),
        ({"type": "join", "room": "r", "id": "x" * 129}, ErrorCode.INVALID_MESSAGE),
    ],
)
def test_each_invalid_request_gets_its_error_code(message: Any, code: str) -> None:
    protocol = RoomProtocol(RoomRegistry())
    assert error_code(handle(protocol, Member("a"), message)) == code


def test_binary_frames_are_unsupported() -> None:
    protocol = RoomProtocol(RoomRegistry())
    assert error_code(protocol.handle(Member("a"), b"\x00", is_binary=True)) == ErrorCode.UNSUPPORTED


def test_join_chat_leave_flow_with_sequence_numbers_and_ids() -> None:
    registry = RoomRegistry()
    protocol = RoomProtocol(registry)
    a, b = Member("a"), Member("b")
    assert handle(protocol, a, {"type": "join", "room": "r", "id": 7}) == [
        Reply({"type": "joined", "room": "r", "size": 1, "id": 7})
    ]
    assert handle(protocol, b, {"type": "join", "room": "r"}) == [Reply({"type": "joined", "room": "r", "size": 2})]
    for expected_seq in (1, 2):
        effects = handle(protocol, a, {"type": "chat", "room": "r", "text": "hi", "id": "m"})
        assert effects == [
            Publish("r", {"type": "chat", "room": "r", "from": "a", "text": "hi", "seq": expected_seq})
        ]
    assert handle(protocol, b, {"type": "leave", "room": "r", "id": "x"}) == [
        Reply({"type": "left", "room": "r", "id": "x"})
    ]
    assert len(registry.get("r").clients) == 1  # type: ignore[union-attr]


def test_error_replies_carry_the_request_id() -> None:
    protocol = RoomProtocol(RoomRegistry())
    effects = handle(protocol, Member("a"), {"type": "nope", "id": "abc"})
    assert effects[0].event["id"] == "abc"
    effects = handle(protocol, Member("a"), {"type": "chat", "room": "r", "text": "x", "id": 3})
    assert effects[0].event == {"type": "error", "code": "not_in_room", "message": "join room 'r' first", "id": 3}


def test_parse_returns_frozen_commands() -> None:
    assert messages.parse(b'{"type":"chat","room":"a:b-c_d.e","text":""}') == messages.Chat("a:b-c_d.e", "")
    with pytest.raises(ProtocolViolation):
        messages.parse(b'{"type":"join","room":"a/b"}')


def test_stats_snapshot_compares_on_the_seed_fields() -> None:
    counters = StatsCounters()
    counters.connected()
    counters.received(10)
    counters.received(10)
    counters.sent(5, recipients=1)
    counters.dropped("slow_consumer")
    snapshot = counters.snapshot(rooms=1)
    assert snapshot == ServerStats(connections=1, rooms=1, messages_sent=1, messages_received=2)
    assert snapshot.bytes_received == 20 and snapshot.drops == {"slow_consumer": 1}
