"""One error tree for everything a client can get wrong, each error carrying its wire code.

Errors that only answer a request (the connection stays open) carry an ``code`` string that goes out in an
``{"type":"error"}`` message. Errors that end the connection also carry a WebSocket ``close_code``. Keeping the
mapping here means the adapters never invent codes and internals never leak to the wire.
"""

from __future__ import annotations


class CloseCode:
    """WebSocket close codes roomserver sends, following RFC 6455 and the Centrifugo convention.

    4000-4499 mean "you may reconnect (and resume)"; 4500-4999 mean "do not reconnect".
    """

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007  # invalid UTF-8 in a text frame
    POLICY_VIOLATION = 1008  # flood, too many errors, auth timeout
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TOKEN_EXPIRED = 4001  # reconnect-class: refresh the token, then reconnect
    SLOW_CONSUMER = 4008  # reconnect-class: the client did not read fast enough
    INVALID_TOKEN = 4501  # terminal: the token is invalid; reconnecting with it will not help
    SESSION_TAKEN_OVER = 4509  # terminal: another connection resumed this connection's session


class ErrorCode:
    """The ``code`` strings of ``{"type":"error"}`` replies (documented in docs/protocol.md)."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_IN_ROOM = "not_in_room"
    UNSUPPORTED = "unsupported"
    ROOM_FULL = "room_full"
    TOO_MANY_ROOMS = "too_many_rooms"
    RATE_LIMITED = "rate_limited"
    FORBIDDEN = "forbidden"
    UNAUTHENTICATED = "unauthenticated"
    FILTERED = "filtered"
    UNAVAILABLE = "unavailable"  # the store failed: the message was not stored and not sent
    INTERNAL = "internal_error"


# The error codes a client earns by its own requests (not by the server's state or faults): they spend its
# error budget (``error_limit``); ``rate_limited`` has its own flood guard, ``room_full`` is not the client's doing,
# and neither is ``too_many_rooms`` when the server holds ``max_rooms`` (a resume listing 20 rooms to a full server
# was closed with 1008, which clients take as terminal); a client over its own ``max_rooms_per_client`` is left to
# the rate limit.
CLIENT_FAULTS = frozenset({
    ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_TYPE, ErrorCode.NOT_IN_ROOM,
    ErrorCode.UNSUPPORTED, ErrorCode.FORBIDDEN, ErrorCode.UNAUTHENTICATED, ErrorCode.FILTERED,
})


class RoomServerError(Exception):
    """Base of every error a client can cause; ``code`` is its wire code."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ProtocolViolation(RoomServerError):
    """A request that breaks the room protocol; answered with an error, the connection stays open."""

    code = ErrorCode.INVALID_MESSAGE


class RoomFull(RoomServerError):
    """A join that would take a room beyond ``max_room_clients``."""

    code = ErrorCode.ROOM_FULL


class TooManyRooms(RoomServerError):
    """A join beyond ``max_rooms_per_client`` or one that would create a room beyond ``max_rooms``."""

    code = ErrorCode.TOO_MANY_ROOMS


class NotInRoom(RoomServerError):
    """A chat to a room the sender has not joined."""

    code = ErrorCode.NOT_IN_ROOM
