"""The drain schedule: the pure plan (core/drain.py) and the Drainer carrying it out on a task.Clock."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
import pytest_twisted
import websockets
from twisted.internet import defer, task

from roomserver.core.drain import DrainPlan
from roomserver.draining import Drainer, Handover

from .support import WSClient, aio, eventually, url_of
from .web_support import http


def test_plan_makes_batches_of_batch_size_every_interval_each_closed_half_an_interval_after_its_hint() -> None:
    plan = DrainPlan(batch_size=100, interval=0.2)
    steps = plan.steps(250)
    assert [(step.first, step.stop) for step in steps] == [(0, 100), (100, 200), (200, 250)]
    assert [step.size for step in steps] == [100, 100, 50]
    assert [step.hint_at for step in steps] == pytest.approx([0.0, 0.2, 0.4])
    assert [step.close_at for step in steps] == pytest.approx([0.1, 0.3, 0.5])
    assert plan.duration(250) == pytest.approx(0.5)
    assert plan.batches(1000) == 10 and plan.duration(1000) == pytest.approx(1.9), \
        "the defaults drain a full node (max_clients 1000) in under 2 s"


def test_plan_for_no_clients_and_for_interval_zero() -> None:
    assert DrainPlan().steps(0) == [] and DrainPlan().duration(0) == 0.0
    at_once = DrainPlan(batch_size=3, interval=0).steps(7)
    assert [step.size for step in at_once] == [3, 3, 1]
    assert {step.hint_at for step in at_once} == {step.close_at for step in at_once} == {0.0}


def test_hinted_delay_is_spread_over_one_interval() -> None:
    plan = DrainPlan(batch_size=10, interval=0.5)
    assert plan.reconnect_after_ms(lambda: 0.0) == 0
    assert plan.reconnect_after_ms(lambda: 0.5) == 250
    assert plan.reconnect_after_ms(lambda: 0.999999) == 499
    assert DrainPlan(interval=0).reconnect_after_ms(lambda: 0.9) == 0


@pytest.mark.parametrize("batch_size, interval", [(0, 0.2), (-1, 0.2), (10, -0.1), (10, float("nan")),
                                                  (10, float("inf"))])
def test_plan_refuses_nonsense(batch_size: int, interval: float) -> None:
    with pytest.raises(ValueError):
        DrainPlan(batch_size, interval)


class Recorder:
    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.events: list[tuple[float, str, int, int]] = []

    def hint(self, client: int, after_ms: int) -> None:
        self.events.append((self.clock.seconds(), "hint", client, after_ms))

    def close(self, client: int, after_ms: int) -> None:
        self.events.append((self.clock.seconds(), "close", client, after_ms))

    def at(self, kind: str) -> dict[float, list[int]]:
        grouped: dict[float, list[int]] = {}
        for when, what, client, _ in self.events:
            if what == kind:
                grouped.setdefault(round(when, 6), []).append(client)
        return grouped


def test_drainer_runs_the_plan_on_the_clock() -> None:
    clock = task.Clock()
    draws = iter([0.1 * n for n in range(10)] + [0.05, 0.95])
    drainer: Drainer[int] = Drainer(clock, DrainPlan(batch_size=5, interval=1.0), random=lambda: next(draws))
    recorder = Recorder(clock)
    done = drainer.run(list(range(12)), recorder.hint, recorder.close)
    assert recorder.at("hint") == {0.0: [0, 1, 2, 3, 4]}, "the first batch is told at once, in the call"
    assert recorder.at("close") == {}
    assert not done.called
    clock.advance(0.5)
    assert recorder.at("close") == {0.5: [0, 1, 2, 3, 4]}
    clock.advance(0.5)
    assert recorder.at("hint")[1.0] == [5, 6, 7, 8, 9]
    clock.pump([0.5, 0.5, 0.5])
    assert recorder.at("hint") == {0.0: [0, 1, 2, 3, 4], 1.0: [5, 6, 7, 8, 9], 2.0: [10, 11]}
    assert recorder.at("close") == {0.5: [0, 1, 2, 3, 4], 1.5: [5, 6, 7, 8, 9], 2.5: [10, 11]}
    assert done.called and drainer.batches_done == 3
    hinted = {client: after_ms for _, kind, client, after_ms in recorder.events if kind == "hint"}
    closed = {client: after_ms for _, kind, client, after_ms in recorder.events if kind == "close"}
    assert hinted == closed, "each close carries the delay its hint announced"
    assert hinted[10] == 50 and hinted[11] == 950
    assert clock.getDelayedCalls() == []


def test_a_drain_at_once_finishes_in_the_call_and_one_batch_takes_half_an_interval() -> None:
    clock = task.Clock()
    recorder = Recorder(clock)
    done = Drainer(clock, DrainPlan(batch_size=2, interval=0)).run([1, 2, 3], recorder.hint, recorder.close)
    assert done.called
    assert [kind for _, kind, _, _ in recorder.events] == ["hint"] * 3 + ["close"] * 3
    assert {after_ms for *_, after_ms in recorder.events} == {0}
    recorder = Recorder(clock)
    done = Drainer(clock, DrainPlan(batch_size=100, interval=0.2)).run([1, 2, 3], recorder.hint, recorder.close)
    assert not done.called and recorder.at("hint") == {0.0: [1, 2, 3]}
    clock.advance(0.1)
    assert done.called and recorder.at("close") == {0.1: [1, 2, 3]}
    clock = task.Clock()
    assert Drainer(clock, DrainPlan()).run([], Recorder(clock).hint, Recorder(clock).close).called


def test_one_client_failing_does_not_stop_the_drain() -> None:
    clock = task.Clock()
    closed: list[int] = []

    def hint(client: int, after_ms: int) -> None:
        if client == 1:
            raise RuntimeError("boom")

    done = Drainer(clock, DrainPlan(batch_size=2, interval=0.2)).run(
        [0, 1, 2], hint, lambda client, after_ms: closed.append(client))
    clock.pump([0.1] * 5)
    assert done.called and closed == [0, 1, 2]


# -- a real server draining real clients ---------------------------------------------------------------------


async def _watch(ws: WSClient, started: float) -> tuple[float, dict[str, Any], int | None, str]:
    """Wait for the reconnect hint (when it arrived, after ``started``), then for the close."""
    loop = asyncio.get_running_loop()
    hint = json.loads(await asyncio.wait_for(ws.ws.recv(), 10))  # an asyncio task: the websockets API itself
    arrived = loop.time() - started
    await asyncio.wait_for(ws.ws.wait_closed(), 10)
    received = ws.ws.protocol.close_rcvd
    return arrived, hint, received.code if received else None, received.reason if received else ""


@pytest_twisted.ensureDeferred
async def test_stop_drains_clients_in_batches_each_told_when_to_come_back(make_server: Any) -> None:
    server = await make_server(room_protocol=True, drain_batch=5, drain_interval=0.6)
    clients = [await WSClient.connect(url_of(server)) for _ in range(12)]
    for ws in clients:
        assert (await ws.recv())["type"] == "welcome"
    started = asyncio.get_running_loop().time()
    watching = aio(asyncio.gather(*(_watch(ws, started) for ws in clients)))
    stopped = server.stop()

    health = await http(server, "GET", "/healthz")
    assert health.code == 503 and health.json()["status"] == "draining", \
        "the port stays open during the drain: the load balancer's check sees the node leave"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await WSClient.connect(url_of(server))
    assert refused.value.response.status_code == 503, "no new clients while draining"

    results = await watching
    await stopped
    for _, hint, code, reason in results:
        assert hint["type"] == "reconnect" and hint["resume"] is True
        assert 0 <= hint["after_ms"] < 600, "spread within one drain interval"
        assert (code, reason) == (1001, f"server shutdown; reconnect after {hint['after_ms']} ms")
    times = sorted(arrived for arrived, *_ in results)
    batches: list[list[float]] = [[times[0]]]
    for previous, current in itertools.pairwise(times):
        if current - previous > 0.3:
            batches.append([])
        batches[-1].append(current)
    assert [len(batch) for batch in batches] == [5, 5, 2], times
    assert server.get_stats().connections == 0 and not server.connections.protocols
    with pytest.raises(OSError):
        await WSClient.connect(url_of(server))


@pytest_twisted.ensureDeferred
async def test_a_chat_sent_after_the_hint_is_refused_not_lost(make_server: Any) -> None:
    server = await make_server(room_protocol=True, drain_interval=1.0)
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    assert (await ws.request({"type": "join", "room": "r"}))["type"] == "joined"
    stopped = server.stop()
    assert (await ws.recv())["type"] == "reconnect"
    refused = await ws.request({"type": "chat", "room": "r", "text": "late", "id": 7, "msg_id": "m7"})
    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
    assert (refused["id"], refused["msg_id"], refused["room"]) == (7, "m7", "r")
    assert (await ws.closed())[0] == 1001
    await stopped
    assert server.get_stats().errors.get("unavailable") == 1


@pytest_twisted.ensureDeferred
async def test_a_chat_in_flight_to_the_store_is_acknowledged_before_the_close(make_server: Any) -> None:
    from twisted.internet import reactor

    server = await make_server(room_protocol=True, drain_interval=0.2)
    store = server.durable.pipeline.store

    class SlowStore:
        """Answers appends 0.5 s late: the chat is still in flight when the drain closes its batch."""

        def append(self, room: str, batch: Any) -> defer.Deferred[Any]:
            answered: defer.Deferred[Any] = defer.Deferred()
            reactor.callLater(0.5, lambda: store.append(room, batch).chainDeferred(answered))  # type: ignore
            return answered

    server.durable.pipeline.store = SlowStore()  # type: ignore[assignment]
    server.durable._append_now = None
    ws = await WSClient.connect(url_of(server))
    await ws.recv()
    assert (await ws.request({"type": "join", "room": "r"}))["type"] == "joined"
    await ws.send({"type": "chat", "room": "r", "text": "in flight", "id": 1, "msg_id": "m1"})
    await eventually(lambda: server.durable._in_flight)
    stopped = server.stop()
    received = [await ws.recv(), await ws.recv(), await ws.recv()]
    assert [message["type"] for message in received] == ["reconnect", "chat", "ack"], received
    assert received[2]["seq"] == 1 and received[2]["msg_id"] == "m1"
    assert (await ws.closed())[0] == 1001
    await stopped


def test_a_handover_lasts_while_sessions_keep_being_taken_and_ends_when_none_is_held() -> None:
    """``Handover`` on a fake clock: each taken session restarts the idle wait, so a cluster that keeps
    continuing the sessions (here one every 1.5 s with an idle wait of 2 s) gets to finish, past the first 2 s."""
    clock = task.Clock()
    handover = Handover(clock, {"a", "b", "c"}, idle=2.0, cap=10.0)
    outcome: list[bool] = []
    handover.wait().addCallback(outcome.append)
    for token in ("a", "b"):
        clock.advance(1.5)
        handover.taken(token)
        handover.taken("not-held")  # no progress: it was never waited for
    assert outcome == [] and handover.pending == {"c"}
    clock.advance(1.5)
    handover.taken("c")
    assert outcome == [True] and not clock.getDelayedCalls()


def test_a_handover_ends_after_the_idle_wait_or_the_cap() -> None:
    clock = task.Clock()
    idle = Handover(clock, {"a", "b"}, idle=2.0, cap=10.0)
    outcome: list[bool] = []
    idle.wait().addCallback(outcome.append)
    clock.advance(1.0)
    idle.taken("a")
    clock.advance(1.9)
    assert outcome == []
    clock.advance(0.1)
    assert outcome == [False] and idle.pending == {"b"} and not clock.getDelayedCalls()

    capped = Handover(clock, {str(n) for n in range(100)}, idle=2.0, cap=5.0)
    capped.wait().addCallback(outcome.append)
    for n in range(100):  # a session taken every second: progress, but the cap holds
        clock.advance(1.0)
        capped.taken(str(n))
        if len(outcome) == 2:
            break
    assert outcome == [False, False] and n == 4 and not clock.getDelayedCalls()
    assert Handover(clock, set(), idle=2.0, cap=5.0).wait().result is True
