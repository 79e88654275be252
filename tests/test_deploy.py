"""deploy/haproxy.cfg, run by a real HAProxy (Debian's package) in front of two ``twistd roomserver`` nodes:
WebSocket upgrades pass, connections spread over the nodes, and when a node stops (SIGTERM: 1001) its clients
come back through HAProxy to the other node and resume with nothing lost."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from .cluster_support import Member, Node, publish
from .redis_support import REDIS_URL, delete_prefix_now, unique_prefix
from .support import aio
from .twistd_support import ROOT, free_port, wait_for_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, list[Node]]]:
    prefix = unique_prefix()
    nodes = [Node(f"{REDIS_URL}?prefix={prefix}", tmp_path, f"node{i}").start() for i in range(2)]
    front = free_port()
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    config = config.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{front}")
    config = config.replace("127.0.0.1:8081", f"127.0.0.1:{nodes[0].port}")
    config = config.replace("127.0.0.1:8082", f"127.0.0.1:{nodes[1].port}")
    config = "\n".join(line for line in config.splitlines() if "node3" not in line) + "\n"
    (tmp_path / "haproxy.cfg").write_text(config)
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for node in nodes:
            node.wait()
        with (tmp_path / "haproxy.log").open("wb") as log:
            haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                       stdout=subprocess.DEVNULL, stderr=log)
        wait_for_port(front, haproxy)
        yield f"ws://127.0.0.1:{front}/ws", nodes
    finally:
        if haproxy is not None:
            haproxy.kill()
            haproxy.wait(5)
        for node in nodes:
            node.stop()
        delete_prefix_now(prefix)


@pytest_twisted.ensureDeferred
async def test_haproxy_spreads_clients_and_a_stopped_nodes_clients_resume_on_the_other(
        deployment: tuple[str, list[Node]]) -> None:
    url, nodes = deployment
    total = 200
    members = [Member([url], "behind-haproxy", total) for _ in range(6)]
    tasks = [asyncio.ensure_future(member.run()) for member in members]
    await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 20))
    loop = asyncio.get_running_loop()
    counts = [(await aio(loop.run_in_executor(None, node.health)))[1]["connections"] for node in nodes]
    assert sum(counts) == 6 and min(counts) >= 2, f"leastconn spreads the clients: {counts}"

    await aio(asyncio.wait_for(publish(url, "behind-haproxy", [f"m{i}" for i in range(1, 101)]), 30))
    await aio(loop.run_in_executor(None, nodes[0].stop))  # SIGTERM: its clients get 1001
    acked = await aio(asyncio.wait_for(publish(url, "behind-haproxy", [f"m{i}" for i in range(101, total + 1)]),
                                       30))
    await aio(asyncio.wait_for(asyncio.gather(*tasks), 30))
    assert sorted(acked.values()) == list(range(101, total + 1))
    for member in members:
        assert member.texts == [f"m{i}" for i in range(1, total + 1)]
    assert sum(bool(member.resumes) for member in members) == counts[0], "the stopped node's clients resumed"
