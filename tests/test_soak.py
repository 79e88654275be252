"""The short CI version of bench/soak.py's leak soak: connect/join/chat/leave/disconnect cycles at 50
concurrent clients leave no client, room, roomserver object or timer behind."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from bench.soak import roomserver_census, run_cycles

from .support import aio, eventually, url_of


@pytest_twisted.ensureDeferred
async def test_churn_leaves_nothing_behind(make_server: Any) -> None:
    from twisted.internet import reactor

    server = await make_server(room_protocol=True, rate_limit=0)
    base_census = roomserver_census()
    base_calls = len(reactor.getDelayedCalls())
    failures = await aio(run_cycles(url_of(server), cycles=1500, concurrency=50))
    assert failures == 0
    await eventually(lambda: not server.connections.protocols, timeout=10)
    stats = server.get_stats()
    assert (stats.connections, stats.rooms, stats.messages_received) == (0, 0, 1500 * 3)
    del stats
    await eventually(lambda: len(reactor.getDelayedCalls()) <= base_calls, timeout=5)
    end_census = roomserver_census()
    grown = {kind: count for kind, count in end_census.items() if count > base_census.get(kind, 0)}
    assert grown == {}, "roomserver objects outlived their connections"
