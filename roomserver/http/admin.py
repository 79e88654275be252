"""The admin HTTP API (JSON, behind ``Authorization: Bearer <admin token>``).

=================================================  =========================================================
``GET  /admin/rooms``                              every room: name, members, last seq, kept or not
``GET  /admin/rooms/<room>``                       one room with its members (client id, peer, rooms)
``PUT  /admin/rooms/<room>``                       create a kept room (stored, recreated at start); body
                                                   ``{"meta": {...}}`` optional (docs/persistence.md)
``DELETE /admin/rooms/<room>``                     remove a room, its record and its history
``POST /admin/rooms/<room>/broadcast``             body ``{"message": <JSON>}``: sent as-is to every member
``GET  /admin/clients``                            every open connection
``POST /admin/clients/<id>/disconnect``            body ``{"code": 4000, "reason": "..."}`` (both optional)
=================================================  =========================================================

Without a configured admin token the whole API answers 403: an API that can disconnect anyone must never be
open by accident. Errors are JSON ``{"error": "<code>", "message": "..."}`` with a fitting HTTP status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from twisted.logger import Logger
from twisted.web.resource import Resource

from ..core.errors import CloseCode
from ..core.messages import ROOM_NAME
from ..transport import MAX_BODY
from .auth import AdminToken

if TYPE_CHECKING:
    from ..client import Client
    from ..core.rooms import Room
    from ..server import WebSocketServer

log = Logger()
DEFAULT_DISCONNECT_CODE = CloseCode.POLICY_VIOLATION
DISCONNECT_REASON = "disconnected by an administrator"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _client_json(client: Client) -> dict[str, Any]:
    return {"id": client.id, "peer": client.peer, "rooms": sorted(client.rooms)}


def _room_json(room: Room) -> dict[str, Any]:
    return {"name": room.name, "members": len(room.clients), "seq": room.last_seq, "keep": room.keep,
            "meta": room.meta}


def _read_json(request: Any) -> dict[str, Any]:
    body = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(body) > MAX_BODY:
        raise ApiError(413, "too_large", f"the request body is limited to {MAX_BODY} bytes")
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_message", "the request body must be a JSON object")
    return value


def _valid_close_code(code: Any) -> int:
    if code is None:
        return DEFAULT_DISCONNECT_CODE
    if isinstance(code, bool) or not isinstance(code, int) or not (
        code in (1000, 1001, 1008) or 3000 <= code <= 4999
    ):
        raise ApiError(400, "invalid_message", '"code" must be 1000, 1001, 1008 or within 3000-4999')
    return code


class AdminApi(Resource):
    """Routes ``/admin/...`` by hand: the API is five endpoints, a router would be more code than it."""

    isLeaf = True

    def __init__(self, server: WebSocketServer, token: AdminToken) -> None:
        super().__init__()
        self._server = server
        self._token = token

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            if not self._token.configured:
                raise ApiError(403, "disabled", "the admin API is off: configure an admin token to use it")
            if not self._token.allows_request(request):
                request.setHeader(b"www-authenticate", b'Bearer realm="roomserver"')
                raise ApiError(401, "unauthorized", "send the admin token as 'Authorization: Bearer <token>'")
            parts = [segment.decode("utf-8", "replace") for segment in request.postpath if segment]
            result = self._route(request.method, parts, request)
        except ApiError as exc:
            request.setResponseCode(exc.status)
            return orjson.dumps({"error": exc.code, "message": exc.message})
        return orjson.dumps(result)

    def _route(self, method: bytes, parts: list[str], request: Any) -> dict[str, Any]:
        server = self._server
        if parts == ["rooms"] and method == b"GET":
            return {"rooms": [_room_json(room) for room in sorted(server.registry, key=lambda r: r.name)]}
        if len(parts) == 2 and parts[0] == "rooms" and method == b"GET":
            room = self._room(parts[1])
            members = [_client_json(m) for m in room.clients.snapshot() if hasattr(m, "peer")]
            return {**_room_json(room), "clients": sorted(members, key=lambda c: c["id"])}
        if len(parts) == 2 and parts[0] == "rooms" and method == b"PUT":
            if ROOM_NAME.fullmatch(parts[1]) is None:
                raise ApiError(400, "invalid_message", "a room name is 1 to 64 characters of letters, digits and _.:-")
            meta = _read_json(request).get("meta")  # none given: an existing room keeps its meta
            if meta is not None and not isinstance(meta, dict):
                raise ApiError(400, "invalid_message", '"meta" must be a JSON object')
            return _room_json(server.create_room(parts[1], keep=True, meta=meta))
        if len(parts) == 2 and parts[0] == "rooms" and method == b"DELETE":
            self._room(parts[1])
            server.delete_room(parts[1]).addErrback(
                lambda failure: log.failure("could not delete room {name} from the store", failure, name=parts[1]))
            return {"deleted": parts[1]}
        if len(parts) == 3 and parts[0] == "rooms" and parts[2] == "broadcast" and method == b"POST":
            room = self._room(parts[1])
            body = _read_json(request)
            if "message" not in body:
                raise ApiError(400, "invalid_message", 'the body needs a "message" field (any JSON value)')
            return {"room": room.name, "recipients": server.broadcast(room, body["message"])}
        if parts == ["clients"] and method == b"GET":
            return {"clients": sorted((_client_json(c) for c in server.clients.values()), key=lambda c: c["id"])}
        if len(parts) == 3 and parts[0] == "clients" and parts[2] == "disconnect" and method == b"POST":
            client = server.get_client(parts[1])
            if client is None:
                raise ApiError(404, "not_found", "no open connection with that id")
            body = _read_json(request)
            code = _valid_close_code(body.get("code"))
            reason = body.get("reason", DISCONNECT_REASON)
            if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
                raise ApiError(400, "invalid_message", '"reason" must be a string of at most 123 bytes')
            client.close(code, reason)
            return {"disconnected": client.id, "code": code}
        raise ApiError(404, "not_found", "no such admin endpoint")

    def _room(self, name: str) -> Room:
        room = self._server.get_room(name)
        if room is None:
            raise ApiError(404, "not_found", f"no room {name[:64]!r}")
        return room
