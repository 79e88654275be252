"""``RedisLink`` through a bad link (tests/fault_proxy.py): a connection that is lost, or left unanswered,
before Redis answered its SELECT is retried with a growing delay, logs no error, and the link comes back once
the path does. (With Twisted's ``prepareConnection`` such a loss left the ClientService "connecting" for
ever, after an automat ``NoTransition``.)"""

from __future__ import annotations

from itertools import pairwise

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
