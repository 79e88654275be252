"""A node's death at scale, by hand (RELIABILITY R4 and G1; figures go to docs/reliability.md).

    python -m bench.failover --clients 5000 --signal kill     # R4: SIGKILL of a node holding 5,000 clients
    python -m bench.failover --clients 10000 --signal term    # G1: SIGTERM, the node drains 10,000 clients

Two ``twistd roomserver`` nodes share a private ``redis-server`` (store and broker). ``--clients`` clients of
the Python client (``RoomClient``, in ``--workers`` subprocesses) connect to node A and join rooms of
``--room-size`` with presence; a publisher on node B sends chats to every room at ``--rate`` per second. Two
seconds in, node A gets the signal. Each client then does what the client library does by itself: reconnects
(after its jittered backoff, or after the drain's hint) and resumes, here on node B (a load balancer's choice
in production). The publisher goes on for ``--publish-after`` seconds, then every client must reach its room's
last acknowledged seq.

Reported: clients resumed, and the time from the signal to each client's resume (p50, p99, max); clients whose
chats had a gap or a duplicate (raw, before the client library's own duplicate filter); clients short of their
room's last seq; and, once the presence ttl has passed since the signal, ghost presence entries on node B (a
user listed who is no longer connected anywhere, or a live user listed with more than its one connection).
Every wait is bounded; the nodes, workers and Redis are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
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

from bench.cluster_latency import start as start_node  # noqa: E402
from bench.cluster_latency import wait_for  # noqa: E402
from bench.run import _raise_nofile, free_port  # noqa: E402
from bench.soak import percentile  # noqa: E402
from bench.workers import Redis  # noqa: E402

HEARTBEAT = 2.0  # the Redis broker's heartbeat interval: presence of a dead node goes after ttl + one beat


# -- the client side (worker subprocesses, Twisted) --------------------------------------------------------------

def worker_main(args: argparse.Namespace) -> None:
    """Runs ``args.clients`` RoomClients; talks to the parent in JSON lines on stdin/stdout."""
    from twisted.internet import defer, reactor, stdio, task
    from twisted.protocols.basic import LineReceiver

    from roomserver.roomclient import RoomClient

    class FailoverClient(RoomClient):
        """Connects to node A first and to node B ever after (a load balancer's choice in production); checks
        every chat's seq as it arrives, before the library's own duplicate filter."""

        def __init__(self, room: str) -> None:
            super().__init__(args.a, request_timeout=60.0)
            self.room = room
            self.first_id: str | None = None
            self.raw_last = 0
            self.gaps = 0
            self.duplicates = 0
            self.first_gap: dict[str, Any] | None = None  # where the first raw gap was, for the report
            self.opens = 0
            self.closed_at: float | None = None
            self.resumed_at: float | None = None
            self.resumed_as: str | None = None  # the client id the resumed session carries
            self.on("welcome", self._welcomed)
            self.on("close", self._closed)
            self.on("resumed", self._resumed)

        def _endpoint(self) -> Any:
            self.url = args.b if self._ever_opened else args.a
            return super()._endpoint()

        def _welcomed(self, message: dict[str, Any]) -> None:
            self.opens += 1
            if self.first_id is None:
                self.first_id = message.get("id")

        def _closed(self, code: int | None, reason: str | None) -> None:
            if self.closed_at is None:
                self.closed_at = time.time()

        def _resumed(self, message: dict[str, Any]) -> None:
            if self.resumed_at is None and self.closed_at is not None and message.get("recovered") is not False:
                self.resumed_at = time.time()
                self.resumed_as = message.get("client")

        def _chat(self, message: dict[str, Any]) -> None:
            seq = message.get("seq")
            if message.get("room") == self.room and isinstance(seq, int):
                if self.raw_last and seq <= self.raw_last:
                    self.duplicates += 1
                elif self.raw_last and seq != self.raw_last + 1:
                    self.gaps += 1
                    if self.first_gap is None:
                        self.first_gap = {"after": self.raw_last, "got": seq, "at": time.time(), "opens": self.opens,
                                          "resumed": self.resumed_at is not None}
                self.raw_last = max(self.raw_last, seq)
            super()._chat(message)

    clients = [FailoverClient(f"room-{(args.first + i) // args.room_size}") for i in range(args.clients)]

    def say(message: dict[str, Any]) -> None:
        # Through the StandardIO transport: it made stdout non-blocking, so a plain write of a long line
        # would fail half-way once the pipe is full.
        commands.transport.write(json.dumps(message).encode() + b"\n")

    async def start() -> None:
        window = defer.DeferredSemaphore(200)

        async def one(client: FailoverClient) -> None:
            await client.connect()
            await client.join(client.room, presence=True)

        await defer.gatherResults([window.run(lambda c=c: defer.ensureDeferred(one(c))) for c in clients],
                                  consumeErrors=True)
        # The first seq a client sees may come after its join: checks start from there.
        say({"ready": len(clients)})

    async def finish(final: dict[str, int]) -> None:
        deadline = time.time() + 60
        while time.time() < deadline and any(c.last_seq(c.room) < final.get(c.room, 0) for c in clients):
            await task.deferLater(reactor, 0.1, lambda: None)
        say({"result": [{"room": c.room, "id": c.resumed_as or c.id, "closed_at": c.closed_at,
                         "resumed_at": c.resumed_at, "state": c.state, "gaps": c.gaps, "duplicates": c.duplicates,
                         "first_gap": c.first_gap,
                         "last_seq": c.last_seq(c.room), "final": final.get(c.room, 0)} for c in clients]})

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = json.loads(line)
            if "final" in command:
                defer.ensureDeferred(finish(command["final"])).addErrback(
                    lambda failure: say({"fatal": failure.getTraceback()}))
            elif command.get("exit"):
                for client in clients:
                    client.reconnect = False
                    if client._protocol is not None and client._protocol.transport is not None:
                        client._protocol.transport.abortConnection()
                reactor.callLater(0.5, reactor.stop)  # type: ignore[attr-defined]

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    commands = Commands()
    stdio.StandardIO(commands)
    defer.ensureDeferred(start()).addErrback(lambda failure: (say({"fatal": failure.getTraceback()}),
                                                              reactor.stop()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- the parent: nodes, publisher, signal, figures ----------------------------------------------------------------

class Publisher:
    """Chats to every room in turn through node B at ``rate`` per second, one connection per 50 rooms; a chat
    refused with ``unavailable`` is sent again. ``acked``: the last acknowledged seq of each room."""

    def __init__(self, url: str, rooms: list[str], rate: float) -> None:
        self.url, self.rooms, self.rate = url, rooms, rate
        self.acked: dict[str, int] = {}
        self.refused = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        groups = [self.rooms[start:start + 50] for start in range(0, len(self.rooms), 50)]
        await asyncio.gather(*(self._one(group, self.rate / len(groups)) for group in groups))

    async def _one(self, rooms: list[str], rate: float) -> None:
        import websockets

        async with websockets.connect(self.url, ping_interval=None, max_size=None, max_queue=None) as ws:
            await ws.recv()
            for room in rooms:
                await ws.send(json.dumps({"type": "join", "room": room}))
            unanswered: dict[str, tuple[str, str]] = {}  # msg_id -> (room, text)
            number = 0

            async def read() -> None:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("type") == "ack":
                        sent = unanswered.pop(message["msg_id"], None)
                        if sent is not None:
                            self.acked[sent[0]] = max(self.acked.get(sent[0], 0), message["seq"])
                    elif message.get("type") == "error" and message.get("code") == "unavailable":
                        self.refused += 1
                        sent = unanswered.get(message.get("msg_id", ""))
                        if sent is not None:  # the same chat again: stored once, whatever happened to the first
                            await ws.send(json.dumps({"type": "chat", "room": sent[0], "text": sent[1],
                                                      "msg_id": message["msg_id"], "id": message["msg_id"]}))

            reader = asyncio.ensure_future(read())
            while not self.stopping.is_set():
                room = rooms[number % len(rooms)]
                msg_id = f"{id(self)}-{room}-{number}"
                unanswered[msg_id] = (room, f"m{number}")
                await ws.send(json.dumps({"type": "chat", "room": room, "text": f"m{number}", "msg_id": msg_id,
                                          "id": msg_id}))
                number += 1
                await asyncio.sleep(1 / rate)
            for _ in range(200):  # the last acknowledgements, bounded
                if not unanswered:
                    break
                await asyncio.sleep(0.05)
            reader.cancel()


def first_gaps_summary(gaps: list[dict[str, Any]], signalled_at: float) -> dict[str, Any]:
    """Where the clients' first raw gaps were: how many came before their resume (on node A, or on B before
    the resume answer) and after, on which connection, how many seqs were skipped, and when."""
    if not gaps:
        return {}
    skipped = sorted(gap["got"] - gap["after"] - 1 for gap in gaps)
    seconds = sorted(gap["at"] - signalled_at for gap in gaps)
    return {"before_resume": sum(1 for gap in gaps if not gap["resumed"]),
            "after_resume": sum(1 for gap in gaps if gap["resumed"]),
            "on_connection": dict(sorted(Counter(gap["opens"] for gap in gaps).items())),
            "skipped_p50_max": [skipped[len(skipped) // 2], skipped[-1]],
            "seconds_after_signal_min_p50_max": [round(seconds[0], 1), round(seconds[len(seconds) // 2], 1),
                                                 round(seconds[-1], 1)]}


async def ghosts(url: str, live: dict[str, set[str]]) -> tuple[int, int]:
    """(ghost entries, rooms checked): a listed user not live in that room, or a live one with > 1 connection."""
    import websockets

    rooms = sorted(live)
    found = 0
    for start in range(0, len(rooms), 50):
        async with websockets.connect(url, ping_interval=None, max_size=None) as probe:
            own = json.loads(await probe.recv())["id"]
            for room in rooms[start:start + 50]:
                await probe.send(json.dumps({"type": "join", "room": room, "id": f"j-{room}"}))
                await probe.send(json.dumps({"type": "presence", "room": room, "id": f"p-{room}"}))
            answered = 0
            while answered < len(rooms[start:start + 50]):
                message = json.loads(await asyncio.wait_for(probe.recv(), 30))
                if message.get("type") == "presence" and "members" in message and message.get("id", "")[:2] == "p-":
                    answered += 1
                    for member in message["members"]:
                        user = member.get("user")
                        if user == own:
                            continue
                        if user not in live[message["room"]]:
                            found += 1
                        elif int(member.get("connections", 1)) > 1:
                            found += int(member["connections"]) - 1
    return found, len(rooms)


async def parent(args: argparse.Namespace) -> int:
    _raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="failover-"))
    redis = Redis(None, workdir)
    ports = [free_port(), free_port()]
    urls = [f"ws://127.0.0.1:{port}/ws" for port in ports]
    extra = ["--presence-ttl", str(args.presence_ttl), *args.node_arg]
    # The nodes run as deployed (twistd's heap policy included); --node-arg=--no-gc-freeze to compare.
    nodes = [start_node(port, "--store", redis.url, "--broker", redis.url, "--max-clients", "100000",
                        *extra, log=workdir / f"node{i}.log") for i, port in enumerate(ports)]
    workers: list[asyncio.subprocess.Process] = []
    try:
        for port in ports:
            wait_for(port)
        share = -(-args.clients // args.workers)
        for first in range(0, args.clients, share):
            workers.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.failover", "worker", "--a", urls[0], "--b", urls[1],
                "--clients", str(min(share, args.clients - first)), "--first", str(first),
                "--room-size", str(args.room_size), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024))

        async def line(worker: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
            assert worker.stdout is not None
            raw = await asyncio.wait_for(worker.stdout.readline(), timeout)
            if not raw:
                raise RuntimeError("a worker exited")
            message: dict[str, Any] = json.loads(raw)
            if "fatal" in message:
                raise RuntimeError(message["fatal"])
            return message

        connect_started = time.monotonic()
        await asyncio.gather(*(line(worker, 300) for worker in workers))
        print(f"{args.clients} clients on node A in {time.monotonic() - connect_started:.1f} s", flush=True)

        rooms = sorted({f"room-{i // args.room_size}" for i in range(args.clients)})
        publisher = Publisher(urls[1], rooms, args.rate)
        publishing = asyncio.ensure_future(publisher.run())
        await asyncio.sleep(2)
        signalled_at = time.time()
        nodes[0].send_signal(signal.SIGKILL if args.signal == "kill" else signal.SIGTERM)
        print(f"node A: SIG{args.signal.upper()}", flush=True)

        async def exited() -> float:
            for _ in range(1200):  # at most two minutes
                if nodes[0].poll() is not None:
                    break
                await asyncio.sleep(0.1)
            return time.time() - signalled_at

        node_a_gone = asyncio.ensure_future(exited())
        await asyncio.sleep(args.publish_after)
        publisher.stopping.set()
        await asyncio.wait_for(publishing, 60)
        final = dict(publisher.acked)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write((json.dumps({"final": final}) + "\n").encode())
            await worker.stdin.drain()
        results = [client for message in await asyncio.gather(*(line(worker, 120) for worker in workers))
                   for client in message["result"]]

        live: dict[str, set[str]] = {}
        for client in results:
            live.setdefault(client["room"], set()).add(client["id"])
        node_a_exited_after = await node_a_gone
        node_a_exit = nodes[0].poll()
        check_after = args.presence_check_after
        if check_after is None:  # a draining node lives on: its presence may linger a ttl after its exit
            check_after = node_a_exited_after + args.presence_ttl + 2 * HEARTBEAT + 1
        presence_wait = signalled_at + check_after - time.time()
        if presence_wait > 0:
            await asyncio.sleep(presence_wait)
        checked_after = time.time() - signalled_at
        ghost_entries, rooms_checked = await ghosts(urls[1], live)

        resumed = [c["resumed_at"] - signalled_at for c in results if c["resumed_at"] is not None]
        closed = [c for c in results if c["closed_at"] is not None]
        within_30 = sum(1 for seconds in resumed if seconds <= 30)
        figures = {
            "clients": len(results), "signal": args.signal, "node_a_exit_code": node_a_exit,
            "node_a_exited_after_s": round(node_a_exited_after, 1),
            "closed": len(closed), "resumed": len(resumed), "resumed_within_30s": within_30,
            "resume_p50_s": round(percentile(resumed, 0.5), 2), "resume_p99_s": round(percentile(resumed, 0.99), 2),
            "resume_max_s": round(max(resumed, default=float("nan")), 2),
            "clients_with_gaps": sum(1 for c in results if c["gaps"]),
            "first_gaps": first_gaps_summary([c["first_gap"] for c in results if c["first_gap"]], signalled_at),
            "clients_with_duplicates": sum(1 for c in results if c["duplicates"]),
            "clients_short_of_last_seq": sum(1 for c in results if c["last_seq"] < c["final"]),
            "chats_acknowledged": sum(final.values()), "chats_refused_and_resent": publisher.refused,
            "ghost_presence_entries": ghost_entries, "rooms_checked": rooms_checked,
            "presence_ttl_s": args.presence_ttl, "presence_checked_after_s": round(checked_after, 1),
        }
        print(json.dumps(figures, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(figures))
        ok = (within_30 >= 0.99 * len(results) and not figures["clients_with_gaps"]
              and not figures["clients_with_duplicates"] and not figures["clients_short_of_last_seq"]
              and ghost_entries == 0)
        print("R4/G1 targets met" if ok else "targets NOT met", f"(logs in {workdir})" if args.keep_logs else "")
        return 0 if ok else 1
    finally:
        for worker in workers:
            if worker.returncode is None:
                if worker.stdin is not None and not worker.stdin.is_closing():
                    worker.stdin.write(b'{"exit": true}\n')
                try:
                    await asyncio.wait_for(worker.wait(), 10)
                except TimeoutError:
                    worker.kill()
        for node in nodes:
            if node.poll() is None:
                node.terminate()
                try:
                    node.wait(30)
                except subprocess.TimeoutExpired:
                    node.kill()
        redis.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--room-size", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0, help="chats per second, all rooms together")
    parser.add_argument("--signal", choices=["kill", "term"], default="kill")
    parser.add_argument("--publish-after", type=float, default=8.0, help="seconds of publishing after the signal")
    parser.add_argument("--presence-ttl", type=float, default=30.0, help="the nodes' --presence-ttl (their default)")
    parser.add_argument("--presence-check-after", type=float, default=None,
                        help="seconds after the signal to count ghosts (default: node A's exit + the ttl + two "
                             "heartbeats + 1)")
    parser.add_argument("--node-arg", action="append", default=[], help="an extra twistd option for both nodes")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--a", help=argparse.SUPPRESS)
    parser.add_argument("--b", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "worker":
        worker_main(args)
        return 0
    return asyncio.run(parent(args))


if __name__ == "__main__":
    sys.exit(main())
