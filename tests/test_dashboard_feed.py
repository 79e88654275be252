"""The dashboard sampler on a fake clock: one sample per second, bounded history, no timer left behind."""

from __future__ import annotations

from twisted.internet import task

from roomserver import ServerOptions, WebSocketServer


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
