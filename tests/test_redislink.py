"""``RedisLink`` through a bad link (tests/fault_proxy.py): a connection that is lost, or left unanswered,
before Redis answered its SELECT is retried with a growing delay, logs no error, and the link comes back once
the path does. (With Twisted's ``prepareConnection`` such a loss left the ClientService "connecting" for
ever, after an automat ``NoTransition``.)"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from roomserver.redislink import RedisLink, RedisURL

from .fault_proxy import FaultProxy, Faults
from .support import eventually, logged_errors


@pytest_twisted.ensureDeferred
async def test_connections_lost_before_select_is_answered_back_off_and_the_link_recovers(
        proxied_redis: FaultProxy) -> None:
    proxy = proxied_redis
    proxy.faults = Faults(latency=30.0)  # nothing Redis says arrives in time
    link = RedisLink(RedisURL.parse(proxy.url), reactor, name="test link", max_delay=2.0)
    with logged_errors() as problems:
        link.start()
        try:
            accepted_at = []
            for attempt in range(1, 5):  # four connections, each cut before its SELECT is answered
                await eventually(lambda a=attempt: proxy.counters.connections >= a, timeout=5)
                accepted_at.append(reactor.seconds())
                proxy.reset_all()
            gaps = [later - earlier for earlier, later in pairwise(accepted_at)]
            assert not link.connected and link.outages == 0, "never usable, so never an outage"
            assert link._unready_losses >= 3
            assert gaps[-1] > 0.2, f"the retries back off ({gaps}), they do not spin"

            proxy.faults = Faults()  # the path heals (a SELECT already queued for 30 s times out after 5 s)
            await link.when_connected(15)
            assert await link.command("PING") == b"PONG"
            assert link._unready_losses == 0
        finally:
            await link.stop()
    assert not problems, problems


# -- the reply watch, on a fake clock (LinkProtocol) -------------------------------------------------------------

class _Transport:
    """Enough of a TCP transport for ``LinkProtocol``: writes kept, an abort recorded, an optional socket."""

    def __init__(self, sock: object = None) -> None:
        self.written = b""
        self.aborted = False
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.written += data

    def abortConnection(self) -> None:
        self.aborted = True

    def getHandle(self) -> object:
        return self.sock


def _watched(clock: Any, sock: object = None) -> tuple[Any, _Transport]:
    from roomserver.redislink import LinkProtocol

    protocol = LinkProtocol(charset=None, replyTimeout=None, convertNumbers=False)
    protocol.reply_timeout = 5.0
    protocol.clock = clock
    protocol.callLater = clock.callLater
    transport = _Transport(sock)
    protocol.makeConnection(transport)
    return protocol, transport


def _results(deferreds: list[Any]) -> list[Any]:
    out: list[Any] = []
    for d in deferreds:
        d.addBoth(out.append)
    return out


def test_a_connection_that_answers_nothing_is_given_up_after_the_reply_timeout() -> None:
    import txredisapi
    from twisted.internet.task import Clock

    clock = Clock()
    protocol, transport = _watched(clock)
    outcome = _results([protocol.execute_command("GET", "a"), protocol.execute_command("GET", "b")])
    clock.advance(4.9)
    assert outcome == [] and not transport.aborted
    clock.advance(0.1)
    assert transport.aborted, "nothing arrived for 5 s: the connection is given up"
    assert [f.check(txredisapi.TimeoutError) for f in outcome] == [txredisapi.TimeoutError] * 2
    assert "Not received Redis response in 5.0 seconds" in str(outcome[0].value)


def test_a_slow_but_steady_redis_is_not_taken_for_a_dead_one() -> None:
    """Twenty commands answered one every 4 s: the last waits 80 s, but the connection kept making progress,
    so nothing times out (txredisapi's per-command timer would have aborted at 5 s and failed all twenty)."""
    from twisted.internet.task import Clock

    clock = Clock()
    protocol, transport = _watched(clock)
    outcome = _results([protocol.execute_command("GET", str(n)) for n in range(20)])
    for n in range(20):
        clock.advance(4.0)
        protocol.dataReceived(b"$1\r\n%d\r\n" % (n % 10))
    assert not transport.aborted and len(outcome) == 20 and outcome[19] == b"9"
    clock.advance(5.0)
    assert not clock.getDelayedCalls(), "nothing outstanding: the watch lapses (the next command starts one)"
    # Idle, then a new command: its wait starts when it is sent, not at the last answer long ago.
    clock.advance(60)
    late = _results([protocol.execute_command("GET", "x")])
    clock.advance(4.9)
    assert late == [] and not transport.aborted
    protocol.dataReceived(b"$1\r\nx\r\n")
    assert late == [b"x"]


def test_answers_waiting_unread_in_the_socket_are_this_nodes_lag_not_a_dead_redis() -> None:
    """At the deadline the reactor has not read the socket yet (a long turn), but the answer is in it: the
    watch looks (MSG_PEEK) and waits on instead of aborting."""
    import socket

    from twisted.internet.task import Clock

    ours, redis = socket.socketpair()
    try:
        clock = Clock()
        protocol, transport = _watched(clock, ours)
        protocol.link = link = type("Counts", (), {"behind": 0, "reply_timeouts": 0})()
        outcome = _results([protocol.execute_command("GET", "a")])
        redis.sendall(b"$1\r\na\r\n")  # arrived, not read
        clock.advance(5.0)
        assert not transport.aborted and outcome == [] and (link.behind, link.reply_timeouts) == (1, 0)
        protocol.dataReceived(ours.recv(100))
        assert outcome == [b"a"]
        # And with nothing in the socket, the deadline holds.
        stalled = _results([protocol.execute_command("GET", "b")])
        clock.advance(5.0)
        assert transport.aborted and len(stalled) == 1 and (link.behind, link.reply_timeouts) == (1, 1)
    finally:
        ours.close()
        redis.close()
