"""Soak and isolation runs for the hardening limits (run by hand; figures go to docs/limits.md).

    python bench/soak.py leak  --cycles 100000 --concurrency 500 --workers 2
    python bench/soak.py flood --clients 50 --rounds 300
    python bench/soak.py idle  --connections 10000
    python bench/soak.py steady --minutes 1440    # RELIABILITY L5: 10,000 connections, 1,000 rooms, 100 msg/s

The server runs in this process (so its RSS, garbage-collector census and pending timers can be read); the
clients run in worker subprocesses (asyncio + the ``websockets`` library) so they do not share its interpreter.
Every loop is bounded: each worker does a fixed number of cycles or connections and exits.

- leak: cycles of connect, join, chat, leave, disconnect. Samples RSS, live roomserver objects and pending
  DelayedCalls every 10,000 cycles; at the end expects 0 clients, 0 rooms, the start's number of roomserver
  objects and DelayedCalls, and RSS within 5% (the matrix's L2) of its value after the first 10,000 cycles.
- flood: chat round-trip latency (p50/p99) of N clients, first unloaded, then while one client floods at 50x
  its rate limit.
- idle: N idle connections, each joined to a room; reports RSS per connection.
- steady: the matrix's long run (L5): N connections in rooms of 10, a publisher at a steady rate to random rooms,
  1 % of the connections closed and opened again (and rejoined) every minute. Every ``--sample-seconds`` it
  records RSS, open file descriptors, connections, pending DelayedCalls and the p99 of the chats' delivery
  latency (sender's clock to receiver's, one machine); at the end it reports the RSS slope after the warm-up
  (least squares, target < 1 MiB/h), whether open fds stayed connections + a constant, and the p99 drift
  between the first and the last third after the warm-up (target < 20 %). ``--census`` adds, each sample, the
  interpreter's allocated blocks and the live objects by type (``heap_census``), and at the end the types that
  grew: unlike RSS, these tell a leak from the allocator settling. A day's reconnects and chats fit in under two
  hours at a higher churn and rate:

    python bench/soak.py steady --minutes 100 --warmup 10 --churn 0.2 --rate 1500 --census
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def status_kib(field: str) -> int:
    """A KiB figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``...); 0 if absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    return status_kib("VmRSS")


# Rolling windows of a fixed length (the dashboard's per-second samples): they grow with time up to their bound,
# not with connections, so they say nothing about leaks. Likewise what resume keeps on purpose for a while:
# a closed connection's resume Session (dropped resume_ttl after the close) and, in the memory store, the
# history (RoomHistory + its DedupeWindow) of a room that emptied (dropped resume_ttl after it emptied).
TIME_BOUNDED = frozenset({"Sample", "Session", "RoomHistory", "DedupeWindow"})


def live_objects() -> collections.Counter[tuple[str, str]]:
    """Every live object the collector tracks, by its type's (module, qualified name), after a full collection.
    ``gc.get_objects`` does not list the frozen generation, so a frozen heap (``deployed_heap``) is thawed for the
    count and frozen again after it, as the heap policy does after each full collection anyway."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    census = collections.Counter((str(getattr(kind, "__module__", "")), kind.__qualname__)
                                 for kind in map(type, gc.get_objects()))
    if frozen:
        gc.freeze()
    return census


def roomserver_census() -> dict[str, int]:
    """Live objects of roomserver's own classes, by class name (time-bounded windows left out)."""
    return {name: count for (module, name), count in live_objects().items()
            if module.startswith("roomserver") and name not in TIME_BOUNDED}


def roomserver_objects() -> int:
    return sum(roomserver_census().values())


def heap_census() -> tuple[int, dict[str, int]]:
    """Every live object the collector tracks, by type (``live_objects``); and the interpreter's allocated memory
    blocks (``sys.getallocatedblocks``: what pymalloc and the object allocator hold, tracked or not).

    RSS cannot tell a slow leak from the allocator settling (arenas are returned to the system only when wholly
    empty); these counts can: a leak is a type (or the block count) that grows with time while the load is
    steady."""
    census = {f"{module}.{name}": count for (module, name), count in live_objects().items()}
    return sys.getallocatedblocks(), census


def malloc_kib() -> tuple[int, int]:
    """C ``malloc``'s memory (glibc's ``mallinfo2``), in KiB: in use, and freed but kept (what fragmentation
    holds). Objects over 512 bytes (the reads of a socket, long messages) and C libraries' buffers live there,
    outside pymalloc's arenas: RSS growth with ``kept`` growing and ``in use`` flat is fragmentation, not a
    leak. (-1, -1) where the C library has no ``mallinfo2``."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return -1, -1
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


def census_growth(first: dict[str, int], middle: dict[str, int], last: dict[str, int],
                  top: int = 12) -> list[str]:
    """The types that grew most between ``first`` and ``last``, with their count at ``middle``: a leak grows
    through the middle too, a fluctuation (connections in transit, a burst of chats) does not."""
    growth = sorted(((last.get(name, 0) - first.get(name, 0), name) for name in set(first) | set(last)),
                    reverse=True)
    return [f"  {name}: {first.get(name, 0)} -> {middle.get(name, 0)} -> {last.get(name, 0)} ({grown:+d})"
            for grown, name in growth[:top] if grown > 0]


def print_heap_events(event: dict[str, Any]) -> None:
    """What the heap policy logs (each thaw: the garbage its scan found, the time to the next), on stdout."""
    if str(event.get("log_namespace", "")).startswith("roomserver.heap"):
        print(f"{time.strftime('%H:%M:%S')} {formatEvent(event)}", flush=True)


def deployed_heap(reactor: Any, thaw_every: float = 900.0, thaw_most: float = 14400.0) -> Any:
    """What ``twistd roomserver`` does once it listens (roomserver/service.py): freeze the start-up heap, then
    what survives each full collection (``roomserver.heap``), so a benchmark measures the collector's pauses of a
    deployed node, not those of an embedding application's unfrozen heap. Returns the started
    ``FreezeAfterFullCollections`` (``stop()`` it before the server stops)."""
    from roomserver.heap import FreezeAfterFullCollections, freeze_startup_heap

    print(f"froze {freeze_startup_heap()} objects of the start-up heap; heap frozen after each full collection, "
          f"thawed after {thaw_every:g} s, then up to {thaw_most:g} s while the thaws find little", flush=True)
    freezer = FreezeAfterFullCollections(reactor, thaw_every, thaw_most)
    globalLogPublisher.addObserver(cast(ILogObserver, print_heap_events))
    freezer.start()
    return freezer


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client side (worker subprocesses, plain asyncio) -----------------------------------------------------------

async def one_cycle(url: str, room: str) -> None:
    """connect, join, chat (and get it back), leave, disconnect."""
    import websockets

    async with websockets.connect(url, ping_interval=None, open_timeout=30, close_timeout=10) as ws:
        json.loads(await ws.recv())  # welcome
        await ws.send(json.dumps({"type": "join", "room": room}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "chat", "room": room, "text": "soak"}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "leave", "room": room}))
        json.loads(await ws.recv())


RESET_STAGES = ("handshake", "welcome", "join", "broadcast", "leave")
RESET_ROOMS = 20


def reset_abruptly(transport: Any) -> None:
    """Close with a TCP RST, not a FIN: SO_LINGER with a zero timeout, then abort."""
    import socket
    import struct

    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def reset_cycle(url: str, stage: str, room: str, cut: float) -> None:
    """One connection reset (RST) at ``stage``: part-way through the HTTP upgrade request (``cut`` of it
    sent), after the welcome, right after sending a join, right after sending a chat to a room other clients
    are in (while it is broadcast), or after sending the leave; never waiting for the server's answer to the
    last thing sent."""
    import websockets

    if stage == "handshake":
        host, port = url.split("//")[1].split("/")[0].split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        request = (f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        writer.write(request[:max(1, int(len(request) * cut))])
        await writer.drain()
        reset_abruptly(writer.transport)
        return
    ws = await websockets.connect(url, ping_interval=None, open_timeout=30, close_timeout=10)
    try:
        await ws.recv()  # welcome
        if stage == "welcome":
            return
        await ws.send(json.dumps({"type": "join", "room": room}))
        if stage == "join":
            return
        await ws.recv()
        await ws.send(json.dumps({"type": "chat", "room": room, "text": "soak"}))
        if stage == "broadcast":
            return
        await ws.send(json.dumps({"type": "leave", "room": room}))
    finally:
        reset_abruptly(ws.transport)


async def run_cycles(url: str, cycles: int, concurrency: int, name: str = "w", resets: bool = False) -> int:
    """``cycles`` cycles spread over ``concurrency`` concurrent clients; returns the number of failures. With
    ``resets``, each cycle is a ``reset_cycle`` at a random stage, in one of a few shared rooms."""
    import random

    failures = 0
    per_task = [cycles // concurrency + (1 if i < cycles % concurrency else 0) for i in range(concurrency)]
    rng = random.Random(name)

    async def task(number: int, count: int) -> None:
        nonlocal failures
        for _ in range(count):
            try:
                if resets:
                    await reset_cycle(url, rng.choice(RESET_STAGES), f"soak-{rng.randrange(RESET_ROOMS)}", rng.random())
                else:
                    await one_cycle(url, f"soak-{name}-{number}")
            except Exception:
                failures += 1

    await asyncio.gather(*(task(i, n) for i, n in enumerate(per_task)))
    return failures


async def hold_idle(url: str, connections: int, hold_seconds: float) -> None:
    import websockets

    sockets = []
    for i in range(connections):
        ws = await websockets.connect(url, ping_interval=None, open_timeout=30)
        await ws.recv()
        await ws.send(json.dumps({"type": "join", "room": f"idle-{i % 1000}"}))
        await ws.recv()
        sockets.append(ws)
    print("ready", flush=True)
    await asyncio.sleep(hold_seconds)
    for ws in sockets:
        await ws.close()


async def latency_probe(url: str, clients: int, rounds: int) -> list[float]:
    """Each client chats into its own room ``rounds`` times, one at a time; returns round-trip times in ms."""
    import websockets

    samples: list[float] = []

    async def client(number: int) -> None:
        async with websockets.connect(url, ping_interval=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "join", "room": f"probe-{number}"}))
            await ws.recv()
            for _ in range(rounds):
                started = time.perf_counter()
                await ws.send(json.dumps({"type": "chat", "room": f"probe-{number}", "text": "ping"}))
                await ws.recv()
                samples.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.01)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return samples


async def flood(url: str, rate: float, seconds: float) -> int:
    """Send chats at ``rate`` messages/s for ``seconds``; when the server closes the connection (1008), connect
    again and go on, as an attacker would. Returns how many messages were sent."""
    import websockets

    sent = closures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with websockets.connect(url, ping_interval=None, max_queue=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "join", "room": "flood"}))
            try:
                while time.monotonic() < deadline:
                    for _ in range(int(rate / 100)):
                        await ws.send(json.dumps({"type": "chat", "room": "flood", "text": "x" * 100}))
                        sent += 1
                    await asyncio.sleep(0.01)
            except websockets.ConnectionClosed:
                closures += 1
    print(f"flooder was closed {closures} times", flush=True)
    return sent


async def steady_clients(url: str, connections: int, rooms: int, first_room: int, churn: float,
                         interval: float, minutes: float) -> None:
    """Hold ``connections`` members of rooms ``first_room``.. (ten a room), read everything, close and reopen
    ``churn`` of them every minute; print one JSON line per ``interval``: delivery latencies in ms and counts."""
    import random

    import websockets

    latencies: list[float] = []
    counts = {"reconnects": 0, "failures": 0, "chats": 0}
    stop_at = time.monotonic() + minutes * 60

    async def member(number: int) -> None:
        room = f"steady-{first_room + number % rooms}"
        while time.monotonic() < stop_at:
            try:
                async with websockets.connect(url, ping_interval=None, open_timeout=60, max_queue=None) as ws:
                    await ws.recv()
                    await ws.send(json.dumps({"type": "join", "room": room}))
                    # Each connection lives a random time of mean 100 minutes: 1 % of them every minute.
                    lifetime = random.expovariate(churn / 60) if churn > 0 else minutes * 60
                    deadline = min(stop_at, time.monotonic() + lifetime)
                    while time.monotonic() < deadline:
                        try:
                            raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
                        except TimeoutError:
                            break
                        message = json.loads(raw)
                        if message.get("type") == "chat":
                            counts["chats"] += 1
                            latencies.append((time.time() - float(message["text"])) * 1000)
                counts["reconnects"] += 1
            except Exception:
                counts["failures"] += 1
                await asyncio.sleep(1)

    async def report() -> None:
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() > stop_at:  # the connections are closing: not a steady sample
                print(json.dumps({"end": True}), flush=True)
                return
            batch, latencies[:] = list(latencies), []
            print(json.dumps({"latencies": batch, **counts}), flush=True)

    await asyncio.gather(report(), *(member(n) for n in range(connections)))


async def steady_publisher(url: str, rooms: int, rate: float, minutes: float) -> None:
    """Chats carrying their send time to random rooms at ``rate`` per second (one connection per 100 rooms)."""
    import random

    import websockets

    stop_at = time.monotonic() + minutes * 60
    sockets = []
    for start in range(0, rooms, 100):
        ws = await websockets.connect(url, ping_interval=None, max_queue=None, open_timeout=60)
        await ws.recv()
        for room in range(start, min(rooms, start + 100)):
            await ws.send(json.dumps({"type": "join", "room": f"steady-{room}"}))
        sockets.append(ws)

    async def drain(ws: Any) -> None:
        async for _ in ws:
            pass

    drains = [asyncio.ensure_future(drain(ws)) for ws in sockets]
    next_at = time.monotonic()
    while time.monotonic() < stop_at:
        room = random.randrange(rooms)
        await sockets[room // 100].send(json.dumps({"type": "chat", "room": f"steady-{room}",
                                                    "text": repr(time.time())}))
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    for task in drains:
        task.cancel()


def worker_main(argv: list[str]) -> None:
    kind, url = argv[0], argv[1]
    if kind in ("cycles", "resets"):
        failures = asyncio.run(run_cycles(url, int(argv[2]), int(argv[3]), argv[4], resets=kind == "resets"))
        print(json.dumps({"failures": failures}), flush=True)
    elif kind == "idle":
        raise_nofile()
        asyncio.run(hold_idle(url, int(argv[2]), float(argv[3])))
    elif kind == "probe":
        samples = asyncio.run(latency_probe(url, int(argv[2]), int(argv[3])))
        print(json.dumps(samples), flush=True)
    elif kind == "flood":
        print(json.dumps({"sent": asyncio.run(flood(url, float(argv[2]), float(argv[3])))}), flush=True)
    elif kind == "steady":
        raise_nofile()
        asyncio.run(steady_clients(url, int(argv[2]), int(argv[3]), int(argv[4]), float(argv[5]), float(argv[6]),
                                   float(argv[7])))
    elif kind == "publisher":
        raise_nofile()
        asyncio.run(steady_publisher(url, int(argv[2]), float(argv[3]), float(argv[4])))


def spawn(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "worker", *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- server side (this process) --------------------------------------------------------------------------------

def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``samples`` (nearest rank); NaN when there are none."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class CollectorTally:
    """What the cyclic garbage collector did during the run: collections, objects it had to free (what reference
    counting could not: cycles) and its pauses, per generation (roomserver.heap)."""

    def __init__(self) -> None:
        from roomserver.heap import GENERATIONS, GCPauses

        self.paused = [0.0] * GENERATIONS
        self.pauses = GCPauses(self._add)
        self.pauses.install()
        self.start = gc.get_stats()

    def _add(self, generation: int, seconds: float) -> None:
        self.paused[generation] += seconds

    def summary(self) -> str:
        self.pauses.remove()
        parts = []
        for generation, (before, after) in enumerate(zip(self.start, gc.get_stats(), strict=True)):
            parts.append(f"generation {generation}: {after['collections'] - before['collections']} collections, "
                         f"{after['collected'] - before['collected']} objects freed, "
                         f"{self.paused[generation] * 1000:.0f} ms in all, longest "
                         f"{self.pauses.longest[generation] * 1000:.1f} ms")
        return "collector: " + "; ".join(parts)


async def leak(args: argparse.Namespace, reactor: Any) -> None:
    from twisted.internet import task

    from roomserver import ServerOptions, WebSocketServer

    server = WebSocketServer(ServerOptions(
        port=0, host="127.0.0.1", room_protocol=True, max_clients=args.concurrency * 2, rate_limit=0,
        # What the server keeps on purpose is bounded by these, not by the number of cycles: each room's last
        # history_size messages and each closed connection's resume session for resume_ttl. Small values let
        # the run reach that steady state early, so RSS growth after it can only be a leak.
        history_size=10, resume_ttl=2))
    from roomserver.observe import ServerObserver

    closed = 0

    class Ended(ServerObserver):
        """Counts WebSocket connections that ended (and upgrades that failed), for the progress samples."""

        def connection_closed(self, client: Any, was_clean: bool) -> None:
            nonlocal closed
            closed += 1

        def handshake_failed(self, protocol: Any) -> None:
            nonlocal closed
            closed += 1

    server.observers.add(Ended())
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/ws"
    collector = CollectorTally()
    base_census = roomserver_census()
    base_objects, base_calls, base_rss = sum(base_census.values()), len(reactor.getDelayedCalls()), rss_kib()
    print(f"start: rss {base_rss} KiB, roomserver objects {base_objects}, delayed calls {base_calls}")
    share = args.cycles // args.workers
    kind = "resets" if args.resets else "cycles"
    workers = [spawn(kind, url, share, args.concurrency // args.workers, n) for n in range(args.workers)]
    samples: list[tuple[int, int, int, int]] = []
    dead_members = 0
    next_mark = 10_000
    started = time.monotonic()
    while any(worker.poll() is None for worker in workers):
        await task.deferLater(reactor, 0.5, lambda: None)
        # L3: a room never holds a connection that is gone (checked at every half-second, not only at the end).
        dead_members += sum(1 for room in list(server.registry) for member in list(room.clients) if not member.open)
        if closed >= next_mark:
            samples.append((closed, rss_kib(), roomserver_objects(), len(reactor.getDelayedCalls())))
            print(f"{closed:>7} cycles  rss {samples[-1][1]} KiB  live clients {server.get_stats().connections}"
                  f"  objects {samples[-1][2]}  delayed calls {samples[-1][3]}  ({time.monotonic() - started:.0f} s)",
                  flush=True)
            next_mark += 10_000
    outputs = [worker.stdout.read() if worker.stdout else "" for worker in workers]
    failures = sum(json.loads(output or '{"failures": -1}')["failures"] for output in outputs)
    await task.deferLater(reactor, 1.0, lambda: None)
    end_census = roomserver_census()
    stats = server.get_stats()
    end_rss, end_objects, end_calls = rss_kib(), sum(end_census.values()), len(reactor.getDelayedCalls())
    if end_census != base_census:
        print(f"census changed: {base_census} -> {end_census}")
    reference = samples[0][1] if samples else base_rss
    cut = "; resets mid-upgrade never became one" if args.resets else ""
    print(f"end: {share * args.workers} cycles in {time.monotonic() - started:.0f} s ({closed} WebSocket "
          f"connections ended{cut}), {failures} failed cycles, {dead_members} closed connections seen in a room")
    print(f"end: clients {stats.connections}, rooms {stats.rooms}, roomserver objects {end_objects} (start "
          f"{base_objects}), delayed calls {end_calls} (start {base_calls})")
    print(f"end: rss {end_rss} KiB vs {reference} KiB after the first 10,000 cycles "
          f"({(end_rss - reference) / reference * 100:+.1f}%)")
    print(f"end: {collector.summary()}")
    ok = (stats.connections == 0 and stats.rooms == 0 and end_objects <= base_objects and end_calls <= base_calls
          and end_rss <= reference * 1.05 and dead_members == 0)
    print("PASS" if ok else "FAIL")
    await server.stop()


async def flood_isolation(args: argparse.Namespace, reactor: Any) -> None:
    from roomserver import ServerOptions, WebSocketServer

    rate_limit = 100.0
    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True, rate_limit=rate_limit,
                                           rate_burst=200))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/ws"

    async def probe() -> list[float]:
        from twisted.internet import threads

        worker = spawn("probe", url, args.clients, args.rounds)
        output = await threads.deferToThread(worker.communicate)
        return json.loads(output[0].strip().splitlines()[-1])  # type: ignore[no-any-return]

    ratios = []
    for run in range(args.repeat):  # alternate unloaded and flooded phases: the machine's noise hits both
        unloaded = await probe()
        flooder = spawn("flood", url, rate_limit * 50, 3600)
        loaded = await probe()
        flooder.kill()
        flooder.wait()
        for name, samples in (("unloaded", unloaded), ("flooded", loaded)):
            print(f"run {run + 1} {name:>9}: p50 {percentile(samples, 0.5):.2f} ms  "
                  f"p99 {percentile(samples, 0.99):.2f} ms  ({len(samples)} round trips)", flush=True)
        ratios.append(percentile(loaded, 0.99) / percentile(unloaded, 0.99))
    stats = server.get_stats()
    print(f"p99 ratio flooded/unloaded per run: {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f} (target <= 2); drops {dict(stats.drops)}, "
          f"rate_limited errors {stats.errors.get('rate_limited', 0)}")
    await server.stop()


async def idle(args: argparse.Namespace, reactor: Any) -> None:
    from twisted.internet import threads

    from roomserver import ServerOptions, WebSocketServer

    raise_nofile()
    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True,
                                           max_clients=args.connections + 10, rate_limit=0, ping_interval=0))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/ws"
    _, census_before = heap_census()
    before = rss_kib()
    per_worker = args.connections // args.workers
    workers = [spawn("idle", url, per_worker, 3600) for _ in range(args.workers)]
    for worker in workers:
        assert worker.stdout is not None
        await threads.deferToThread(worker.stdout.readline)
    _, census_after = heap_census()
    after = rss_kib()
    held = max(server.get_stats().connections, 1)
    print(f"{held} idle connections in {server.get_stats().rooms} rooms: rss {before} -> {after} KiB, "
          f"{(after - before) / held:.1f} KiB per connection")
    # What a full collection has to scan for each connection: its pause grows with these (roomserver/heap.py).
    added = {name: census_after.get(name, 0) - census_before.get(name, 0) for name in census_after}
    print(f"objects the collector tracks, per connection: {sum(added.values()) / held:.1f}; by type:")
    for name, count in sorted(added.items(), key=lambda item: -item[1])[:args.top_types]:
        if count >= held / 2:
            print(f"  {count / held:5.2f}  {name}")
    for worker in workers:
        worker.kill()
        worker.wait()
    await server.stop()


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600 if spread else 0.0


async def steady(args: argparse.Namespace, reactor: Any) -> None:
    from twisted.internet import task, threads

    from roomserver import ServerOptions, WebSocketServer
    from roomserver.heap import malloc_trim

    raise_nofile()
    # The history is what a room keeps on purpose: at 100 chats/s over 1,000 rooms the default 1,000 messages a
    # room take close to three hours to fill, and RSS grows until they have. A short history reaches that
    # steady state within the warm-up, so RSS growth after it can only be a leak (``--history-size``).
    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True,
                                           max_clients=args.connections + 100, rate_limit=0,
                                           history_size=args.history_size))
    await server.start()
    freezer = deployed_heap(reactor, args.thaw_every, args.thaw_most) if args.gc_freeze else None
    url = f"ws://127.0.0.1:{server.port}/ws"
    rooms = args.connections // 10
    per_worker = args.connections // args.workers
    rooms_per_worker = max(1, rooms // args.workers)
    workers = [spawn("steady", url, per_worker, rooms_per_worker, n * rooms_per_worker, args.churn,
                     args.sample_seconds, args.minutes) for n in range(args.workers)]
    publisher = spawn("publisher", url, rooms_per_worker * args.workers, args.rate, args.minutes)
    collector = CollectorTally()
    started = time.monotonic()
    samples: list[dict[str, float]] = []
    censuses: list[tuple[float, dict[str, int]]] = []
    trims: list[float] = []
    print("minute  rss_kib  fds  connections  fds-conns  delayed_calls  chats  p99_ms  reconnects  failures"
          + ("  blocks  objects  malloc_used  malloc_kept" if args.census else ""), flush=True)
    while any(worker.poll() is None for worker in workers):
        lines = [await threads.deferToThread(worker.stdout.readline) for worker in workers if worker.stdout]
        reports = [json.loads(line) for line in lines if line.strip()]
        if not reports or any(report.get("end") for report in reports):
            break
        latencies = [value for report in reports for value in report["latencies"]]
        stats = server.get_stats()
        fds = len(os.listdir("/proc/self/fd"))
        sample = {"t": time.monotonic() - started, "rss": rss_kib(), "fds": fds, "connections": stats.connections,
                  "calls": len(reactor.getDelayedCalls()), "chats": len(latencies),
                  "p99": percentile(latencies, 0.99),
                  "reconnects": sum(r["reconnects"] for r in reports), "failures": sum(r["failures"] for r in reports)}
        census_columns = ""
        if args.census and len(samples) % args.census_every == 0:
            sample["blocks"], census = heap_census()
            sample["objects"] = sum(census.values())
            sample["malloc_used"], sample["malloc_kept"] = malloc_kib()
            censuses.append((sample["t"], census))
            census_columns = (f"  {sample['blocks']:8.0f}  {sample['objects']:8.0f}  {sample['malloc_used']:11.0f}  "
                              f"{sample['malloc_kept']:11.0f}")
        if args.malloc_trim:
            trims.append(malloc_trim())
        samples.append(sample)
        print(f"{sample['t'] / 60:6.1f}  {sample['rss']:7.0f}  {fds:5d}  {stats.connections:11d}  "
              f"{fds - stats.connections:9d}  {sample['calls']:13.0f}  {sample['chats']:5.0f}  {sample['p99']:6.1f}  "
              f"{sample['reconnects']:10.0f}  {sample['failures']:8.0f}{census_columns}", flush=True)
    for process in [*workers, publisher]:
        process.wait(120)
    await task.deferLater(reactor, 1.0, lambda: None)
    settled = [s for s in samples if s["t"] >= args.warmup * 60] or samples
    slope = slope_per_hour([(s["t"], s["rss"]) for s in settled]) / 1024  # MiB/h
    overhead = [s["fds"] - s["connections"] for s in settled]
    third = max(1, len(settled) // 3)
    first_p99 = statistics.fmean(s["p99"] for s in settled[:third])
    last_p99 = statistics.fmean(s["p99"] for s in settled[-third:])
    drift = (last_p99 - first_p99) / first_p99 * 100
    failures = samples[-1]["failures"] if samples else 0
    print(f"after the warm-up ({args.warmup:g} min, {len(settled)} samples): rss slope {slope:+.2f} MiB/h "
          f"(target < 1), open fds minus connections {min(overhead)} to {max(overhead)}, p99 {first_p99:.1f} -> "
          f"{last_p99:.1f} ms ({drift:+.1f} %, target < 20 %), {failures:.0f} failed connections")
    print(collector.summary())
    if trims:
        print(f"malloc_trim after each sample: {len(trims)} trims, longest {max(trims) * 1000:.1f} ms, "
              f"median {statistics.median(trims) * 1000:.1f} ms")
    if freezer is not None:
        scan = (f"; the last thaw's scan found {freezer.found} garbage objects among {freezer.thawed} thawed"
                if freezer.found is not None else "")
        print(f"heap: {freezer.freezes} freezes, {freezer.thaws} thaws{scan}; next thaw after "
              f"{freezer.thaw_interval:g} s")
    settled_censuses = [census for t, census in censuses if t >= args.warmup * 60] or [c for _, c in censuses]
    if settled_censuses:
        counted = [s for s in settled if "blocks" in s] or [s for s in samples if "blocks" in s]
        per_hour = {key: slope_per_hour([(s["t"], s[key]) for s in counted])
                    for key in ("blocks", "objects", "malloc_used", "malloc_kept")}
        print(f"census after the warm-up: allocated blocks {counted[0]['blocks']:.0f} -> {counted[-1]['blocks']:.0f} "
              f"({per_hour['blocks']:+.0f}/h), tracked objects {counted[0]['objects']:.0f} -> "
              f"{counted[-1]['objects']:.0f} ({per_hour['objects']:+.0f}/h), malloc in use "
              f"{per_hour['malloc_used'] / 1024:+.2f} MiB/h, malloc freed but kept "
              f"{per_hour['malloc_kept'] / 1024:+.2f} MiB/h; types grown most (first -> middle -> last):")
        print("\n".join(census_growth(settled_censuses[0], settled_censuses[len(settled_censuses) // 2],
                                      settled_censuses[-1])) or "  none")
    ok = slope < 1 and max(overhead) - min(overhead) <= 10 and drift < 20 and failures == 0
    print("PASS" if ok else "FAIL")
    if freezer is not None:
        freezer.stop()
    await server.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    leak_parser = sub.add_parser("leak")
    leak_parser.add_argument("--cycles", type=int, default=100_000)
    leak_parser.add_argument("--concurrency", type=int, default=500)
    leak_parser.add_argument("--workers", type=int, default=2)
    leak_parser.add_argument("--resets", action="store_true",
                             help="L3: every cycle ends in a TCP reset at a random stage (handshake, welcome, join, "
                                  "broadcast, leave), in 20 shared rooms")
    flood_parser = sub.add_parser("flood")
    flood_parser.add_argument("--clients", type=int, default=50)
    flood_parser.add_argument("--rounds", type=int, default=300)
    flood_parser.add_argument("--repeat", type=int, default=3)
    idle_parser = sub.add_parser("idle")
    idle_parser.add_argument("--connections", type=int, default=10_000)
    idle_parser.add_argument("--workers", type=int, default=4)
    idle_parser.add_argument("--top-types", type=int, default=25, help="object types listed per connection")
    steady_parser = sub.add_parser("steady")
    steady_parser.add_argument("--minutes", type=float, default=1440.0)
    steady_parser.add_argument("--warmup", type=float, default=60.0, help="minutes left out of the trends")
    steady_parser.add_argument("--connections", type=int, default=10_000)
    steady_parser.add_argument("--rate", type=float, default=100.0, help="chats per second, to random rooms")
    steady_parser.add_argument("--churn", type=float, default=0.01, help="share of connections replaced a minute")
    steady_parser.add_argument("--sample-seconds", type=float, default=60.0)
    steady_parser.add_argument("--workers", type=int, default=4)
    steady_parser.add_argument("--history-size", type=int, default=10, help="chats each room keeps")
    steady_parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                               help="leave the heap unfrozen (an embedding application's shape)")
    steady_parser.add_argument("--thaw-every", type=float, default=900.0, help="seconds to the first thaw (twistd's)")
    steady_parser.add_argument("--thaw-most", type=float, default=14400.0,
                               help="seconds between thaws at most, while they find little garbage (twistd's)")
    steady_parser.add_argument("--census", action="store_true",
                               help="also count live objects by type, the interpreter's allocated blocks and C "
                                    "malloc's memory (a full collection each time); the end lists the types that grew")
    steady_parser.add_argument("--malloc-trim", action="store_true",
                               help="call glibc's malloc_trim(0) after each sample, as twistd does every "
                                    "--malloc-trim-interval (its effect on RSS, and its time)")
    steady_parser.add_argument("--census-every", type=int, default=1, help="samples between two censuses")
    args = parser.parse_args()
    scenario = {"leak": leak, "flood": flood_isolation, "idle": idle, "steady": steady}[args.scenario]

    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(scenario(args, reactor)))


if __name__ == "__main__":
    main()
