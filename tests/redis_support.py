"""Redis for tests: the shared server at 127.0.0.1:6379 under a key prefix of the test's own, and dedicated
``redis-server`` processes on free ports for the fault tests (which kill and restart them)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from twisted.internet import reactor

from roomserver.redislink import RedisLink, RedisURL

REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"rstest-{uuid.uuid4().hex[:12]}:"


async def redis_link(url: str = REDIS_URL) -> RedisLink:
    """A connected ``RedisLink`` for a test to look at Redis with (stop it when done)."""
    link = RedisLink(RedisURL.parse(url), reactor, name="test")
    link.start()
    await link.when_connected(5)
    return link


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    link = RedisLink(RedisURL.parse(url), reactor, name="test cleanup")
    link.start()
    try:
        await link.when_connected(5.0)
        keys = await scan(link, prefix)
        if keys:
            await link.command("DEL", *keys)
        return len(keys)
    finally:
        await link.stop()


async def scan(link: RedisLink, prefix: str) -> list[bytes]:
    cursor, keys = b"0", []
    for _ in range(10_000):
        cursor, batch = await link.command("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        keys.extend(batch)
        if cursor in (b"0", 0, "0"):
            break
    return keys


def delete_prefix_now(prefix: str, port: int = 6379) -> int:
    """``delete_prefix`` without a reactor (for module fixtures), with redis-cli."""
    keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", prefix + "*"],
                          capture_output=True, check=True, timeout=10).stdout.split()
    for start in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-p", str(port), "DEL", *keys[start:start + 500]], capture_output=True,
                       check=True, timeout=10)
    return len(keys)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, which tests may stop and restart on the same port
    (``persistent``: with an append-only file fsynced at every write, so a restart keeps everything)."""

    def __init__(self, workdir: Path, persistent: bool = False, *config: str) -> None:
        self.persistent = persistent
        self.config = config  # more redis-server options, e.g. "--client-output-buffer-limit", "pubsub 1mb 1mb 0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", str(self.workdir), *self.config],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None
