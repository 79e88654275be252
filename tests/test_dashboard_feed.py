"""The dashboard sampler on a fake clock: one sample per second, bounded history, no timer left behind."""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import formatEvent

from roomserver import ServerOptions, WebSocketServer

from .support import logged_errors


def test_sampler_ticks_on_the_injected_clock_and_stops_cleanly() -> None:
    clock = task.Clock()
    server = WebSocketServer(ServerOptions(port=0, room_protocol=True), reactor=clock)
    feed = server.http.feed  # type: ignore[attr-defined]
    feed.started(server)
    assert len(feed.series.samples) == 1, "the first sample is taken at start"
    server.counters.received(100)
    clock.advance(1.0)
    server.counters.received(100)
    server.counters.received(100)
    clock.advance(1.0)
    rates = [sample.messages_in_per_s for sample in feed.series.samples]
    assert rates == [0.0, 1.0, 2.0]
    assert [sample.bytes_in_per_s for sample in feed.series.samples][-1] == 200.0
    for _ in range(400):
        clock.advance(1.0)
    assert len(feed.series.samples) == 300, "five minutes of samples, no more"
    feed.stopping(server)
    assert clock.getDelayedCalls() == [], "stopping leaves no timer behind"
    clock.advance(10.0)
    assert len(feed.series.samples) == 300


def test_a_failing_sample_does_not_stop_the_sampler() -> None:
    """A bare LoopingCall stopped for good at the first exception: the dashboard froze while the process lived."""
    clock = task.Clock()
    server = WebSocketServer(ServerOptions(port=0, room_protocol=True), reactor=clock)
    feed = server.http.feed  # type: ignore[attr-defined]
    feed.started(server)
    read = feed.read
    feed.read = lambda: 1 / 0
    with logged_errors() as errors:
        clock.advance(1.0)
    assert len(errors) == 1 and "sample the dashboard" in formatEvent(errors[0])
    feed.read = read
    clock.advance(1.0)
    assert len(feed.series.samples) == 2, "sampled again on schedule"
    feed.stopping(server)
