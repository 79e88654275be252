"""The Autobahn testee: the room server's own stack with an echo handler, and only the documented differences."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.python import usage

from roomserver import ServerOptions, WebSocketServer
from roomserver.options import MIB
from roomserver.tap import Options
from roomserver.testee import TESTEE_MESSAGE_SIZE, as_testee
from roomserver.websocket import RoomServerFactory, RoomServerProtocol

from .support import WSClient, url_of

# Every Autobahn protocol option of a server factory, plus our own per-factory limit.
PROTOCOL_OPTIONS = (*RoomServerProtocol.CONFIG_ATTRS_COMMON, *RoomServerProtocol.CONFIG_ATTRS_SERVER, "max_fragments")
# What the testee may change in the factory, and nothing else (docs/compliance.md, "What the testee changes").
TESTEE_DIFFERENCES = {"maxFramePayloadSize", "maxMessagePayloadSize", "autoPingInterval", "autoPingTimeout",
                      "max_fragments"}
# The ServerOptions fields the testee changes (the rest must be exactly what was given).
TESTEE_FIELDS = {"testee", "room_protocol", "max_message_size", "max_frame_size", "ping_interval", "ping_timeout",
                 "max_fragments", "max_send_buffer", "rate_limit"}


def configured(options: ServerOptions) -> dict[str, Any]:
    class Bare(WebSocketServerFactory):  # type: ignore[misc]
        configure = RoomServerFactory.configure

    factory = Bare()
    factory.configure(options)
    values = {name: getattr(factory, name) for name in PROTOCOL_OPTIONS}
    hook = values.pop("perMessageCompressionAccept")
    values["perMessageCompressionAccept"] = (type(hook).__name__, getattr(hook, "max_message_size", None))
    return values


@pytest.mark.parametrize("compression", [False, True])
def test_testee_differs_from_the_room_endpoint_only_in_the_listed_limits(compression: bool) -> None:
    room = ServerOptions(room_protocol=True, compression=compression)
    testee = as_testee(room)
    room_values, testee_values = configured(room), configured(testee)
    differing = {name for name in PROTOCOL_OPTIONS if room_values[name] != testee_values[name]}
    if compression:  # the deflate bound follows max_message_size
        assert differing - TESTEE_DIFFERENCES == {"perMessageCompressionAccept"}
    else:
        assert differing <= TESTEE_DIFFERENCES
    assert testee_values["maxMessagePayloadSize"] == testee_values["maxFramePayloadSize"] == 16 * MIB
    assert testee_values["autoPingInterval"] == 0
    assert (testee.room_protocol, room.room_protocol) == (False, True)
    assert testee_values["max_fragments"] == 65536
    assert (testee.rate_limit, testee.max_send_buffer) == (0, 32 * MIB)
    unchanged = {f.name for f in dataclasses.fields(ServerOptions)} - TESTEE_FIELDS
    assert {name for name in unchanged if getattr(room, name) != getattr(testee, name)} == set()


def test_as_testee_never_lower_a_limit_and_are_idempotent() -> None:
    big = ServerOptions(max_message_size=64 * MIB, max_frame_size=32 * MIB, max_send_buffer=128 * MIB)
    lifted = as_testee(big)
    assert (lifted.max_message_size, lifted.max_frame_size) == (64 * MIB, 32 * MIB)
    assert as_testee(lifted) == lifted
    small = as_testee(ServerOptions(max_frame_size=1000))
    assert small.max_frame_size == small.max_message_size == TESTEE_MESSAGE_SIZE


@pytest_twisted.ensureDeferred
async def test_library_testee_echoes_text_as_text_and_binary_as_binary(make_server: Any) -> None:
    server: WebSocketServer = await make_server(testee=True)
    assert isinstance(server.factory, RoomServerFactory) and server.factory.protocol is RoomServerProtocol
    assert server.room_protocol is None and server.options.max_message_size == TESTEE_MESSAGE_SIZE
    ws = await WSClient.connect(url_of(server))
    for message in ("hello", "", "ünïcødé ✓", b"\x00\xff\x10", b"", "{\"type\":\"join\",\"room\":\"r\"}"):
        await ws.send(message)
        echo = await ws.recv_raw()
        assert echo == message and type(echo) is type(message), "no welcome, no room protocol: a pure echo"
    big = b"\xab" * (2 * MIB)  # beyond the room endpoint's 1 MiB default
    await ws.send(big)
    assert await ws.recv_raw() == big
    stats = server.get_stats()
    assert stats.messages_received == stats.messages_sent == 7


def test_twistd_flags() -> None:
    config = Options()
    config.parseOptions(["--testee", "--compression", "--port", "9001"])
    options = config.server_options()
    assert options.testee and options.compression and not options.room_protocol
    assert options.max_message_size == TESTEE_MESSAGE_SIZE and options.ping_interval == 0
    assert options.store == "memory", "the echo testee creates no database file"
    default = Options()
    default.parseOptions([])
    assert not default.server_options().compression and not default.server_options().testee
    explicit_off = Options()
    explicit_off.parseOptions(["--no-compression"])
    assert not explicit_off.server_options().compression
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--compression", "--no-compression"])
    text = str(Options())
    for flag in ("--testee", "--compression", "--no-compression"):
        assert flag in text
