"""Subscription churn on the Redis broker: 10,000 rooms joined and left leave no subscription, no per-room state
and no Redis key behind (no chat was sent, so there is no history either)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from roomserver.redislink import RedisLink, RedisURL

from .redis_support import REDIS_URL, delete_prefix, scan, unique_prefix
from .support import aio, url_of

ROOMS = 10_000


async def churn(url: str) -> None:
    import websockets

    async with websockets.connect(url, ping_interval=None, max_size=None) as ws:
        await ws.recv()  # welcome
        for start in range(0, ROOMS, 100):  # pipelined in batches: 100 joins, then their 100 leaves
            names = [f"churn-{i}" for i in range(start, start + 100)]
            for name in names:
                await ws.send(json.dumps({"type": "join", "room": name}))
            for name in names:
                await ws.send(json.dumps({"type": "leave", "room": name}))
            for _ in range(200):
                reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
                # A join still waiting for the room's baseline when its leave came is answered not_in_room.
                assert reply["type"] in ("joined", "left") or reply.get("code") == "not_in_room", reply


@pytest_twisted.ensureDeferred
async def test_ten_thousand_rooms_created_and_emptied_leave_nothing_in_redis(make_server: Any) -> None:
    prefix = unique_prefix()
    url = f"{REDIS_URL}?prefix={prefix}"
    server = await make_server(room_protocol=True, store=url, broker=url, rate_limit=0)
    link = RedisLink(RedisURL.parse(REDIS_URL), reactor, name="test")
    link.start()
    await link.when_connected(5)
    try:
        await aio(asyncio.wait_for(churn(url_of(server)), 120))
        assert len(server.registry) == 0 and server.relay.sequences == {} and server.broker.rooms == set()
        channels = await link.command("PUBSUB", "CHANNELS", prefix + "c:*")
        assert channels == [], "no room subscription is left"
        keys = sorted(key.decode()[len(prefix):] for key in await scan(link, prefix))
        node = server.broker.node_id
        sessions = [key for key in keys if key.startswith("s:")]
        assert set(keys) - set(sessions) <= {"meta", "nodes", f"n:{node}", "pnodes"}, keys
        for key in sessions:  # the closed connection's resume session: it expires with resume_ttl
            assert 0 < int(await link.command("PTTL", prefix + key)) <= server.options.resume_ttl * 1000
    finally:
        await link.stop()
        await server.stop()
        await delete_prefix(prefix)
