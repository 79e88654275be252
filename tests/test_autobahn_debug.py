"""Autobahn's per-connection configuration debug line is formatted only when rendered (roomserver/autobahn_debug.py),
and reads as before when it is."""

from __future__ import annotations

from pprint import pformat
from typing import Any

import autobahn.websocket.protocol as autobahn_protocol
import pytest_twisted
import txaio
from twisted.logger import formatEvent, globalLogPublisher

import roomserver.websocket  # noqa: F401 - installs the deferred pformat
from roomserver.autobahn_debug import DeferredPformat

from .support import WSClient, url_of


def test_the_configuration_list_is_formatted_later_and_the_same() -> None:
    settings = [("openHandshakeTimeout", 5.0, "RoomServerFactory"), ("autoPingInterval", 30, "RoomServerFactory")]
    deferred = autobahn_protocol.pformat(settings)
    assert isinstance(deferred, DeferredPformat)
    assert str(deferred) == f"{deferred}" == pformat(settings)
    timings = {"open": 0.1}
    assert autobahn_protocol.pformat(timings) == pformat(timings), "other uses get the real pformat"


@pytest_twisted.ensureDeferred
async def test_the_debug_line_of_a_real_connection_renders_as_autobahn_wrote_it(make_server: Any) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    level = txaio.get_global_log_level()
    txaio.set_global_log_level("debug")  # Autobahn's debug lines are dropped before any observer otherwise
    try:
        server = await make_server(room_protocol=True)
        ws = await WSClient.connect(url_of(server))
        await ws.recv()
        await ws.close()
    finally:
        txaio.set_global_log_level(level)
        globalLogPublisher.removeObserver(events.append)
    lines = [event for event in events if isinstance(event.get("attrs"), DeferredPformat)]
    assert lines, "Autobahn logged its configuration (at debug level) with the deferred pformat"
    text = formatEvent(lines[0])
    assert "'openHandshakeTimeout'" in text and text == "\n" + pformat(lines[0]["attrs"].value)
