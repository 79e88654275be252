"""Reconnect storms: the listening socket (roomserver/listening.py: the backlog, the accept rate, the ``tcp:``
descriptions), and the handshake deadline of a connection whose request waits unread in a long iteration.

The pacing is checked on Twisted's ``MemoryReactorClock`` with a real listening socket and real client sockets
waiting in the kernel's accept queue: the port's ``doRead`` is called by hand, as the reactor would when the
socket is readable, and time moves only when the test says so.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactorClock

from roomserver.core.ratelimit import TokenBucket
from roomserver.listening import AcceptPacer, PacedPort, TcpAddress, tcp_address
from roomserver.options import ServerOptions
from roomserver.tap import Options
from roomserver.transport import GuardedConnection, HandshakeDeadlineChannel
from roomserver.web import TrackingFactory

from .support import WSClient, aio, metric, url_of
from .web_support import http


class Counting(protocol.Factory):
    def __init__(self) -> None:
        self.built: list[protocol.Protocol] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        built = protocol.Protocol()
        self.built.append(built)
        return built


@contextmanager
def listening(pacer: AcceptPacer | None = None) -> Iterator[tuple[MemoryReactorClock, PacedPort, Counting,
                                                                   list[socket.socket]]]:
    """A port on 127.0.0.1 driven by a fake clock (``pacer``'s clock too), and the client sockets a test opens;
    everything is closed afterwards."""
    reactor = MemoryReactorClock()
    factory = Counting()
    port = PacedPort(0, factory, 50, "127.0.0.1", reactor, pacer=pacer)
    port.startListening()
    clients: list[socket.socket] = []
    try:
        yield reactor, port, factory, clients
    finally:
        for client in clients:
            client.close()
        for built in factory.built:
            if built.transport is not None:
                built.transport.socket.close()  # type: ignore[attr-defined]
        port.stopListening()


@pytest.fixture
def paced() -> Iterator[tuple[MemoryReactorClock, PacedPort, Counting, list[socket.socket]]]:
    """A port paced at 10 connections/s with bursts of 3 (the fake clock starts at 0)."""
    with listening(AcceptPacer(10, 3, 0.0)) as parts:
        yield parts


def connect(port: PacedPort, clients: list[socket.socket], count: int) -> None:
    """``count`` real connections, each complete (in the kernel's accept queue) once this returns."""
    for _ in range(count):
        clients.append(socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5))


def test_token_bucket_reports_what_it_holds_as_it_refills() -> None:
    bucket = TokenBucket(10, 3, now=0.0)
    assert bucket.available(0.0) == 3
    assert bucket.take(0.0, 3)
    assert bucket.available(0.05) == pytest.approx(0.5)
    assert not bucket.take(0.05)
    assert bucket.available(10.0) == 3  # never more than its capacity


def test_a_paced_port_accepts_its_burst_then_pauses_until_the_next_connection_may_come(paced: Any) -> None:
    reactor, port, factory, clients = paced
    connect(port, clients, 8)
    port.doRead()
    assert len(factory.built) == 3  # the burst; the other five wait in the kernel's accept queue
    port.doRead()  # still readable, nothing allowed: the port stops reading
    assert len(factory.built) == 3
    assert port not in reactor.getReaders()
    assert port.pacer is not None and port.pacer.pauses == 1
    reactor.advance(0.099)
    assert port not in reactor.getReaders()
    reactor.advance(0.001)  # one connection's worth of rate: 1/10 s
    assert port in reactor.getReaders()
    port.doRead()
    assert len(factory.built) == 4
    reactor.advance(0.5)  # five connections' worth of time, but a burst is at most three
    port.doRead()
    assert len(factory.built) == 7
    port.doRead()
    assert port.pacer.pauses == 2
    reactor.advance(0.1)
    port.doRead()
    assert len(factory.built) == 8
    assert port.pacer.paused_seconds == pytest.approx(0.2)


def test_a_paced_port_that_stops_listening_while_paused_leaves_no_timer(paced: Any) -> None:
    reactor, port, _, clients = paced
    connect(port, clients, 4)
    port.doRead()
    port.doRead()
    assert len(reactor.getDelayedCalls()) == 1
    port.stopListening()
    reactor.advance(0)  # Twisted's own step of stopListening
    assert reactor.getDelayedCalls() == []
    reactor.advance(1)
    assert port not in reactor.getReaders()


def test_an_unpaced_port_accepts_everything_waiting() -> None:
    with listening() as (_, port, factory, clients):
        connect(port, clients, 8)
        port.doRead()
        assert len(factory.built) == 8


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read a listening socket's backlog")
def test_the_listening_socket_has_the_backlog_asked_for() -> None:
    """``ss -ltn`` shows a listening socket's backlog as its Send-Q."""
    reactor = MemoryReactorClock()
    for backlog in (7, 4096):
        port = PacedPort(0, Counting(), backlog, "127.0.0.1", reactor)
        port.startListening()
        try:
            number = port.getHost().port
            out = subprocess.run(["ss", "-ltnH", f"sport = :{number}"], capture_output=True, text=True,
                                 check=True).stdout.split()
            somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
            assert int(out[2]) == min(backlog, somaxconn), out
        finally:
            port.stopListening()


def test_reuse_port_lets_two_ports_listen_on_one_number() -> None:
    reactor = MemoryReactorClock()
    first = PacedPort(0, Counting(), 50, "127.0.0.1", reactor, reuse_port=True)
    first.startListening()
    second = PacedPort(first.getHost().port, Counting(), 50, "127.0.0.1", reactor, reuse_port=True)
    try:
        second.startListening()
        assert second.getHost().port == first.getHost().port
    finally:
        first.stopListening()
        second.stopListening()


@pytest.mark.parametrize(("spec", "expected"), [
    (8080, TcpAddress(8080, "10.0.0.1", None)),
    ("8080", TcpAddress(8080, "10.0.0.1", None)),
    ("tcp:8080", TcpAddress(8080, "10.0.0.1", None)),
    ("tcp:8080:interface=127.0.0.1", TcpAddress(8080, "127.0.0.1", None)),
    ("tcp:8080:backlog=128:interface=\\:\\:1", TcpAddress(8080, "::1", 128)),
])
def test_tcp_port_descriptions(spec: Any, expected: TcpAddress) -> None:
    assert tcp_address(spec, "10.0.0.1") == expected


@pytest.mark.parametrize("spec", ["unix:/tmp/x.sock", "ssl:8443:privateKey=k.pem", "tcp:http", "tcp:80:backlog=0",
                                  "tcp:80:backlog=many", "tcp:80:reuse=1"])
def test_other_endpoints_are_not_tcp_ports(spec: str) -> None:
    with pytest.raises(ValueError):
        tcp_address(spec)


def test_accept_options_are_checked_and_are_twistd_flags() -> None:
    with pytest.raises(ValueError, match="accept_rate needs a port number or a tcp: port description"):
        ServerOptions(port="unix:/tmp/x.sock", accept_rate=10)
    with pytest.raises(ValueError, match="backlog must be >= 1"):
        ServerOptions(backlog=0)
    ServerOptions(port="unix:/tmp/x.sock")  # no accept rate: any endpoint
    config = Options()
    config.parseOptions(["--backlog", "512", "--accept-rate", "200", "--accept-burst", "20", "--store", "memory"])
    options = config.server_options()
    assert (options.backlog, options.accept_rate, options.accept_burst) == (512, 200.0, 20)
    assert ServerOptions().backlog == 4096 and ServerOptions().accept_rate == 0


@pytest_twisted.ensureDeferred
async def test_a_storm_over_the_accept_rate_is_taken_at_that_rate_and_nobody_is_refused(make_server: Any) -> None:
    """24 clients at once against 20 connections/s in bursts of 4: every one gets its welcome (none is refused
    or times out: the rest wait in the kernel's accept queue), and the last cannot be in before
    (24 - 4) / 20 = 1 s."""
    server = await make_server(room_protocol=True, accept_rate=20, accept_burst=4)
    started = time.monotonic()
    clients = await aio(asyncio.gather(*(_connect_and_welcome(url_of(server)) for _ in range(24))))
    elapsed = time.monotonic() - started
    assert len(clients) == 24 and all(welcome["type"] == "welcome" for _, welcome in clients)
    assert elapsed >= 0.95, elapsed
    assert server.get_stats().connections == 24
    text = (await http(server, "GET", "/metrics")).text
    assert metric(text, "roomserver_accept_pauses_total") >= 1
    assert metric(text, "roomserver_accept_paused_seconds_total") > 0.5
    for client, _ in clients:
        await client.close()


async def _connect_and_welcome(url: str) -> tuple[WSClient, Any]:
    """Plain asyncio (run concurrently under ``asyncio.gather``): connect, read the welcome."""
    ws = await websockets.connect(url, open_timeout=10, ping_interval=None)
    return WSClient(ws), json.loads(await asyncio.wait_for(ws.recv(), 10))


def deadline_channel(reactor: MemoryReactorClock) -> tuple[Any, socket.socket, list[str]]:
    """An HTTP channel with a 5 s handshake deadline on a real socket (one end of a socketpair) that the fake
    reactor never reads: what the client sends stays waiting, as in a long reactor iteration."""
    ours, theirs = socket.socketpair()
    timeouts: list[str] = []
    channel = HandshakeDeadlineChannel()
    channel.callLater = reactor.callLater  # type: ignore[method-assign]
    channel.handshake_timeout = 5.0
    channel.on_timeout = lambda: timeouts.append("timeout")
    wrapper = GuardedConnection(TrackingFactory(protocol.Factory()), channel)
    wrapper.makeConnection(tcp.Connection(ours, wrapper, reactor))
    return channel, theirs, timeouts


def dropped(client: socket.socket) -> bool:
    """Whether the server's end of the connection is closed (reset or closed; not merely silent)."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_whole_request_head_waiting_unread_at_the_deadline_is_not_dropped() -> None:
    reactor = MemoryReactorClock()
    _, client, timeouts = deadline_channel(reactor)
    try:
        client.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reactor.advance(5)
        reactor.advance(0)
        assert timeouts == [] and not dropped(client)
        assert reactor.getDelayedCalls()  # a new deadline, in case it is still not read
        reactor.advance(5)
        assert timeouts == []
        reactor.advance(5)  # at most two extensions: then it is dropped like any late head
        reactor.advance(0)
        assert timeouts == ["timeout"] and dropped(client)
    finally:
        client.close()


def test_a_slow_client_whose_head_never_ends_is_dropped_at_the_deadline() -> None:
    reactor = MemoryReactorClock()
    _, client, timeouts = deadline_channel(reactor)
    try:
        client.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")  # slowloris: no blank line yet
        reactor.advance(5)
        reactor.advance(0)  # Twisted closes an aborted connection's socket on the next turn
        assert timeouts == ["timeout"] and dropped(client)
    finally:
        client.close()
