"""The dashboard's numbers: readings of the server's counters in, rates and rankings out.

A ``Reading`` is what the adapter copies out of the server at one tick (its counters and, per room, the member
count and the last assigned ``seq``). ``TrafficSeries.add`` turns consecutive readings into a ``Sample``:
messages and bytes per second in both directions, and the top rooms by members and by traffic. A room's
traffic is the growth of its ``seq`` (one per chat message published to it), so ranking rooms costs nothing on
the broadcast path. Samples are kept for a fixed number of ticks (the "last minutes" the charts show).

Everything here is pure: time is an argument, never read from a clock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reading:
    """The server's counters at one instant (``time`` in seconds, any monotonic origin)."""

    time: float
    connections: int
    rooms: int
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    drops: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    room_state: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Room name -> (members, last seq)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the dashboard's charts, plus the totals it was computed from."""

    time: float
    connections: int
    rooms: int
    messages_in_per_s: float
    messages_out_per_s: float
    bytes_in_per_s: float
    bytes_out_per_s: float
    messages_received: int
    messages_sent: int
    bytes_received: int
    bytes_sent: int
    drops: Mapping[str, int]
    errors: Mapping[str, int]
    top_rooms_by_members: tuple[tuple[str, int], ...]
    top_rooms_by_traffic: tuple[tuple[str, float], ...]

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the dashboard WebSocket's wire shape)."""
        return {
            "time": round(self.time, 3),
            "connections": self.connections,
            "rooms": self.rooms,
            "messages_in_per_s": round(self.messages_in_per_s, 3),
            "messages_out_per_s": round(self.messages_out_per_s, 3),
            "bytes_in_per_s": round(self.bytes_in_per_s, 1),
            "bytes_out_per_s": round(self.bytes_out_per_s, 1),
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "drops": dict(self.drops),
            "errors": dict(self.errors),
            "top_rooms_by_members": [{"room": name, "members": n} for name, n in self.top_rooms_by_members],
            "top_rooms_by_traffic": [
                {"room": name, "messages_per_s": round(rate, 3)} for name, rate in self.top_rooms_by_traffic
            ],
        }


def _rate(current: int, previous: int, seconds: float) -> float:
    if seconds <= 0:
        return 0.0
    return max(0, current - previous) / seconds


class TrafficSeries:
    """Consecutive readings -> samples; keeps the last ``capacity`` samples, ranks the ``top`` rooms."""

    def __init__(self, capacity: int = 300, top: int = 10) -> None:
        if capacity < 1 or top < 1:
            raise ValueError("capacity and top must be at least 1")
        self.top = top
        self.samples: deque[Sample] = deque(maxlen=capacity)
        self._previous: Reading | None = None

    def add(self, reading: Reading) -> Sample:
        previous = self._previous
        self._previous = reading
        seconds = reading.time - previous.time if previous is not None else 0.0
        if previous is None:
            previous = reading
        by_members = heapq.nlargest(
            self.top, ((name, members) for name, (members, _) in reading.room_state.items() if members),
            key=lambda item: (item[1], item[0]),
        )
        traffic: list[tuple[str, float]] = []
        if seconds > 0:
            for name, (_, seq) in reading.room_state.items():
                before = previous.room_state.get(name)
                # A room that is new, or was removed and created again, started counting from zero.
                grown = seq - before[1] if before is not None and before[1] <= seq else seq
                if grown > 0:
                    traffic.append((name, grown / seconds))
        by_traffic = heapq.nlargest(self.top, traffic, key=lambda item: (item[1], item[0]))
        sample = Sample(
            time=reading.time,
            connections=reading.connections,
            rooms=reading.rooms,
            messages_in_per_s=_rate(reading.messages_received, previous.messages_received, seconds),
            messages_out_per_s=_rate(reading.messages_sent, previous.messages_sent, seconds),
            bytes_in_per_s=_rate(reading.bytes_received, previous.bytes_received, seconds),
            bytes_out_per_s=_rate(reading.bytes_sent, previous.bytes_sent, seconds),
            messages_received=reading.messages_received,
            messages_sent=reading.messages_sent,
            bytes_received=reading.bytes_received,
            bytes_sent=reading.bytes_sent,
            drops=dict(reading.drops),
            errors=dict(reading.errors),
            top_rooms_by_members=tuple(by_members),
            top_rooms_by_traffic=tuple(by_traffic),
        )
        self.samples.append(sample)
        return sample

    def history(self) -> list[dict[str, Any]]:
        return [sample.as_json() for sample in self.samples]
