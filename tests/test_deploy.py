"""deploy/haproxy.cfg, run by a real HAProxy (Debian's package) in front of two ``twistd roomserver`` nodes:
WebSocket upgrades pass, connections spread over the nodes, and when a node stops (SIGTERM: 1001) its clients
come back through HAProxy to the other node and resume with nothing lost."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets

from roomserver.roomclient import RoomClient

from .cluster_support import Member, Node, SteadyPublisher, publish
from .redis_support import REDIS_URL, delete_prefix_now, unique_prefix
from .support import aio, eventually
from .twistd_support import ROOT, free_port, wait_for_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, list[Node]]]:
    prefix = unique_prefix()
    # Small drain batches, so a drained node still drains (listening, refusing upgrades with 503) while its
    # first clients come back: HAProxy must send them to the other node.
    nodes = [Node(f"{REDIS_URL}?prefix={prefix}", tmp_path, f"node{i}", "--drain-batch", "2", "--drain-interval",
                  "0.5", "--trusted-proxies", "127.0.0.1").start() for i in range(2)]
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


class CountingClient(RoomClient):
    """Counts its connection attempts (each reconnect, whatever became of it)."""

    connects = 0

    def _connect_once(self) -> Any:
        self.connects += 1
        return super()._connect_once()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_a_node_and_its_roomclients_resume_through_haproxy_with_nothing_lost(
        deployment: tuple[str, list[Node]]) -> None:
    """A rolling restart's one step: SIGTERM on a node under a steady publisher. Its RoomClients get the reconnect
    hint, come back after the hinted delay through HAProxy (which retries the draining node's 503 or refusal on
    the other node: each client connects once), resume, and end with every seq once, in order."""
    url, nodes = deployment
    total = 300
    clients = [CountingClient(url, request_timeout=20) for _ in range(8)]
    seqs: list[list[int]] = [[] for _ in clients]
    texts: list[dict[int, str]] = [{} for _ in clients]
    hints: list[list[dict[str, Any]]] = [[] for _ in clients]
    retries: list[list[dict[str, Any]]] = [[] for _ in clients]
    for index, client in enumerate(clients):
        client.on("chat", lambda event, i=index: (seqs[i].append(event["seq"]),
                                                  texts[i].__setitem__(event["seq"], event["text"])))
        client.on("message", lambda event, i=index: event["type"] == "reconnect" and hints[i].append(event))
        client.on("state", lambda state, detail, i=index: state == "reconnecting" and "delay" in detail
                  and retries[i].append(detail))
        await client.connect()
        await client.join("draining")
    loop = asyncio.get_running_loop()
    counts = [(await aio(loop.run_in_executor(None, node.health)))[1]["connections"] for node in nodes]
    assert sum(counts) == 8 and min(counts) >= 2, f"leastconn spreads the clients: {counts}"

    publisher = SteadyPublisher([url], "draining", total, pause=0.01)
    publishing = asyncio.ensure_future(publisher.run())
    await eventually(lambda: len(publisher.acked) >= 50, timeout=20)
    await aio(loop.run_in_executor(None, nodes[0].stop))  # SIGTERM: drain
    await aio(asyncio.wait_for(publishing, 60))
    await eventually(lambda: all(len(received) >= total for received in seqs), timeout=30)

    assert sorted(publisher.acked.values()) == list(range(1, total + 1)), "every chat stored exactly once"
    by_seq = {seq: f"m{number}" for number, seq in publisher.acked.items()}
    for index in range(len(clients)):
        assert seqs[index] == list(range(1, total + 1)), f"client {index}: 0 gaps, 0 duplicates, in order"
        assert texts[index] == by_seq
    drained = [index for index in range(len(clients)) if hints[index]]
    assert len(drained) == counts[0], "the stopped node's clients, and only they, got the reconnect hint"
    for index in drained:
        [hint] = hints[index]
        assert hint["resume"] is True and 0 <= hint["after_ms"] < 500, hint
        assert [(retry["hinted"], retry["delay"]) for retry in retries[index]] == [(True, hint["after_ms"] / 1000)], \
            "it came back after the hinted delay"
        assert clients[index].connects == 2, "at the first try: HAProxy retried the draining node on the other one"
    final = (await aio(loop.run_in_executor(None, nodes[1].health)))[1]["connections"]
    assert final == 8, "every client is on the remaining node"
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_nodes_see_the_clients_address_through_haproxy_and_no_spoofed_one(
        deployment: tuple[str, list[Node]]) -> None:
    """HAProxy appends the client's address to X-Forwarded-For (``option forwardfor``); the nodes trust only
    HAProxy's (127.0.0.1), so a client at 127.0.0.2 that sent a made-up hop is logged as 127.0.0.2."""
    url, nodes = deployment
    ws = await aio(websockets.connect(url, additional_headers={"X-Forwarded-For": "6.6.6.6"},
                                      local_addr=("127.0.0.2", 0), ping_interval=None))
    assert json.loads(await aio(ws.recv()))["type"] == "welcome"
    await eventually(lambda: any("opened from 127.0.0.2 " in node.log.read_text() for node in nodes), timeout=5)
    assert not any("6.6.6.6" in node.log.read_text() for node in nodes)
    await aio(ws.close())
