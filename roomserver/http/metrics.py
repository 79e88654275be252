"""``/metrics``: the server's numbers in the Prometheus text format, from a registry of its own.

Each ``WebSocketServer`` gets its own ``CollectorRegistry`` (never prometheus_client's global one), so several
servers in one process, as in the tests, never mix their numbers. Totals that the hub already counts
(connections, rooms, messages, bytes, drops, error replies) are read from ``server.get_stats()`` at scrape time
by a custom collector: nothing is counted twice and the broadcast path pays nothing for them. What the hub does
not count is fed by the observer hooks: failed handshakes by reason, opened and closed connections, and the
broadcast latency histogram (one observation per broadcast, not per recipient). The cyclic garbage collector's
pauses (``roomserver.heap``) are timed while the server runs: a full collection stops the reactor, and this is
where an operator sees it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource

from ..heap import GENERATIONS, GCPauses
from ..observe import ServerObserver, handshake_failure_reason

if TYPE_CHECKING:
    from ..client import Client
    from ..core.rooms import Room
    from ..server import WebSocketServer
    from ..websocket import RoomServerProtocol

# From 10 microseconds (a small room) to 1 second (something is very wrong).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
# A young-generation collection takes tens of microseconds; a full one over a large heap, hundreds of milliseconds.
GC_PAUSE_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


class StatsCollector:
    """Reads ``get_stats()`` at each scrape and exposes it as Prometheus metrics."""

    def __init__(self, server: WebSocketServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        from .. import __version__

        stats = self._server.get_stats()
        info = InfoMetricFamily("roomserver", "roomserver build information")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily("roomserver_connections", "Open WebSocket connections", value=stats.connections)
        yield GaugeMetricFamily("roomserver_rooms", "Rooms that exist", value=stats.rooms)
        yield CounterMetricFamily("roomserver_messages_sent", "Messages delivered (one per recipient)",
                                  value=stats.messages_sent)
        yield CounterMetricFamily("roomserver_messages_received", "Messages received from clients",
                                  value=stats.messages_received)
        yield CounterMetricFamily("roomserver_bytes_sent", "Payload bytes delivered", value=stats.bytes_sent)
        yield CounterMetricFamily("roomserver_bytes_received", "Payload bytes received",
                                  value=stats.bytes_received)
        drops = CounterMetricFamily("roomserver_drops", "Connections the server dropped, by reason",
                                    labels=["reason"])
        for reason, count in sorted(stats.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        pacer = self._server.accept_pacer
        if pacer is not None:
            yield CounterMetricFamily("roomserver_accept_pauses", "Times the listening port stopped accepting "
                                      "because --accept-rate was reached", value=pacer.pauses)
            yield CounterMetricFamily("roomserver_accept_paused_seconds", "Seconds new connections waited in "
                                      "the kernel's accept queue for --accept-rate", value=pacer.paused_seconds)
        errors = CounterMetricFamily("roomserver_errors", "Error replies sent to clients, by code",
                                     labels=["code"])
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        from .health import BACKENDS, backend_health, find_backend

        up = GaugeMetricFamily("roomserver_backend_up", "1 while a backend (store, broker) is healthy, else 0 "
                               "(the node reports degraded)", labels=["backend", "kind"])
        for name in BACKENDS:
            report = backend_health(find_backend(self._server, name))
            up.add_metric([name, str(report.get("backend"))], 1 if report["ok"] else 0)
        yield up
        relay = getattr(self._server, "relay", None)
        if relay is not None and relay.clustered:
            cluster = relay.stats()
            yield CounterMetricFamily("roomserver_cluster_gap_fetches", "Missing ranges read from the store to "
                                      "keep seq order across nodes", value=cluster["gap_fetches"])
            yield CounterMetricFamily("roomserver_cluster_skipped", "Messages that left the history before this "
                                      "node could deliver them", value=cluster["skipped"])


class HeapCollector:
    """The longest collector pause per generation and how many objects are frozen, at each scrape."""

    def __init__(self, pauses: GCPauses) -> None:
        self._pauses = pauses

    def collect(self) -> Iterator[Metric]:
        longest = GaugeMetricFamily("roomserver_gc_pause_max_seconds", "Longest pause of the cyclic garbage "
                                    "collector since the server started, by generation", labels=["generation"])
        for generation in range(GENERATIONS):
            longest.add_metric([str(generation)], self._pauses.longest[generation])
        yield longest
        yield GaugeMetricFamily("roomserver_gc_frozen_objects", "Objects exempted from collection (gc.freeze: "
                                "twistd freezes at start-up and after each full collection)",
                                value=gc.get_freeze_count())


class MetricsObserver(ServerObserver):
    """Counts what the hub does not: handshakes that failed, connections opened/closed, broadcast latency,
    the garbage collector's pauses."""

    def __init__(self, server: WebSocketServer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatsCollector(server))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)
        self.handshake_failures = Counter(
            "roomserver_handshake_failures", "Opening handshakes that failed, by reason", ["reason"],
            registry=self.registry,
        )
        self.opened = Counter("roomserver_connections_opened", "Connections that completed the handshake",
                              registry=self.registry)
        self.closed = Counter("roomserver_connections_closed", "Open connections that ended",
                              registry=self.registry)
        self.broadcast_latency = Histogram(
            "roomserver_broadcast_latency_seconds", "Time to frame a broadcast and write it to every member",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._observe_latency = self.broadcast_latency.observe
        GCCollector(registry=self.registry)
        gc_pause = Histogram(
            "roomserver_gc_pause_seconds", "Pauses of the cyclic garbage collector (the reactor stands still), by "
            "generation", ["generation"], buckets=GC_PAUSE_BUCKETS, registry=self.registry,
        )
        by_generation = [gc_pause.labels(str(generation)) for generation in range(GENERATIONS)]
        self.gc_pauses = GCPauses(lambda generation, seconds: by_generation[generation].observe(seconds))
        self.registry.register(HeapCollector(self.gc_pauses))  # type: ignore[arg-type]

    def started(self, server: WebSocketServer) -> None:
        self.gc_pauses.install()

    def stopping(self, server: WebSocketServer) -> None:
        self.gc_pauses.remove()

    def connection_opened(self, client: Client) -> None:
        self.opened.inc()

    def connection_closed(self, client: Client, was_clean: bool) -> None:
        self.closed.inc()

    def handshake_failed(self, protocol: RoomServerProtocol) -> None:
        self.handshake_failures.labels(handshake_failure_reason(protocol)).inc()

    def broadcast_done(self, room: Room, recipients: int, seconds: float) -> None:
        self._observe_latency(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsPage(Resource):
    """``GET /metrics``: the Prometheus text exposition format."""

    isLeaf = True

    def __init__(self, metrics: MetricsObserver) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()
