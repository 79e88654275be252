"""The room protocol's decisions: one request in, a list of effects out.

``RoomProtocol.handle`` is where a client's request meets the registry and the resume sessions. It mutates
membership (pure, in-memory state) and returns effects for the hub to carry out against the store and the
network:

- ``Reply``: send an event to the requester only.
- ``Append``: store a chat message (the store assigns its seq), then broadcast it to the room and acknowledge
  it to the sender; a store failure becomes an error to the sender, never a silent drop.
- ``Replay``: the requester just joined (or re-joined) ``room`` and wants everything after ``since`` first: the
  hub replays history, then switches the member to live delivery with no gap and no duplicate.
- ``ReadHistory``: answer a ``history`` request from the store.
- ``TakeOver``: a resume claimed the session of a connection that may still look open: close that one.

It never raises for anything a client sends: every failure becomes a ``Reply`` carrying an error event, and the
connection stays open.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import messages
from .errors import ErrorCode, RoomServerError
from .rooms import RoomRegistry
from .sessions import SessionTable


class Identified(Protocol):
    """Anything with an ``id``: the core needs nothing else of a connection."""

    @property
    def id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``event`` to the requester only."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Append:
    """Store the chat ``body`` (encoded without seq) in ``room``, then broadcast it and acknowledge it."""

    room: str
    body: bytes
    msg_id: str | None
    request_id: messages.RequestId


@dataclass(frozen=True, slots=True)
class Replay:
    """Replay ``room``'s history after ``since`` to the requester, then go live; ``reply`` (``joined`` or
    ``resumed``) goes first, completed with the recovery outcome."""

    room: str
    since: int
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Answer a ``history`` request."""

    room: str
    since: int | None
    before: int | None
    limit: int
    request_id: messages.RequestId


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Close the connection of ``client_id`` (if still open): its session was resumed elsewhere."""

    client_id: str


Effect = Reply | Append | Replay | ReadHistory | TakeOver


class RoomProtocol:
    """The built-in JSON room protocol (docs/protocol.md) over a ``RoomRegistry`` and a ``SessionTable``.

    ``clock`` (seconds, any epoch) is only used to expire resume sessions; it is injected so tests control it.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        sessions: SessionTable | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        self.sessions = sessions if sessions is not None else SessionTable(ttl=0)
        self._clock = clock if clock is not None else (lambda: 0.0)
        self._tokens: dict[str, str] = {}

    def welcome(self, member: Identified) -> list[Effect]:
        """Greet a new connection with its id and a fresh, unguessable session token."""
        token = secrets.token_urlsafe(24)
        self._tokens[member.id] = token
        self.sessions.attach(token, member.id)
        return [Reply(messages.welcome(member.id, token))]

    def disconnected(self, member: Identified) -> None:
        """The member's connection closed: its session stays resumable for the session ttl."""
        token = self._tokens.pop(member.id, None)
        if token is not None:
            self.sessions.detach(token, self._clock())

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
            reply = messages.joined(room.name, len(room.clients), command.id)
            if command.since is None:
                return [Reply(reply)]
            return [Replay(room.name, command.since, reply)]
        if isinstance(command, messages.Leave):
            if not self.registry.leave(member, command.room):
                return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"not in room {command.room!r}", command.id))]
            return [Reply(messages.left(command.room, command.id))]
        if isinstance(command, messages.History):
            return [ReadHistory(command.room, command.since, command.before, command.limit, command.id)]
        if isinstance(command, messages.Resume):
            return self._resume(member, command)
        if not self.registry.is_member(member, command.room):
            return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"join room {command.room!r} first", command.id))]
        body = messages.chat_body(command.room, member.id, command.text, command.msg_id)
        return [Append(command.room, body, command.msg_id, command.id)]

    def _resume(self, member: Identified, command: messages.Resume) -> list[Effect]:
        """Rejoin every listed room with a replay after its last seen seq; continue the old session if it is
        still resumable (an unknown or expired one still rejoins and replays, as a new member)."""
        effects: list[Effect] = []
        if self._tokens.get(member.id) == command.session:
            continued = True
        else:
            session = self.sessions.take(command.session, self._clock())
            continued = session is not None
            if session is not None:
                effects.append(TakeOver(session.client_id))
        for name, since in command.rooms:
            try:
                room = self.registry.join(member, name)
            except RoomServerError as exc:
                effects.append(Reply(messages.error(exc.code, exc.message, command.id, room=name)))
                continue
            effects.append(Replay(room.name, since, messages.resumed(room.name, continued, command.id)))
        if not command.rooms:
            effects.append(Reply(messages.resumed(None, continued, command.id)))
        return effects
