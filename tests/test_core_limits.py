"""Unit tests of the pure limit logic: token bucket, flood guard, error budget, the steady clock and origin policy
(fake time, no sockets)."""

from __future__ import annotations

import pytest

from roomserver.core.clock import SteadyClock
from roomserver.core.origins import OriginPolicy
from roomserver.core.ratelimit import ErrorBudget, FloodGuard, TokenBucket, Verdict
from roomserver.core.sessions import SessionTable


def test_token_bucket_refills_at_its_rate_up_to_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1) and not bucket.take(0.1)
    assert sum(bucket.take(100.0) for _ in range(10)) == 5, "idle time never stores more than capacity"


def test_token_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1, capacity=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0), "going back gives no tokens"
    assert bucket.take(6.0), "and time counts again from there, not only once past 10"


class SteppedWallClock:
    """A wall clock the test sets (and steps back)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.reading = start

    def __call__(self) -> float:
        return self.reading


def test_a_steady_clock_counts_a_step_back_as_no_time_and_goes_on_from_there() -> None:
    wall = SteppedWallClock()
    clock = SteadyClock(wall)
    start = clock()
    wall.reading += 30
    assert clock() == start + 30
    wall.reading -= 3600  # stepped back an hour
    assert clock() == start + 30
    wall.reading += 5
    assert clock() == start + 35
    wall.reading += 7200  # and forward two
    assert clock() == start + 7235


def test_limits_and_sessions_on_a_steady_clock_survive_the_wall_clock_stepping_back() -> None:
    """On the wall clock a client sending at a tenth of its limit was closed with 1008 70 s after a step back,
    one whose errors were rare was closed at its next error, and a session closed after the step outlived its
    ttl by the hour."""
    wall = SteppedWallClock()
    clock = SteadyClock(wall)
    guard = FloodGuard(rate=100, burst=200, flood_factor=3, now=clock())
    budget = ErrorBudget(limit=3, window=10)
    sessions = SessionTable(ttl=120)
    assert budget.spend(clock()) and budget.spend(clock() + 0)  # two errors, long apart below
    for tick in range(1200):  # 10 messages a second for 120 s; the clock steps back an hour at 30 s
        wall.reading += 0.1
        if tick == 300:
            wall.reading -= 3600
        assert guard.check(clock()) is Verdict.ALLOW, tick
    assert budget.spend(clock()), "the third error, 120 s after the first two, is within the budget"
    sessions.attach("token", "client")
    sessions.detach("token", clock())
    wall.reading += 121
    assert sessions.peek("token", clock()) is None, "expired after its ttl"


def simulate(rate_limit: float, sending_rate: float, seconds: float, flood_factor: float = 3) -> list[Verdict]:
    guard = FloodGuard(rate_limit, burst=rate_limit, flood_factor=flood_factor, now=0.0)
    verdicts = []
    for i in range(int(sending_rate * seconds)):
        verdict = guard.check(i / sending_rate)
        verdicts.append(verdict)
        if verdict is Verdict.CLOSE:
            break
    return verdicts


def test_within_the_limit_everything_is_allowed() -> None:
    assert set(simulate(rate_limit=10, sending_rate=9, seconds=60)) == {Verdict.ALLOW}


def test_twice_the_limit_drops_but_never_closes() -> None:
    verdicts = simulate(rate_limit=10, sending_rate=20, seconds=60)
    assert Verdict.CLOSE not in verdicts
    allowed = verdicts.count(Verdict.ALLOW)
    assert 600 <= allowed <= 600 + 10 + 1, "the sustained rate is the limit (plus the initial burst)"


def test_several_times_the_limit_closes_within_seconds() -> None:
    verdicts = simulate(rate_limit=10, sending_rate=50, seconds=60)
    assert verdicts[-1] is Verdict.CLOSE
    assert len(verdicts) / 50 < 2.0, "a 5x flood is closed within two seconds"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("null", False),
        ("", False),
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://app.example.com:443", False),
        ("https://app.example.com.evil.com", False),
        ("https://evil.com/https://app.example.com", False),
        ("https://xapp.example.com", False),
        ("http://app.example.com", False),
        ("https://eu.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),
        ("https://example.org.evil.net", False),
        ("https://evil.net/.example.org", False),
        ("http://localhost:3000", True),
        ("http://localhost:3001", False),
    ],
)
def test_origin_patterns_match_whole_origins(origin: str | None, allowed: bool) -> None:
    policy = OriginPolicy(["https://app.example.com", "https://*.example.org", "http://localhost:3000"])
    assert policy.allows(origin, "server.example.com") is allowed


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://chat.example.com", "chat.example.com", True),
        ("https://chat.example.com", "chat.example.com", True),
        ("http://chat.example.com:8080", "chat.example.com:8080", True),
        ("https://chat.example.com:8080", "chat.example.com:8080", True),
        ("http://chat.example.com:8081", "chat.example.com:8080", False),
        ("http://chat.example.com", "chat.example.com:8080", False),
        ("http://chat.example.com:8080", "chat.example.com", False),
        ("http://evil.com", "chat.example.com", False),
        ("http://chat.example.com.evil.com", "chat.example.com", False),
        ("http://chat.example.com", None, False),
        ("ftp://chat.example.com", "chat.example.com", False),
        ("http://chat.example.com/path", "chat.example.com", False),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://chat.example.com:99999", "chat.example.com", False),
    ],
)
def test_default_policy_is_same_origin(origin: str, host: str | None, allowed: bool) -> None:
    assert OriginPolicy().allows(origin, host) is allowed


def test_star_allows_every_origin_but_null() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows("https://anything.example", "h")
    assert not policy.allows("null", "h")


def test_the_server_measures_limits_and_sessions_on_a_steady_clock() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from roomserver import ServerOptions, WebSocketServer

    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    server = WebSocketServer(ServerOptions(port=0, room_protocol=True), reactor=reactor)
    before = server.steady_seconds()
    reactor.advance(-3600)  # the system clock set back an hour
    assert server.steady_seconds() == before
    assert server.room_protocol is not None and server.room_protocol._clock is server.steady_seconds
