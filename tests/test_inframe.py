"""``roomserver.inframe``: the common incoming frame is recognised exactly, and everything else is left to
Autobahn (None). The server-level behaviour (close codes for bad frames, several frames per read) is in
tests/test_conformance.py and the Autobahn TestSuite run (tests/test_compliance.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import pytest
import pytest_twisted
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]
from hypothesis import given
from hypothesis import strategies as st

from roomserver import websocket
from roomserver.inframe import INT_UNMASK_MAX, unmask, whole_frame

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


@given(st.binary(max_size=20), st.binary(min_size=1, max_size=70_000), st.booleans(), st.binary(max_size=20))
def test_one_whole_masked_frame_is_read_as_is_wherever_it_starts(
        before: bytes, payload: bytes, binary: bool, after: bytes) -> None:
    data = before + frame(payload, 0x82 if binary else 0x81) + after
    end = len(data) - len(after)
    expected = (binary, payload, end) if len(payload) <= 65535 else None
    assert whole_frame(data, len(before), 0) == expected, "64-bit lengths are left to Autobahn"


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.booleans()), min_size=1, max_size=12))
def test_a_read_of_whole_frames_is_read_frame_by_frame_in_order(frames: list[tuple[bytes, bool]]) -> None:
    data = b"".join(frame(payload, 0x82 if binary else 0x81) for payload, binary in frames)
    found = []
    start = 0
    while (result := whole_frame(data, start, 0)) is not None:
        is_binary, payload, start = result
        found.append((payload, is_binary))
    assert found == frames
    assert start == len(data)


def test_everything_but_the_common_frame_is_left_to_autobahn() -> None:
    text = b'{"type":"chat","room":"r","text":"hi"}'
    assert whole_frame(frame(text), 0, 0) == (False, text, len(frame(text)))
    assert whole_frame(frame(text) + frame(text), 0, 0) == (False, text, len(frame(text))), "the first of two"
    for data, why in [
        (frame(text, first=0x01), "not final: a fragmented message"),
        (frame(text, first=0x80), "a continuation frame"),
        (frame(text, first=0xC1), "RSV1 (compression) set"),
        (frame(text, first=0x89), "a ping"),
        (frame(text, first=0x88), "a close"),
        (frame(text, first=0x83), "a reserved opcode"),
        (frame(text, masked=False), "unmasked"),
        (frame(text)[:-1], "a partial frame"),
        (frame(b"x" * 70, length_code=126), "a length not minimally encoded"),
        (frame(b"x" * 200, length_code=127)[:-1], "a 64-bit length"),
        (frame(b""), "an empty payload"),
        (frame(os.urandom(3))[:6], "shorter than any frame with a payload"),
    ]:
        assert whole_frame(data, 0, 0) is None, why
        assert whole_frame(frame(text) + data, len(frame(text)), 0) is None, f"{why}, after a whole frame"
    assert whole_frame(frame(b"x" * 300), 0, 299) is None, "beyond the limit: Autobahn refuses it (1009)"
    assert whole_frame(frame(b"x" * 300), 0, 300) == (False, b"x" * 300, 308)


@pytest.fixture
def read_here(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The payloads of the frames the fast path read (in order), for the servers a test starts."""
    payloads: list[bytes] = []

    def counting(data: bytes, start: int, max_payload: int) -> tuple[bool, bytes, int] | None:
        found = whole_frame(data, start, max_payload)
        if found is not None:
            payloads.append(found[1])
        return found

    monkeypatch.setattr(websocket, "whole_frame", counting)
    return payloads


def chat(text: str, room: str = "mix") -> bytes:
    return support_frame(0x1, json.dumps({"type": "chat", "room": room, "text": text}).encode())


async def joined(server: Any, room: str = "mix") -> RawClient:
    raw = await RawClient.connect(server)
    await raw.read_frame()  # welcome
    raw.send(support_frame(0x1, json.dumps({"type": "join", "room": room}).encode()))
    assert json.loads((await raw.read_frame())[1])["type"] == "joined"
    return raw


@pytest_twisted.ensureDeferred
async def test_whole_split_and_batched_frames_all_reach_the_room_in_order(
        make_server: Any, read_here: list[bytes]) -> None:
    """The same server reads whole frames itself, one or several per read, and leaves to Autobahn a frame split
    over two reads (and a whole frame's partial successor), a fragmented message and pings: every chat arrives
    once, in the order sent."""
    server = await make_server(room_protocol=True)
    raw = await joined(server)

    async def pause() -> None:
        await aio(asyncio.sleep(0.05))  # what was sent so far is read before what comes next

    raw.send(chat("whole"))
    await pause()
    split = chat("split")
    raw.send(split[:5])
    await pause()
    raw.send(split[5:])
    await pause()
    raw.send(chat("first of two") + chat("second of two"))
    await pause()
    raw.send(chat("before a partial") + chat("partial")[:9])
    await pause()
    raw.send(chat("partial")[9:])
    await pause()
    raw.send(chat("before a ping") + support_frame(0x9, b"ping") + chat("after a ping"))
    body = json.dumps({"type": "chat", "room": "mix", "text": "fragmented"}).encode()
    raw.send(support_frame(0x1, body[:10], fin=False) + support_frame(0x9, b"ping")
             + support_frame(0x0, body[10:]))
    raw.send(chat("é ünïcode"))
    expected = ["whole", "split", "first of two", "second of two", "before a partial", "partial", "before a ping",
                "after a ping", "fragmented", "é ünïcode"]
    texts: list[str] = []
    pongs = 0
    while len(texts) < len(expected):
        opcode, payload = await raw.read_frame()
        if opcode == 0xA:
            pongs += 1
            continue
        event = json.loads(payload)
        if event["type"] == "chat":
            texts.append(event["text"])
    assert texts == expected
    assert pongs == 2
    fast = {json.loads(payload)["text"] for payload in read_here if b'"chat"' in payload}
    assert {"whole", "first of two", "second of two", "before a partial", "before a ping"} <= fast
    assert not fast & {"split", "partial"}, "a frame Autobahn began is finished by Autobahn"
    assert server.get_stats().messages_received >= len(expected) + 1


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_after_a_whole_frame_in_the_same_read_closes_with_1007(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    raw = await joined(server)
    raw.send(chat("fine") + support_frame(0x1, b'{"type":"chat","room":"mix","text":"\xff"}') + chat("never"))
    opcode, payload = await raw.read_frame()
    assert opcode == 0x1 and json.loads(payload)["text"] == "fine"
    assert await raw.close_code() == 1007
    assert server.get_stats().messages_received == 2  # the join and "fine"


@pytest_twisted.ensureDeferred
async def test_a_flood_in_one_read_is_cut_off_where_the_rate_limit_closes(make_server: Any) -> None:
    """Handling one frame of a read can close the connection: the frames after it are not acted upon."""
    server = await make_server(room_protocol=True, rate_limit=0.01, rate_burst=3)
    raw = await joined(server)  # the join takes the first of 3 tokens
    raw.send(b"".join(chat(f"chat {i}") for i in range(10)))
    kinds: list[str] = []
    while True:
        opcode, payload = await raw.read_frame()
        if opcode == 0x8:
            assert int.from_bytes(payload[:2], "big") == 1008
            break
        event = json.loads(payload)
        kinds.append(event["text"] if event["type"] == "chat" else event["code"])
    # Two chats within the burst, three refused (the flood allowance, also a burst of 3), then the close.
    assert kinds == ["chat 0", "chat 1", "rate_limited", "rate_limited", "rate_limited"]
    assert server.get_stats().messages_received == 1 + 6


@pytest_twisted.ensureDeferred
async def test_a_frame_stream_cut_into_reads_anywhere_delivers_every_chat_once_in_order(
        make_server: Any, read_here: list[bytes]) -> None:
    """Seeded fuzz of the two receive paths together: rounds of whole chats (short, 16-bit lengths), fragmented
    chats and pings, each round's bytes cut at random points into separate writes, so reads start and end
    anywhere (mid-header, mid-mask, mid-payload, between frames). Every chat arrives once, in the order sent,
    every ping is answered, and both the fast path and Autobahn's read some of the chats."""
    server = await make_server(room_protocol=True, rate_limit=0)
    raw = await joined(server, "fuzz")
    rng = random.Random(8)
    sent: list[str] = []
    pings = 0
    for round_number in range(40):
        stream = b""
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            text = f"{round_number}-{len(sent)}-" + "x" * rng.choice([0, 10, 90, 200, 1000])
            body = json.dumps({"type": "chat", "room": "fuzz", "text": text}).encode()
            if kind < 0.15:
                stream += support_frame(0x9, b"p")
                pings += 1
                continue
            if kind < 0.3:
                cut = rng.randint(1, len(body) - 1)
                stream += support_frame(0x1, body[:cut], fin=False) + support_frame(0x0, body[cut:])
            else:
                stream += support_frame(0x1, body)
            sent.append(text)
        cuts = sorted(rng.sample(range(1, len(stream)), k=min(len(stream) - 1, rng.randint(0, 3))))
        for begin, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            raw.send(stream[begin:end])
            await aio(raw.writer.drain())
            await aio(asyncio.sleep(0.002))  # most pieces become reads of their own
    texts: list[str] = []
    pongs = 0
    while len(texts) < len(sent) or pongs < pings:
        opcode, payload = await raw.read_frame()
        if opcode == 0xA:
            pongs += 1
        elif json.loads(payload)["type"] == "chat":
            texts.append(json.loads(payload)["text"])
    assert texts == sent
    assert pongs == pings
    fast = sum(1 for payload in read_here if b'"chat"' in payload)
    assert 0 < fast < len(sent), "both paths read chats"
