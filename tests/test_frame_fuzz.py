"""RELIABILITY P5 at its own scale: 1,000 fuzzed frames that break RFC 6455's framing rules, each closed with 1002.

``test_conformance.py`` has one hand-written case per rule; the Autobahn suite fuzzes the testee (an echo
server). This sends 1,000 generated variants to the room endpoint users connect to, through its own frame reader
(``roomserver/inframe.py`` reads the common frames without Autobahn's frame machine, so its checks are the ones
that must hold): every variant breaks at least one of the rules "a client masks every frame", "no RSV bit without
a negotiated extension" and "no reserved opcode", often several at once, after 0 to 2 well-formed frames (a chat,
a ping, the start of a fragmented message). The seed is fixed, so a failure names a variant that can be replayed.

Each must get close 1002 (then the server closes the TCP connection), nothing of it may reach the room, and a
member of the room chatting all along must see every one of its own chats, in order; no error is logged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest_twisted
from twisted.internet import defer

from roomserver import WebSocketServer
from roomserver.client import Client
from roomserver.observe import ServerObserver

from .rawws import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, close_payload
from .support import WSClient, eventually, logged_errors, url_of

VARIANTS = 1000
SEED = 6455
AT_ONCE = 25
RESERVED_OPCODES = (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)
DEFINED_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
FAULTS = ("unmasked", "rsv", "reserved opcode")


@dataclass
class Variant:
    """Well-formed frames, then one frame with ``faults``."""

    number: int
    faults: tuple[str, ...]
    before: list[dict[str, Any]] = field(default_factory=list)
    bad: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shown = {key: (value[:16] if isinstance(value, bytes) else value) for key, value in self.bad.items()}
        return f"variant {self.number} ({', '.join(self.faults)}) after {len(self.before)} frames: {shown}"


def payload_for(rng: random.Random, opcode: int) -> bytes:
    """What the frame carries: JSON, random bytes, a close code, of 0 to 300 bytes (over 125 on a control frame
    is a violation of its own, which must not change the answer)."""
    size = rng.choice((0, *[rng.randint(1, 125)] * 5, *[rng.randint(126, 300)] * 4))
    if opcode == OP_CLOSE and rng.random() < 0.5:
        return close_payload(rng.choice((1000, 1001, 3000)), b"bye")
    if opcode == OP_TEXT and rng.random() < 0.5:
        return b'{"type":"chat","room":"fuzz","text":"' + b"x" * min(size, 200) + b'"}'
    return rng.randbytes(size)


def generate(rng: random.Random, number: int) -> Variant:
    faults = tuple(sorted({FAULTS[number % 3], *rng.sample(FAULTS, rng.randint(0, 2))}))
    opcode = rng.choice(RESERVED_OPCODES) if "reserved opcode" in faults else rng.choice(DEFINED_OPCODES)
    rsv = rng.randint(1, 7) if "rsv" in faults else 0
    bad = {"opcode": opcode, "payload": payload_for(rng, opcode), "fin": rng.random() < 0.8, "rsv": rsv,
           "mask": "unmasked" not in faults}
    before: list[dict[str, Any]] = []
    for _ in range(rng.randint(0, 2)):
        kind = rng.choice(("chat", "ping", "fragment"))
        if kind == "chat":
            before.append({"opcode": OP_TEXT, "payload": b'{"type":"chat","room":"fuzz","text":"ok"}'})
        elif kind == "ping":
            before.append({"opcode": OP_PING, "payload": rng.randbytes(rng.randint(0, 125))})
        elif not any(frame.get("fin") is False for frame in before):
            before.append({"opcode": OP_TEXT, "payload": b'{"type":"chat",', "fin": False})
    return Variant(number, faults, before, bad)


def variants() -> list[Variant]:
    rng = random.Random(SEED)
    return [generate(rng, number) for number in range(VARIANTS)]


def test_the_variants_cover_every_fault_and_its_combinations() -> None:
    """Not a test of the server: that the fuzz is what it claims (every fault a third of the time or more, all
    three at once sometimes, control and data opcodes, unfinished frames, frames after a fragment)."""
    generated = variants()
    for fault in FAULTS:
        assert sum(fault in variant.faults for variant in generated) >= VARIANTS // 3
    assert any(len(variant.faults) == 3 for variant in generated)
    assert {variant.bad["opcode"] for variant in generated} >= set(RESERVED_OPCODES) | set(DEFINED_OPCODES)
    assert any(not variant.bad["fin"] for variant in generated)
    assert any(any(frame.get("fin") is False for frame in variant.before) for variant in generated)
    distinct = {(repr(v.before), v.bad["opcode"], v.bad["rsv"], v.bad["mask"], v.bad["fin"], v.bad["payload"])
                for v in generated}
    assert len(distinct) >= 0.95 * VARIANTS, "variants, not the same few frames again"


async def offend(server: WebSocketServer, variant: Variant) -> None:
    ws = await RawWebSocket.connect(server.port or 0)
    try:
        welcome = await ws.read_frame()
        assert welcome.opcode == OP_TEXT, variant.describe()
        for frame in variant.before:
            ws.send_frame(**frame)
        ws.send_frame(**variant.bad)
        try:
            await ws.expect_close(1002, skip=(OP_TEXT, OP_PONG))  # replies to the well-formed frames
        except AssertionError as exc:
            raise AssertionError(f"{variant.describe()}: {exc}") from None
    finally:
        ws.close()


@pytest_twisted.ensureDeferred
async def test_a_thousand_fuzzed_framing_violations_all_close_1002_and_the_room_goes_on(make_server: Any) -> None:
    server = await make_server(room_protocol=True, rate_limit=0, close_handshake_timeout=30.0)
    member = await WSClient.connect(url_of(server))
    assert (await member.recv())["type"] == "welcome"
    assert (await member.request({"type": "join", "room": "fuzz"}))["type"] == "joined"
    generated = variants()
    closes: list[int | None] = []

    class CloseCodes(ServerObserver):
        def connection_closed(self, client: Client, was_clean: bool) -> None:
            closes.append(client.close_code)

    server.observers.add(CloseCodes())
    with logged_errors() as errors:
        for start in range(0, VARIANTS, AT_ONCE):
            batch = generated[start:start + AT_ONCE]
            await defer.gatherResults([defer.ensureDeferred(offend(server, variant)) for variant in batch],
                                      consumeErrors=True)
            await member.send({"type": "chat", "room": "fuzz", "text": f"after {start}", "id": start})
            seen = await member.recv()
            assert (seen["type"], seen["text"]) == ("chat", f"after {start}"), "only the member's own chats"
            assert (await member.recv())["type"] == "ack"
        await eventually(lambda: server.get_stats().connections == 1)
    assert errors == [], "a framing violation is the client's fault: nothing to log as an error"
    room = server.registry.get("fuzz")
    assert room is not None and len(room.clients) == 1, "the offenders never joined"
    assert sorted(closes) == [1002] * VARIANTS, "every offender's connection ended with 1002"
