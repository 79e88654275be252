"""The dashboard's arithmetic: rates between readings, room rankings, the bounded window."""

from __future__ import annotations

import pytest

from roomserver.core.timeseries import Reading, TrafficSeries


def reading(time: float, sent: int = 0, received: int = 0, rooms: dict[str, tuple[int, int]] | None = None) -> Reading:
    rooms = rooms or {}
    return Reading(time=time, connections=3, rooms=len(rooms), messages_sent=sent, messages_received=received,
                   bytes_sent=sent * 10, bytes_received=received * 10, room_state=rooms)


def test_first_reading_has_zero_rates_then_rates_are_per_second() -> None:
    series = TrafficSeries()
    first = series.add(reading(100.0, sent=50, received=10))
    assert first.messages_out_per_s == 0 and first.messages_in_per_s == 0
    second = series.add(reading(102.0, sent=90, received=14))
    assert second.messages_out_per_s == 20 and second.messages_in_per_s == 2
    assert second.bytes_out_per_s == 200 and second.bytes_in_per_s == 20
    assert (second.messages_sent, second.messages_received) == (90, 14)


def test_counters_that_go_backwards_never_give_negative_rates() -> None:
    series = TrafficSeries()
    series.add(reading(0.0, sent=10))
    assert series.add(reading(1.0, sent=5)).messages_out_per_s == 0


def test_top_rooms_by_members_and_by_seq_growth() -> None:
    series = TrafficSeries(top=2)
    series.add(reading(0.0, rooms={"a": (5, 10), "b": (1, 100), "c": (3, 0), "gone": (2, 50)}))
    sample = series.add(reading(2.0, rooms={"a": (5, 20), "b": (1, 104), "c": (9, 0), "new": (1, 6)}))
    assert sample.top_rooms_by_members == (("c", 9), ("a", 5))
    # a: +10 in 2 s; new: 6 (counted from zero); b: +4
    assert sample.top_rooms_by_traffic == (("a", 5.0), ("new", 3.0))
    recreated = series.add(reading(3.0, rooms={"a": (1, 2)}))
    assert recreated.top_rooms_by_traffic == (("a", 2.0),), "a room whose seq restarted counts from zero"


def test_empty_rooms_are_not_ranked_by_members() -> None:
    sample = TrafficSeries().add(reading(0.0, rooms={"kept": (0, 3)}))
    assert sample.top_rooms_by_members == ()


def test_window_is_bounded_and_history_is_json_ready() -> None:
    series = TrafficSeries(capacity=3)
    for t in range(10):
        series.add(reading(float(t), sent=t))
    history = series.history()
    assert [point["time"] for point in history] == [7.0, 8.0, 9.0]
    assert history[-1]["messages_out_per_s"] == 1.0 and history[-1]["top_rooms_by_members"] == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        TrafficSeries(capacity=0)
