"""``roomserver.inframe``: the common incoming frame is recognised exactly, and everything else is left to
Autobahn (None). The server-level behaviour (close codes for bad frames, several frames per read) is in
tests/test_conformance.py and the Autobahn TestSuite run (tests/test_compliance.py)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]
from hypothesis import given
from hypothesis import strategies as st

from roomserver import websocket
from roomserver.inframe import INT_UNMASK_MAX, single_frame, unmask

from .support import RawClient, aio
from .support import frame as support_frame

MASK = b"\x11\x22\x33\x44"


def frame(payload: bytes, first: int = 0x81, masked: bool = True, length_code: int | None = None) -> bytes:
    size = len(payload)
    if length_code is None:
        length_code = size if size < 126 else 126
    header = bytes([first, (0x80 if masked else 0) | length_code])
    if length_code == 126:
        header += size.to_bytes(2, "big")
    elif length_code == 127:
        header += size.to_bytes(8, "big")
    if not masked:
        return header + payload
    return header + MASK + bytes(create_xor_masker(MASK, size).process(payload))


@given(st.binary(max_size=3 * INT_UNMASK_MAX), st.binary(min_size=4, max_size=4))
def test_unmasking_matches_autobahns_masker_at_every_size(payload: bytes, mask: bytes) -> None:
    assert unmask(payload, mask) == bytes(create_xor_masker(mask, len(payload)).process(payload))


@given(st.binary(min_size=1, max_size=70_000), st.booleans())
def test_one_whole_masked_frame_is_read_as_is(payload: bytes, binary: bool) -> None:
    data = frame(payload, 0x82 if binary else 0x81)
    expected = (binary, payload) if len(payload) <= 65535 else None
    assert single_frame(data, 0) == expected, "64-bit lengths are left to Autobahn"


def test_everything_but_the_common_frame_is_left_to_autobahn() -> None:
    text = b'{"type":"chat","room":"r","text":"hi"}'
    assert single_frame(frame(text), 0) == (False, text)
    for data, why in [
        (frame(text, first=0x01), "not final: a fragmented message"),
        (frame(text, first=0x80), "a continuation frame"),
        (frame(text, first=0xC1), "RSV1 (compression) set"),
        (frame(text, first=0x89), "a ping"),
        (frame(text, first=0x88), "a close"),
        (frame(text, first=0x83), "a reserved opcode"),
        (frame(text, masked=False), "unmasked"),
        (frame(text) + frame(text), "two frames in one read"),
        (frame(text)[:-1], "a partial frame"),
        (frame(b"x" * 70, length_code=126), "a length not minimally encoded"),
        (frame(b"x" * 200, length_code=127)[:-1], "a 64-bit length"),
        (frame(b""), "an empty payload"),
        (frame(os.urandom(3))[:6], "shorter than any frame with a payload"),
    ]:
        assert single_frame(data, 0) is None, why
    assert single_frame(frame(b"x" * 300), 299) is None, "beyond the limit: Autobahn refuses it (1009)"
    assert single_frame(frame(b"x" * 300), 300) == (False, b"x" * 300)


@pytest_twisted.ensureDeferred
async def test_whole_split_and_batched_frames_all_reach_the_room_in_order(
        make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same server reads a whole frame itself, and leaves a frame split over two reads, two frames in one
    read, a fragmented message and a ping to Autobahn: every chat arrives once, in the order sent."""
    read_here: list[bytes] = []

    def counting(data: bytes, max_payload: int) -> tuple[bool, bytes] | None:
        found = single_frame(data, max_payload)
        if found is not None:
            read_here.append(found[1])
        return found

    monkeypatch.setattr(websocket, "single_frame", counting)
    server = await make_server(room_protocol=True)
    raw = await RawClient.connect(server)
    await raw.read_frame()  # welcome
    raw.send(support_frame(0x1, json.dumps({"type": "join", "room": "mix"}).encode()))
    assert json.loads((await raw.read_frame())[1])["type"] == "joined"

    def chat(text: str) -> bytes:
        return support_frame(0x1, json.dumps({"type": "chat", "room": "mix", "text": text}).encode())

    raw.send(chat("whole"))
    await aio(asyncio.sleep(0.05))  # its own read
    split = chat("split")
    raw.send(split[:5])
    await aio(asyncio.sleep(0.05))
    raw.send(split[5:])
    raw.send(chat("first of two") + chat("second of two"))
    body = json.dumps({"type": "chat", "room": "mix", "text": "fragmented"}).encode()
    raw.send(support_frame(0x1, body[:10], fin=False) + support_frame(0x9, b"ping")
             + support_frame(0x0, body[10:]))
    raw.send(chat("é ünïcode"))
    texts: list[str] = []
    pongs = 0
    while len(texts) < 6:
        opcode, payload = await raw.read_frame()
        if opcode == 0xA:
            pongs += 1
            continue
        event = json.loads(payload)
        if event["type"] == "chat":
            texts.append(event["text"])
    assert texts == ["whole", "split", "first of two", "second of two", "fragmented", "é ünïcode"]
    assert pongs == 1
    assert any(b'"whole"' in payload for payload in read_here), "the whole frame took the fast path"
    assert not any(b"split" in payload or b"of two" in payload for payload in read_here)
    assert server.get_stats().messages_received >= 7
