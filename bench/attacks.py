"""Two attacks at the reliability matrix's own scale, by hand (RELIABILITY H1 and A3; figures in
docs/reliability.md). CI runs them scaled down (tests/test_limits.py, tests/test_auth.py).

    python -m bench.attacks slowloris --sockets 5000      # H1: request heads trickled at 1 byte/s
    python -m bench.attacks silent --connections 10000    # A3: WebSocket connections that never authenticate

The server runs in this process (its timers, drop counters and connections can be read); the attackers and
the legitimate probe run in worker subprocesses (plain asyncio) so they do not share its interpreter.

- slowloris: ``--sockets`` TCP connections, each sending a request head one byte a second, never ending it.
  The matrix: each is cut at ``open_handshake_timeout`` (5 s) +- 0.5 s, measured by the attacker from its
  connect to the server's close; and a legitimate client's connect (upgrade + welcome) p99 during the attack
  is at most twice its p99 before it.
- silent: ``--connections`` WebSocket connections to a server with JWT authentication, none sending a token
  or an ``auth`` message. The matrix: each closed with 1008 at ``auth_timeout`` (10 s) +- 0.5 s, measured from
  the client's upgrade to the close frame; afterwards the reactor holds no more timers than before.

Every loop is bounded: each attacker stops at three times its deadline, the workers exit, the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench.soak import percentile, raise_nofile  # noqa: E402

CONNECT_AT_ONCE = 200  # connects in flight per worker (the kernel's accept queue is not what is measured)
HEAD = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: "


# -- worker side (subprocesses, plain asyncio) ------------------------------------------------------------------

async def trickle(port: int, deadline: float, connected: asyncio.Semaphore) -> float | None:
    """One slowloris socket: the head, then a byte a second; seconds from connect to the server's close (None if
    it was still open at ``3 * deadline``)."""
    async with connected:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(HEAD)
        while time.monotonic() - started < 3 * deadline:
            try:
                if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                writer.write(b"a")
            except ConnectionError:
                return time.monotonic() - started
        return None
    finally:
        writer.transport.abort()


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
    connected = asyncio.Semaphore(CONNECT_AT_ONCE)
    tasks: list[asyncio.Future[Any]]
    if kind == "slowloris":
        tasks = [asyncio.ensure_future(trickle(int(target), deadline, connected)) for _ in range(count)]
    else:
        tasks = [asyncio.ensure_future(silent(target, deadline, connected)) for _ in range(count)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    if kind == "slowloris":
        return {"lifetimes": [r for r in results if isinstance(r, float)],
                "open_at_end": sum(1 for r in results if r is None), "failures": failures[:5],
                "failed": len(failures)}
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


def worker_main(argv: list[str]) -> None:
    raise_nofile()
    kind = argv[0]
    if kind == "probe":
        print(json.dumps(asyncio.run(probe(argv[1], int(argv[2])))), flush=True)
    else:
        print(json.dumps(asyncio.run(attackers(kind, argv[1], int(argv[2]), float(argv[3])))), flush=True)


def spawn(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.attacks", "worker", *map(str, args)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


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
    url = f"ws://127.0.0.1:{server.port}/ws"
    try:
        baseline = (await collect([spawn("probe", url, args.probes)], 120))[0]
        per_worker = args.sockets // args.workers
        attack = [spawn("slowloris", server.port, per_worker, args.deadline) for _ in range(args.workers)]
        from twisted.internet import task

        await task.deferLater(reactor, args.deadline / 2, lambda: None)  # the sockets are open and trickling
        during = (await collect([spawn("probe", url, args.probes)], 120))[0]
        results = await collect(attack, 6 * args.deadline + 120)
    finally:
        await server.stop()
    lifetimes = merged(results, "lifetimes")
    inside = sum(1 for t in lifetimes if abs(t - args.deadline) <= 0.5)
    drops = server.get_stats().drops.get("handshake_timeout", 0)
    ratio = percentile(during, 0.99) / percentile(baseline, 0.99)
    print(spread("slowloris sockets", lifetimes, args.deadline))
    print(f"open at 3x the deadline: {sum(r['open_at_end'] for r in results)}, attacker failures: "
          f"{sum(r['failed'] for r in results)} {[f for r in results for f in r['failures']][:3]}; "
          f"server drops handshake_timeout: {drops}")
    print(f"legitimate connect + welcome, {args.probes} one after another: before p50 "
          f"{percentile(baseline, 0.5) * 1000:.1f} ms, p99 {percentile(baseline, 0.99) * 1000:.1f} ms; during "
          f"p50 {percentile(during, 0.5) * 1000:.1f} ms, p99 {percentile(during, 0.99) * 1000:.1f} ms "
          f"({ratio:.2f}x, target <= 2)")
    return inside == args.sockets == per_worker * args.workers and ratio <= 2


async def silent_connections(args: argparse.Namespace, reactor: Any) -> bool:
    from roomserver import ServerOptions, WebSocketServer

    with tempfile.NamedTemporaryFile("w", suffix=".secret", delete=False) as secret:
        secret.write("bench-attacks-" + os.urandom(16).hex())
    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True,
                                           jwt_secret_file=secret.name, auth_timeout=args.deadline,
                                           max_clients=args.connections + 1000))
    await server.start()
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
        await server.stop()
        os.unlink(secret.name)
    lifetimes = merged(results, "lifetimes")
    codes = Counter(merged(results, "codes"))
    inside = sum(1 for t in lifetimes if abs(t - args.deadline) <= 0.5)
    print(spread("silent connections", lifetimes, args.deadline))
    print(f"close codes: {dict(codes)}; open at 3x the deadline: {sum(r['open_at_end'] for r in results)}; "
          f"client failures: {sum(r['failed'] for r in results)} {[f for r in results for f in r['failures']][:3]}")
    print(f"server: drops auth_timeout {stats.drops.get('auth_timeout', 0)}, connections left {stats.connections}; "
          f"reactor timers {timers} (before the attack {baseline_timers})")
    return (inside == args.connections == per_worker * args.workers and codes == Counter({1008: args.connections})
            and timers <= baseline_timers)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    loris = sub.add_parser("slowloris")
    loris.add_argument("--sockets", type=int, default=5000)
    loris.add_argument("--deadline", type=float, default=5.0, help="the server's open_handshake_timeout")
    loris.add_argument("--probes", type=int, default=200)
    loris.add_argument("--workers", type=int, default=4)
    quiet = sub.add_parser("silent")
    quiet.add_argument("--connections", type=int, default=10_000)
    quiet.add_argument("--deadline", type=float, default=10.0, help="the server's auth_timeout")
    quiet.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    raise_nofile()
    scenario = {"slowloris": slowloris, "silent": silent_connections}[args.scenario]

    from twisted.internet import defer, task

    async def run(reactor: Any) -> None:
        ok = await scenario(args, reactor)
        print("PASS" if ok else "FAIL")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
