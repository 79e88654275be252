"""Wire codecs and WebSocket subprotocol negotiation.

A codec turns the protocol's message shapes (dicts) into frames and back. ``roomserver.json.v1`` (JSON in text
frames) is the default for clients naming no subprotocol; ``roomserver.msgpack.v1`` carries the same shapes in
msgpack binary frames. Applications register more with ``server.add_protocol(name, codec)``.

Broadcasts encode once per codec in use, never once per client: ``CodecRegistry.encode_for`` is called per
distinct codec of a room's members.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import msgpack
import orjson

from .errors import ErrorCode, ProtocolViolation

JSON_PROTOCOL = "roomserver.json.v1"
MSGPACK_PROTOCOL = "roomserver.msgpack.v1"


class Codec(Protocol):
    """How one subprotocol frames messages."""

    binary: bool
    """True if frames are binary (msgpack), False for text (JSON)."""

    def encode(self, message: Any) -> bytes: ...

    def decode(self, payload: bytes) -> Any:
        """The decoded message; raise ``ProtocolViolation`` (code ``invalid_json``) if it cannot be decoded."""
        ...


class JsonCodec:
    binary = False

    def encode(self, message: Any) -> bytes:
        return orjson.dumps(message)

    def decode(self, payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ProtocolViolation("the message is not valid JSON", code=ErrorCode.INVALID_JSON) from exc


class MsgpackCodec:
    binary = True

    def encode(self, message: Any) -> bytes:
        return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]

    def decode(self, payload: bytes) -> Any:
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
            raise ProtocolViolation("the message is not valid msgpack", code=ErrorCode.INVALID_JSON) from exc


class CodecRegistry:
    """Known subprotocols, in server preference order."""

    def __init__(self) -> None:
        self._codecs: dict[str, Codec] = {JSON_PROTOCOL: JsonCodec(), MSGPACK_PROTOCOL: MsgpackCodec()}

    def add(self, name: str, codec: Codec) -> None:
        if not name or any(ch in name for ch in " ,;\t\r\n"):
            raise ValueError(f"invalid subprotocol name {name!r}")
        self._codecs[name] = codec

    def get(self, name: str | None) -> Codec:
        return self._codecs[name or JSON_PROTOCOL]

    def names(self) -> list[str]:
        return list(self._codecs)

    def negotiate(self, offered: Iterable[str]) -> str | None:
        """The first offered subprotocol we know (the client's preference order); None if none is known.

        A client offering nothing gets the default and needs no ``Sec-WebSocket-Protocol`` answer: the caller
        treats an empty offer separately.
        """
        for name in offered:
            if name in self._codecs:
                return name
        return None
