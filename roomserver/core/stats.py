"""Server counters and their snapshot, ``ServerStats``.

``ServerStats`` compares on the four fields of the seed API (connections, rooms, messages_sent,
messages_received) so ``get_stats() == ServerStats(1, 1, 1, 2)`` reads as the seed's example does; the extra
counters ride along with ``compare=False``.

``messages_sent`` counts deliveries: one per message per recipient. ``messages_received`` counts data messages
received from clients (pings and pongs are not messages).

``ClusterStats`` (``server.get_cluster_stats()``) is the view over every live node of a cluster: totals and one
``NodeStats`` per node, built from the reports the nodes publish with their heartbeats (docs/cluster.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class ServerStats:
    connections: int
    rooms: int
    messages_sent: int
    messages_received: int
    bytes_sent: int = field(default=0, compare=False)
    bytes_received: int = field(default=0, compare=False)
    drops: Mapping[str, int] = field(default_factory=dict, compare=False)
    errors: Mapping[str, int] = field(default_factory=dict, compare=False)


class StatsCounters:
    """Mutable counters owned by one server; ``snapshot`` freezes them together with the room count."""

    __slots__ = ("bytes_received", "bytes_sent", "connections", "drops", "errors", "messages_received",
                 "messages_sent")

    def __init__(self) -> None:
        self.connections = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.drops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def connected(self) -> None:
        self.connections += 1

    def disconnected(self) -> None:
        self.connections -= 1

    def received(self, size: int) -> None:
        self.messages_received += 1
        self.bytes_received += size

    def sent(self, size: int, recipients: int = 1) -> None:
        self.messages_sent += recipients
        self.bytes_sent += size * recipients

    def dropped(self, reason: str) -> None:
        """A connection the server closed for a reason of its own (slow consumer, flood, heartbeat...)."""
        self.drops[reason] += 1

    def error(self, code: str) -> None:
        """An error reply sent to a client."""
        self.errors[code] += 1

    def snapshot(self, rooms: int) -> ServerStats:
        return ServerStats(
            connections=self.connections,
            rooms=rooms,
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            drops=MappingProxyType(dict(self.drops)),
            errors=MappingProxyType(dict(self.errors)),
        )


# -- the cluster view ------------------------------------------------------------------------------------------
#
# ``get_stats()`` stays per node (the seed's shape and equality). ``get_cluster_stats()`` adds a view over every
# live node, built from the reports the nodes publish with their heartbeats (roomserver/broker/redis.py) or, on
# one node, from this node's own counters. The functions here only turn those reports into typed values.

NODE_OK = "ok"
NODE_DEGRADED = "degraded"
NODE_DRAINING = "draining"  # stopping: closing its clients in batches (they resume on the other nodes)


@dataclass(frozen=True)
class NodeStats:
    """One node's part of the cluster view, as the node reported it at its last heartbeat.

    ``messages_in_per_s``/``messages_out_per_s`` are measured by the node over its last heartbeat interval;
    ``None`` where nothing measured them (one node without a cluster). ``status`` is ``"ok"``, ``"draining"``
    (the node is stopping) or ``"degraded"`` (the node's own health said so, or its heartbeat is late);
    ``age`` is how old the report was when the view was read, in seconds.
    """

    node: str
    connections: int
    rooms: int
    messages_sent: int
    messages_received: int
    messages_in_per_s: float | None = None
    messages_out_per_s: float | None = None
    status: str = NODE_OK
    address: str = ""
    local: bool = False
    age: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == NODE_OK

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "address": self.address, "local": self.local, "status": self.status,
            "connections": self.connections, "rooms": self.rooms, "messages_sent": self.messages_sent,
            "messages_received": self.messages_received, "messages_in_per_s": _rounded(self.messages_in_per_s),
            "messages_out_per_s": _rounded(self.messages_out_per_s), "age": round(self.age, 3),
        }


@dataclass(frozen=True)
class ClusterStats:
    """Connections, rooms and messages over every live node, and each node's own figures.

    ``rooms`` counts distinct rooms with a member on any node (a room spanning two nodes counts once); the
    other totals are sums over ``nodes``. ``clustered`` is False with the memory broker: then ``nodes`` holds
    this node alone, read live. ``as_of`` is when the view was read from Redis (``None``: not read yet, or one
    node), on the reactor's clock.
    """

    clustered: bool
    node: str
    nodes: tuple[NodeStats, ...]
    connections: int
    rooms: int
    messages_sent: int
    messages_received: int
    messages_in_per_s: float | None = None
    messages_out_per_s: float | None = None
    as_of: float | None = None

    @property
    def ok(self) -> bool:
        return all(node.ok for node in self.nodes)

    def get(self, node: str) -> NodeStats | None:
        """The entry of node ``node`` (its id), if it is live."""
        return next((entry for entry in self.nodes if entry.node == node), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "clustered": self.clustered, "node": self.node, "nodes": [entry.as_json() for entry in self.nodes],
            "totals": {
                "nodes": len(self.nodes), "connections": self.connections, "rooms": self.rooms,
                "messages_sent": self.messages_sent, "messages_received": self.messages_received,
                "messages_in_per_s": _rounded(self.messages_in_per_s),
                "messages_out_per_s": _rounded(self.messages_out_per_s),
            },
            "as_of": None if self.as_of is None else round(self.as_of, 3),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _number(value: Any, kind: type[int] | type[float] = int) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        return kind(0)


def _sum_rates(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def node_from_report(report: Mapping[str, Any], local_node: str, now: float | None = None,
                     late_after: float | None = None) -> NodeStats:
    """A node's heartbeat report (a JSON object another version of the server may have written) -> NodeStats.

    Missing or malformed numbers read as 0 rather than hide the node. A report whose ``heartbeat`` is more
    than ``late_after`` seconds older than ``now`` is ``degraded``: the node is still in the view (its entry
    has not expired) but has stopped reporting.
    """
    node = str(report.get("node", ""))
    reported = report.get("status", NODE_OK)
    status = reported if reported in (NODE_OK, NODE_DRAINING) else NODE_DEGRADED
    heartbeat = report.get("heartbeat")
    age = max(0.0, now - _number(heartbeat, float)) if now is not None and heartbeat is not None else 0.0
    if late_after is not None and age > late_after:
        status = NODE_DEGRADED
    rate_in, rate_out = report.get("messages_in_per_s"), report.get("messages_out_per_s")
    return NodeStats(
        node=node,
        connections=_number(report.get("connections")),
        rooms=_number(report.get("rooms")),
        messages_sent=_number(report.get("messages_sent")),
        messages_received=_number(report.get("messages_received")),
        messages_in_per_s=None if rate_in is None else _number(rate_in, float),
        messages_out_per_s=None if rate_out is None else _number(rate_out, float),
        status=status,
        address=str(report.get("address", "")),
        local=node == local_node,
        age=age,
    )


def cluster_from_view(reports: Iterable[Mapping[str, Any]], distinct_rooms: int, local_node: str,
                      as_of: float | None, late_after: float | None = None) -> ClusterStats:
    """The live nodes' reports (and the count of distinct rooms over them) -> ClusterStats, nodes by id."""
    nodes = tuple(sorted((node_from_report(report, local_node, as_of, late_after) for report in reports),
                         key=lambda entry: entry.node))
    return ClusterStats(
        clustered=True,
        node=local_node,
        nodes=nodes,
        connections=sum(entry.connections for entry in nodes),
        rooms=distinct_rooms,
        messages_sent=sum(entry.messages_sent for entry in nodes),
        messages_received=sum(entry.messages_received for entry in nodes),
        messages_in_per_s=_sum_rates(entry.messages_in_per_s for entry in nodes),
        messages_out_per_s=_sum_rates(entry.messages_out_per_s for entry in nodes),
        as_of=as_of,
    )


def single_node(stats: ServerStats, node: str, address: str = "", status: str = NODE_OK,
                clustered: bool = False) -> ClusterStats:
    """The view of a node that is alone (memory broker), or that has not read the cluster view yet."""
    entry = NodeStats(node=node, connections=stats.connections, rooms=stats.rooms,
                      messages_sent=stats.messages_sent, messages_received=stats.messages_received,
                      status=status, address=address, local=True)
    return ClusterStats(clustered=clustered, node=node, nodes=(entry,), connections=stats.connections,
                        rooms=stats.rooms, messages_sent=stats.messages_sent,
                        messages_received=stats.messages_received)


class RateMeter:
    """Messages in and out per second between consecutive readings of the counters (told the time)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[float, int, int] | None = None

    def update(self, now: float, received: int, sent: int) -> tuple[float, float]:
        """Rates since the previous reading (0.0 at the first, or if the clock did not move)."""
        last, self._last = self._last, (now, received, sent)
        if last is None or now <= last[0]:
            return 0.0, 0.0
        seconds = now - last[0]
        return max(0, received - last[1]) / seconds, max(0, sent - last[2]) / seconds
