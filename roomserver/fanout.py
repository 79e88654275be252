"""The broadcast hot path: one message, framed once, written to every open member of a room.

The message was encoded once (orjson) and framed once (``factory.prepareMessage``) by the caller. What is left
per recipient is the write of the same frame bytes, and this module keeps it to that: no Autobahn
``sendPreparedMessage``/``sendData`` (which evaluate a debug log line's arguments, colour-highlighted type
names included, on every call, and keep traffic statistics nobody reads), no property calls. The bytes go to
the connection's transport, ``transport.GuardedConnection``, so the send-buffer watch (slow-consumer
detection) and the write batching there see every byte exactly as before.

A connection that negotiated permessage-deflate, or whose Autobahn send queue holds data (chopped or
synchronous sends, never used by roomserver but possible), goes through ``sendPreparedMessage``: compression
is per connection and the queue's order must be kept. docs/performance.md measures what this saves.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol

STATE_OPEN = WebSocketProtocol.STATE_OPEN  # compared directly: a property call per member costs more


def send_prepared(protocol: Any, prepared: Any) -> None:
    """Send ``prepared`` (an Autobahn ``PreparedMessage``) on an open ``protocol``: its frame bytes straight to
    the transport, unless the connection compresses or Autobahn holds queued sends (then Autobahn's own path)."""
    if protocol._perMessageCompress is None and not protocol.send_queue:
        protocol.transport.write(prepared.payloadHybi)
    else:
        protocol.sendPreparedMessage(prepared)
