"""Who is in each room, as users rather than connections.

A user with three tabs open is one member with three connections. ``join`` and ``leave`` return the
presence event to announce, if any: a user's ``join`` fires on its first connection to the room and its
``leave`` only when its last connection leaves, so drops and reconnects of one of several tabs are silent.

Connections that asked for presence events (``"presence": true`` on join) are tracked per room as
subscribers; the hub sends join/leave events to them only.

In a cluster (docs/cluster.md) this is the node's own part of the presence: ``listener`` hears of every change
of a (room, user) here so the node can mirror it into Redis, and ``cluster_members`` merges the per-node
entries Redis holds into the member list, users counted once over all nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson


@dataclass
class Member:
    """One user in one room: how many of its connections are there, and its public metadata."""

    user: str
    connections: set[Hashable] = field(default_factory=set)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"user": self.user, "connections": len(self.connections), "meta": dict(self.meta)}


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    room: str
    event: Literal["join", "leave"]
    user: str
    meta: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "presence", "room": self.room, "event": self.event, "user": self.user}
        if self.event == "join" and self.meta:
            message["meta"] = dict(self.meta)
        return message


class Presence:
    """Per-room members (as users) and presence subscribers."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, Member]] = {}
        self._subscribers: dict[str, set[Hashable]] = {}
        self.listener: Callable[[str, str, PresenceEvent | None], None] | None = None
        """Called with (room, user, the node-level event if any) after every change of that member here
        (connections or meta): what a cluster mirrors into Redis."""
        self.watch_listener: Callable[[str, bool], None] | None = None
        """Called with (room, True) when a room gets its first presence subscriber here, (room, False) when it
        loses its last: a cluster keeps what those subscribers were told only while there are some."""

    def join(self, room: str, user: str, connection: Hashable, meta: Mapping[str, Any] | None = None
             ) -> PresenceEvent | None:
        members = self._rooms.setdefault(room, {})
        member = members.get(user)
        first = member is None
        if member is None:
            member = members[user] = Member(user)
        if meta:
            member.meta = dict(meta)
        member.connections.add(connection)
        event = PresenceEvent(room, "join", user, member.meta) if first else None
        if self.listener is not None:
            self.listener(room, user, event)
        return event

    def leave(self, room: str, user: str, connection: Hashable) -> PresenceEvent | None:
        self.unsubscribe(room, connection)
        members = self._rooms.get(room)
        if members is None or user not in members:
            return None
        member = members[user]
        if connection not in member.connections:
            return None
        member.connections.discard(connection)
        event = None
        if not member.connections:
            del members[user]
            if not members:
                del self._rooms[room]
            event = PresenceEvent(room, "leave", user, member.meta)
        if self.listener is not None:
            self.listener(room, user, event)
        return event

    def members(self, room: str) -> list[dict[str, Any]]:
        return [member.as_json() for member in self._rooms.get(room, {}).values()]

    def connection_count(self, room: str, user: str) -> int:
        """How many connections ``user`` has in ``room``."""
        member = self._rooms.get(room, {}).get(user)
        return len(member.connections) if member is not None else 0

    def member(self, room: str, user: str) -> Member | None:
        return self._rooms.get(room, {}).get(user)

    def entries(self) -> Iterator[tuple[str, Member]]:
        """Every (room, member) here: the whole of this node's presence, for a cluster resync."""
        for room, members in self._rooms.items():
            for member in members.values():
                yield room, member

    def users(self, room: str) -> frozenset[str]:
        return frozenset(self._rooms.get(room, {}))

    def subscribe(self, room: str, connection: Hashable) -> None:
        first = room not in self._subscribers
        self._subscribers.setdefault(room, set()).add(connection)
        if first and self.watch_listener is not None:
            self.watch_listener(room, True)

    def unsubscribe(self, room: str, connection: Hashable) -> None:
        subscribers = self._subscribers.get(room)
        if subscribers is not None:
            subscribers.discard(connection)
            if not subscribers:
                del self._subscribers[room]
                if self.watch_listener is not None:
                    self.watch_listener(room, False)

    def subscribers(self, room: str) -> frozenset[Hashable]:
        return frozenset(self._subscribers.get(room, ()))

    def room_count(self) -> int:
        return len(self._rooms)


def cluster_members(entries: Iterable[tuple[str, bytes | str]]) -> list[dict[str, Any]]:
    """The member list of a room from its cluster entries: field ``<node>|<user>`` -> ``{"c": connections,
    "m": meta}``, one per node the user is on. A user on two nodes is one member whose connections add up
    (its meta is the one of the node that sorts first: each node holds its latest join's). Sorted by user."""
    merged: dict[str, dict[str, Any]] = {}
    for key, value in sorted(entries):
        node, separator, user = key.partition("|")
        if not separator or not node:
            continue
        try:
            entry = orjson.loads(value)
            connections = int(entry.get("c", 0))
            meta = entry.get("m") or {}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
        member = merged.get(user)
        if member is None:
            merged[user] = {"user": user, "connections": connections, "meta": dict(meta)}
        else:
            member["connections"] += connections
    return [merged[user] for user in sorted(merged)]
