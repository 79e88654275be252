"""A raw WebSocket client over asyncio streams, for tests that must send what no well-behaved client sends.

Real client libraries refuse to send unmasked frames, reserved bits, unknown opcodes, fragmented control frames
or invalid close codes, so conformance tests build frames by hand (RFC 6455, section 5.2). Every read is bounded
by a timeout; the server under test runs in the same event loop (Twisted's asyncio reactor).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass
from typing import Any

from .support import aio

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
                 declared_length: int | None = None) -> bytes:
    """One frame; ``declared_length`` lies about the payload length (to test huge length headers)."""
    length = len(payload) if declared_length is None else declared_length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWebSocket:
    """A hand-driven WebSocket connection: ``send_frame``, ``read_frame``, ``expect_close``, ``at_eof``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: str) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> RawWebSocket:
        reader, writer = await aio(asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await aio(asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout))
        response = head.decode("latin-1")
        assert response.startswith("HTTP/1.1 101"), response
        return cls(reader, writer, response)

    def header(self, name: str) -> str | None:
        """A header of the 101 response (case-insensitive name), or None."""
        for line in self.response.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.writer.write(encode_frame(opcode, payload, **kwargs))

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        async def read() -> Frame:
            b1, b2 = await self.reader.readexactly(2)
            length = b2 & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            assert not b2 & 0x80, "a server must not mask its frames"
            payload = await self.reader.readexactly(length)
            return Frame(bool(b1 & 0x80), (b1 >> 4) & 0x7, b1 & 0x0F, payload)

        return await aio(asyncio.wait_for(read(), timeout))  # type: ignore[no-any-return]

    async def expect_close(self, code: int, timeout: float = 5.0,
                           skip: tuple[int, ...] = (OP_TEXT, OP_BINARY, OP_CONTINUATION)) -> Frame:
        """Read (skipping data frames, or the ``skip`` opcodes) up to the server's close frame; check its code,
        answer it, and check the server then closes the TCP connection (it is the server's job, RFC 6455 section
        7.1.1)."""
        while True:
            frame = await self.read_frame(timeout)
            if frame.opcode == OP_CLOSE:
                break
            assert frame.opcode in skip, f"unexpected frame {frame}"
        assert frame.close_code == code, f"expected close code {code}, got {frame.close_code} ({frame.payload!r})"
        if not self.writer.is_closing():
            self.send_frame(OP_CLOSE, close_payload(code))
        assert await self.at_eof(timeout), "the server did not close the TCP connection"
        return frame

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server closed the TCP connection (anything it still sends is discarded)."""
        async def drain() -> bool:
            while await self.reader.read(65536):
                pass
            return True

        try:
            return await aio(asyncio.wait_for(drain(), timeout))  # type: ignore[no-any-return]
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()
