"""``RoundTrip``: how long to wait for an answer before a connection is taken for dead, learned from the
answers themselves, the way TCP sets its retransmission timeout (RFC 6298).

A fixed timeout is wrong at one end or the other: short enough to notice a hung Redis connection quickly on a
LAN, it is shorter than the round trip of a slow link (a node two seconds from Redis, RELIABILITY R6), and
every connection is aborted before its first answer can arrive: the node reconnects forever and hears nothing.
So the timeout is ``srtt + 4 * rttvar`` (the smoothed round trip and its smoothed deviation), never below
``floor`` (the LAN case keeps its quick detection) nor above ``ceiling``; a timeout that fires doubles the
next one until an answer is measured again (RFC 6298's back-off), so even the first connection over a slow
link gets through. The estimate outlives connections: the path's latency does not change because a
connection was replaced.
"""

from __future__ import annotations

ALPHA = 1 / 8  # RFC 6298's gains
BETA = 1 / 4
K = 4


class RoundTrip:
    """The smoothed round trip of one path and the timeout it gives (seconds)."""

    __slots__ = ("_backoff", "ceiling", "floor", "rttvar", "srtt")

    def __init__(self, floor: float, ceiling: float) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError("need 0 < floor <= ceiling")
        self.floor = floor
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._backoff = 1

    def measured(self, rtt: float) -> None:
        """An answer came ``rtt`` seconds after its question."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        self._backoff = 1

    def timed_out(self) -> None:
        """The timeout fired: wait twice as long next time (until an answer is measured)."""
        self._backoff = min(self._backoff * 2, 1 << 16)

    @property
    def timeout(self) -> float:
        base = self.floor if self.srtt is None else max(self.floor, self.srtt + K * self.rttvar)
        return min(self.ceiling, base * self._backoff)
