"""The room protocol's decisions: one request in, a list of effects out.

``RoomProtocol.handle`` is where a client's request meets the registry. It mutates membership (pure, in-memory
state) and returns effects for the adapter to carry out: ``Reply`` to the requester, ``Publish`` to a room. It
never raises for anything a client sends: every failure becomes a ``Reply`` carrying an error event, and the
connection stays open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from . import messages
from .errors import ErrorCode, RoomServerError
from .rooms import RoomRegistry


class Identified(Protocol):
    """Anything with an ``id``: the core needs nothing else of a connection."""

    @property
    def id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``event`` to the requester only."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Publish:
    """Send ``event`` to every member of ``room`` (the sender included)."""

    room: str
    event: dict[str, Any]


Effect = Reply | Publish


class RoomProtocol:
    """The built-in JSON room protocol (docs/protocol.md) over a ``RoomRegistry``."""

    def __init__(self, registry: RoomRegistry) -> None:
        self.registry = registry

    def welcome(self, member: Identified) -> list[Effect]:
        return [Reply(messages.welcome(member.id))]

    def handle(self, member: Identified, payload: bytes | str, is_binary: bool = False) -> list[Effect]:
        if is_binary:
            return [Reply(messages.error(ErrorCode.UNSUPPORTED, "binary frames are not part of the JSON protocol"))]
        try:
            command = messages.parse(payload)
        except RoomServerError as exc:
            request_id = None
            if exc.code != ErrorCode.INVALID_JSON:
                try:
                    request_id = messages.request_id_of(messages.decode(payload))
                except RoomServerError:
                    request_id = None
            return [Reply(messages.error(exc.code, exc.message, request_id))]
        try:
            return self._execute(member, command)
        except RoomServerError as exc:
            return [Reply(messages.error(exc.code, exc.message, command.id))]

    def _execute(self, member: Identified, command: messages.Command) -> list[Effect]:
        if isinstance(command, messages.Join):
            room = self.registry.join(member, command.room)
            return [Reply(messages.joined(room.name, len(room.clients), command.id))]
        if isinstance(command, messages.Leave):
            if not self.registry.leave(member, command.room):
                return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"not in room {command.room!r}", command.id))]
            return [Reply(messages.left(command.room, command.id))]
        room_obj = self.registry.get(command.room)
        if room_obj is None or member not in room_obj.clients:
            return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"join room {command.room!r} first", command.id))]
        event = messages.chat(room_obj.name, member.id, command.text, room_obj.next_seq())
        return [Publish(room_obj.name, event)]
