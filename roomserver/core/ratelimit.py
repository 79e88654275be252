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
from collections import OrderedDict, deque
from collections.abc import Hashable


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

    def available(self, now: float) -> float:
        """The tokens there are at time ``now`` (refilled for the time since the last look)."""
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        # Also when ``now`` went back (a wall clock stepped back: core/clock.py): refilling from then on, rather
        # than nothing until the clock is back past ``_last``.
        self._last = now
        return self.tokens

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are enough at time ``now``."""
        if self.available(now) >= amount:
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


class ErrorBudget:
    """How many client-caused error replies a connection may earn: fewer than ``limit`` within any ``window``
    seconds.

    A client that keeps getting errors (probing rooms it may not join, sending malformed requests in a loop) is
    either broken or hostile; answering it forever costs the server and fills logs. ``spend`` is called per
    error and says whether the client is still within its budget; the adapter closes it with 1008 when not.
    A sliding window over the times of the last ``limit`` errors (kept only once a first error came), so
    occasional mistakes spread over time never add up to a close.
    """

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("an error budget needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._times: deque[float] | None = None

    def spend(self, now: float) -> bool:
        """Count one error at ``now``; False if it is the ``limit``-th within the last ``window`` seconds."""
        times = self._times
        if times is None:
            times = self._times = deque(maxlen=self.limit)
        times.append(now)
        return len(times) < self.limit or now - times[0] >= self.window


class KeyedRateLimit:
    """One token bucket per key (a client address): ``rate`` events/s per key with bursts of ``burst``.

    Memory is bounded by ``max_keys``: the least recently used key is forgotten first. A forgotten key starts
    again with a full bucket, which only matters for a key that was quiet while ``max_keys`` others were used,
    so an attacker cannot grow the table, nor keep a key's bucket empty by rotating through other keys.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a keyed rate limit needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
