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
- In a cluster (``shared_sessions``): ``ShareSession`` records a detached session where every node can claim
  it; ``ClaimSession`` claims one (once-only, cluster-wide) before a resume can say whether it continues, and
  the hub answers with ``claimed``; ``SessionTaken`` tells the node a session came from that it was continued
  here (that node answers with ``taken_elsewhere``).

It never raises for anything a client sends: every failure becomes a ``Reply`` carrying an error event, and the
connection stays open.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import messages
from .auth import Action, Identity
from .errors import ErrorCode, RoomServerError
from .filters import Pipeline, Rejected, SubscriptionFilter
from .presence import Presence
from .rooms import RoomRegistry
from .sessions import Session, SessionTable


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


@dataclass(frozen=True, slots=True)
class Announce:
    """Send a presence ``event`` to the room's presence subscribers (but ``exclude``, the member it is about)."""

    room: str
    event: dict[str, Any]
    exclude: Any = None


@dataclass(frozen=True, slots=True)
class ShareSession:
    """Record the just detached session ``token`` where every node of the cluster can claim it, until it
    expires (best effort: if it cannot be written, the hub calls ``session_unshared`` and it stays local)."""

    token: str
    client_id: str
    user: str
    rooms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClaimSession:
    """Claim session ``token`` from the cluster's records for a resume by ``user`` (atomically: one claimant
    wins cluster-wide), then answer ``claimed``. The requester's later messages wait for that answer, in order."""

    token: str
    user: str
    command: messages.Resume


@dataclass(frozen=True, slots=True)
class SessionTaken:
    """Tell ``node``, where session ``token`` was detached, that it was continued here: that node forgets its
    copy and lets go of the presence the copy held (``taken_elsewhere``)."""

    node: str
    token: str


Effect = Reply | Append | Replay | ReadHistory | TakeOver | Announce | ShareSession | ClaimSession | SessionTaken


def identity_of(member: Any) -> Identity:
    """The member's identity; a connection that never authenticated is an anonymous user (its own id)."""
    identity = getattr(member, "identity", None)
    return identity if isinstance(identity, Identity) else Identity(member.id)


class RoomProtocol:
    """The built-in JSON room protocol (docs/protocol.md) over a ``RoomRegistry`` and a ``SessionTable``.

    ``clock`` (seconds, any epoch) is only used to expire resume sessions; it is injected so tests control it.
    """

    def __init__(
        self,
        registry: RoomRegistry,
        sessions: SessionTable | None = None,
        clock: Callable[[], float] | None = None,
        *,
        presence: Presence | None = None,
        filters: Pipeline | None = None,
        max_meta_bytes: int = messages.MAX_META_BYTES,
        shared_sessions: bool = False,
        adopt: Callable[[Any, str], bool] | None = None,
    ) -> None:
        self.registry = registry
        self.shared = shared_sessions
        """Sessions are resumable on every node of a cluster (docs/cluster.md): detached ones are recorded
        (``ShareSession``), unknown or recorded ones claimed (``ClaimSession``), and a continued session keeps
        its client id, so an anonymous user (whose user is its client id) is held like an authenticated one."""
        self.adopt = adopt
        """``adopt(member, client_id) -> bool``: give the connection ``member`` the id ``client_id`` (of the
        session it continues); False if it cannot (the id is in use here)."""
        self.presence = presence if presence is not None else Presence()
        self.filters = filters if filters is not None else Pipeline()
        self.max_meta_bytes = max_meta_bytes
        self.subscriptions: dict[str, dict[Any, SubscriptionFilter]] = {}
        """Per room, the members that asked for only some message types (read by the hub's fan-out)."""
        self.sessions = sessions if sessions is not None else SessionTable(ttl=0)
        self._clock = clock if clock is not None else (lambda: 0.0)
        self._tokens: dict[str, str] = {}
        self._owners: dict[str, Any] = {}  # token -> its open connection

    def welcome(self, member: Identified) -> list[Effect]:
        """Greet a new connection with its id and a fresh, unguessable session token."""
        token = secrets.token_urlsafe(24)
        self._tokens[member.id] = token
        self._owners[token] = member
        self.sessions.attach(token, member.id)
        return [Reply(messages.welcome(member.id, token))]

    def disconnected(self, member: Identified, rooms: Any = (), deliberate: bool = True) -> list[Effect]:
        """The member's connection closed (after leaving ``rooms``): its session stays resumable for the
        session ttl; returns the presence leaves to announce (a user's last connection only).

        A connection that was lost rather than closed on purpose (``deliberate=False``) keeps its user's
        presence in those rooms for as long as its session can be resumed: a resume within that time is the
        same member, with no leave and join; otherwise the leaves are announced when the session expires.
        Anonymous connections are their own users, so theirs are announced at once.
        """
        token = self._tokens.pop(member.id, None)
        if token is not None:
            self._owners.pop(token, None)
        session = self.sessions.detach(token, self._clock()) if token is not None else None
        effects = self._expired_leaves()
        names = [room.name if hasattr(room, "name") else str(room) for room in rooms]
        user = identity_of(member).user
        if session is not None:
            session.user = user
            if self.shared and token is not None:
                session.recorded = True
                effects.append(ShareSession(token, session.client_id, user, tuple(names)))
        # A continued session of a cluster keeps its client id, so an anonymous user comes back as itself too.
        hold = session is not None and not deliberate and (user != member.id or self.shared)
        for name in names:
            if hold and session is not None and self.presence.connection_count(name, user) == 1:
                # The user's last connection there: keep it counted until a resume or the session's expiry.
                session.connection = member
                self._unsubscribe(member, name)
                session.held.append(name)
            else:
                effects += self._left(member, name)
        return effects

    def expire_sessions(self) -> list[Effect]:
        """Forget sessions past their ttl; the presence leaves they were holding back, to announce now."""
        self.sessions.expire(self._clock())
        return self._expired_leaves()

    def _expired_leaves(self) -> list[Effect]:
        effects: list[Effect] = []
        for session in self.sessions.drain_expired():
            effects += self._release(session)
        return effects

    def _may_continue(self, member: Identified, token: str) -> bool:
        """A session of an authenticated user continues only for that same user (a token alone is enough for
        an anonymous one: it is its only credential)."""
        session = self.sessions.peek(token, self._clock())
        if session is None:
            return False
        owner = self._owners.get(token)
        owner_user = identity_of(owner).user if owner is not None else session.user
        if owner_user is None or owner_user == session.client_id:
            return True
        return owner_user == identity_of(member).user

    def _release(self, session: Session) -> list[Effect]:
        """Let go of the presence a detached session held: leaves for rooms its user has no other connection in."""
        effects: list[Effect] = []
        for name in session.held:
            event = self.presence.leave(name, session.user or "", session.connection)
            if event is not None and self.presence.subscribers(name):
                effects.append(Announce(name, event.as_json(), session.connection))
        session.held = []
        return effects

    def _unsubscribe(self, member: Any, room: str) -> None:
        subscriptions = self.subscriptions.get(room)
        if subscriptions is not None:
            subscriptions.pop(member, None)
            if not subscriptions:
                del self.subscriptions[room]
        self.presence.unsubscribe(room, member)

    def removed(self, member: Any, room: str) -> list[Effect]:
        """``member`` was taken out of ``room`` by the server, not by its own ``leave`` (its history could not be
        replayed, the room was deleted): the same presence and subscription bookkeeping as a leave, so no one
        keeps seeing it present and no filter or presence subscription of it stays behind."""
        return self._left(member, room)

    def _left(self, member: Any, room: str) -> list[Effect]:
        """Presence and subscription bookkeeping once ``member`` is out of ``room``."""
        self._unsubscribe(member, room)
        event = self.presence.leave(room, identity_of(member).user, member)
        if event is None or not self.presence.subscribers(room):
            return []
        return [Announce(room, event.as_json(), member)]

    def _joined(self, member: Any, room: str, command: messages.Join | None) -> tuple[list[Effect], dict[str, Any]]:
        """Presence and subscription bookkeeping once ``member`` is in ``room``: the presence announcement and
        the extra fields of the ``joined`` reply."""
        identity = identity_of(member)
        meta = command.meta if command is not None and command.meta is not None else identity.meta
        event = self.presence.join(room, identity.user, member, meta)
        announce = event is not None and bool(self.presence.subscribers(room))
        extra: dict[str, Any] = {}
        if command is not None and command.filter is not None:
            self.subscriptions.setdefault(room, {})[member] = command.filter
        if command is not None and command.presence:
            self.presence.subscribe(room, member)
            extra["members"] = self.presence.members(room)
        return ([Announce(room, event.as_json(), member)] if announce and event is not None else []), extra

    @staticmethod
    def _taken_out_as_it_joined(room: str, request_id: messages.RequestId) -> dict[str, Any]:
        """The application took the member out of ``room`` while it joined (a ``join`` event handler kicking
        it): refused, and none of a join's presence and subscriptions, which nothing would ever undo."""
        return messages.error(ErrorCode.FORBIDDEN, f"the server took you out of room {room!r} as you joined",
                              request_id, room=room)

    @staticmethod
    def _forbidden(action: Action, room: str, request_id: messages.RequestId) -> list[Effect]:
        verb = "join" if action is Action.JOIN else "publish to"
        return [Reply(messages.error(ErrorCode.FORBIDDEN, f"you may not {verb} room {room!r}", request_id))]

    def handle(self, member: Identified, payload: bytes | str | dict[str, Any], is_binary: bool = False
               ) -> list[Effect]:
        """One request: raw JSON, or a dict another codec (msgpack) already decoded."""
        command = self.parse(payload, is_binary)
        if isinstance(command, Reply):
            return [command]
        return self.handle_command(member, command)

    def parse(self, payload: bytes | str | dict[str, Any], is_binary: bool = False) -> messages.Command | Reply:
        """The request's command, or the error reply it gets if it is not one.

        Separate from ``handle_command`` so that a caller which must look at the command first (the hub asks
        the application's ``authorize`` hook about joins and chats) parses it once and hands it on."""
        if is_binary and not isinstance(payload, dict):
            return Reply(messages.error(ErrorCode.UNSUPPORTED, "binary frames are not part of the JSON protocol"))
        try:
            return messages.parse(payload, self.max_meta_bytes)
        except RoomServerError as exc:
            request_id = None
            if isinstance(payload, dict):
                request_id = messages.request_id_of(payload)
            elif exc.code != ErrorCode.INVALID_JSON:
                try:
                    request_id = messages.request_id_of(messages.decode(payload))
                except RoomServerError:
                    request_id = None
            return Reply(messages.error(exc.code, exc.message, request_id))

    def handle_command(self, member: Identified, command: messages.Command) -> list[Effect]:
        """One parsed request (from ``parse``)."""
        try:
            return self._execute(member, command)
        except RoomServerError as exc:
            return [Reply(messages.error(exc.code, exc.message, command.id))]

    def _execute(self, member: Identified, command: messages.Command) -> list[Effect]:
        if isinstance(command, messages.Join):
            if not identity_of(member).may(Action.JOIN, command.room):
                return self._forbidden(Action.JOIN, command.room, command.id)
            room = self.registry.join(member, command.room)
            if not self.registry.is_member(member, room.name):
                return [Reply(self._taken_out_as_it_joined(room.name, command.id))]
            announcements, extra = self._joined(member, room.name, command)
            reply = messages.joined(room.name, len(room.clients), command.id)
            reply.update(extra)
            if command.since is None:
                return [Reply(reply), *announcements]
            # The announcement first: a replay can fail at once (a store that answers synchronously), taking the
            # member out again with a leave, which must not reach the others before the join it undoes.
            return [*announcements, Replay(room.name, command.since, reply)]
        if isinstance(command, messages.Leave):
            if not self.registry.leave(member, command.room):
                return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"not in room {command.room!r}", command.id))]
            return [Reply(messages.left(command.room, command.id)), *self._left(member, command.room)]
        if isinstance(command, messages.PresenceQuery):
            if not self.registry.is_member(member, command.room):
                return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"join room {command.room!r} first", command.id))]
            return [Reply(messages.presence(command.room, self.presence.members(command.room), command.id))]
        if isinstance(command, messages.History):
            return [ReadHistory(command.room, command.since, command.before, command.limit, command.id)]
        if isinstance(command, messages.Resume):
            return self._resume(member, command)
        if not self.registry.is_member(member, command.room):
            return [Reply(messages.error(ErrorCode.NOT_IN_ROOM, f"join room {command.room!r} first", command.id))]
        if not identity_of(member).may(Action.PUBLISH, command.room):
            return self._forbidden(Action.PUBLISH, command.room, command.id)
        text = command.text
        if self.filters:
            try:
                filtered = self.filters.apply(member, command.room, {"type": "chat", "room": command.room,
                                                                     "text": text})
            except Rejected as exc:
                return [Reply(messages.error(ErrorCode.FILTERED, exc.message, command.id))]
            if not isinstance(filtered.get("text"), str):
                return [Reply(messages.error(ErrorCode.FILTERED, "a filter removed the text", command.id))]
            text = filtered["text"]
        body = messages.chat_body(command.room, member.id, text, command.msg_id)
        return [Append(command.room, body, command.msg_id, command.id)]

    def _resume(self, member: Identified, command: messages.Resume) -> list[Effect]:
        """Rejoin every listed room with a replay after its last seen seq; continue the old session if it is
        still resumable (an unknown or expired one still rejoins and replays, as a new member).

        In a cluster, a session this node does not know may be another node's, and one it recorded may have
        been claimed by another node: the decision waits for the claim (``ClaimSession``, then ``claimed``)."""
        if self._tokens.get(member.id) == command.session:
            return self._rejoin(member, command, True)
        now = self._clock()
        if self.shared and self.sessions.ttl > 0:
            local = self.sessions.peek(command.session, now)
            if local is None or (local.recorded and local.expires is not None
                                 and self._may_continue(member, command.session)):
                return [*self._expired_leaves(), ClaimSession(command.session, identity_of(member).user, command)]
        session = None
        if self._may_continue(member, command.session):
            session = self.sessions.take(command.session, now)
        return self._continue(member, command, session)

    def claimed(self, member: Identified, command: messages.Resume, record: dict[str, Any] | None,
                failed: bool = False) -> list[Effect]:
        """The answer to ``ClaimSession``: the cluster's record of the session (now deleted there: this node won
        the claim), None if there is none to claim (never recorded, expired, claimed by another node, or of
        another user), or ``failed`` if the cluster could not be asked (then a session of this node's own
        continues as it would on one node)."""
        token = command.session
        local = self.sessions.peek(token, self._clock())
        if local is not None and local.expires is not None:
            if record is None and not failed and local.recorded:
                # Another node claimed it first: this node's copy is stale, and the presence it held goes over
                # to that node (the cluster presence sees the user there: no leave).
                effects = self._expired_leaves()
                stale = self.sessions.discard(token)
                if stale is not None:
                    effects += self._release(stale)
                return effects + self._rejoin(member, command, False)
            session = self.sessions.take(token, self._clock()) if self._may_continue(member, token) else None
            return self._continue(member, command, session)
        effects = self._expired_leaves()
        client_id = record.get("id") if record is not None else None
        user = record.get("user") if record is not None else None
        if not isinstance(client_id, str) or user not in (client_id, identity_of(member).user):
            return effects + self._rejoin(member, command, False)
        adopted = self._adopt(member, client_id)
        effects += self._rejoin(member, command, True, client_id if adopted else None)
        node = record.get("node") if record is not None else None
        if isinstance(node, str):
            effects.append(SessionTaken(node, token))
        return effects

    def taken_elsewhere(self, token: str) -> list[Effect]:
        """Another node continued session ``token``: forget this node's copy and let go of the presence it
        held (its user is on that node now, so the cluster sees no leave)."""
        session = self.sessions.discard(token)
        return self._release(session) if session is not None else []

    def session_unshared(self, token: str) -> None:
        """``ShareSession`` could not be written: the session stays this node's alone (taken locally at once)."""
        session = self.sessions.peek(token, self._clock())
        if session is not None:
            session.recorded = False

    def _continue(self, member: Identified, command: messages.Resume, session: Session | None) -> list[Effect]:
        """Rejoin, continuing ``session`` (taken from this node's table) if there is one."""
        effects = self._expired_leaves()
        client = None
        if session is not None:
            effects.append(TakeOver(session.client_id))
            if self.shared and session.expires is not None and self._adopt(member, session.client_id):
                client = session.client_id
        effects += self._rejoin(member, command, session is not None, client)
        if session is not None:
            # The held presence goes over to this connection where it rejoined (the user never left: no
            # events); rooms it did not rejoin get their leave now.
            effects += self._release(session)
        return effects

    def _adopt(self, member: Identified, client_id: str) -> bool:
        """Give ``member`` the client id of the session it continues (cluster only), before it joins anything:
        an anonymous user is its client id, so it stays the same member."""
        old = member.id
        if client_id == old:
            return True
        if self.adopt is None or self.registry.rooms_of(member) or not self.adopt(member, client_id):
            return False
        token = self._tokens.pop(old, None)
        if token is not None:
            self._tokens[client_id] = token
            self.sessions.rename(token, client_id)
        return True

    def _rejoin(self, member: Identified, command: messages.Resume, continued: bool, client: str | None = None
                ) -> list[Effect]:
        effects: list[Effect] = []
        for name, since in command.rooms:
            if not identity_of(member).may(Action.JOIN, name):
                effects.append(Reply(messages.error(ErrorCode.FORBIDDEN, f"you may not join room {name!r}",
                                                    command.id, room=name)))
                continue
            try:
                room = self.registry.join(member, name)
            except RoomServerError as exc:
                effects.append(Reply(messages.error(exc.code, exc.message, command.id, room=name)))
                continue
            if not self.registry.is_member(member, room.name):
                effects.append(Reply(self._taken_out_as_it_joined(room.name, command.id)))
                continue
            announcements, _ = self._joined(member, room.name, None)
            effects.append(Replay(room.name, since, messages.resumed(room.name, continued, command.id, client)))
            effects += announcements
        if not command.rooms:
            effects.append(Reply(messages.resumed(None, continued, command.id, client)))
        return effects
