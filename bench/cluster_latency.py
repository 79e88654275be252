"""Broker latency, by hand: how long a chat takes from its sender to another member, on one node (memory
store and broker), within a Redis cluster node, and across two Redis cluster nodes.

    python -m bench.cluster_latency            # needs Redis at 127.0.0.1:6379; prints p50/p99 per setup

Starts three ``twistd roomserver`` processes on free loopback ports, sends 1,000 chats one after another (each
waits for its delivery), and deletes its Redis keys afterwards. Figures: docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[1]
TWISTD = str(Path(sys.executable).parent / "twistd")
MESSAGES = 1000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(port: int, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``twistd roomserver`` of this checkout on ``port`` (no rate limit); its output goes to ``log`` (appended,
    and the node runs in its folder) or nowhere."""
    argv = [TWISTD, "-n", "--pidfile=", "roomserver", "--port", f"tcp:{port}:interface=127.0.0.1", "--rate-limit",
            "0", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if log is None:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def wait_for(port: int) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def measure(sender_url: str, receiver_url: str) -> tuple[float, float]:
    """p50 and p99 in milliseconds of send -> delivery to another member."""
    sender = await websockets.connect(sender_url, ping_interval=None)
    receiver = await websockets.connect(receiver_url, ping_interval=None)
    for ws in (sender, receiver):
        await ws.recv()
        await ws.send(json.dumps({"type": "join", "room": "latency"}))
        await ws.recv()
    await asyncio.sleep(0.5)
    samples = []
    for i in range(MESSAGES):
        started = time.perf_counter()
        await sender.send(json.dumps({"type": "chat", "room": "latency", "text": str(i)}))
        while json.loads(await receiver.recv()).get("text") != str(i):
            pass
        samples.append((time.perf_counter() - started) * 1000)
        await sender.recv()  # the sender's own copy
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


async def main() -> None:
    prefix = f"bench-{os.getpid()}:"
    redis = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    ports = [free_port() for _ in range(3)]
    nodes = [start(ports[0], "--store", "memory"), start(ports[1], "--store", redis, "--broker", redis),
             start(ports[2], "--store", redis, "--broker", redis)]
    try:
        for port in ports:
            wait_for(port)
        for name, sender, receiver in (("one node, memory store and broker", 0, 0),
                                       ("Redis cluster, both members on one node", 1, 1),
                                       ("Redis cluster, members on two nodes", 1, 2)):
            p50, p99 = await measure(f"ws://127.0.0.1:{ports[sender]}/ws", f"ws://127.0.0.1:{ports[receiver]}/ws")
            print(f"{name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    finally:
        for node in nodes:
            node.terminate()
            node.wait(10)
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", prefix + "*"], capture_output=True,
                              check=False).stdout.split()
        if keys:
            subprocess.run(["redis-cli", "DEL", *keys], capture_output=True, check=False)


if __name__ == "__main__":
    asyncio.run(main())
