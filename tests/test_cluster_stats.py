"""Cluster stats: ``get_stats()`` stays per node, ``get_cluster_stats()`` shows every live node, and the
dashboard's feed pushes that view (pure parts on plain values, the relay's report on a fake clock, then two
nodes in this process and two ``twistd roomserver`` nodes on the real Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import websockets
from twisted.internet import task

from roomserver import ClusterStats, NodeStats, ServerOptions, ServerStats, WebSocketServer
from roomserver.core.stats import RateMeter, cluster_from_view, node_from_report, single_node

from .cluster_support import Node, running_nodes
from .redis_support import REDIS_URL, delete_prefix, unique_prefix
from .support import WSClient, aio, url_of

# -- pure parts ------------------------------------------------------------------------------------------------


def report(node: str, connections: int, rooms: int, sent: int, received: int, **extra: Any) -> dict[str, Any]:
    return {"node": node, "connections": connections, "rooms": rooms, "messages_sent": sent,
            "messages_received": received, **extra}


def test_the_view_sums_the_nodes_and_counts_rooms_once() -> None:
    view = cluster_from_view(
        [report("b", 1, 2, 30, 4, messages_in_per_s=1.5, messages_out_per_s=2.0, heartbeat=99.0),
         report("a", 2, 1, 10, 6, messages_in_per_s=0.5, messages_out_per_s=1.0, heartbeat=100.0,
                address="web-1:8080")],
        distinct_rooms=2, local_node="a", as_of=100.0)
    assert [entry.node for entry in view.nodes] == ["a", "b"], "nodes by id"
    assert (view.connections, view.rooms, view.messages_sent, view.messages_received) == (3, 2, 40, 10)
    assert (view.messages_in_per_s, view.messages_out_per_s) == (2.0, 3.0)
    a = view.get("a")
    assert a is not None and a.local and a.address == "web-1:8080" and a.age == 0.0 and a.ok
    b = view.get("b")
    assert b is not None and not b.local and b.age == 1.0
    assert view.get("c") is None
    assert view.clustered and view.ok and view.as_of == 100.0
    wire = view.as_json()
    assert wire["totals"] == {"nodes": 2, "connections": 3, "rooms": 2, "messages_sent": 40,
                              "messages_received": 10, "messages_in_per_s": 2.0, "messages_out_per_s": 3.0}
    assert [entry["node"] for entry in wire["nodes"]] == ["a", "b"] and wire["nodes"][0]["local"] is True


def test_a_node_that_says_so_or_stopped_reporting_is_degraded() -> None:
    unhealthy = node_from_report(report("a", 1, 1, 0, 0, status="degraded", heartbeat=10.0), "x", 10.0, 4.0)
    assert unhealthy.status == "degraded" and not unhealthy.ok
    late = node_from_report(report("b", 1, 1, 0, 0, heartbeat=5.0), "x", now=10.0, late_after=4.0)
    assert late.status == "degraded" and late.age == 5.0
    on_time = node_from_report(report("c", 1, 1, 0, 0, heartbeat=7.0), "x", now=10.0, late_after=4.0)
    assert on_time.ok
    view = cluster_from_view([report("a", 1, 1, 0, 0, status="degraded")], 1, "a", None)
    assert not view.ok


def test_a_malformed_or_older_report_still_shows_its_node() -> None:
    entry = node_from_report({"node": "old", "connections": "x", "rooms": None}, "me")
    assert entry == NodeStats(node="old", connections=0, rooms=0, messages_sent=0, messages_received=0)
    assert entry.messages_in_per_s is None and entry.as_json()["messages_in_per_s"] is None
    view = cluster_from_view([{"node": "old", "connections": 2}], 1, "me", None)
    assert view.messages_in_per_s is None, "no node measured a rate: the total says so rather than 0"


def test_one_node_is_its_own_view() -> None:
    view = single_node(ServerStats(3, 2, 10, 4), "web-1:8080", "web-1:8080")
    assert not view.clustered and view.as_of is None
    assert (view.connections, view.rooms, view.messages_sent, view.messages_received) == (3, 2, 10, 4)
    assert view.nodes == (NodeStats("web-1:8080", 3, 2, 10, 4, address="web-1:8080", local=True),)


def test_rate_meter_measures_between_readings() -> None:
    meter = RateMeter()
    assert meter.update(10.0, 5, 50) == (0.0, 0.0), "nothing to compare the first reading with"
    assert meter.update(12.0, 9, 70) == (2.0, 10.0)
    assert meter.update(12.0, 20, 80) == (0.0, 0.0), "the clock did not move"
    assert meter.update(14.0, 10, 80) == (0.0, 0.0), "counters never run backwards into a negative rate"


# -- the node's report and get_cluster_stats() in this process -------------------------------------------------


def test_get_stats_keeps_the_seed_shape_and_the_memory_broker_gives_a_one_node_view() -> None:
    server = WebSocketServer(ServerOptions(port=0, room_protocol=True), reactor=task.Clock())
    assert server.get_stats() == ServerStats(0, 0, 0, 0)
    server.counters.connected()
    server.counters.received(10)
    view = server.get_cluster_stats()
    assert isinstance(view, ClusterStats) and not view.clustered
    assert [(entry.connections, entry.messages_received, entry.local) for entry in view.nodes] == [(1, 1, True)]
    assert view.connections == 1 and view.node == server.relay.address


def test_the_heartbeat_report_carries_rates_and_health_measured_on_the_node() -> None:
    clock = task.Clock()
    clock.advance(100.0)
    server = WebSocketServer(ServerOptions(port=0, room_protocol=True), reactor=clock)
    first = server.relay._report()
    assert first["status"] == "ok" and first["messages_in_per_s"] == 0.0
    for _ in range(6):
        server.counters.received(10)
    server.counters.sent(10, recipients=12)
    clock.advance(2.0)
    second = server.relay._report()
    assert (second["messages_in_per_s"], second["messages_out_per_s"]) == (3.0, 6.0)
    assert (second["messages_received"], second["messages_sent"]) == (6, 12)
    assert second["address"] == server.relay.address
    server._stopping = True
    assert server.relay._report()["status"] == "draining", "a stopping node reports itself draining"
    assert node_from_report(server.relay._report(), "x").status == "draining"


def test_a_node_whose_broker_is_not_connected_reports_degraded() -> None:
    server = WebSocketServer(ServerOptions(port=0, store=REDIS_URL, broker=REDIS_URL), reactor=task.Clock())
    assert server.relay._report()["status"] == "degraded"
    view = server.get_cluster_stats()
    assert view.clustered and view.as_of is None, "no view read yet: this node alone"
    assert [entry.node for entry in view.nodes] == [server.broker.node_id]  # type: ignore[attr-defined]
    assert not view.ok


async def until(condition: Callable[[], bool], timeout: float) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await aio(asyncio.sleep(0.05))
    raise AssertionError("condition not met in time")


@pytest_twisted.async_yield_fixture
async def redis_url() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield f"{REDIS_URL}?prefix={prefix}"
    await delete_prefix(prefix)


def matches(entry: NodeStats | None, stats: ServerStats) -> bool:
    return entry is not None and (entry.connections, entry.rooms, entry.messages_sent, entry.messages_received) \
        == (stats.connections, stats.rooms, stats.messages_sent, stats.messages_received)


@pytest_twisted.ensureDeferred
async def test_every_node_sees_every_live_node_with_its_own_get_stats(make_server: Any, redis_url: str) -> None:
    """Two nodes in this process on the real Redis: each one's ``get_cluster_stats()`` lists both, with the
    figures each node's ``get_stats()`` gives; a node that stops leaves the view."""
    a = await make_server(room_protocol=True, store=redis_url, broker=redis_url, rate_limit=0)
    b = await make_server(room_protocol=True, store=redis_url, broker=redis_url, rate_limit=0)
    clients = []
    for server, room in ((a, "shared"), (a, "shared"), (b, "shared"), (b, "b-only")):
        client = await WSClient.connect(url_of(server))
        await client.recv()
        assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
        clients.append(client)
    delivered_on_b = b.get_stats().messages_sent  # replies count as sent messages too
    await clients[0].send({"type": "chat", "room": "shared", "text": "hello", "id": 1})
    await until(lambda: b.get_stats().messages_sent == delivered_on_b + 1, timeout=5)

    def settled(viewer: WebSocketServer) -> bool:
        view = viewer.get_cluster_stats()
        return len(view.nodes) == 2 and all(
            matches(view.get(node.broker.node_id), node.get_stats()) for node in (a, b))

    await until(lambda: settled(a) and settled(b), timeout=10)  # heartbeats every 2 s
    view = a.get_cluster_stats()
    assert (view.connections, view.rooms) == (4, 2), "the shared room counts once"
    assert view.messages_sent == a.get_stats().messages_sent + b.get_stats().messages_sent
    assert view.messages_received == 1 + 4  # the chat and the four joins
    assert view.get(a.broker.node_id).local and not view.get(b.broker.node_id).local  # type: ignore[union-attr]
    assert view.ok and view.clustered and view.as_of is not None
    assert all(entry.messages_in_per_s is not None for entry in view.nodes)
    own = a.get_stats()
    assert own == ServerStats(2, 1, own.messages_sent, 3), "get_stats() stays this node's, in the seed's shape"
    for client in clients:
        await client.close()
    await b.stop()
    await until(lambda: [entry.node for entry in a.get_cluster_stats().nodes] == [a.broker.node_id], timeout=10)


@pytest_twisted.ensureDeferred
async def test_the_heartbeat_rebuilds_a_room_set_that_expired_and_never_leaves_a_key_without_ttl(
        redis_url: str) -> None:
    """``nr:<node>`` expires 6 s after the last heartbeat: a reactor stall that long (a collector pause, an
    overload) lets it go while the connection stays. The next heartbeat must write it whole again (it was only
    rewritten after a reconnect: the view counted the node's rooms as 0 for good), and a room joined meanwhile
    must not create it partial; the node's keys always carry their ttl."""
    from twisted.internet import reactor

    from roomserver.broker.redis import RedisBroker

    from .redis_support import redis_link

    broker = RedisBroker(redis_url, reactor, node_id="stalled")
    broker.publisher.start()
    link = await redis_link()
    prefix = redis_url.partition("prefix=")[2].encode()
    rooms_key, report_key = prefix + b"nr:stalled", prefix + b"n:stalled"
    try:
        await broker.publisher.when_connected(5)

        async def members() -> list[bytes]:
            return sorted(await link.command("SMEMBERS", rooms_key))

        async def with_ttl(key: bytes) -> bool:
            return 0 < int(await link.command("PTTL", key)) <= 6000

        broker.subscribe("r1")  # the node's only room: the set is whole with it
        await broker.publisher.command("PING")  # answered after the change, on the same connection
        assert await members() == [b"r1"] and await with_ttl(rooms_key)
        broker.subscribe("r2")
        await broker._beat()
        assert await members() == [b"r1", b"r2"] and await with_ttl(rooms_key) and await with_ttl(report_key)
        assert broker.cluster_view is not None and broker.cluster_view["rooms"] == 2

        await link.command("DEL", rooms_key, report_key)  # what a 7 s stall does
        broker.subscribe("r3")  # a join while it is gone: not a set of r3 alone
        await broker.publisher.command("PING")
        assert await link.command("EXISTS", rooms_key) == 0
        await broker._beat()
        assert await members() == [b"r1", b"r2", b"r3"], "the next heartbeat writes it whole"
        assert await with_ttl(rooms_key) and await with_ttl(report_key)
        assert broker.cluster_view["rooms"] == 3

        await link.command("DEL", rooms_key)
        await broker._beat()
        assert await members() == [b"r1", b"r2", b"r3"], "rebuilt within the heartbeat that found it gone"
    finally:
        await link.stop()
        await broker.publisher.stop()


# -- the dashboard feed of two twistd nodes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    with running_nodes(tmp_path_factory.mktemp("dashboard-cluster"), 2) as (_prefix, nodes):
        yield nodes


async def own_sample(node: Node) -> dict[str, Any]:
    """What a node's own dashboard says about it: its ``get_stats()`` at its last sample, and its node id."""
    async with websockets.connect(f"ws://127.0.0.1:{node.port}/dashboard/ws", open_timeout=5) as viewer:
        snapshot = json.loads(await asyncio.wait_for(viewer.recv(), 5))
        sample = json.loads(await asyncio.wait_for(viewer.recv(), 5))
    assert snapshot["type"] == "snapshot" and sample["type"] == "sample"
    return {"node": sample["cluster"]["node"], **sample["sample"]}


@pytest_twisted.ensureDeferred
async def test_the_dashboard_feed_of_one_node_pushes_every_node(two_nodes: list[Node]) -> None:
    """Clients on both nodes; the dashboard WebSocket of node 0 pushes (no request from the viewer) a nodes
    table holding node 1 too, with the figures node 1's own feed (its ``get_stats()``) and ``/healthz`` give,
    and the cluster's totals."""
    clients = []
    for node, room in ((0, "dash"), (1, "dash"), (1, "dash"), (1, "dash-b")):
        client = await WSClient.connect(two_nodes[node].url)
        await client.recv()
        assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
        clients.append(client)
    for i in range(3):
        await clients[1].send({"type": "chat", "room": "dash", "text": f"n{i}", "id": i})
    for client in clients[:3]:
        for _ in range(3):  # every member of "dash" got the three chats (the sender its acks too)
            while (await client.recv())["type"] != "chat":
                pass

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        own = [await own_sample(node) for node in two_nodes]
        health = [(await loop.run_in_executor(None, node.health))[1] for node in two_nodes]
        for sample, report in zip(own, health, strict=True):
            assert (sample["connections"], sample["rooms"]) == (report["connections"], report["rooms"])
            assert sample["node"] == report["broker"]["node"]
        expected = {sample["node"]: (sample["connections"], sample["rooms"], sample["messages_sent"],
                                     sample["messages_received"]) for sample in own}
        assert expected[own[1]["node"]][:2] == (3, 2) and expected[own[0]["node"]][:2] == (1, 1)
        async with websockets.connect(f"ws://127.0.0.1:{two_nodes[0].port}/dashboard/ws") as viewer:
            cluster: dict[str, Any] = {}
            for _ in range(20):  # a sample per second, the view changes with the heartbeats (2 s)
                message = json.loads(await asyncio.wait_for(viewer.recv(), 5))
                cluster = message["cluster"]
                seen = {entry["node"]: (entry["connections"], entry["rooms"], entry["messages_sent"],
                                        entry["messages_received"]) for entry in cluster["nodes"]}
                if seen == expected:
                    break
            assert seen == expected, cluster
        assert cluster["clustered"] is True and cluster["node"] == own[0]["node"]
        assert [entry["local"] for entry in cluster["nodes"] if entry["node"] == own[0]["node"]] == [True]
        ports = {report["broker"]["node"]: node.port for node, report in zip(two_nodes, health, strict=True)}
        for entry in cluster["nodes"]:
            assert entry["status"] == "ok" and entry["address"].endswith(f":{ports[entry['node']]}"), entry
            assert entry["messages_in_per_s"] is not None and entry["messages_out_per_s"] is not None
        totals = cluster["totals"]
        assert (totals["nodes"], totals["connections"], totals["rooms"]) == (2, 4, 2)
        assert totals["messages_sent"] == sum(value[2] for value in expected.values())

    await aio(scenario())
    for client in clients:
        await client.close()
