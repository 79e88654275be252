"""``Relay`` with a fused store (the store publishes what it appends, in seq order): a node's own chat that
overtook another node's waits for the channel while the node is subscribed, and reads the gap from the store at
once while it is not (nothing is on its way then). No I/O: a fake broker, store and server."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, task

from roomserver.cluster import Relay
from roomserver.core.history import HistoryPage
from roomserver.core.sequencer import RoomSequence


class FakeBroker:
    clustered = True

    def __init__(self) -> None:
        self.subscribed = True
        self.published: list[int] = []

    def fuse(self, store: Any) -> bool:
        return True

    def publish(self, room: str, seq: int, payload: bytes) -> defer.Deferred[None]:
        self.published.append(seq)
        return defer.succeed(None)


class FakeStore:
    def __init__(self) -> None:
        self.reads: list[tuple[int | None, int | None]] = []

    def read(self, room: str, since: int | None = None, before: int | None = None,
             limit: int = 100) -> defer.Deferred[HistoryPage]:
        self.reads.append((since, before))
        return defer.Deferred()  # never answered here: only the ask matters


def fused_relay() -> tuple[Relay, FakeBroker, FakeStore, RoomSequence]:
    broker, store = FakeBroker(), FakeStore()
    server: Any = SimpleNamespace(registry={}, durable=SimpleNamespace(store=store), reactor=task.Clock())
    relay = Relay(server, broker)  # type: ignore[arg-type]
    relay.fused = True
    sequence = relay.sequences["r"] = RoomSequence()
    sequence.start(4)
    return relay, broker, store, sequence


def test_an_own_chat_ahead_waits_for_the_channel_while_subscribed() -> None:
    relay, broker, store, sequence = fused_relay()
    relay.stored("r", 6, b"six")
    assert store.reads == [] and broker.published == [], "the store published it; seq 5 is on the channel"
    relay._received("r", 5, b"five")
    relay._received("r", 6, b"six")
    assert sequence.delivered == 6 and store.reads == [] and relay.gap_fetches == 0


def test_an_own_chat_ahead_reads_the_gap_at_once_while_not_subscribed() -> None:
    relay, broker, store, _ = fused_relay()
    broker.subscribed = False  # the subscriber connection is down: nothing is on its way
    relay.stored("r", 6, b"six")
    assert store.reads == [(4, 6)] and relay.gap_fetches == 1
