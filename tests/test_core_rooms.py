"""Unit tests of Room and RoomRegistry: membership both ways, cleanup of empty rooms, limits."""

from __future__ import annotations

import gc
import weakref

import pytest

from roomserver.core.errors import RoomFull, TooManyRooms
from roomserver.core.rooms import RoomRegistry


class Member:
    def __init__(self, name: str) -> None:
        self.id = name

    def __repr__(self) -> str:
        return self.id


def test_join_creates_room_and_indexes_both_ways() -> None:
    registry = RoomRegistry()
    a = Member("a")
    room = registry.join(a, "lobby")
    assert registry.get("lobby") is room
    assert a in room.clients
    assert registry.rooms_of(a) == {"lobby"}
    assert registry.join(a, "lobby") is room, "joining twice is a no-op"
    assert len(room.clients) == 1


def test_empty_room_is_removed_unless_kept() -> None:
    removed: list[str] = []
    registry = RoomRegistry(on_removed=lambda room: removed.append(room.name))
    a = Member("a")
    registry.join(a, "temp")
    kept = registry.create("kept", keep=True)
    kept.clients.add(a)
    assert registry.leave(a, "temp")
    assert "temp" not in registry and removed == ["temp"]
    registry.remove_member(a)
    assert registry.get("kept") is kept and len(kept.clients) == 0
    assert registry.member_count() == 0
    assert not registry.leave(a, "temp")


def test_a_room_entering_the_registry_is_announced_once_and_again_after_its_removal() -> None:
    created: list[str] = []
    registry = RoomRegistry(on_created=lambda room: created.append(room.name))
    a, b = Member("a"), Member("b")
    registry.join(a, "r")
    registry.join(b, "r")
    registry.create("r")
    assert created == ["r"], "one room, announced once"
    room = registry.get("r")
    assert room is not None
    registry.remove_member(a)
    registry.remove_member(b)
    registry.join(a, "r")
    assert created == ["r", "r"], "a new room of that name after the first was dropped"
    registry.remove_member(a)
    room.clients.add(b)  # the application brings the dropped room object back
    assert created == ["r", "r", "r"] and registry.get("r") is room


def test_created_room_stays_until_it_has_been_used() -> None:
    """create_room makes an empty room that waits for members; cleanup only happens when it becomes empty."""
    registry = RoomRegistry()
    room = registry.create("waiting")
    assert registry.get("waiting") is room
    a = Member("a")
    room.clients.add(a)
    room.clients.discard(a)
    assert registry.get("waiting") is None


def test_direct_set_operations_keep_the_index_consistent() -> None:
    """The seed API lets applications use room.clients as a set; cleanup must still see those members."""
    registry = RoomRegistry()
    a, b, c = Member("a"), Member("b"), Member("c")
    room = registry.create("r")
    room.clients |= {a, b}
    room.clients.add(c)
    assert registry.rooms_of(a) == {"r"} and registry.rooms_of(c) == {"r"}
    room.clients -= {b}
    assert registry.rooms_of(b) == frozenset()
    room.clients.remove(c)
    with pytest.raises(KeyError):
        room.clients.remove(c)
    assert registry.remove_member(a) == [room]
    assert "r" not in registry


def test_removed_room_object_comes_back_when_used_again() -> None:
    registry = RoomRegistry()
    a = Member("a")
    room = registry.join(a, "r")
    registry.leave(a, "r")
    assert "r" not in registry
    room.clients.add(a)
    assert registry.get("r") is room and registry.rooms_of(a) == {"r"}


def test_stale_room_object_cannot_shadow_a_new_room() -> None:
    registry = RoomRegistry()
    a, b = Member("a"), Member("b")
    old = registry.join(a, "r")
    registry.leave(a, "r")
    new = registry.join(b, "r")
    assert new is not old
    with pytest.raises(ValueError):
        old.clients.add(a)
    assert a not in old.clients and registry.rooms_of(a) == frozenset()


def test_a_dropped_room_is_freed_by_reference_counting() -> None:
    """A room and its member set are no reference cycle: once the registry dropped the room and nobody holds it,
    it is gone with the cyclic garbage collector off, and a member set kept on its own is a plain set."""
    registry = RoomRegistry()
    a = Member("a")
    room = registry.join(a, "r")
    members = room.clients
    gone = weakref.ref(room)
    registry.leave(a, "r")
    gc.disable()
    try:
        del room
        assert gone() is None
    finally:
        gc.enable()
    members.add(a)
    assert a in members and "r" not in registry and registry.rooms_of(a) == frozenset()


def test_room_limits() -> None:
    registry = RoomRegistry(max_room_clients=2, max_rooms_per_client=2, max_rooms=3)
    a, b, c = Member("a"), Member("b"), Member("c")
    registry.join(a, "r1")
    registry.join(b, "r1")
    with pytest.raises(RoomFull):
        registry.join(c, "r1")
    registry.join(a, "r2")
    with pytest.raises(TooManyRooms):
        registry.join(a, "r3")
    registry.join(c, "r3")
    with pytest.raises(TooManyRooms):
        registry.join(c, "r4")
    assert len(registry) == 3
    assert registry.rooms_of(c) == {"r3"}


def test_discard_room_forgets_a_kept_room_and_its_members() -> None:
    registry = RoomRegistry()
    a = Member("a")
    room = registry.create("k", keep=True)
    room.clients.add(a)
    registry.discard_room("k")
    assert "k" not in registry and registry.rooms_of(a) == frozenset()
