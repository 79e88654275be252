"""Unit tests of the room protocol's parsing and decisions (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from roomserver.core import messages
from roomserver.core.errors import ErrorCode, ProtocolViolation
from roomserver.core.rooms import RoomRegistry
from roomserver.core.session import Append, ReadHistory, Replay, Reply, RoomProtocol, TakeOver
from roomserver.core.sessions import SessionTable
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


def test_join_chat_leave_flow_with_ids() -> None:
    registry = RoomRegistry()
    protocol = RoomProtocol(registry)
    a, b = Member("a"), Member("b")
    assert handle(protocol, a, {"type": "join", "room": "r", "id": 7}) == [
        Reply({"type": "joined", "room": "r", "size": 1, "id": 7})
    ]
    assert handle(protocol, b, {"type": "join", "room": "r"}) == [Reply({"type": "joined", "room": "r", "size": 2})]
    effects = handle(protocol, a, {"type": "chat", "room": "r", "text": "hi", "id": "m", "msg_id": "u1"})
    assert effects == [
        Append("r", b'{"type":"chat","room":"r","from":"a","text":"hi","msg_id":"u1"}', "u1", "m")
    ], "the chat goes to the store first, encoded without seq (the store assigns it)"
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


@pytest.mark.parametrize(
    "message",
    [
        {"type": "chat", "room": "r", "text": "x", "msg_id": ""},
        {"type": "chat", "room": "r", "text": "x", "msg_id": 5},
        {"type": "chat", "room": "r", "text": "x", "msg_id": "m" * 129},
        {"type": "join", "room": "r", "since": -1},
        {"type": "join", "room": "r", "since": "3"},
        {"type": "join", "room": "r", "since": True},
        {"type": "history", "room": "r", "limit": 0},
        {"type": "history", "room": "r", "limit": 1.5},
        {"type": "history", "room": "r", "since": 2**60},
        {"type": "history", "room": "bad name"},
        {"type": "resume"},
        {"type": "resume", "session": 5},
        {"type": "resume", "session": "s", "rooms": []},
        {"type": "resume", "session": "s", "rooms": {"r": -1}},
        {"type": "resume", "session": "s", "rooms": {"bad name": 1}},
    ],
)
def test_invalid_durable_requests_are_invalid_message(message: Any) -> None:
    protocol = RoomProtocol(RoomRegistry())
    assert error_code(handle(protocol, Member("a"), message)) == ErrorCode.INVALID_MESSAGE


def test_history_requests_need_no_membership_and_cap_the_limit() -> None:
    protocol = RoomProtocol(RoomRegistry())
    assert handle(protocol, Member("a"), {"type": "history", "room": "r", "since": 3, "limit": 10**6, "id": 1}) == [
        ReadHistory("r", 3, None, messages.MAX_HISTORY_LIMIT, 1)]
    assert handle(protocol, Member("a"), {"type": "history", "room": "r", "before": 9}) == [
        ReadHistory("r", None, 9, messages.DEFAULT_HISTORY_LIMIT, None)]


def test_join_with_since_asks_for_a_replay() -> None:
    protocol = RoomProtocol(RoomRegistry())
    assert handle(protocol, Member("a"), {"type": "join", "room": "r", "since": 4, "id": "j"}) == [
        Replay("r", 4, {"type": "joined", "room": "r", "size": 1, "id": "j"})]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resume_continues_a_detached_session_once_and_within_its_ttl() -> None:
    clock = Clock()
    registry = RoomRegistry()
    protocol = RoomProtocol(registry, SessionTable(ttl=120), clock=clock)
    old, new, late = Member("old"), Member("new"), Member("late")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    assert len(token) >= 32, "the session token must be unguessable"
    protocol.welcome(new)
    protocol.disconnected(old)
    clock.now += 119
    effects = handle(protocol, new, {"type": "resume", "session": token, "rooms": {"r": 7, "s": 0}, "id": 1})
    assert effects == [
        TakeOver("old"),
        Replay("r", 7, {"type": "resumed", "room": "r", "continued": True, "id": 1}),
        Replay("s", 0, {"type": "resumed", "room": "s", "continued": True, "id": 1}),
    ]
    assert registry.rooms_of(new) == {"r", "s"}
    protocol.welcome(late)
    again = handle(protocol, late, {"type": "resume", "session": token, "rooms": {}})
    assert again == [Reply({"type": "resumed", "continued": False})], "a session is continued at most once"


def test_an_expired_or_unknown_session_still_rejoins_and_replays_but_is_not_continued() -> None:
    clock = Clock()
    protocol = RoomProtocol(RoomRegistry(), SessionTable(ttl=120), clock=clock)
    old, new = Member("old"), Member("new")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    protocol.disconnected(old)
    clock.now += 121
    protocol.welcome(new)
    assert handle(protocol, new, {"type": "resume", "session": token, "rooms": {"r": 1}}) == [
        Replay("r", 1, {"type": "resumed", "room": "r", "continued": False})]
    assert len(protocol.sessions) == 1, "the expired session is forgotten, only the live one remains"


def test_resume_of_a_session_still_attached_takes_it_over() -> None:
    protocol = RoomProtocol(RoomRegistry(), SessionTable(ttl=120), clock=Clock())
    old, new = Member("old"), Member("new")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    protocol.welcome(new)
    assert handle(protocol, new, {"type": "resume", "session": token, "rooms": {}})[0] == TakeOver("old")
    protocol.disconnected(old)  # the taken-over connection closing later must not bring the session back
    assert handle(protocol, Member("x"), {"type": "resume", "session": token, "rooms": {}}) == [
        Reply({"type": "resumed", "continued": False})]


def test_with_a_ttl_of_0_no_session_is_continued_not_even_a_live_ones() -> None:
    """resume_ttl=0: "sessions are never continued" (docs/limits.md); a resume of a live connection's token
    took that session over and closed the connection (4509)."""
    protocol = RoomProtocol(RoomRegistry(), SessionTable(ttl=0), clock=Clock())
    old, new = Member("old"), Member("new")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    protocol.welcome(new)
    assert handle(protocol, new, {"type": "resume", "session": token, "rooms": {}}) == [
        Reply({"type": "resumed", "continued": False})]
    protocol.disconnected(old)
    assert handle(protocol, Member("x"), {"type": "resume", "session": token, "rooms": {}}) == [
        Reply({"type": "resumed", "continued": False})]


def test_a_resume_beyond_the_room_limit_reports_that_room_and_rejoins_the_others() -> None:
    protocol = RoomProtocol(RoomRegistry(max_rooms_per_client=1), SessionTable(ttl=120), clock=Clock())
    member = Member("m")
    protocol.welcome(member)
    effects = handle(protocol, member, {"type": "resume", "session": "unknown", "rooms": {"a": 0, "b": 0}})
    assert effects[0] == Replay("a", 0, {"type": "resumed", "room": "a", "continued": False})
    assert isinstance(effects[1], Reply) and effects[1].event["code"] == ErrorCode.TOO_MANY_ROOMS
    assert effects[1].event["room"] == "b"


class User:
    """A connection of an authenticated user."""

    def __init__(self, client_id: str, user: str) -> None:
        from roomserver.core.auth import Identity

        self.id = client_id
        self.identity = Identity(user)


def presence_world() -> tuple[RoomProtocol, Clock, Member]:
    clock = Clock()
    protocol = RoomProtocol(RoomRegistry(), SessionTable(ttl=120), clock=clock)
    watcher = Member("watcher")
    protocol.welcome(watcher)
    handle(protocol, watcher, {"type": "join", "room": "r", "presence": True})
    return protocol, clock, watcher


def announcements(effects: list[Any]) -> list[tuple[str, str]]:
    from roomserver.core.session import Announce

    return [(e.event["event"], e.event["user"]) for e in effects if isinstance(e, Announce)]


def test_a_lost_connection_resumed_within_the_ttl_is_the_same_member_without_leave_or_join() -> None:
    protocol, clock, _ = presence_world()
    old = User("c1", "alice")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    assert announcements(handle(protocol, old, {"type": "join", "room": "r"})) == [("join", "alice")]
    handle(protocol, old, {"type": "join", "room": "s"})
    rooms = list(protocol.registry.remove_member(old))
    assert announcements(protocol.disconnected(old, rooms, deliberate=False)) == [], "held, not left"
    assert [m["user"] for m in protocol.presence.members("r")] == ["watcher", "alice"]
    clock.now += 100
    new = User("c2", "alice")
    protocol.welcome(new)
    effects = handle(protocol, new, {"type": "resume", "session": token, "rooms": {"r": 0}})
    assert announcements(effects) == [], "same member: no join in r; s had no presence subscriber to tell"
    assert protocol.presence.members("r")[1] == {"user": "alice", "connections": 1, "meta": {}}
    assert protocol.presence.members("s") == [], "a held room that was not rejoined is left"
    clock.now += 1000
    assert protocol.expire_sessions() == []


def test_held_presence_is_released_with_a_leave_when_the_session_expires() -> None:
    protocol, clock, _ = presence_world()
    old = User("c1", "alice")
    protocol.welcome(old)
    handle(protocol, old, {"type": "join", "room": "r"})
    protocol.disconnected(old, list(protocol.registry.remove_member(old)), deliberate=False)
    clock.now += 119
    assert protocol.expire_sessions() == []
    clock.now += 2
    assert announcements(protocol.expire_sessions()) == [("leave", "alice")]
    assert [m["user"] for m in protocol.presence.members("r")] == ["watcher"]


def test_a_deliberate_close_or_an_anonymous_connection_leaves_at_once() -> None:
    protocol, _, _ = presence_world()
    alice, anonymous = User("c1", "alice"), Member("anon")
    for member in (alice, anonymous):
        protocol.welcome(member)
        handle(protocol, member, {"type": "join", "room": "r"})
    effects = protocol.disconnected(alice, list(protocol.registry.remove_member(alice)), deliberate=True)
    assert announcements(effects) == [("leave", "alice")]
    effects = protocol.disconnected(anonymous, list(protocol.registry.remove_member(anonymous)), deliberate=False)
    assert announcements(effects) == [("leave", "anon")], "an anonymous connection is its own user"


def test_a_resume_by_another_user_does_not_inherit_held_presence() -> None:
    protocol, _, _ = presence_world()
    old = User("c1", "alice")
    token = protocol.welcome(old)[0].event["session"]  # type: ignore[union-attr]
    handle(protocol, old, {"type": "join", "room": "r"})
    protocol.disconnected(old, list(protocol.registry.remove_member(old)), deliberate=False)
    mallory = User("c2", "mallory")
    protocol.welcome(mallory)
    effects = handle(protocol, mallory, {"type": "resume", "session": token, "rooms": {"r": 0}})
    assert announcements(effects) == [("join", "mallory")]
    assert Replay("r", 0, {"type": "resumed", "room": "r", "continued": False}) in effects
    assert {m["user"] for m in protocol.presence.members("r")} == {"watcher", "alice", "mallory"}, \
        "alice's session is not mallory's: it keeps holding alice's presence until it expires"


def test_a_lost_tab_of_a_user_with_another_tab_there_is_let_go_at_once() -> None:
    protocol, _, _ = presence_world()
    tab1, tab2 = User("c1", "alice"), User("c2", "alice")
    for tab in (tab1, tab2):
        protocol.welcome(tab)
        handle(protocol, tab, {"type": "join", "room": "r"})
    assert announcements(protocol.disconnected(tab1, list(protocol.registry.remove_member(tab1)),
                                               deliberate=False)) == []
    assert protocol.presence.members("r")[1]["connections"] == 1, "only real connections are counted"


def test_a_session_of_an_authenticated_user_continues_only_for_that_user() -> None:
    protocol, _, _ = presence_world()
    alice = User("c1", "alice")
    token = protocol.welcome(alice)[0].event["session"]  # type: ignore[union-attr]
    mallory = User("c2", "mallory")
    protocol.welcome(mallory)
    effects = handle(protocol, mallory, {"type": "resume", "session": token, "rooms": {}})
    assert effects == [Reply({"type": "resumed", "continued": False})], "no takeover of alice's connection"
    protocol.disconnected(alice, [], deliberate=False)
    assert handle(protocol, mallory, {"type": "resume", "session": token, "rooms": {}}) == [
        Reply({"type": "resumed", "continued": False})]
    again = User("c3", "alice")
    protocol.welcome(again)
    assert handle(protocol, again, {"type": "resume", "session": token, "rooms": {}}) == [
        TakeOver("c1"), Reply({"type": "resumed", "continued": True})], "the session was still there for alice"
