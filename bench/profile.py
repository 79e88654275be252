"""Profile one server under one benchmark scenario with py-spy, and print where its time goes.

Usage: python -m bench.profile [--server roomserver] [--scenario fanout1000] [--scale 1.0] [--top 25]
                               [--redis redis://127.0.0.1:6379/0]

``--redis URL`` profiles roomserver with the Redis store and broker there (one process, its own key prefix,
deleted afterwards): where a clustered node's time goes. The scenarios of ``bench.workers`` (``rate100``, ...)
can be named too.

py-spy (``pip install py-spy``; a profiling tool, not a dependency of roomserver) samples the server process
from the outside, so the server runs unmodified, and only during the measured phase: the load generator writes
a ready file once its connections are set up and waits for py-spy to attach. The output is the
functions with the most samples on top of the stack (self time) and the most samples anywhere on the stack
(total time), plus the collapsed stacks file for a flame graph tool.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .run import BENCH, SCENARIOS, SERVERS, ServerProcess, roomserver_argv, run_scenario
from .workers import SCENARIOS as WORKER_SCENARIOS
from .workers import Redis

CATALOG = {**SCENARIOS, **WORKER_SCENARIOS}


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = [frame.split(" (")[0] + " " + frame.split("/")[-1].rstrip(")") for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples", "", "self time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total time (on the stack):"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="roomserver", choices=sorted(SERVERS))
    parser.add_argument("--scenario", default="fanout1000", choices=sorted(CATALOG))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--redis", metavar="URL", help="the Redis store and broker (roomserver only)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "profile.txt")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    redis = Redis(args.redis, args.out.parent) if args.redis else None
    prefix = f"profile-{os.getpid()}:"
    argv_of = None
    if redis is not None:
        if args.server != "roomserver":
            parser.error("--redis profiles roomserver only")
        url = f"{redis.url}?prefix={prefix}"
        argv_of = lambda port: [*roomserver_argv(port), "--store", url, "--broker", url]  # noqa: E731
    server = ServerProcess(args.server, args.out.parent, argv_of)
    outcome: dict[str, object] = {}
    try:
        server.wait_ready()
        ready_file = Path(tempfile.mkdtemp()) / "ready"
        config = dict(CATALOG[args.scenario].at_scale(args.scale), ready_file=str(ready_file), ready_pause_ms=1500)
        runner = threading.Thread(target=lambda: outcome.update(result=run_scenario(server, config, timeout=600)))
        runner.start()
        deadline = time.monotonic() + 600
        while not ready_file.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        spy = subprocess.Popen([py_spy, "record", "--pid", str(server.proc.pid), "--format", "raw", "--rate", "250",
                                "--output", str(args.out), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runner.join(600)
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    finally:
        server.stop()
        if redis is not None:
            redis.delete_prefix(prefix)
            redis.stop()
    result: dict[str, object] = outcome.get("result", {})  # type: ignore[assignment]
    print({k: result.get(k) for k in ("deliveries", "cpu_us_per_delivery", "deliveries_per_s", "p99_ms")})
    print(summarize(args.out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
