"""A fault-injecting TCP proxy for the tests of RELIABILITY R6 (a slow, lossy link between the nodes and
Redis): what toxiproxy does, small enough to live beside the tests and run in their event loop.

The proxy listens on a free loopback port and forwards every connection to ``upstream``. Its faults can be
changed while connections are open:

- ``latency`` and ``jitter``: each chunk read in either direction is written to the other side ``latency``
  seconds later, plus a uniform draw from ``[-jitter, +jitter]``; chunks never overtake one another (a TCP
  stream keeps its order however its segments are delayed).
- ``loss``: TCP hides packet loss behind retransmissions, so what the application sees of a lossy link is a
  stall. Each chunk is "lost" with probability ``loss``, again and again (a geometric number of times); each
  loss costs a retransmission timeout that starts at ``rto`` and doubles, as Linux's does.
- ``slice_to``: chunks are cut into pieces of at most this many bytes, each written on its own (replies split
  anywhere, even inside a RESP length).
- ``reset_all()``: every open connection is cut at once with a TCP reset, both sides.

A close from either side closes the other once what was read before it has been written (no half-close: Redis
clients never use one).

``counters`` says what the faults did (chunks, stalls, resets), so a test can show the faults really hit.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class Faults:
    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rto: float = 0.2
    slice_to: int = 0


@dataclass
class Counters:
    connections: int = 0
    chunks: int = 0
    stalls: int = 0
    resets: int = 0
    bytes: int = 0


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", seed: int = 6) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.counters = Counters()
        self.random = random.Random(seed)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.reset_all()

    def reset_all(self) -> int:
        """Cut every open connection with a reset (SO_LINGER 0), as a lossy link finally gives up."""
        links, self._links = list(self._links), set()
        for link in links:
            for writer in (link.client, link.upstream):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            for task in link.tasks:
                task.cancel()
        self.counters.resets += len(links)
        return len(links)

    async def _accepted(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self.counters.connections += 1
        link = _Link(client_writer, upstream_writer)
        self._links.add(link)
        link.tasks = [asyncio.ensure_future(self._pump(client_reader, upstream_writer, link)),
                      asyncio.ensure_future(self._pump(upstream_reader, client_writer, link))]

    def _delay(self) -> float:
        faults = self.faults
        delay = max(0.0, faults.latency + self.random.uniform(-faults.jitter, faults.jitter))
        rto = faults.rto
        while faults.loss and self.random.random() < faults.loss:
            self.counters.stalls += 1
            delay += rto
            rto *= 2
        return delay

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        """Read chunks as they come; hand each to the writer loop with the time it may leave."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        link.tasks.append(sender)
        not_before = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.counters.chunks += 1
                self.counters.bytes += len(data)
                not_before = max(not_before, loop.time() + self._delay())
                size = self.faults.slice_to or len(data)
                for start in range(0, len(data), size):
                    queue.put_nowait((not_before, data[start:start + size]))
            queue.put_nowait((not_before, b""))  # the end: close the other side once the rest has left
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
            writer.transport.abort()
        finally:
            self._links.discard(link)

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()
                if self.faults.slice_to:
                    await asyncio.sleep(0)  # one loop pass: the peer reads this slice before the next
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
