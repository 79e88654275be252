"""Attacks at the reliability matrix's own scale, by hand (RELIABILITY H1, A3, P9, P10; figures in
docs/reliability.md). CI runs them scaled down (tests/test_limits.py, tests/test_auth.py, tests/test_memory_bounds.py,
tests/test_compression.py, and a 100-attacker smoke in tests/test_bench_smoke.py).

    python -m bench.attacks slowloris --sockets 5000      # H1: request heads trickled at 1 byte/s
    python -m bench.attacks silent --connections 10000    # A3: WebSocket connections that never authenticate
    python -m bench.attacks fragments                     # P9: 1,000,000 empty continuation frames, 10 times
    python -m bench.attacks bomb                          # P10: a 64 KiB deflate frame inflating to 64 MiB, 10 times

The server runs in this process (its timers, drop counters and connections can be read); the attackers and
the legitimate probe run in worker subprocesses (plain asyncio) so they do not share its interpreter.

- slowloris: ``--sockets`` TCP connections, each sending a request head one byte a second, never ending it.
  The matrix: each is cut at ``open_handshake_timeout`` (5 s) +- 0.5 s, measured by the attacker from its
  connect to the server's close; and a legitimate client's connect (upgrade + welcome) p99 during the attack
  is at most twice its p99 before it.
- silent: ``--connections`` WebSocket connections to a server with JWT authentication, none sending a token
  or an ``auth`` message. The matrix: each closed with 1008 at ``auth_timeout`` (10 s) +- 0.5 s, measured by
  the server from the end of the upgrade to the close (the clients' own view is printed too); afterwards the
  reactor holds no more timers than before.
- fragments, bomb: one attacking connection at a time; for each, the close code, the server's CPU time and its
  peak RSS (VmHWM, reset before the attack) above its RSS, until the connection is gone.

Every loop is bounded: each attacker stops at three times its deadline, the workers exit, the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak import CollectorTally, deployed_heap, percentile, raise_nofile, status_kib  # noqa: E402

CONNECT_AT_ONCE = 200  # connects in flight per worker (the kernel's accept queue is not what is measured)
HEAD = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: "


# -- worker side (subprocesses, plain asyncio) ------------------------------------------------------------------

class Loris(asyncio.Protocol):
    """One slowloris socket: sends the start of a request head at once, then the bytes ``slowloris_sockets``
    trickles; records when the server closed it."""

    def __init__(self, ended: asyncio.Future[float]) -> None:
        self.ended = ended
        self.transport: asyncio.Transport | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.started = time.monotonic()
        transport.write(HEAD)

    def data_received(self, data: bytes) -> None:
        pass  # nothing is expected before the close (a 400 or 408 would be read and ignored)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ended.done():
            self.ended.set_result(time.monotonic() - self.started)


async def slowloris_sockets(port: int, count: int, deadline: float) -> list[float | None]:
    """``count`` sockets, each trickling one byte a second with the bytes of all of them spread evenly over the
    second (a tick every 10 ms writes to a hundredth of them), until the server closed each or ``3 * deadline``
    passed: seconds from each connect to its close (None: still open)."""
    loop = asyncio.get_running_loop()
    connected = asyncio.Semaphore(CONNECT_AT_ONCE)
    ended: list[asyncio.Future[float]] = [loop.create_future() for _ in range(count)]
    sockets: list[Loris] = []

    async def open_one(future: asyncio.Future[float]) -> None:
        async with connected:
            _, protocol = await loop.create_connection(lambda: Loris(future), "127.0.0.1", port)
        sockets.append(protocol)

    opening = asyncio.gather(*(open_one(future) for future in ended))
    began = time.monotonic()
    tick = 0
    while time.monotonic() - began < 3 * deadline and not all(future.done() for future in ended):
        await asyncio.sleep(0.01)
        for protocol in sockets[tick % 100::100]:
            if protocol.transport is not None:
                protocol.transport.write(b"a")
        tick += 1
    await opening
    for protocol in sockets:
        if protocol.transport is not None:
            protocol.transport.abort()
    return [future.result() if future.done() else None for future in ended]


async def silent(url: str, deadline: float, connected: asyncio.Semaphore) -> tuple[float | None, int | None]:
    """One WebSocket connection that never authenticates: (seconds from the upgrade to the close, close code)."""
    import websockets

    async with connected:
        ws = await websockets.connect(url, open_timeout=60, ping_interval=None, close_timeout=5)
    started = time.monotonic()
    try:
        await asyncio.wait_for(ws.wait_closed(), 3 * deadline)
    except TimeoutError:
        return None, None
    finally:
        ws.transport.abort()
    received = ws.protocol.close_rcvd
    return time.monotonic() - started, received.code if received is not None else None


async def attackers(kind: str, target: str, count: int, deadline: float) -> dict[str, Any]:
    if kind == "slowloris":
        try:
            lifetimes = await slowloris_sockets(int(target), count, deadline)
        except OSError as exc:
            return {"lifetimes": [], "open_at_end": 0, "failures": [repr(exc)], "failed": count}
        return {"lifetimes": [t for t in lifetimes if t is not None], "open_at_end": lifetimes.count(None),
                "failures": [], "failed": 0}
    connected = asyncio.Semaphore(CONNECT_AT_ONCE)
    tasks = [asyncio.ensure_future(silent(target, deadline, connected)) for _ in range(count)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    pairs = [r for r in results if isinstance(r, tuple)]
    return {"lifetimes": [t for t, _ in pairs if t is not None], "codes": [c for _, c in pairs],
            "open_at_end": sum(1 for t, _ in pairs if t is None), "failures": failures[:5], "failed": len(failures)}


async def probe(url: str, count: int) -> list[float]:
    """Seconds for each of ``count`` legitimate connects, one after another: upgrade, then the welcome."""
    import websockets

    samples = []
    for _ in range(count):
        began = time.monotonic()
        async with websockets.connect(url, open_timeout=30, ping_interval=None) as ws:
            await asyncio.wait_for(ws.recv(), 30)
            samples.append(time.monotonic() - began)
    return samples


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame (payloads under 64 KiB; the key is zero, which leaves the payload as it is)."""
    length = len(payload)
    size = bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    return bytes([(0x80 if fin else 0) | (rsv << 4) | opcode]) + size + b"\0\0\0\0" + payload


def deflate_bomb(inflated: int) -> bytes:
    """A permessage-deflate message body of ``inflated`` zero bytes (about 1,000:1)."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(b"\0" * inflated) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def one_shot(kind: str, port: int) -> None:
    """One attacking connection, driven by the server process over stdin/stdout: upgrade, wait for the welcome,
    say ``ready``; on ``go``, send the whole attack (P9: a text frame's start then 1,000,000 empty
    continuations, 6 MB; P10: a 64 KiB frame inflating to 64 MiB), then read up to the server's close and print
    its code."""
    import socket

    if kind == "fragments":
        data = client_frame(0x1, b"{", fin=False) + client_frame(0x0, fin=False) * 1_000_000
        extension = b""
    else:
        data = client_frame(0x1, deflate_bomb(64 * 1024 * 1024), rsv=4)
        extension = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extension + b"\r\n")
    received = b""  # the 101 and the start of the welcome (often in one read)
    while b"\r\n\r\n" not in received or received.endswith(b"\r\n\r\n"):
        received += sock.recv(65536)
    print("ready", flush=True)
    sys.stdin.readline()
    sock.settimeout(30)
    with contextlib.suppress(OSError):  # the server closes while the rest is on its way
        sock.sendall(data)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    at = received.find(b"\x88")
    print(int.from_bytes(received[at + 2:at + 4], "big") if at >= 0 else "none", flush=True)


def worker_main(argv: list[str]) -> None:
    raise_nofile()
    kind = argv[0]
    if kind == "probe":
        print(json.dumps(asyncio.run(probe(argv[1], int(argv[2])))), flush=True)
    elif kind in ("fragments", "bomb"):
        one_shot(kind, int(argv[1]))
    else:
        result = asyncio.run(attackers(kind, argv[1], int(argv[2]), float(argv[3])))
        result["cpu_s"] = sum(os.times()[:2])
        print(json.dumps(result), flush=True)


def spawn(*args: Any, driven: bool = False) -> subprocess.Popen[str]:
    """A worker of this module; ``driven``: with a pipe to its stdin too (the one-shot attackers wait for "go")."""
    return subprocess.Popen([sys.executable, "-m", "bench.attacks", "worker", *map(str, args)],
                            stdin=subprocess.PIPE if driven else None, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- server side (this process) --------------------------------------------------------------------------------

async def collect(workers: list[subprocess.Popen[str]], timeout: float) -> list[Any]:
    from twisted.internet import threads

    def read(worker: subprocess.Popen[str]) -> Any:
        out, _ = worker.communicate(timeout=timeout)
        return json.loads(out)

    return [await threads.deferToThread(read, worker) for worker in workers]


def spread(name: str, lifetimes: list[float], deadline: float) -> str:
    inside = sum(1 for t in lifetimes if abs(t - deadline) <= 0.5)
    return (f"{name}: {len(lifetimes)} closed, {inside} within {deadline:g} s +- 0.5 s; min {min(lifetimes):.2f}, "
            f"p50 {percentile(lifetimes, 0.5):.2f}, p99 {percentile(lifetimes, 0.99):.2f}, "
            f"max {max(lifetimes):.2f} s" if lifetimes else f"{name}: none closed")


def merged(results: list[dict[str, Any]], key: str) -> list[Any]:
    return [value for result in results for value in result[key]]


async def slowloris(args: argparse.Namespace, reactor: Any) -> bool:
    from roomserver import ServerOptions, WebSocketServer

    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True,
                                           open_handshake_timeout=args.deadline, max_clients=args.sockets + 1000))
    await server.start()
    freezer = deployed_heap(reactor) if args.gc_freeze else None
    collector = CollectorTally()
    url = f"ws://127.0.0.1:{server.port}/ws"
    try:
        baseline = (await collect([spawn("probe", url, args.probes)], 120))[0]
        per_worker = args.sockets // args.workers
        cpu_before, began = sum(os.times()[:2]), time.monotonic()
        attack = [spawn("slowloris", server.port, per_worker, args.deadline) for _ in range(args.workers)]
        from twisted.internet import task

        await task.deferLater(reactor, args.deadline / 2, lambda: None)  # the sockets are open and trickling
        during = (await collect([spawn("probe", url, args.probes)], 120))[0]
        results = await collect(attack, 6 * args.deadline + 120)
        elapsed, server_cpu = time.monotonic() - began, sum(os.times()[:2]) - cpu_before
    finally:
        if freezer is not None:
            freezer.stop()
        await server.stop()
    print(collector.summary())
    lifetimes = merged(results, "lifetimes")
    inside = sum(1 for t in lifetimes if abs(t - args.deadline) <= 0.5)
    drops = server.get_stats().drops.get("handshake_timeout", 0)
    ratio = percentile(during, 0.99) / percentile(baseline, 0.99)
    print(spread("slowloris sockets", lifetimes, args.deadline))
    print(f"open at 3x the deadline: {sum(r['open_at_end'] for r in results)}, attacker failures: "
          f"{sum(r['failed'] for r in results)} {[f for r in results for f in r['failures']][:3]}; "
          f"server drops handshake_timeout: {drops}")
    print(f"CPU over the attack's {elapsed:.1f} s: server {server_cpu / elapsed * 100:.0f} % of a core (the probe's "
          f"connects included), attackers {sum(r['cpu_s'] for r in results) / elapsed * 100:.0f} %")
    print(f"legitimate connect + welcome, {args.probes} one after another: before p50 "
          f"{percentile(baseline, 0.5) * 1000:.1f} ms, p99 {percentile(baseline, 0.99) * 1000:.1f} ms; during "
          f"p50 {percentile(during, 0.5) * 1000:.1f} ms, p90 {percentile(during, 0.9) * 1000:.1f} ms, p99 "
          f"{percentile(during, 0.99) * 1000:.1f} ms, max {max(during) * 1000:.1f} ms ({ratio:.2f}x, target <= 2)")
    return inside == args.sockets == per_worker * args.workers and ratio <= 2


async def silent_connections(args: argparse.Namespace, reactor: Any) -> bool:
    from roomserver import ServerOptions, WebSocketServer

    with tempfile.NamedTemporaryFile("w", suffix=".secret", delete=False) as secret:
        secret.write("bench-attacks-" + os.urandom(16).hex())
    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True,
                                           jwt_secret_file=secret.name, auth_timeout=args.deadline,
                                           max_clients=args.connections + 1000))
    from roomserver.observe import ServerObserver

    opened: dict[str, float] = {}
    held: list[float] = []

    class Lifetimes(ServerObserver):
        """The server's view: from the end of a connection's upgrade to its close (the client's view also holds
        the time its worker took to read the 101 and the close, with thousands of connections per process)."""

        def connection_opened(self, client: Any) -> None:
            opened[client.id] = time.monotonic()

        def connection_closed(self, client: Any, was_clean: bool) -> None:
            began = opened.pop(client.id, None)
            if began is not None:
                held.append(time.monotonic() - began)

    server.observers.add(Lifetimes())
    await server.start()
    freezer = deployed_heap(reactor)
    baseline_timers = len(reactor.getDelayedCalls())
    url = f"ws://127.0.0.1:{server.port}/ws"
    try:
        per_worker = args.connections // args.workers
        results = await collect([spawn("silent", url, per_worker, args.deadline) for _ in range(args.workers)],
                                6 * args.deadline + 300)
        from twisted.internet import task

        for _ in range(100):
            if not server.connections.protocols:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        timers = len(reactor.getDelayedCalls())
        stats = server.get_stats()
    finally:
        freezer.stop()
        await server.stop()
        os.unlink(secret.name)
    lifetimes = merged(results, "lifetimes")
    codes = Counter(merged(results, "codes"))
    inside = sum(1 for t in held if abs(t - args.deadline) <= 0.5)
    print(spread("server's view, silent connections", held, args.deadline))
    print(spread("clients' view", lifetimes, args.deadline))
    print(f"close codes: {dict(codes)}; open at 3x the deadline: {sum(r['open_at_end'] for r in results)}; "
          f"client failures: {sum(r['failed'] for r in results)} {[f for r in results for f in r['failures']][:3]}")
    print(f"server: drops auth_timeout {stats.drops.get('auth_timeout', 0)}, connections left {stats.connections}; "
          f"reactor timers {timers} (before the attack {baseline_timers})")
    return (inside == args.connections == per_worker * args.workers == len(lifetimes)
            and codes == Counter({1008: args.connections})
            and timers <= baseline_timers)


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns it (KiB)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_kib("VmHWM")


async def one_connection(args: argparse.Namespace, reactor: Any) -> bool:
    """P9 (``fragments``) and P10 (``bomb``): ``--repeat`` attacking connections, one after another; for each,
    the server's CPU time and its peak RSS above its RSS from the attacker's first byte to the connection's end,
    and the close code."""
    from twisted.internet import task, threads

    from roomserver import ServerOptions, WebSocketServer

    fragments = args.scenario == "fragments"
    options = ServerOptions(port=0, host="127.0.0.1", room_protocol=True) if fragments else ServerOptions(
        port=0, host="127.0.0.1", room_protocol=True, compression=True, max_message_size=64 * 1024)
    server = WebSocketServer(options)
    await server.start()
    freezer = deployed_heap(reactor)
    rows = []
    try:
        for _ in range(args.repeat):
            worker = spawn(args.scenario, server.port, driven=True)
            assert worker.stdout is not None and worker.stdin is not None
            assert (await threads.deferToThread(worker.stdout.readline)).strip() == "ready"
            rss = peak_rss_reset()
            cpu, began = sum(os.times()[:2]), time.monotonic()
            worker.stdin.write("go\n")
            worker.stdin.flush()
            for _ in range(3000):
                if server.get_stats().connections == 0:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            seconds, cpu = time.monotonic() - began, sum(os.times()[:2]) - cpu
            peak = status_kib("VmHWM") - rss
            code = (await threads.deferToThread(worker.communicate, None, 60))[0].strip()
            rows.append((code, seconds, cpu, peak))
    finally:
        freezer.stop()
        await server.stop()
    what = "1,000,000 empty continuations" if fragments else "a 64 KiB frame inflating to 64 MiB"
    expected = "1008" if fragments else "1009"
    for code, seconds, cpu, peak in rows:
        print(f"{what}: close {code} after {seconds * 1000:.0f} ms; server CPU {cpu * 1000:.0f} ms; peak RSS "
              f"+{peak} KiB")
    worst = max(peak for *_, peak in rows)
    print(f"{len(rows)} attacks: close codes {Counter(code for code, *_ in rows)}, server CPU at most "
          f"{max(cpu for _, _, cpu, _ in rows) * 1000:.0f} ms each, peak RSS at most +{worst} KiB "
          f"(target < {1024 if fragments else 2048} KiB); drops {dict(server.get_stats().drops)}")
    return all(code == expected for code, *_ in rows) and worst < (1024 if fragments else 2048)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    loris = sub.add_parser("slowloris")
    loris.add_argument("--sockets", type=int, default=5000)
    loris.add_argument("--deadline", type=float, default=5.0, help="the server's open_handshake_timeout")
    loris.add_argument("--probes", type=int, default=500)
    loris.add_argument("--workers", type=int, default=4)
    loris.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                       help="leave the heap unfrozen (an embedding application's shape)")
    quiet = sub.add_parser("silent")
    quiet.add_argument("--connections", type=int, default=10_000)
    quiet.add_argument("--deadline", type=float, default=10.0, help="the server's auth_timeout")
    quiet.add_argument("--workers", type=int, default=4)
    for name, text in (("fragments", "P9: 1,000,000 empty continuation frames on one connection"),
                       ("bomb", "P10: a 64 KiB deflate frame inflating to 64 MiB")):
        one = sub.add_parser(name, help=text)
        one.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    raise_nofile()
    scenario = {"slowloris": slowloris, "silent": silent_connections, "fragments": one_connection,
                "bomb": one_connection}[args.scenario]

    from twisted.internet import defer, task

    async def run(reactor: Any) -> None:
        ok = await scenario(args, reactor)
        print("PASS" if ok else "FAIL")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
