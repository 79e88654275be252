"""RELIABILITY R3: a node paused under load is dropped by Redis for its pub/sub output buffer; once it runs
again it notices, resubscribes and fetches what its members missed: no undetected gap.

Two ``twistd roomserver`` nodes on a dedicated ``redis-server`` whose pub/sub output buffer limit is small
(512 KiB hard), so a pause of a second or two under load is enough (the matrix's 70 s at Redis's default
32 MB is the same event, later). Node B is frozen with SIGSTOP while a publisher on node A keeps sending 2 KiB
chats; Redis closes B's subscriber connection once the chats queued for it pass the limit; then B gets
SIGCONT. This happens three times in one run; nothing is published after the last, so only the node's own
catch-up after it resubscribes can bring its members the chats of that pause (a later chat would reveal the
gap anyway). Members on B must get every seq once, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest_twisted

from bench.workers import socket_inodes

from .cluster_support import Member, Node, publish
from .redis_support import RedisServer
from .support import aio, eventually

PAUSES = 3
PADDING = "x" * 16384


def pubsub_ports(redis: RedisServer) -> set[int]:
    """The client-side ports of Redis's pub/sub connections."""
    listing = subprocess.run(["redis-cli", "-p", str(redis.port), "CLIENT", "LIST", "TYPE", "pubsub"],
                             capture_output=True, text=True, check=True, timeout=10).stdout
    return {int(field.rsplit(":", 1)[1]) for line in listing.splitlines() for field in line.split()
            if field.startswith("addr=")}


def ports_towards(pid: int, remote_port: int) -> set[int]:
    """The local ports of process ``pid``'s TCP connections to ``remote_port`` on this machine (from /proc)."""
    inodes = socket_inodes(pid)
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest_twisted.ensureDeferred
async def test_a_paused_node_dropped_for_its_pubsub_buffer_notices_and_its_members_miss_nothing(
        tmp_path: Path) -> None:
    redis = RedisServer(tmp_path, False, "--client-output-buffer-limit", "pubsub 512kb 512kb 0")
    redis.start()
    url = f"{redis.url}?prefix=pause:"
    nodes = [Node(url, tmp_path, f"node{i}", "--history-size", "100000").start() for i in range(2)]
    frozen = False
    try:
        for node in nodes:
            node.wait()
        a, b = nodes
        assert b.process is not None
        members = [Member([b.url], "paused", 10**9) for _ in range(2)]  # the count is known at the end
        tasks = [asyncio.ensure_future(member.run()) for member in members]
        await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 10))
        acked: dict[str, int] = {}

        def b_subscribed() -> bool:
            assert b.process is not None
            return bool(pubsub_ports(redis) & ports_towards(b.process.pid, redis.port))

        await eventually(b_subscribed, timeout=10)

        async def send(count: int) -> None:
            texts = [f"m{len(acked) + i}" for i in range(1, count + 1)]
            acked.update(await publish(a.url, "paused", texts, window=100, padding=PADDING))

        for pause in range(1, PAUSES + 1):
            await aio(send(100))
            os.kill(b.process.pid, signal.SIGSTOP)
            frozen = True
            # The chats queued for the frozen node fill its socket buffers, then Redis's output buffer for it,
            # and past 512 KiB Redis drops its subscriber.
            for _ in range(40):
                await aio(send(100))
                if not b_subscribed():
                    break
            assert not b_subscribed(), "Redis dropped the frozen node's subscriber"
            if pause == PAUSES:
                # Nothing is published after the last pause: no later chat reveals the gap, so the members
                # get the chats of the pause only if the node notices the drop and catches up by itself.
                for member in members:
                    member.expect = len(acked)
            os.kill(b.process.pid, signal.SIGCONT)
            frozen = False
            await eventually(b_subscribed, timeout=10)  # resubscribed
        await aio(asyncio.wait_for(asyncio.gather(*tasks), 60))

        assert sorted(acked.values()) == list(range(1, len(acked) + 1))
        expected = [text + PADDING for text, _ in sorted(acked.items(), key=lambda item: item[1])]
        for member in members:
            assert member.texts == expected, "every seq once, in order (Member checks each on arrival)"
        status, health = b.health()
        assert status == 200 and health["broker"]["resubscriptions"] >= PAUSES + 1
        assert health["broker"]["outages"] >= PAUSES
    finally:
        if frozen and nodes[1].process is not None:
            os.kill(nodes[1].process.pid, signal.SIGCONT)
        for node in nodes:
            node.stop()
        redis.stop()
    for node in nodes:
        assert not node.tracebacks(), node.tracebacks()
