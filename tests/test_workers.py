"""``twistd roomserver --workers 2``: two processes share one port (SO_REUSEPORT) and act as one server through
Redis; SIGTERM to the first stops both; a worker whose first process was killed (SIGKILL) stops by itself;
a worker logs as the first process does."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from roomserver.tap import Options
from roomserver.workers import SupervisorWatch

from .cluster_support import Node
from .redis_support import REDIS_URL, delete_prefix_now, unique_prefix
from .support import WSClient, aio


def test_workers_need_the_redis_broker_and_a_port_number() -> None:
    with pytest.raises(Exception, match="--workers needs --broker redis"):
        Options().parseOptions(["--workers", "2", "--store", "memory"])
    with pytest.raises(Exception, match="reuse_port needs a port number or a tcp: port description"):
        Options().parseOptions(["--reuse-port", "--port", "unix:/tmp/x.sock", "--store", "memory"])
    config = Options()
    config.parseOptions(["--reuse-port", "--port", "0", "--store", "memory"])
    assert config.server_options().reuse_port


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Node]:
    prefix = unique_prefix()
    node = Node(f"{REDIS_URL}?prefix={prefix}", tmp_path, "workers", "--workers", "2")
    node.start().wait()
    try:
        yield node
    finally:
        node.stop()
        delete_prefix_now(prefix)
    assert not node.tracebacks(), node.tracebacks()


def node_of_each_request(port: int, count: int) -> dict[str, int]:
    """Which process answered each of ``count`` fresh HTTP connections: node id -> WebSocket connections."""
    seen: dict[str, int] = {}
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:  # degraded while a worker is still starting
            body = json.loads(error.read())
        seen[body["broker"]["node"]] = body["connections"]
    return seen


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port_and_rooms_span_them(workers: Node) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {}
    for _ in range(50):  # the second worker starts after the first listens
        seen = await aio(loop.run_in_executor(None, node_of_each_request, workers.port, 20))
        if len(seen) == 2:
            break
        await aio(asyncio.sleep(0.2))
    assert len(seen) == 2, f"connections reach two processes: {seen}"

    clients = [await WSClient.connect(workers.url) for _ in range(12)]
    for client in clients:
        await client.recv()
        assert (await client.request({"type": "join", "room": "spanning"}))["type"] == "joined"
    per_node = await aio(loop.run_in_executor(None, node_of_each_request, workers.port, 30))
    assert len(per_node) == 2 and all(count > 0 for count in per_node.values()), per_node
    await clients[0].send({"type": "chat", "room": "spanning", "text": "to everyone"})
    for client in clients:
        message = await client.recv()
        assert (message["type"], message["text"], message["seq"]) == ("chat", "to everyone", 1)
    for client in clients:
        await client.close()

    pids = [int(pid) for pid in re.findall(r"started worker 1 \(pid (\d+)\)", workers.log.read_text())]
    assert pids
    workers.stop()
    assert workers.process is not None and workers.process.returncode in (0, -signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pids[-1]):
        await aio(asyncio.sleep(0.05))
    assert not alive(pids[-1]), "stopping the first process stops its workers"


def alive(pid: int) -> bool:
    """Running: not gone, nor a zombie (an orphan's exit is reaped by whatever adopted it, maybe never)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False




class RecordsStop:
    """The test's reactor, except that ``stop`` is only recorded (``stopped`` fires)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.running = True
        self.stopped: defer.Deferred[None] = defer.Deferred()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def stop(self) -> None:
        self.stopped.callback(None)


@pytest_twisted.ensureDeferred
async def test_the_supervisor_watch_stops_the_worker_when_its_input_ends() -> None:
    from twisted.internet import reactor

    read_end, write_end = os.pipe()
    recorder = RecordsStop(reactor)
    watch = SupervisorWatch(recorder, fd=read_end)
    watch.startService()
    try:
        os.write(write_end, b"anything the supervisor writes is read and dropped\n")
        await aio(asyncio.sleep(0.1))
        assert not recorder.stopped.called
        os.close(write_end)  # the supervisor is gone: the kernel closes its end
        await aio(asyncio.wait_for(recorder.stopped.asFuture(asyncio.get_running_loop()), 5))
    finally:
        watch.stopService()
        os.close(read_end)


def test_a_worker_whose_first_process_was_killed_stops(workers: Node) -> None:
    """SIGKILL gives the first process no chance to stop its workers: each notices its pipe from it closed,
    and stops (draining its clients) rather than serve the port unsupervised."""
    pid = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not pid:
        found = re.findall(r"started worker 1 \(pid (\d+)\)", workers.log.read_text())
        pid = int(found[-1]) if found else 0
        time.sleep(0.05)
    assert pid and alive(pid)
    workers.kill()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        assert not alive(pid), "the orphaned worker stopped"
    finally:
        if alive(pid):  # no orphan outlives a failed test
            os.kill(pid, signal.SIGKILL)
    assert "the process that started this worker is gone" in workers.log.read_text()


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] ")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_worker_logs_in_the_format_the_first_process_logs(tmp_path: Path, log_format: str) -> None:
    """Every line of both processes has the documented format (docs/observability.md): the workers used to run
    as ``python -m twisted``, which ignores ``--log-format`` and writes Twisted's raw JSON events when its
    output is not a terminal; and no ``twistd.log`` appears beside them."""
    prefix = unique_prefix()
    node = Node(f"{REDIS_URL}?prefix={prefix}", tmp_path, "workers", "--workers", "2", "--log-format", log_format)
    node.start().wait()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and node.log.read_text().count("roomserver listening on") < 2:
            time.sleep(0.05)
        assert node.log.read_text().count("roomserver listening on") == 2, "both processes started"
    finally:
        node.stop()
        delete_prefix_now(prefix)
    lines = node.log.read_text().splitlines()
    listening = [line for line in lines if "roomserver listening on" in line]
    if log_format == "json":
        events = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all(list(event)[:4] == ["time", "level", "namespace", "message"] for event in events), lines
        assert len([event for event in events if event["message"].startswith("roomserver listening on")]) == 2
    else:
        starts = [line for line in lines if line and not line[0].isspace() and not line.startswith("Traceback")]
        assert all(TEXT_LINE.match(line) for line in starts), [line for line in starts if not TEXT_LINE.match(line)]
        assert all(TEXT_LINE.match(line) for line in listening) and len(listening) == 2
    assert not (tmp_path / "twistd.log").exists()


def test_worker_twistd_options_log_where_the_first_process_logs() -> None:
    from roomserver.workers import worker_twistd_options

    assert worker_twistd_options(None, 1) == ["--nodaemon", "--pidfile="]
    assert worker_twistd_options({"nodaemon": True, "logfile": None, "syslog": False}, 1) == [
        "--nodaemon", "--pidfile="], "stdout, shared with the first process"
    assert worker_twistd_options({"nodaemon": True, "logfile": "/var/log/rs.log"}, 2)[-2:] == [
        "--logfile", "/var/log/rs.log.worker2"], "a file of its own: twistd's log files rotate"
    assert worker_twistd_options({"nodaemon": False, "logfile": None}, 1)[-1] == os.path.abspath(
        "twistd.log") + ".worker1", "a daemon's default log file"
    assert worker_twistd_options({"nodaemon": True, "syslog": True, "prefix": "rs"}, 1)[2:] == [
        "--syslog", "--prefix", "rs"]
    assert worker_twistd_options({"nodaemon": True, "logger": "my.observer"}, 1)[2:] == [
        "--logger", "my.observer"]
    from twisted.python.reflect import namedAny

    from roomserver.logs import json_log_target

    # What twistd's own parsing leaves there: the imported observer factory, not its name (str() of it made every
    # worker's twistd exit with "could not be imported", restarted each second for ever).
    [flag, name] = worker_twistd_options({"nodaemon": True, "logger": json_log_target}, 1)[2:]
    assert flag == "--logger" and namedAny(name) is json_log_target
