"""Property-based fuzzing of the protocol core with hypothesis.

Valid, near-valid and garbage requests (wrong types, huge numbers, deep nesting, unicode edge cases, invalid
room names, duplicated keys, random bytes) go through ``RoomProtocol.handle``. Every input must yield
well-formed effects (never an exception), and after every step the registry must be consistent both ways: a
client is in a room exactly when the room lists it, no empty unkept room survives, and the counts agree with a
recount. Requests as the msgpack codec decodes them (bytes keys and values, every request type with its own
fields) go through too. Together the tests feed well over 10,000 generated inputs per run.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roomserver.core.errors import ErrorCode
from roomserver.core.rooms import RoomRegistry
from roomserver.core.session import Append, ReadHistory, Replay, Reply, RoomProtocol, TakeOver
from roomserver.core.sessions import SessionTable

ERROR_CODES = {value for name, value in vars(ErrorCode).items() if name.isupper()}
ROOM_CHARS = "abcXYZ019_.:-"

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=4)),
    max_leaves=20,
)
room_names = st.one_of(
    st.text(alphabet=ROOM_CHARS, min_size=1, max_size=3),  # few distinct valid names: members really meet
    st.text(alphabet=ROOM_CHARS, min_size=60, max_size=70),
    st.text(max_size=8),  # mostly invalid: spaces, unicode, empty
    json_values,
)
requests = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["join", "leave", "chat", "presence", "JOIN", ""]), json_values)},
    optional={"room": room_names, "text": st.one_of(st.text(max_size=30), json_values),
              "id": st.one_of(st.text(max_size=130), st.integers(min_value=-(2**60), max_value=2**60), json_values),
              "extra": json_values},
)


def deeply_nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


payloads = st.one_of(
    requests.map(lambda message: json.dumps(message).encode()),
    requests.map(lambda message: json.dumps(message, ensure_ascii=False).encode()),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda text: text.encode("utf-8", "surrogatepass")),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=3000).map(deeply_nested),
    st.sampled_from([
        b'{"type":"join","type":"chat","room":"a","text":"dup"}',
        b'{"type":"chat","room":"a","room":"b","text":"x"}',
        b'{"type":"join","room":"a\\u0000"}',
        b'{"type":"join","room":"\\ud800"}',
        b'{"type":"chat","room":"a","text":"\\ud83d\\ude00 \\u202e"}',
        b'{"type":"join","room":"a","id":1e400}',
        b'{"type":"join","room":"a","id":123456789012345678901234567890}',
        b"\xef\xbb\xbf{}", b"", b"null", b"[]", b'"join"',
    ]),
)

# What the msgpack codec hands the core (``MsgpackCodec.decode``: ``strict_map_key`` lets bytes keys through, and
# values may be bytes), for every request type, with each type's own fields.
msgpack_scalars = st.one_of(json_scalars, st.binary(max_size=8))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=5), st.binary(max_size=5)), inner,
                                            max_size=4)),
    max_leaves=20,
)
msgpack_rooms = st.one_of(st.text(alphabet=ROOM_CHARS, min_size=1, max_size=3), st.binary(max_size=3),
                          msgpack_values)
msgpack_fields = {
    "room": msgpack_rooms, "text": msgpack_values, "id": msgpack_values, "msg_id": msgpack_values,
    "since": st.one_of(st.integers(min_value=-1, max_value=2**64), msgpack_values), "meta": msgpack_values,
    "filter": msgpack_values, "token": msgpack_values,
    "session": st.one_of(st.text(min_size=1, max_size=20), msgpack_values),
    "rooms": st.one_of(st.dictionaries(st.one_of(st.text(alphabet=ROOM_CHARS, min_size=1, max_size=3),
                                                 st.binary(max_size=3)), msgpack_values, max_size=3),
                       msgpack_values),
}
request_fields = {"join": ("room", "since", "meta", "filter", "id"), "leave": ("room", "id"),
                  "chat": ("room", "text", "id", "msg_id"), "history": ("room", "since", "id"),
                  "presence": ("room", "id"), "resume": ("session", "rooms", "id"), "auth": ("token", "id")}
msgpack_requests = st.one_of(
    *(st.fixed_dictionaries({"type": st.just(kind)}, optional={field: msgpack_fields[field] for field in fields})
      for kind, fields in request_fields.items()),
    st.dictionaries(st.one_of(st.text(max_size=5), st.binary(max_size=5)), msgpack_values, max_size=4),
)

class Member:
    def __init__(self, number: int) -> None:
        self.id = f"member-{number}"


def check_effects(effects: list[Any], member: Member, registry: RoomRegistry) -> None:
    assert effects, "every request gets an answer"
    for effect in effects:
        if isinstance(effect, Reply):
            json.dumps(effect.event)  # serializable
            event = effect.event
            assert event["type"] in {"joined", "left", "error", "welcome", "resumed", "presence"}
            if event["type"] == "error":
                assert event["code"] in ERROR_CODES and isinstance(event["message"], str)
        elif isinstance(effect, Append):
            room = registry.get(effect.room)
            assert room is not None and member in room.clients
            event = json.loads(effect.body)
            assert event["from"] == member.id and "seq" not in event, "the store assigns the seq"
        elif isinstance(effect, Replay):
            room = registry.get(effect.room)
            assert room is not None and member in room.clients and effect.since >= 0
            json.dumps(effect.reply)
        else:
            assert isinstance(effect, (ReadHistory, TakeOver))


def check_invariants(registry: RoomRegistry, members: list[Member]) -> None:
    listed = 0
    for room in registry:
        assert room.keep or len(room.clients) > 0, f"empty room {room.name!r} was not cleaned up"
        for member in room.clients:
            assert room.name in registry.rooms_of(member)
            listed += 1
    memberships = 0
    for member in members:
        for name in registry.rooms_of(member):
            room = registry.get(name)
            assert room is not None and member in room.clients
            memberships += 1
    assert listed == memberships
    assert registry.member_count() == sum(1 for member in members if registry.rooms_of(member))


@settings(max_examples=8000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads, is_binary=st.booleans())
def test_any_single_input_gets_a_well_formed_answer(payload: bytes, is_binary: bool) -> None:
    registry = RoomRegistry(max_rooms=5, max_room_clients=2, max_rooms_per_client=3)
    protocol = RoomProtocol(registry)
    member = Member(0)
    registry.join(member, "a")
    effects = protocol.handle(member, payload, is_binary)
    check_effects(effects, member, registry)
    check_invariants(registry, [member])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=msgpack_requests)
def test_any_msgpack_decoded_request_gets_a_well_formed_answer(message: dict[Any, Any]) -> None:
    registry = RoomRegistry(max_rooms=5, max_room_clients=2, max_rooms_per_client=3)
    protocol = RoomProtocol(registry, SessionTable(120))
    member = Member(0)
    registry.join(member, "a")
    check_effects(protocol.handle(member, message, True), member, registry)
    check_invariants(registry, [member])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(min_value=0, max_value=3), payloads, st.booleans()), min_size=5,
                      max_size=40),
       disconnects=st.sets(st.integers(min_value=0, max_value=39)))
def test_sequences_of_inputs_keep_membership_consistent(
    steps: list[tuple[int, bytes, bool]], disconnects: set[int]
) -> None:
    registry = RoomRegistry(max_rooms=5, max_room_clients=3, max_rooms_per_client=3)
    registry.create("kept", keep=True)
    protocol = RoomProtocol(registry)
    members = [Member(i) for i in range(4)]
    for step, (index, payload, is_binary) in enumerate(steps):
        member = members[index]
        check_effects(protocol.handle(member, payload, is_binary), member, registry)
        if step in disconnects:
            registry.remove_member(member)
        check_invariants(registry, members)
    for member in members:
        registry.remove_member(member)
    assert [room.name for room in registry] == ["kept"], "after everyone left only the kept room remains"
