"""Scale-out benchmark, by hand: does ``--workers 2`` fan out more than one process?

Three servers, alternately (their order rotates from run to run), medians of the runs:

- ``memory``: one process, memory store and broker (what ``make bench`` measures as ``roomserver``);
- ``redis-workers1``: one process, ``--workers 1`` with the Redis store and broker (the price of Redis alone);
- ``redis-workers2``: ``--workers 2`` with the Redis store and broker: two processes on one port
  (SO_REUSEPORT), the room's members spread over them by the kernel, every chat crossing Redis once.

Each is driven by the Node load generator of ``bench/run.py`` (one room, one publisher, at most ``window`` of its
chats in flight, where a chat is in flight until EVERY member got it: with several workers the sender's own copy
comes from its own process and says nothing about how far behind the other one is). Measured over the same
window, from ``/proc/<pid>/stat``: every server process's CPU time (summed for CPU per delivery, and each
worker's own), Redis's and the load generator's, so the reader sees which process was the limit; and from
``/proc/<pid>/schedstat`` the time the busiest worker and the load generator waited for a core (CPU + wait near
100 %: always had work). How the kernel spread the members is counted from ``/proc`` too (each worker's
established connections on the port, read once the members have joined).

On a 2-core machine the load generator and Redis share the cores with the workers, so wall-clock deliveries/s
cannot show what two workers do with a core each. ``worker_ceiling_per_s`` (deliveries per CPU-second of the
busiest worker) is the rate each configuration would reach if every worker had a core of its own and nothing
else were the limit; ``redis_ceiling_per_s`` (deliveries per CPU-second of Redis) is the limit Redis would set
(one core). See docs/performance.md ("--workers").

By default a private ``redis-server`` is started on a free port (``--save "" --appendonly no``) so the test
suites of other people on the machine do not show up in its CPU figure; ``--redis URL`` uses a running one. Each
server gets its own key prefix, whose keys are deleted when it stops.

Usage: python -m bench.workers [--runs 3] [--scale 1.0] [--scenarios fanout1000,fanout100]
                               [--servers memory,redis-workers1,redis-workers2] [--window 16] [--redis URL]
                               [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .run import (
    BENCH,
    Results,
    Scenario,
    ServerProcess,
    free_port,
    machine,
    report_end,
    roomserver_argv,
    run,
    run_scenario,
    table,
)

METRICS = ("deliveries_per_s", "cpu_us_per_delivery", "busiest_worker_cpu_pct", "busiest_worker_demand_pct",
           "other_worker_cpu_pct", "redis_cpu_pct", "loadgen_demand_pct", "machine_cpu_pct", "worker_ceiling_per_s",
           "redis_ceiling_per_s", "p50_ms", "p99_ms")
SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("fanout1000", "1,000 members x 500 messages",
                 {"scenario": "fanout", "members": 1000, "messages": 500, "window": 16, "window_scope": "all"},
                 METRICS, ("members", "messages")),
        Scenario("fanout100", "100 members x 5,000 messages",
                 {"scenario": "fanout", "members": 100, "messages": 5000, "window": 16, "window_scope": "all"},
                 METRICS, ("members", "messages")),
        # A fixed load of 100,000 deliveries/s, which the load generator keeps up with (about half a core): the
        # servers' CPU at that load, not the load generator's limit, decides the ceiling.
        Scenario("rate1000", "1,000 members, 100 messages/s for 5 s (100,000 deliveries/s)",
                 {"scenario": "rate", "members": 1000, "rate": 100, "duration": 5}, METRICS, ("members",)),
        Scenario("rate100", "100 members, 1,000 messages/s for 5 s (100,000 deliveries/s)",
                 {"scenario": "rate", "members": 100, "rate": 1000, "duration": 5}, METRICS, ("members",)),
        # Chats from random members of the one room, so every worker publishes (and the chats of the two
        # workers meet in the room's seq order): at most ``window`` in flight, each until its sender got it.
        Scenario("spread100", "100 members x 5,000 messages from random members",
                 {"scenario": "rooms", "rooms": 1, "room_size": 100, "messages": 5000, "window": 16}, METRICS,
                 ("messages",)),
    )
}
WORKERS = {"memory": 0, "redis-workers1": 1, "redis-workers2": 2}  # 0: no Redis, one process
REFERENCE = "redis-workers2"
RATIO_METRICS = ("deliveries_per_s", "cpu_us_per_delivery", "worker_ceiling_per_s")
_PREFIXES = itertools.count(1)


class Redis:
    """The Redis the servers use: a private ``redis-server`` on a free port, or a running one (``url``)."""

    def __init__(self, url: str | None, workdir: Path) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        if url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not installed (or pass --redis URL)")
            port = free_port()
            self.process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
        self.url = url
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        deadline = time.monotonic() + 10
        while True:
            try:
                self.pid = int(self.info("server")["process_id"])
                break
            except (OSError, subprocess.SubprocessError, KeyError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no Redis answers at {url}") from None
                time.sleep(0.05)
        self.version = self.info("server").get("redis_version", "?")

    def cli(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args], input=stdin,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def info(self, section: str) -> dict[str, str]:
        pairs = (line.split(":", 1) for line in self.cli("info", section).splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def delete_prefix(self, prefix: str) -> int:
        keys = self.cli("--scan", "--pattern", prefix + "*").split()
        for start in range(0, len(keys), 500):
            self.cli("DEL", *keys[start:start + 500])
        return len(keys)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open (from /proc; empty if it is gone)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _tcp_sockets(port: int, state: str) -> set[str]:
    """Inodes of the TCP sockets bound to local ``port`` in ``state`` (01 established, 0A listening)."""
    found = set()
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table_path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                found.add(fields[9])
    return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


class WorkersServer(ServerProcess):
    """roomserver on the memory store and broker (``workers=0``) or on Redis with ``--workers N``: ready once every
    process listens on the port and ``/healthz`` shows all of them in the cluster view."""

    def __init__(self, name: str, log_dir: Path, redis: Redis) -> None:
        self.workers = WORKERS[name]
        self.redis = redis
        self.prefix = f"bench-workers-{os.getpid()}-{next(_PREFIXES)}:"
        self.pids: list[int] = []
        super().__init__(name, log_dir, self._argv)

    def _argv(self, port: int) -> list[str]:
        argv = roomserver_argv(port)
        if self.workers:
            url = f"{self.redis.url}?prefix={self.prefix}"
            argv[argv.index("--store") + 1] = url
            argv += ["--broker", url, "--workers", str(self.workers)]
        return argv

    def listening_pids(self) -> list[int]:
        listening = _tcp_sockets(self.port, "0A")
        candidates = [self.proc.pid, *_children(self.proc.pid)]
        return [pid for pid in candidates if socket_inodes(pid) & listening]

    def connections_by_pid(self) -> dict[int, int]:
        established = _tcp_sockets(self.port, "01")
        return {pid: len(socket_inodes(pid) & established) for pid in self.pids}

    def wait_ready(self, timeout: float = 60.0) -> None:
        super().wait_ready(timeout)
        deadline = time.monotonic() + timeout
        expected = max(1, self.workers)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            pids = self.listening_pids()
            if len(pids) == expected and self._healthy(expected):
                self.pids = pids
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {expected} processes not listening and healthy within {timeout} s")

    def _healthy(self, expected: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                body = json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        if not self.workers:
            return bool(body.get("status") == "ok")
        cluster = body.get("broker", {}).get("cluster", {})
        nodes = cluster.get("nodes")
        count = len(nodes) if isinstance(nodes, (list, dict)) else nodes
        return bool(body.get("status") == "ok" and count == expected)

    def stop(self) -> None:
        super().stop()  # SIGTERM to the first process, which stops its workers
        for pid in self.pids:  # a worker that outlived the first process (checked to be ours: pids get reused)
            with contextlib.suppress(OSError):
                if f"tcp:{self.port}:".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        if self.workers:
            self.redis.delete_prefix(self.prefix)


def derive(result: dict[str, Any], connections: dict[int, int], uses_redis: bool) -> dict[str, Any]:
    """The figures of the table from the load generator's raw ones."""
    by_pid = {int(pid): seconds for pid, seconds in result.get("server_cpu_s_by_pid", {}).items()}
    waits = {int(pid): seconds for pid, seconds in result.get("server_wait_s_by_pid", {}).items()}
    elapsed = result["elapsed_s"]
    cpus = sorted(by_pid.values(), reverse=True)
    busiest = max(by_pid, key=lambda pid: by_pid[pid])
    redis_cpu_s = result.get("watch_cpu_s", {}).get("redis")
    result["connections_by_pid"] = {str(pid): count for pid, count in connections.items()}
    result["busiest_worker_cpu_pct"] = 100 * cpus[0] / elapsed
    # CPU + time waiting for a core: near 100 % means the process always had work (it, or the processes
    # taking its core, were the limit); well below means it sat idle waiting for input.
    result["busiest_worker_demand_pct"] = 100 * (cpus[0] + waits.get(busiest, math.nan)) / elapsed
    result["loadgen_demand_pct"] = result["loadgen_cpu_pct"] + 100 * result.get("loadgen_wait_s", math.nan) / elapsed
    if len(cpus) > 1:
        result["other_worker_cpu_pct"] = 100 * cpus[1] / elapsed
    result["redis_cpu_pct"] = 100 * redis_cpu_s / elapsed if redis_cpu_s is not None else None
    result["machine_cpu_pct"] = result["server_cpu_pct"] + result["loadgen_cpu_pct"] + (result["redis_cpu_pct"] or 0)
    deliveries = result["deliveries"]
    result["worker_ceiling_per_s"] = deliveries / cpus[0] if cpus[0] > 0 else None
    if uses_redis and redis_cpu_s:
        result["redis_ceiling_per_s"] = deliveries / redis_cpu_s
    return result


def measurer(redis: Redis, pause_ms: int = 300) -> Any:
    """``measure`` for bench.run's loop: the load generator watches every server process and Redis; the
    members' spread over the workers is read while the load generator pauses after its set-up."""

    def measure(server: ServerProcess, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert isinstance(server, WorkersServer)
        ready_file = Path(tempfile.mkdtemp(prefix="bench-workers-")) / "ready"
        config = dict(config, pids=server.pids, watch_pids={"redis": redis.pid}, ready_file=str(ready_file),
                      ready_pause_ms=pause_ms)
        outcome: dict[str, Any] = {}

        def drive() -> None:
            try:
                outcome["result"] = run_scenario(server, config, timeout)
            except Exception as exc:  # re-raised in the caller's thread
                outcome["error"] = exc

        runner = threading.Thread(target=drive, daemon=True)
        runner.start()
        connections: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while runner.is_alive() and time.monotonic() < deadline:
            if ready_file.exists():
                connections = server.connections_by_pid()
                break
            time.sleep(0.02)
        runner.join(max(1.0, deadline - time.monotonic()))
        shutil.rmtree(ready_file.parent, ignore_errors=True)
        if "error" in outcome:
            raise outcome["error"]
        if "result" not in outcome:
            raise RuntimeError("the load generator did not finish in time")
        return derive(outcome["result"], connections, bool(server.workers))

    return measure


def spread(results: Results, servers: Sequence[str], scenarios: Sequence[str]) -> str:
    """Members per worker process in every run (the kernel's SO_REUSEPORT spread), first process first."""
    lines = ["| scenario | server | connections per process, each run |", "|---|---|---|"]
    for scenario in scenarios:
        for server in servers:
            runs = results.runs.get((scenario, server), [])
            cells = ["/".join(str(n) for n in run_result.get("connections_by_pid", {}).values()) for run_result in runs]
            lines.append(f"| {scenario} | {server} | {', '.join(cells) or '-'} |")
    return "\n".join(lines)


def targets(results: Results, scenarios: Sequence[str]) -> list[str]:
    """Issue 8's ``--workers 2`` target (>= 1.7x one worker), on wall-clock deliveries/s and on the ceiling."""
    checks = []
    for scenario in scenarios:
        for metric, what in (("deliveries_per_s", "deliveries/s on this machine"),
                             ("worker_ceiling_per_s", "ceiling with a core per worker")):
            two = results.median(scenario, REFERENCE, metric)
            for base in ("redis-workers1", "memory"):
                one = results.median(scenario, base, metric)
                if two is not None and one:
                    ratio = two / one
                    checks.append(f"{scenario}: {what}, {REFERENCE} ÷ {base} = {ratio:.2f} (target >= 1.70): "
                                  + ("met" if ratio >= 1.7 else "NOT met"))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply member and message counts")
    parser.add_argument("--servers", default=",".join(WORKERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--window", type=int, help="chats in flight (default 16); more keeps every worker busier")
    parser.add_argument("--redis", help="use this running Redis (redis://HOST:PORT/DB) instead of a private one")
    parser.add_argument("--json", type=Path, help="also write every run's raw figures here")
    parser.add_argument("--log-dir", type=Path, default=BENCH / "results", help="server logs go here")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in servers if s not in WORKERS] + [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    if shutil.which("node") is None or not (BENCH / "node_modules" / "ws").is_dir():
        parser.error("the load generator needs Node.js and bench/node_modules: run `make bench-deps` first")
    catalog = SCENARIOS
    if args.window:
        catalog = {name: dataclasses.replace(scenario, config={**scenario.config, "window": args.window})
                   for name, scenario in SCENARIOS.items()}
    args.log_dir.mkdir(parents=True, exist_ok=True)
    redis = Redis(args.redis, args.log_dir)
    try:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        header = (f"{machine()}; Redis {redis.version} at {redis.url} "
                  f"({'private' if redis.process else 'shared'}, pid {redis.pid})")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True,
                                text=True, check=False).stdout.strip()
        print(f"# roomserver --workers benchmark, {started}, commit {commit or '?'}\n{header}\n"
              f"runs={args.runs} scale={args.scale} window={args.window or 16}", flush=True)
        results = run(servers, scenarios, args.runs, args.scale, args.log_dir,
                      progress=lambda line: print(line, flush=True),
                      start=lambda name, log_dir: WorkersServer(name, log_dir, redis),
                      measure=measurer(redis), catalog=catalog)
        load = os.getloadavg()
        print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(table(results, servers, scenarios, catalog=catalog, reference=REFERENCE,
                    ratio_metrics=RATIO_METRICS))
        print("\n### Members per process (SO_REUSEPORT)\n")
        print(spread(results, servers, scenarios))
        report_end(results, targets(results, scenarios), "Target (issue 8)", args.json, started=started,
                   commit=commit, machine=header, runs=args.runs, scale=args.scale)
    finally:
        redis.stop()
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
