"""RELIABILITY R6: a slow, lossy link between the nodes and Redis (toxiproxy's latency and loss, here
``tests/fault_proxy.py``): every member sees every seq of its room exactly once, in order.

Two nodes (in this process) reach a dedicated ``redis-server`` only through the fault proxy, for both the store
and the broker. Members on both nodes, a publisher that sends again what a node refused with ``unavailable``
(the same ``msg_id``, so a chat stored before its reply was lost is stored once). While it publishes, the link
gets the matrix's two-second round trip (with jitter), 30 % loss (retransmission stalls), replies cut into
five-byte pieces, and every connection to Redis is reset twice. A node's subscriber connection must learn that
round trip (a fixed 1.5 s ping timeout aborted every connection before its first pong, and the node never
heard the other again), and a connection lost before Redis answered its SELECT must be retried (Twisted's
ClientService stayed "connecting" for ever).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest_twisted

from roomserver import WebSocketServer

from .cluster_support import Member, RetryingPublisher
from .fault_proxy import FaultProxy, Faults
from .support import aio, eventually, logged_errors, url_of


@pytest_twisted.ensureDeferred
async def test_a_slow_lossy_link_to_redis_keeps_every_rooms_order_without_gaps_or_duplicates(
        make_server: Any, proxied_redis: FaultProxy) -> None:
    proxy = proxied_redis
    nodes: list[WebSocketServer] = [
        await make_server(room_protocol=True, store=proxy.url, broker=proxy.url, rate_limit=0) for _ in range(2)]
    total = 100
    rooms = ("lossy-a", "lossy-b")
    members = [Member([url_of(node)], room, total) for room in rooms for node in (nodes[0], nodes[1], nodes[1])]
    tasks = [asyncio.ensure_future(member.run()) for member in members]
    await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 10))

    # The matrix's link: a two-second round trip (one second each way, give or take half a second), 30 % loss.
    proxy.faults = Faults(latency=1.0, jitter=0.5, loss=0.3, slice_to=5)
    publishers = [RetryingPublisher(url_of(nodes[i]), room, total, window=20) for i, room in enumerate(rooms)]
    with logged_errors() as problems:
        publishing = asyncio.ensure_future(asyncio.gather(*(publisher.run() for publisher in publishers)))
        for fraction in (3, 2):  # reset every Redis connection at a third and at half of the way
            await eventually(lambda f=fraction: min(len(p.acked) for p in publishers) >= total // f, timeout=60)
            assert proxy.reset_all() >= 4, "both nodes' store and subscriber connections were cut"
        await aio(asyncio.wait_for(publishing, 120))
        await aio(asyncio.wait_for(asyncio.gather(*tasks), 60))
    assert not problems, "a slow link is expected trouble: warnings, not errors"

    for publisher in publishers:
        assert sorted(publisher.acked.values()) == list(range(1, total + 1)), "one seq per chat, none twice"
    for member in members:
        expected = {seq: f"m{number}" for number, seq in publishers[rooms.index(member.room)].acked.items()}
        # Member asserts each seq is the one after the last on arrival: in order, no gap, no duplicate.
        assert member.texts == [expected[seq] for seq in range(1, total + 1)]
    assert proxy.counters.stalls > 50 and proxy.counters.resets >= 8, proxy.counters
    assert all(node.broker.health()["resubscriptions"] >= 2 for node in nodes)
    assert max(node.broker.health()["ping_timeout"] for node in nodes) > 2.0, "the round trip was learned"
