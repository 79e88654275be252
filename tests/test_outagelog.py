"""``OutageLog``: a store outage is one warning line per kind of failure and interval, without a traceback;
anything that is not a ``StoreError`` keeps its traceback every time."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure

from roomserver.interfaces import StoreError
from roomserver.outagelog import OutageLog


def capture() -> tuple[Logger, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return Logger(observer=events.append), events


def failure_of(error: Exception) -> Failure:
    try:
        raise error
    except Exception:
        return Failure()


def test_a_thousand_store_failures_in_one_interval_make_one_line_then_a_count() -> None:
    log, events = capture()
    clock = Clock()
    outages = OutageLog(log, clock, interval=5.0)
    for i in range(1000):
        outages.failed("could not store a message for room {room}", failure_of(StoreError("redis is away")),
                       room=f"r{i}")
        clock.advance(0.001)
    assert len(events) == 1
    assert events[0]["log_level"] == LogLevel.warn and "log_failure" not in events[0]
    assert formatEvent(events[0]) == "could not store a message for room r0: redis is away"

    clock.advance(5.0)
    outages.failed("could not store a message for room {room}", failure_of(StoreError("redis is away")), room="x")
    assert len(events) == 2
    assert formatEvent(events[1]) == "could not store a message for room x: redis is away (999 more like it in " \
                                     "the last 6 s)"


def test_each_kind_of_failure_has_its_own_interval() -> None:
    log, events = capture()
    outages = OutageLog(log, Clock())
    outages.failed("could not store a message for room {room}", failure_of(StoreError("down")), room="a")
    outages.failed("could not read the history of room {room}", failure_of(StoreError("down")), room="a")
    outages.failed("could not store a message for room {room}", failure_of(StoreError("down")), room="b")
    assert [formatEvent(e) for e in events] == ["could not store a message for room a: down",
                                                "could not read the history of room a: down"]


def test_a_bug_keeps_its_traceback_every_time() -> None:
    log, events = capture()
    outages = OutageLog(log, Clock())
    for _ in range(3):
        outages.failed("could not store a message for room {room}", failure_of(KeyError("oops")), room="a")
    assert len(events) == 3
    assert all(event["log_level"] == LogLevel.critical and event["log_failure"].check(KeyError) for event in events)
