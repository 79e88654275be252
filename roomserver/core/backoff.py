"""Reconnect delays: exponential backoff with jitter, shared by the Python client and (in JavaScript, same
formula) roomserver.js.

Retry ``attempt`` (0-based) waits a random time between ``min_delay / 2`` and ``min(max_delay, min_delay *
factor ** attempt)``: the cap grows exponentially, and the randomness spreads a crowd of clients that lost the
same server over the whole window instead of having them all come back in the same instant (a reconnect storm).
The random source is an argument, so the delays are exactly testable.
"""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(
    attempt: int, random: Callable[[], float], min_delay: float = 0.25, max_delay: float = 10.0, factor: float = 2.0
) -> float:
    """The delay in seconds before retry number ``attempt``; ``random()`` returns a float in [0, 1)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0 < min_delay <= max_delay or factor < 1:
        raise ValueError("need 0 < min_delay <= max_delay and factor >= 1")
    cap = min(max_delay, min_delay * factor ** min(attempt, 64))
    floor = min_delay / 2
    return floor + random() * (cap - floor)
