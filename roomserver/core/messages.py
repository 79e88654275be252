"""The built-in room protocol on the wire: parsing client requests and building server events.

``parse`` turns one text frame into a frozen command (``Join``, ``Leave``, ``Chat``) or raises a
``ProtocolViolation`` whose ``code`` is the wire error code. It never raises anything else, whatever the input:
the hypothesis tests in tests/test_core_messages.py hold it to that.

Events are plain dicts so the broadcast path can encode them once (``encode``) and hand the same bytes to every
recipient. docs/protocol.md is the reader's version of this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import ErrorCode, ProtocolViolation
from .filters import SubscriptionFilter

ROOM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_REQUEST_ID_LENGTH = 128
MAX_MSG_ID_LENGTH = 128
MAX_SESSION_LENGTH = 128
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000
MAX_RESUME_ROOMS = 1000
MAX_SEQ = 2**53
RequestId = str | int | None


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    id: RequestId = None
    since: int | None = None
    """Replay the room's history after this seq before live messages (docs/protocol.md, resume)."""
    meta: dict[str, Any] | None = None
    """Public presence metadata of this member (size-limited)."""
    presence: bool = False
    """Send the member list with ``joined`` and subscribe to the room's presence events."""
    filter: SubscriptionFilter | None = None
    """Receive only these message types from the room."""


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    room: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Chat:
    room: str
    text: str
    id: RequestId = None
    msg_id: str | None = None
    """The client's idempotency key: a retry with the same msg_id is acknowledged, not broadcast again."""


@dataclass(frozen=True, slots=True)
class History:
    room: str
    since: int | None = None
    before: int | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Resume:
    session: str
    rooms: tuple[tuple[str, int], ...]
    id: RequestId = None


Command = Join | Leave | Chat | History | Resume | PresenceQuery
MAX_META_BYTES = 1024


def encode(event: Any) -> bytes:
    """Serialize an event (or any JSON-serializable value) to UTF-8 JSON bytes, once per broadcast."""
    return orjson.dumps(event)


def request_id_of(message: Any) -> RequestId:
    """The request's ``id`` if it is usable (a short string or an integer), else None."""
    if not isinstance(message, dict):
        return None
    value = message.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and -(2**53) <= value <= 2**53:
        return value
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_LENGTH:
        return value
    return None


def decode(payload: bytes | str) -> dict[str, Any]:
    """Parse JSON into an object, or raise ``invalid_json`` / ``invalid_message``."""
    try:
        message = orjson.loads(payload)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise ProtocolViolation("the message is not valid JSON", code=ErrorCode.INVALID_JSON) from exc
    if not isinstance(message, dict):
        raise ProtocolViolation("a message must be a JSON object")
    return message


def parse(payload: bytes | str | dict[str, Any], max_meta_bytes: int = MAX_META_BYTES) -> Command:
    """Parse and validate one client request (raw JSON, or a message another codec already decoded)."""
    message = payload if isinstance(payload, dict) else decode(payload)
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation('a message needs a string field "type"')
    if "id" in message and message["id"] is not None and request_id_of(message) is None:
        raise ProtocolViolation('"id" must be a string of at most 128 characters or an integer')
    request_id = request_id_of(message)
    if kind == "join":
        return Join(room=_room_of(message), id=request_id, since=_seq_of(message, "since"),
                    meta=_meta_of(message, max_meta_bytes), presence=message.get("presence") is True,
                    filter=_filter_of(message))
    if kind == "presence":
        return PresenceQuery(room=_room_of(message), id=request_id)
    if kind == "leave":
        return Leave(room=_room_of(message), id=request_id)
    if kind == "chat":
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolViolation('a chat message needs a string field "text"')
        return Chat(room=_room_of(message), text=text, id=request_id, msg_id=_msg_id_of(message))
    if kind == "history":
        return History(room=_room_of(message), since=_seq_of(message, "since"), before=_seq_of(message, "before"),
                       limit=_limit_of(message), id=request_id)
    if kind == "resume":
        return Resume(session=_session_of(message), rooms=_resume_rooms_of(message), id=request_id)
    raise ProtocolViolation(f"unknown message type {kind[:64]!r}", code=ErrorCode.UNKNOWN_TYPE)


def _meta_of(message: dict[str, Any], limit: int) -> dict[str, Any] | None:
    meta = message.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ProtocolViolation('"meta" must be an object')
    try:
        size = len(orjson.dumps(meta))
    except TypeError as exc:
        raise ProtocolViolation('"meta" must be plain JSON') from exc
    if size > limit:
        raise ProtocolViolation(f'"meta" is larger than {limit} bytes')
    return meta


def _filter_of(message: dict[str, Any]) -> SubscriptionFilter | None:
    try:
        return SubscriptionFilter.parse(message.get("filter"))
    except ValueError as exc:
        raise ProtocolViolation(str(exc)) from exc


def presence(room: str, members: list[dict[str, Any]], request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "presence", "room": room, "members": members}, request_id)


def authenticated(user: str, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "authenticated", "user": user}, request_id)


def _room_of(message: dict[str, Any]) -> str:
    room = message.get("room")
    if not isinstance(room, str) or ROOM_NAME.fullmatch(room) is None:
        raise ProtocolViolation(
            'field "room" must be 1 to 64 characters of letters, digits and _.:-'
        )
    return room


def _is_seq(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ


def _seq_of(message: dict[str, Any], field: str) -> int | None:
    value = message.get(field)
    if value is None:
        return None
    if not _is_seq(value):
        raise ProtocolViolation(f'field "{field}" must be a sequence number (an integer >= 0)')
    return int(value)


def _limit_of(message: dict[str, Any]) -> int:
    """The page size: default 100; larger requests are capped at ``MAX_HISTORY_LIMIT``."""
    value = message.get("limit")
    if value is None:
        return DEFAULT_HISTORY_LIMIT
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtocolViolation('field "limit" must be an integer >= 1')
    return min(value, MAX_HISTORY_LIMIT)


def _msg_id_of(message: dict[str, Any]) -> str | None:
    value = message.get("msg_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_MSG_ID_LENGTH:
        raise ProtocolViolation(f'"msg_id" must be a string of 1 to {MAX_MSG_ID_LENGTH} characters')
    return value


def _session_of(message: dict[str, Any]) -> str:
    value = message.get("session")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SESSION_LENGTH:
        raise ProtocolViolation('a resume needs the string field "session" from the welcome message')
    return value


def _resume_rooms_of(message: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    rooms = message.get("rooms", {})
    if not isinstance(rooms, dict) or len(rooms) > MAX_RESUME_ROOMS:
        raise ProtocolViolation(
            f'field "rooms" must be an object of at most {MAX_RESUME_ROOMS} rooms: {{"room": last_seq}}')
    for name, seq in rooms.items():
        if not isinstance(name, str) or ROOM_NAME.fullmatch(name) is None:  # msgpack keys may be bytes
            raise ProtocolViolation(f'room names in "rooms" must be 1 to 64 characters of letters, digits '
                                    f'and _.:- (got {name[:70]!r})')
        if not _is_seq(seq):
            raise ProtocolViolation(f'the last seq of room {name!r} in "rooms" must be an integer >= 0')
    return tuple(rooms.items())


def with_id(event: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        event["id"] = request_id
    return event


def welcome(client_id: str, session: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "welcome", "id": client_id}
    if session is not None:
        event["session"] = session
    return event


def joined(room: str, size: int, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "joined", "room": room, "size": size}, request_id)


def recovery(event: dict[str, Any], recovered: bool, first_seq: int) -> dict[str, Any]:
    """Add the outcome of a replay to a ``joined``/``resumed`` reply (``first_seq`` only when not recovered)."""
    event["recovered"] = recovered
    if not recovered:
        event["first_seq"] = first_seq
    return event


def resumed(room: str | None, continued: bool, request_id: RequestId = None, client: str | None = None
            ) -> dict[str, Any]:
    """One room's ``resumed`` reply (a resume listing no rooms gets one without ``room``); ``client`` is the
    client id the connection took over from the continued session, when it is not the one of its ``welcome``."""
    event: dict[str, Any] = {"type": "resumed"}
    if room is not None:
        event["room"] = room
    event["continued"] = continued
    if client is not None:
        event["client"] = client
    return with_id(event, request_id)


def chat_body(room: str, sender: str, text: str, msg_id: str | None = None) -> bytes:
    """A chat event encoded without its seq (the store adds it: ``history.with_seq``)."""
    event: dict[str, Any] = {"type": "chat", "room": room, "from": sender, "text": text}
    if msg_id is not None:
        event["msg_id"] = msg_id
    return encode(event)


def ack(seq: int, request_id: RequestId = None, msg_id: str | None = None, duplicate: bool = False) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "ack"}
    with_id(event, request_id)
    event["seq"] = seq
    if msg_id is not None:
        event["msg_id"] = msg_id
    if duplicate:
        event["duplicate"] = True
    return event


def reconnect(after_ms: int) -> dict[str, Any]:
    """The hint a draining node sends before its 1001 close: reconnect (to any node) after ``after_ms`` and
    resume the session; a client that honours it spreads the drained node's clients over time."""
    return {"type": "reconnect", "after_ms": after_ms, "resume": True, "reason": "server shutdown"}


def left(room: str, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "left", "room": room}, request_id)


def error(code: str, message: str, request_id: RequestId = None, room: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if room is not None:
        event["room"] = room
    return with_id(event, request_id)
