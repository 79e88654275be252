"""The Autobahn TestSuite testee: roomserver's own stack with an echo handler instead of rooms.

The fuzzing cases expect an echo server: every text message comes back as text, every binary message as binary.
``ServerOptions(testee=True)`` (``twistd roomserver --testee``) gives exactly that without a second WebSocket
implementation: the same ``WebSocketServer``, ``RoomServerFactory.configure`` and ``RoomServerProtocol`` serve the
connections, and the echo is an ordinary application handler on the public ``Client`` API (``client.on("message",
client.send)``), so a message travels the same path as in any roomserver application.

Only what the cases cannot pass otherwise differs from the options given (``as_testee``), and each
difference is listed in docs/compliance.md:

- the JSON room protocol is off (its ``welcome`` message would be an unexpected frame in every case);
- ``max_message_size`` (and ``max_frame_size`` if set) is raised to at least 16 MiB, the largest message the
  9.x cases send;
- ``max_fragments`` is raised to at least 65536: case 9.3.1 sends a 4 MiB message in 64-byte frames;
- ``max_send_buffer`` is raised to at least 32 MiB (twice the largest message): the 9.x cases have the server
  echo messages of up to 16 MiB, which a socket cannot take at once, so the queue legitimately holds them;
- the rate limit is off (``rate_limit=0``): 9.7/9.8, 12.x and 13.x send 1000 messages each as fast as the echoes
  come back, far above the default 100 messages per second;
- heartbeats are off: a case records every frame the server sends, so a heartbeat ping in the middle of a long
  case (9.x, 12.x, 13.x) would be an unexpected event and fail it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .options import MIB, ServerOptions

if TYPE_CHECKING:
    from .client import Client
    from .server import WebSocketServer

TESTEE_MESSAGE_SIZE = 16 * MIB
"""The largest message of the Autobahn cases (9.1.6 and 9.2.6 send exactly 16 MiB in one frame)."""

TESTEE_MAX_FRAGMENTS = 65536
"""The most frames per message in the Autobahn cases (9.3.1: 4 MiB in 64-byte frames)."""

TESTEE_SEND_BUFFER = 2 * TESTEE_MESSAGE_SIZE
"""Queue room for the echo of the largest message and then some."""


def as_testee(options: ServerOptions) -> ServerOptions:
    """``options`` with the testee switched on and only the differences listed in the module doc applied."""
    frame_size = options.max_frame_size
    return dataclasses.replace(
        options,
        testee=True,
        room_protocol=False,
        max_message_size=max(options.max_message_size, TESTEE_MESSAGE_SIZE),
        max_frame_size=None if frame_size is None else max(frame_size, TESTEE_MESSAGE_SIZE),
        max_fragments=max(options.max_fragments, TESTEE_MAX_FRAGMENTS),
        max_send_buffer=max(options.max_send_buffer, TESTEE_SEND_BUFFER),
        rate_limit=0,
        ping_interval=0,
        ping_timeout=None,
    )


def echo(client: Client) -> None:
    """The ``connection`` handler of the testee: send every message back as it came (text as text)."""
    client.on("message", client.send)


def install_echo(server: WebSocketServer) -> None:
    """Make ``server`` echo every message of every client."""
    server.on("connection", echo)
