"""``RoundTrip``: RFC 6298's estimator, the ping timeout of the Redis broker's subscriber connection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomserver.core.roundtrip import RoundTrip


def test_without_a_measurement_the_timeout_is_the_floor() -> None:
    assert RoundTrip(1.5, 15.0).timeout == 1.5


def test_a_fast_lan_keeps_the_floor() -> None:
    estimate = RoundTrip(1.5, 15.0)
    for _ in range(20):
        estimate.measured(0.0003)
    assert estimate.timeout == 1.5


def test_a_two_second_link_gets_a_timeout_above_its_round_trip() -> None:
    estimate = RoundTrip(1.5, 15.0)
    estimate.measured(2.0)
    assert estimate.timeout == pytest.approx(2.0 + 4 * 1.0)  # the first sample: srtt = R, rttvar = R / 2
    for _ in range(50):
        estimate.measured(2.0)
    assert 2.0 < estimate.timeout < 2.5, "a steady round trip: the deviation decays"


def test_a_jittery_link_keeps_room_for_its_jitter() -> None:
    estimate = RoundTrip(1.5, 15.0)
    for rtt in [1.0, 3.0] * 20:
        estimate.measured(rtt)
    assert estimate.timeout > 3.0 * 1.5


def test_timeouts_double_until_an_answer_is_measured_and_the_ceiling_holds() -> None:
    estimate = RoundTrip(1.5, 15.0)
    timeouts = []
    for _ in range(5):
        estimate.timed_out()
        timeouts.append(estimate.timeout)
    assert timeouts == [3.0, 6.0, 12.0, 15.0, 15.0]
    estimate.measured(0.001)
    assert estimate.timeout == 1.5


def test_floor_and_ceiling_are_checked() -> None:
    with pytest.raises(ValueError):
        RoundTrip(0, 1)
    with pytest.raises(ValueError):
        RoundTrip(2, 1)


@given(st.lists(st.one_of(st.floats(min_value=0, max_value=100), st.none()), max_size=200))
def test_the_timeout_stays_within_floor_and_ceiling(events: list[float | None]) -> None:
    estimate = RoundTrip(1.5, 15.0)
    for rtt in events:
        if rtt is None:
            estimate.timed_out()
        else:
            estimate.measured(rtt)
        assert 1.5 <= estimate.timeout <= 15.0
