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

ROOM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_REQUEST_ID_LENGTH = 128
RequestId = str | int | None


@dataclass(frozen=True, slots=True)
class Join:
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


Command = Join | Leave | Chat


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


def parse(payload: bytes | str) -> Command:
    """Parse and validate one client request."""
    message = decode(payload)
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation('a message needs a string field "type"')
    if "id" in message and message["id"] is not None and request_id_of(message) is None:
        raise ProtocolViolation('"id" must be a string of at most 128 characters or an integer')
    request_id = request_id_of(message)
    if kind == "join":
        return Join(room=_room_of(message), id=request_id)
    if kind == "leave":
        return Leave(room=_room_of(message), id=request_id)
    if kind == "chat":
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolViolation('a chat message needs a string field "text"')
        return Chat(room=_room_of(message), text=text, id=request_id)
    raise ProtocolViolation(f"unknown message type {kind[:64]!r}", code=ErrorCode.UNKNOWN_TYPE)


def _room_of(message: dict[str, Any]) -> str:
    room = message.get("room")
    if not isinstance(room, str) or ROOM_NAME.fullmatch(room) is None:
        raise ProtocolViolation(
            'field "room" must be 1 to 64 characters of letters, digits and _.:-'
        )
    return room


def with_id(event: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        event["id"] = request_id
    return event


def welcome(client_id: str) -> dict[str, Any]:
    return {"type": "welcome", "id": client_id}


def joined(room: str, size: int, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "joined", "room": room, "size": size}, request_id)


def left(room: str, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "left", "room": room}, request_id)


def chat(room: str, sender: str, text: str, seq: int) -> dict[str, Any]:
    return {"type": "chat", "room": room, "from": sender, "text": text, "seq": seq}


def error(code: str, message: str, request_id: RequestId = None) -> dict[str, Any]:
    return with_id({"type": "error", "code": code, "message": message}, request_id)
