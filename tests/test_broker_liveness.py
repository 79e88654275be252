"""The Redis broker's subscriber liveness check (no deaf node), on a fake clock and a fake connection: a
connection that answers nothing is aborted after PING_TIMEOUT; one whose pong is late because a backlog of
messages is still arriving is only behind, and keeps its subscriptions."""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from roomserver.broker.redis import PING_INTERVAL, PING_TIMEOUT, RedisBroker


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeSubscriber:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.transport = FakeTransport()

    def send(self, *args: Any) -> None:
        self.sent.append(args)


def broker_with_connection() -> tuple[RedisBroker, FakeSubscriber, task.Clock]:
    clock = task.Clock()
    broker = RedisBroker("redis://127.0.0.1:6379/0?prefix=liveness-test:", clock)
    connection = FakeSubscriber()
    broker.subscriber.protocol = connection
    broker.rooms.add("r")
    broker._on_message = lambda room, seq, payload: None
    return broker, connection, clock


def tick(broker: RedisBroker, clock: task.Clock) -> None:
    clock.advance(PING_INTERVAL)
    broker._ping()


def test_a_connection_that_answers_nothing_is_aborted_after_the_ping_timeout() -> None:
    broker, connection, clock = broker_with_connection()
    broker._ping()  # sends a PING
    assert connection.sent == [("PING",)]
    for _ in range(int(PING_TIMEOUT / PING_INTERVAL)):
        tick(broker, clock)
    assert not connection.transport.aborted, "not before the timeout"
    tick(broker, clock)
    assert connection.transport.aborted


def test_a_connection_still_delivering_a_backlog_is_behind_not_dead() -> None:
    broker, connection, clock = broker_with_connection()
    broker._ping()
    for step in range(int(10 * PING_TIMEOUT / PING_INTERVAL)):  # the pong stays queued behind messages for 10x
        broker._pushed(connection, [b"message", b"liveness-test:c:r", b"%d other-node {}" % (step + 1)])
        tick(broker, clock)
        assert not connection.transport.aborted, f"aborted after {clock.seconds()} s while receiving"
    broker._pushed(connection, [b"pong", b""])  # the pong arrives at last
    assert broker._ping_sent is None
    for _ in range(int(PING_TIMEOUT / PING_INTERVAL) + 2):  # quiet from now on, its next PING unanswered
        tick(broker, clock)
    assert connection.transport.aborted, "once nothing arrives any more, the timeout applies again"


def test_a_slow_link_learns_its_round_trip_instead_of_reconnecting_for_ever() -> None:
    """RELIABILITY R6: Redis two seconds away. The first connection is aborted at the 1.5 s floor (nothing is
    known yet); the next timeout is doubled, so the next connection's pong arrives, and from then on the
    measured round trip sets the timeout: a silent connection is still aborted, after the learned timeout."""
    broker, connection, clock = broker_with_connection()
    broker._ping()
    while not connection.transport.aborted:
        tick(broker, clock)
    assert clock.seconds() == 2.0  # the check after 1.5 s without an answer
    broker._subscriber_lost()

    connection = FakeSubscriber()
    broker.subscriber.protocol = connection
    for _ in range(10):  # ten pings, each answered two seconds later and by nothing else
        broker._ping()
        for _ in range(4):
            tick(broker, clock)
            assert not connection.transport.aborted, f"aborted at {clock.seconds()} s"
        broker._pushed(connection, [b"pong", b""])
    learned = broker.health()["ping_timeout"]
    assert 2.0 < learned < 3.0, "a steady two-second round trip"

    broker._ping()
    quiet = 0.0
    while not connection.transport.aborted:  # now Redis stops answering
        tick(broker, clock)
        quiet += PING_INTERVAL
    assert learned < quiet <= learned + PING_INTERVAL


def test_a_pong_behind_messages_is_not_taken_as_a_round_trip() -> None:
    broker, connection, clock = broker_with_connection()
    broker._ping()
    for step in range(8):
        broker._pushed(connection, [b"message", b"liveness-test:c:r", b"%d other-node {}" % (step + 1)])
        tick(broker, clock)
    broker._pushed(connection, [b"pong", b""])
    assert broker.round_trip.srtt is None and broker.health()["ping_timeout"] == PING_TIMEOUT
