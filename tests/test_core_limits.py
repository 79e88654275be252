"""Unit tests of the pure limit logic: token bucket, flood guard and origin policy (fake time, no sockets)."""

from __future__ import annotations

import pytest

from roomserver.core.origins import OriginPolicy
from roomserver.core.ratelimit import FloodGuard, TokenBucket, Verdict


def test_token_bucket_refills_at_its_rate_up_to_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.1) and not bucket.take(0.1)
    assert sum(bucket.take(100.0) for _ in range(10)) == 5, "idle time never stores more than capacity"


def test_token_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1, capacity=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)


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
