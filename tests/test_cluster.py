"""Three ``twistd roomserver`` nodes on Redis acting as one server (store and broker in Redis).

Members are spread over the nodes; publishers on several nodes at once. Every member must see every message,
in the same order (the store's seq). Then one node is killed with SIGKILL while a publisher on another keeps
sending: its members move to the surviving nodes, resume, and still end with the full sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from .cluster_support import Member, Node, SteadyPublisher, publish, running_nodes
from .support import WSClient, aio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    with running_nodes(tmp_path_factory.mktemp("cluster"), 3) as (_prefix, nodes):
        yield nodes


async def settled_gap_fetches(nodes: list[Node]) -> list[float]:
    """Every node's gap fetches so far, once two reads a little apart agree (a new subscription's catch-up
    read is done)."""
    loop = asyncio.get_running_loop()

    def read() -> list[float]:
        return [node.metric("roomserver_cluster_gap_fetches_total") for node in nodes]

    last = await loop.run_in_executor(None, read)
    for _ in range(50):
        await asyncio.sleep(0.2)
        now = await loop.run_in_executor(None, read)
        if now == last:
            return now
        last = now
    raise AssertionError(f"gap fetches still moving: {last}")


@pytest_twisted.ensureDeferred
async def test_members_on_three_nodes_see_every_message_in_the_same_order(cluster: list[Node]) -> None:
    async def scenario() -> None:
        members = [Member([cluster[i % 3].url], "same-order", 300) for i in range(9)]
        tasks = [asyncio.ensure_future(member.run()) for member in members]
        await asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 20)
        fetches_before = await settled_gap_fetches(cluster)
        acks = await asyncio.wait_for(asyncio.gather(*(
            publish(cluster[n].url, "same-order", [f"n{n}-{i}" for i in range(100)]) for n in range(3))), 60)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert await settled_gap_fetches(cluster) == fetches_before, \
            "the store publishes in seq order (fused): chats of three nodes at once make no node read a gap"
        seqs = sorted(seq for acked in acks for seq in acked.values())
        assert seqs == list(range(1, 301)), "one gap-free seq for the whole cluster"
        by_seq = {seq: text for acked in acks for text, seq in acked.items()}
        expected = [by_seq[seq] for seq in range(1, 301)]
        for member in members:
            assert member.texts == expected, "every member, on every node, in the store's order"
        for n, acked in enumerate(acks):
            assert [acked[f"n{n}-{i}"] for i in range(100)] == sorted(acked.values()), "each publisher's order"

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_every_node_reports_the_cluster_view_of_all_live_nodes(cluster: list[Node]) -> None:
    clients = []
    for node, room in ((0, "view-1"), (0, "view-1"), (1, "view-1"), (2, "view-2")):
        client = await WSClient.connect(cluster[node].url)
        await client.recv()
        assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
        clients.append(client)
    loop = asyncio.get_running_loop()
    view: dict[str, Any] = {}
    for _ in range(40):  # heartbeats every 2 s
        _, health = await aio(loop.run_in_executor(None, cluster[2].health))
        view = health["broker"].get("cluster") or {}
        if view.get("connections") == 4 and view.get("rooms") == 2:
            break
        await aio(asyncio.sleep(0.2))
    assert (view["nodes"], view["connections"], view["rooms"]) == (3, 4, 2), view
    assert [node["connections"] for node in view["per_node"]] != [], view
    assert sorted(node["connections"] for node in view["per_node"]) == [1, 1, 2]
    for client in clients:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_rolling_restart_of_every_node_under_steady_publishing_loses_and_repeats_nothing(
        cluster: list[Node]) -> None:
    total = 600
    urls = [node.url for node in cluster]
    members = [Member(urls[i % 3:] + urls[:i % 3], "rolling", total) for i in range(6)]
    tasks = [asyncio.ensure_future(member.run()) for member in members]
    await aio(asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 20))
    # The last chat waits until every node was restarted: on a busy machine the others could all be delivered
    # before the last restart, and members already done would never be moved.
    restarted = asyncio.Event()
    publisher = SteadyPublisher(urls[1:] + urls[:1], "rolling", total, pause=0.01, hold_last=restarted)
    publishing = asyncio.ensure_future(publisher.run())
    loop = asyncio.get_running_loop()
    for node in cluster:  # SIGTERM (clients get 1001 and resume elsewhere), then start it again
        await aio(asyncio.sleep(0.3))
        await aio(loop.run_in_executor(None, node.stop))
        await aio(loop.run_in_executor(None, lambda node=node: node.start().wait()))
    restarted.set()
    await aio(asyncio.wait_for(publishing, 90))
    await aio(asyncio.wait_for(asyncio.gather(*tasks), 60))
    assert sorted(publisher.acked.values()) == list(range(1, total + 1)), "every chat stored exactly once"
    by_seq = {seq: f"m{number}" for number, seq in publisher.acked.items()}
    expected = [by_seq[seq] for seq in range(1, total + 1)]
    for member in members:
        assert member.texts == expected, "0 gaps, 0 duplicates, one order"
    assert all(member.resumes for member in members), "every member was moved at least once"
    assert all(member.hints for member in members), "each node drained its members with a reconnect hint"
    for member in members:
        for hint in member.hints:
            assert hint["resume"] is True and 0 <= hint["after_ms"] < 200, hint
    assert publisher.connections > 1, "the publisher's node was restarted under it too"


@pytest_twisted.ensureDeferred
async def test_killed_nodes_members_resume_on_survivors_with_the_full_sequence(cluster: list[Node]) -> None:
    total = 1000
    urls = [node.url for node in cluster]

    async def scenario() -> None:
        # Members of node 2 fall back to nodes 0 and 1 (in that order) when it dies.
        members = [Member(urls[i % 3:] + urls[:i % 3], "kill-9", total) for i in range(9)]
        tasks = [asyncio.ensure_future(member.run()) for member in members]
        await asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 20)
        victims = [member for member in members if member.nodes[0] == urls[2]]
        publisher = asyncio.ensure_future(publish(urls[0], "kill-9", [f"m{i}" for i in range(1, total + 1)]))
        for _ in range(400):
            if min(member.last_seq for member in victims) >= total // 4:
                break
            await asyncio.sleep(0.01)
        cluster[2].kill()
        acked = await asyncio.wait_for(publisher, 60)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert sorted(acked.values()) == list(range(1, total + 1))
        expected = [f"m{i}" for i in range(1, total + 1)]
        for member in members:
            assert member.texts == expected
        assert all(member.resumes and member.nodes[-1] != urls[2] for member in victims)
        assert victims and all(not member.resumes for member in members if member not in victims)

    await aio(scenario())
