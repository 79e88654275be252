"""Server counters and their snapshot, ``ServerStats``.

``ServerStats`` compares on the four fields of the seed API (connections, rooms, messages_sent,
messages_received) so ``get_stats() == ServerStats(1, 1, 1, 2)`` reads as the seed's example does; the extra
counters ride along with ``compare=False``.

``messages_sent`` counts deliveries: one per message per recipient. ``messages_received`` counts data messages
received from clients (pings and pongs are not messages).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class ServerStats:
    connections: int
    rooms: int
    messages_sent: int
    messages_received: int
    bytes_sent: int = field(default=0, compare=False)
    bytes_received: int = field(default=0, compare=False)
    drops: Mapping[str, int] = field(default_factory=dict, compare=False)
    errors: Mapping[str, int] = field(default_factory=dict, compare=False)


class StatsCounters:
    """Mutable counters owned by one server; ``snapshot`` freezes them together with the room count."""

    __slots__ = ("bytes_received", "bytes_sent", "connections", "drops", "errors", "messages_received",
                 "messages_sent")

    def __init__(self) -> None:
        self.connections = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.drops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def connected(self) -> None:
        self.connections += 1

    def disconnected(self) -> None:
        self.connections -= 1

    def received(self, size: int) -> None:
        self.messages_received += 1
        self.bytes_received += size

    def sent(self, size: int, recipients: int = 1) -> None:
        self.messages_sent += recipients
        self.bytes_sent += size * recipients

    def dropped(self, reason: str) -> None:
        """A connection the server closed for a reason of its own (slow consumer, flood, heartbeat...)."""
        self.drops[reason] += 1

    def error(self, code: str) -> None:
        """An error reply sent to a client."""
        self.errors[code] += 1

    def snapshot(self, rooms: int) -> ServerStats:
        return ServerStats(
            connections=self.connections,
            rooms=rooms,
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            drops=MappingProxyType(dict(self.drops)),
            errors=MappingProxyType(dict(self.errors)),
        )
