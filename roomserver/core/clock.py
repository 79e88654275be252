"""A clock for measuring intervals off a wall clock that can be stepped back.

Twisted's ``reactor.seconds()`` is ``time.time()``: an administrator or NTP setting the system clock back by an
hour makes it read an hour earlier. Everything here that measures intervals (the token buckets of the rate
limits, the error budget's window, the resume sessions' expiry) compares readings: one taken after such a step
lies before the ones taken just ahead of it, so a bucket would refill nothing for an hour (a client sending at a
tenth of its limit was closed with 1008 within 70 s), an error budget's window would hold errors of "the future",
and a session closed after the step would outlive its ttl by the hour. ``SteadyClock`` reads the wall clock but
never goes back: a step back counts as no time passing, forward time counts as it comes. (A step forward is time
passing for these purposes: buckets refill, sessions expire, which errs on the side of the client.)
"""

from __future__ import annotations

from collections.abc import Callable


class SteadyClock:
    """``clock()`` reads ``source`` (seconds) made non-decreasing; it starts at ``source``'s first reading."""

    __slots__ = ("_last_reading", "_now", "_source")

    def __init__(self, source: Callable[[], float]) -> None:
        self._source = source
        self._last_reading = self._now = source()

    def __call__(self) -> float:
        reading = self._source()
        if reading > self._last_reading:
            self._now += reading - self._last_reading
        self._last_reading = reading  # stepped back: count on from here, without going back
        return self._now
