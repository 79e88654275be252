"""The room protocol shared by the Python peer servers: welcome, join/leave, chat with a per-room seq.

Each peer keeps only what its library needs to fan out (members per room, a seq per room) and answers with the
same JSON shapes as docs/protocol.md, compact (no spaces), encoded once per broadcast. Validation is kept to
what a careful hand-written server does (a JSON object, a string room, a string text, membership), so the
peers do comparable work per incoming message; the fan-out, the part the benchmark is about, is each library's
own.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(event: dict[str, Any]) -> bytes:
    return _compact(event).encode("utf-8")


def new_id() -> str:
    return secrets.token_urlsafe(16)


def welcome(client_id: str) -> bytes:
    return encode({"type": "welcome", "id": client_id})


def error(code: str, message: str) -> bytes:
    return encode({"type": "error", "code": code, "message": message})


class Rooms:
    """Members and seq per room; ``handle`` returns a reply for the sender and, for a chat, calls
    ``broadcast(room, members, payload)``."""

    def __init__(self) -> None:
        self.members: dict[str, set[Any]] = {}
        self.seqs: dict[str, int] = {}

    def handle(self, member: Any, member_id: str, payload: bytes | str,
               broadcast: Callable[[str, set[Any], bytes], None]) -> bytes | None:
        try:
            message = json.loads(payload)
        except ValueError:
            return error("invalid_json", "the message is not valid JSON")
        if not isinstance(message, dict):
            return error("invalid_message", "a message must be a JSON object")
        kind = message.get("type")
        room = message.get("room")
        if not isinstance(room, str) or not 1 <= len(room) <= 64:
            return error("invalid_message", 'field "room" must be a string of 1 to 64 characters')
        if kind == "chat":
            text = message.get("text")
            if not isinstance(text, str):
                return error("invalid_message", 'a chat message needs a string field "text"')
            members = self.members.get(room)
            if members is None or member not in members:
                return error("not_in_room", f"join room {room!r} first")
            seq = self.seqs[room] = self.seqs[room] + 1
            event = {"type": "chat", "room": room, "from": member_id, "text": text, "seq": seq}
            broadcast(room, members, encode(event))
            return None
        if kind == "join":
            members = self.members.setdefault(room, set())
            self.seqs.setdefault(room, 0)
            members.add(member)
            return encode({"type": "joined", "room": room, "size": len(members)})
        if kind == "leave":
            self.leave(member, room)
            return encode({"type": "left", "room": room})
        return error("unknown_type", "unknown message type")

    def leave(self, member: Any, room: str) -> None:
        members = self.members.get(room)
        if members is not None:
            members.discard(member)
            if not members:
                del self.members[room]
                del self.seqs[room]

    def leave_all(self, member: Any, rooms: list[str]) -> None:
        for room in rooms:
            self.leave(member, room)
