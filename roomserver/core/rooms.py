"""Rooms and the registry that keeps membership consistent in both directions.

A ``Room`` exposes its members as ``room.clients``, a mutable set, because the seed API lets applications write
``room.clients.add(client)``. To keep disconnection cleanup correct even then, ``room.clients`` is a
``MemberSet`` that tells the registry about every add and discard, so the registry's reverse index
(member -> rooms) never drifts from the rooms' own sets. A room that becomes empty is dropped from the registry
unless it was created with ``keep=True``: that is the room cleanup that stops churning rooms from leaking.

Limits (``max_rooms``, ``max_room_clients``, ``max_rooms_per_client``) are checked by ``join``, the path client
requests take; direct ``room.clients.add`` is trusted application code and is not limited.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator, MutableSet
from typing import Any

from .errors import RoomFull, TooManyRooms

Member = Hashable


class MemberSet(MutableSet[Any]):
    """The set of members of one room; every change is reported to the owning registry.

    It refers to its room weakly: the room holds its ``MemberSet``, and a strong reference back would make every
    room a reference cycle, which only the cyclic garbage collector can free once the room is dropped (a full
    collection, for a room that lived long: roomserver/heap.py). A ``MemberSet`` whose room no longer exists
    (someone kept ``room.clients`` only) is a plain set."""

    __slots__ = ("_members", "_room")

    def __init__(self, room: Room) -> None:
        self._room = weakref.ref(room)
        self._members: set[Any] = set()

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __iter__(self) -> Iterator[Any]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"MemberSet({self._members!r})"

    def add(self, member: Any) -> None:
        if member in self._members:
            return
        self._members.add(member)
        room = self._room()
        if room is not None:
            room._registry._member_added(room, member)

    def discard(self, member: Any) -> None:
        if member not in self._members:
            return
        self._members.remove(member)
        room = self._room()
        if room is not None:
            room._registry._member_removed(room, member)

    def snapshot(self) -> tuple[Any, ...]:
        """A copy to iterate over while members may come and go (a broadcast's handlers can close clients)."""
        return tuple(self._members)


class Room:
    """A named room: its members, whether it outlives its members, its metadata and its last stored seq.

    Seqs are assigned by the store (so they survive restarts and are shared by every node); ``last_seq`` is
    the last one this server saw stored.
    """

    __slots__ = ("__weakref__", "_registry", "clients", "keep", "last_seq", "meta", "name")

    def __init__(self, name: str, registry: RoomRegistry, *, keep: bool = False, last_seq: int = 0) -> None:
        self.name = name
        self.keep = keep
        self.last_seq = last_seq
        self.meta: dict[str, Any] = {}
        self._registry = registry
        self.clients = MemberSet(self)

    def __repr__(self) -> str:
        return f"Room({self.name!r}, members={len(self.clients)}, keep={self.keep})"


class RoomRegistry:
    """All rooms of a server and, for each member, the rooms it is in.

    ``on_removed`` is called with a room when cleanup drops it, so other components (history, brokers) can
    forget it too; ``on_created`` with a room when it (or a room of that name, after a removal) enters the
    registry, so they can stop forgetting it.
    """

    def __init__(
        self,
        *,
        max_rooms: int | None = None,
        max_room_clients: int | None = None,
        max_rooms_per_client: int | None = None,
        on_removed: Callable[[Room], None] | None = None,
        on_created: Callable[[Room], None] | None = None,
    ) -> None:
        self.max_rooms = max_rooms
        self.max_room_clients = max_room_clients
        self.max_rooms_per_client = max_rooms_per_client
        self._on_removed = on_removed
        self._on_created = on_created
        self.on_member_added: Callable[[Room, Any], None] | None = None
        """Told of every member entering a room (joins, resumes and direct ``room.clients.add`` alike)."""
        self.on_member_removed: Callable[[Room, Any], None] | None = None
        """Told of every member leaving a room (leaves, disconnects and direct discards alike)."""
        self._rooms: dict[str, Room] = {}
        self._memberships: dict[Any, dict[str, Room]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, name: object) -> bool:
        return name in self._rooms

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def create(self, name: str, *, keep: bool = False) -> Room:
        """Return the room called ``name``, creating it if needed; ``keep=True`` makes it survive being empty."""
        room = self._rooms.get(name)
        if room is None:
            room = Room(name, self, keep=keep)
            self._rooms[name] = room
            self._created(room)
        elif keep:
            room.keep = True
        return room

    def join(self, member: Any, name: str) -> Room:
        """Put ``member`` into room ``name`` (created on demand), enforcing the configured limits."""
        room = self._rooms.get(name)
        if room is not None and member in room.clients:
            return room
        rooms_of_member = self._memberships.get(member, ())
        if self.max_rooms_per_client is not None and len(rooms_of_member) >= self.max_rooms_per_client:
            raise TooManyRooms(f"a connection may be in at most {self.max_rooms_per_client} rooms")
        if room is None:
            if self.max_rooms is not None and len(self._rooms) >= self.max_rooms:
                raise TooManyRooms(f"the server holds at most {self.max_rooms} rooms")
            room = self.create(name)
        elif self.max_room_clients is not None and len(room.clients) >= self.max_room_clients:
            raise RoomFull(f"room {name!r} is full ({self.max_room_clients} members)")
        room.clients.add(member)
        return room

    def leave(self, member: Any, name: str) -> bool:
        """Take ``member`` out of room ``name``; False if it was not a member."""
        room = self._rooms.get(name)
        if room is None or member not in room.clients:
            return False
        room.clients.discard(member)
        return True

    def remove_member(self, member: Any) -> list[Room]:
        """Take ``member`` out of every room (disconnection cleanup); returns the rooms it was in."""
        rooms = list(self._memberships.get(member, {}).values())
        for room in rooms:
            room.clients.discard(member)
        return rooms

    def rooms_of(self, member: Any) -> frozenset[str]:
        """Names of the rooms ``member`` is in."""
        return frozenset(self._memberships.get(member, ()))

    def is_member(self, member: Any, name: str) -> bool:
        return name in self._memberships.get(member, ())

    def discard_room(self, name: str) -> None:
        """Forget a room even if kept; its members are removed first."""
        room = self._rooms.get(name)
        if room is None:
            return
        room.keep = False
        for member in room.clients.snapshot():
            room.clients.discard(member)
        self._drop_if_unused(room)

    def member_count(self) -> int:
        """Number of distinct members in any room."""
        return len(self._memberships)

    # -- called by MemberSet -------------------------------------------------------------------------------

    def _member_added(self, room: Room, member: Any) -> None:
        current = self._rooms.get(room.name)
        if current is None:
            self._rooms[room.name] = room  # a cleaned-up room object brought back to life by the application
            self._created(room)
        elif current is not room:
            room.clients._members.discard(member)
            raise ValueError(f"room {room.name!r} was removed and another room now has that name")
        self._memberships.setdefault(member, {})[room.name] = room
        if self.on_member_added is not None:
            self.on_member_added(room, member)

    def _member_removed(self, room: Room, member: Any) -> None:
        rooms = self._memberships.get(member)
        if rooms is not None:
            rooms.pop(room.name, None)
            if not rooms:
                del self._memberships[member]
        if self.on_member_removed is not None:
            self.on_member_removed(room, member)
        self._drop_if_unused(room)

    def _created(self, room: Room) -> None:
        if self._on_created is not None:
            self._on_created(room)

    def _drop_if_unused(self, room: Room) -> None:
        if room.keep or len(room.clients) or self._rooms.get(room.name) is not room:
            return
        del self._rooms[room.name]
        if self._on_removed is not None:
            self._on_removed(room)
