"""Draining a node: which clients are told to go, when, and how long each should wait before coming back.

A node that stops closes every client with 1001, and every client reconnects, to the other nodes. Closing a
thousand clients in one instant makes them all reconnect, resume and read history on the other nodes in the
same instant too. So a drain goes in batches: batch ``k`` (``batch_size`` clients) gets its reconnect hint at
``k * interval`` seconds, and its 1001 close ``interval / 2`` later; the hint carries a delay drawn at random
within ``interval``, so the reconnects of one batch are spread over the time until the next. The half interval
between the hint and the close is when chats the client sent before it saw the hint arrive: they are answered
(acknowledged, or refused with ``unavailable``) instead of meeting a closed connection.

``interval = 0`` is the drain of old: every client told and closed at once, no delay hinted.
Pure: no clock, no randomness of its own (the caller passes ``random``), no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DrainStep:
    """One batch: clients ``first`` to ``stop - 1`` (in the order given) get the hint at ``hint_at`` and the
    close at ``close_at``, both in seconds after the drain began."""

    index: int
    first: int
    stop: int
    hint_at: float
    close_at: float

    @property
    def size(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True)
class DrainPlan:
    """``batch_size`` clients every ``interval`` seconds."""

    batch_size: int = 100
    interval: float = 0.2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("drain_batch must be >= 1")
        if not (self.interval >= 0 and math.isfinite(self.interval)):
            raise ValueError("drain_interval must be >= 0")

    @property
    def close_delay(self) -> float:
        """Seconds between a batch's hint and its close."""
        return self.interval / 2

    def batches(self, count: int) -> int:
        return math.ceil(count / self.batch_size) if count > 0 else 0

    def steps(self, count: int) -> list[DrainStep]:
        """The batches for ``count`` clients, in order."""
        steps = []
        for index in range(self.batches(count)):
            first = index * self.batch_size
            hint_at = index * self.interval
            steps.append(DrainStep(index, first, min(first + self.batch_size, count), hint_at,
                                   hint_at + self.close_delay))
        return steps

    def duration(self, count: int) -> float:
        """Seconds from the first hint to the last close: how much a drain adds to a shutdown."""
        batches = self.batches(count)
        return 0.0 if batches == 0 else (batches - 1) * self.interval + self.close_delay

    def reconnect_after_ms(self, random: Callable[[], float]) -> int:
        """The hinted delay for one client: uniform within one interval (``random()`` in [0, 1))."""
        return int(random() * self.interval * 1000)
