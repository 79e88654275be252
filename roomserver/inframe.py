"""The common incoming frame, read without Autobahn's general frame machine: a complete, masked, unfragmented
text or binary frame, of which a read holds one or several.

That is what a chat client sends: one frame per message, one message per write, so the kernel hands the server
one frame per read, or several whole ones when the client sends faster than the server reads. Autobahn's
receive path handles every case (partial frames, fragments, control frames, compression) with a per-frame state
machine in Python: a ``FrameHeader``, a CFFI XOR masker created per frame, begin/data/end callbacks, a list
joined into the message, a debug line formatted on every read. For the common frame that is about a third of a
chat's own CPU (docs/performance.md). This module only *recognises* the common frame and unmasks it; anything
else (a partial frame, a control frame, a fragment, and anything doubtful: a non-minimal length, an empty
payload, a length beyond the limits) returns None, and the rest of the read goes through Autobahn unchanged,
which also keeps every error path (close codes 1002, 1007, 1009) Autobahn's.
"""

from __future__ import annotations

from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]  # NVX or pure Python

INT_UNMASK_MAX = 1024
"""Up to this many bytes, unmasking with Python's integer XOR beats creating Autobahn's CFFI masker (about 1 µs
against 4 for a chat-sized payload); above it the SIMD masker wins."""

FIN_TEXT = 0x81
FIN_BINARY = 0x82


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (RFC 6455 section 5.3)."""
    size = len(payload)
    if size > INT_UNMASK_MAX:
        return bytes(create_xor_masker(mask, size).process(payload))
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def whole_frame(data: bytes, start: int, max_payload: int) -> tuple[bool, bytes, int] | None:
    """``(is_binary, unmasked payload, end)`` if ``data`` holds, from offset ``start``, one complete, masked,
    final text or binary frame with no RSV bits and a minimally encoded length of 1 to 65535 bytes, at most
    ``max_payload`` (0: no limit), ending at offset ``end``; otherwise None (let Autobahn read from there)."""
    size = len(data)
    if size - start < 7:
        return None
    first, second = data[start], data[start + 1]
    if (first != FIN_TEXT and first != FIN_BINARY) or not second & 0x80:
        return None
    length = second & 0x7F
    if length < 126:
        mask_at = start + 2
    elif length == 126 and size - start >= 8:
        length = (data[start + 2] << 8) | data[start + 3]
        if length < 126:
            return None  # not minimal: Autobahn fails the connection for it
        mask_at = start + 4
    else:
        return None
    end = mask_at + 4 + length
    if length == 0 or end > size or 0 < max_payload < length:
        return None
    return first == FIN_BINARY, unmask(data[mask_at + 4:end], data[mask_at:mask_at + 4]), end
