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


@pytest_twisted.ensureDeferred
async def test_resets_at_every_stage_leave_nothing_behind(make_server: Any) -> None:
    """RELIABILITY L3 in small (``bench/soak.py leak --resets`` runs 100,000 by hand): 1,500 connections reset
    (TCP RST) at random stages (mid-upgrade, after the welcome, with a join or a chat to a shared room in flight,
    after a leave). While they run, no room ever holds a closed connection; after, no client, room, roomserver
    object or timer is left, and the server still serves."""
    from twisted.internet import reactor, task

    server = await make_server(room_protocol=True, rate_limit=0)
    base_census = roomserver_census()
    base_calls = len(reactor.getDelayedCalls())
    dead_members: list[Any] = []

    def look() -> None:
        dead_members.extend(member for room in list(server.registry) for member in list(room.clients)
                            if not member.open)

    watch = task.LoopingCall(look)
    watch.start(0.01)
    try:
        failures = await aio(run_cycles(url_of(server), cycles=1500, concurrency=50, resets=True))
    finally:
        watch.stop()
    assert failures == 0
    assert dead_members == [], "a room held a connection that was gone"
    await eventually(lambda: not server.connections.protocols, timeout=10)
    stats = server.get_stats()
    assert (stats.connections, stats.rooms) == (0, 0)
    assert stats.messages_received > 500, "joins and chats reached the server before their resets"
    del stats
    await eventually(lambda: len(reactor.getDelayedCalls()) <= base_calls, timeout=5)
    end_census = roomserver_census()
    grown = {kind: count for kind, count in end_census.items() if count > base_census.get(kind, 0)}
    assert grown == {}, "roomserver objects outlived their connections"
    assert await aio(run_cycles(url_of(server), cycles=10, concurrency=2)) == 0, "still serving"
