"""Per-client rate limiting: a token bucket that is told the time, and a flood guard built from two buckets.

``TokenBucket`` owns no clock (``now`` is passed in), so the adapters use the reactor's time and the tests a
fake one. ``FloodGuard`` decides, per message, between three outcomes:

- ``ALLOW``: within ``rate`` messages/s with bursts up to ``burst``;
- ``DROP``: over the limit; the message is dropped and the client gets error ``rate_limited``;
- ``CLOSE``: the client keeps sending at more than ``flood_factor`` times the limit; it is closed with 1008.

The second bucket counts dropped messages and refills at ``(flood_factor - 1) * rate``: a client sending at
twice the limit only ever sees ``rate_limited`` errors, while one sending at several times the limit empties it
within about ``burst / (sending_rate - flood_factor * rate)`` seconds.
"""

from __future__ import annotations

import enum


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``; starts full."""

    __slots__ = ("_last", "capacity", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a token bucket needs rate > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._last = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are enough at time ``now``."""
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self._last = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


class Verdict(enum.Enum):
    ALLOW = "allow"
    DROP = "drop"
    CLOSE = "close"


class FloodGuard:
    """The rate-limit decision for one client's messages (see the module docstring)."""

    __slots__ = ("_accepted", "_dropped")

    def __init__(self, rate: float, burst: float, flood_factor: float, now: float) -> None:
        if flood_factor <= 1:
            raise ValueError("flood_factor must be > 1")
        self._accepted = TokenBucket(rate, max(burst, 1.0), now)
        self._dropped = TokenBucket((flood_factor - 1) * rate, max(burst, 1.0), now)

    def check(self, now: float) -> Verdict:
        if self._accepted.take(now):
            return Verdict.ALLOW
        if self._dropped.take(now):
            return Verdict.DROP
        return Verdict.CLOSE
