"""Broker backends and the ``--broker`` spec that picks one.

``memory`` (the default): one process, local delivery only. ``redis://HOST:PORT/DB``: the nodes of a cluster
exchange room messages through Redis pub/sub (docs/cluster.md); it needs the Redis store, because the seq order
every member sees is the shared store's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..interfaces import Broker
    from ..options import ServerOptions
    from ..server import WebSocketServer
    from .presence import ClusterPresence
    from .sessions import ClusterSessions

BROKER_SPECS = "memory or redis://HOST:PORT/DB"


def parse_broker_spec(spec: str, store: str) -> str:
    """Check ``spec`` (and that the store fits it); return its kind. ValueError says what is wrong."""
    if spec == "memory":
        return "memory"
    if spec.startswith("redis:"):
        from ..redislink import RedisURL

        RedisURL.parse(spec)
        if not store.startswith("redis:"):
            raise ValueError("--broker redis needs --store redis://...: every node must see the seqs the shared "
                             "store assigns")
        return "redis"
    raise ValueError(f"unknown broker {spec!r}: use {BROKER_SPECS}")


def create_broker(options: ServerOptions, reactor: Any) -> Broker:
    if parse_broker_spec(options.broker, options.store) == "redis":
        from .redis import RedisBroker

        return RedisBroker(options.broker, reactor)
    from .memory import MemoryBroker

    return MemoryBroker()


def create_cluster_presence(server: WebSocketServer, broker: Broker) -> ClusterPresence | None:
    """Presence across the nodes (roomserver/broker/presence.py) when the broker is Redis; None on one node."""
    from .redis import RedisBroker

    if not isinstance(broker, RedisBroker):
        return None
    from .presence import ClusterPresence

    return ClusterPresence(server, broker, server.options.presence_ttl)


def create_cluster_sessions(server: WebSocketServer, broker: Broker) -> ClusterSessions | None:
    """Resume sessions every node can continue (roomserver/broker/sessions.py) when the broker is Redis."""
    from .redis import RedisBroker

    if not isinstance(broker, RedisBroker):
        return None
    from .sessions import ClusterSessions

    return ClusterSessions(broker, server.options.resume_ttl)
