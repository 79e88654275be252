"""A member's ``joined`` in a cluster is a promise: every chat sent after it reaches the member.

A node that gets its first member of a room subscribes to the room and reads the room's last seq (its baseline)
from the store; messages after the baseline are delivered. When both the subscription and the read reach Redis
late (a slow link, a reconnecting connection) and the ``joined`` reply went out at once, chats sent after it
could be appended before the read: they were below the baseline and missed by the subscription, so the member
never got them (seen once in 140 runs of the Redis restart test). Node B here reaches Redis through a proxy
with half a second of latency each way; node A directly. The ``joined`` must wait for the baseline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest_twisted

from .cluster_support import Member, publish
from .fault_proxy import FaultProxy, Faults
from .support import WSClient, aio, url_of


@pytest_twisted.ensureDeferred
async def test_chats_sent_after_joined_reach_a_member_whose_node_is_slow_to_read_its_baseline(
        make_server: Any, proxied_redis: FaultProxy) -> None:
    direct = f"redis://127.0.0.1:{proxied_redis.upstream[1]}/0"
    a = await make_server(room_protocol=True, store=direct, broker=direct, rate_limit=0)
    b = await make_server(room_protocol=True, store=proxied_redis.url, broker=proxied_redis.url, rate_limit=0)
    proxied_redis.faults = Faults(latency=0.5)

    loop = asyncio.get_running_loop()
    first = await WSClient.connect(url_of(b))
    await first.recv()
    asked = loop.time()
    assert (await first.request({"type": "join", "room": "baseline"}))["type"] == "joined"
    assert loop.time() - asked >= 1.0, "the first joined waited for the baseline (a round trip of 1 s)"

    # A second member of the room on node B: the baseline is known, its ``joined`` comes at once.
    member = Member([url_of(b)], "baseline", 20)
    asked = loop.time()
    listening = asyncio.ensure_future(member.run())
    await aio(asyncio.wait_for(member.ready.wait(), 10))
    assert loop.time() - asked < 0.5

    # Sent only now that the members hold their ``joined``: every one must reach both.
    acked = await aio(asyncio.wait_for(publish(url_of(a), "baseline", [f"m{i}" for i in range(1, 21)]), 10))
    assert sorted(acked.values()) == list(range(1, 21))
    await aio(asyncio.wait_for(listening, 15))
    assert member.texts == [f"m{i}" for i in range(1, 21)]
    assert [(await first.recv())["seq"] for _ in range(20)] == list(range(1, 21))
    await first.close()
