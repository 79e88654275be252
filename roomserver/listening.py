"""The listening TCP socket: its accept queue (``backlog``), ``SO_REUSEPORT`` and a node-wide accept rate.

Why this exists: a reconnect storm. When a node restarts or a network blips, thousands of clients come back
within a second. What the node does then decides whether they are back in seconds or in a minute:

- **The accept queue.** Twisted listens with a backlog of 50. A storm overflows it at once, and Linux then drops
  the handshake's last ACK: the client believes it is connected, sends its HTTP upgrade and waits while its TCP
  stack retransmits with growing delays. Measured here (one Node client, loopback): 5,000 clients at once
  against a backlog of 50 got their welcome after 30 to 57 s at p99, and up to 6 % of them waited more than a
  minute; with a backlog of 4,096 every one was in within 4 to 5.5 s (10,000 at once: docs/performance.md,
  "N"). ``backlog`` defaults to 4,096 (Linux caps it at ``net.core.somaxconn``, 4,096 on current kernels).
- **The accept rate** (``accept_rate`` connections per second, bursts of ``accept_burst``; off by default).
  Every accepted connection gets ``open_handshake_timeout`` seconds to finish its handshake, and costs a few
  hundred microseconds of CPU to do so. A node that accepts a whole storm at once can end up with more accepted
  connections than it can hand-shake in time (they time out, retry, and the storm feeds itself) and starves
  its live clients of CPU meanwhile. With a rate, the port stops reading while its bucket is empty: the kernel
  keeps the rest in its accept queue, for free, until the node takes them, and what the node accepts it can
  serve. The rate should sit below what the node can hand-shake (``bench.run --scenarios connect`` measures
  it: about 1,000 to 2,000 connections/s per core here). Off by default: the right rate depends on the
  machine, and with the backlog and the handshake deadline's extension (roomserver/transport.py) an unpaced
  node already served every client of a 10,000-connection storm here (docs/performance.md, "N").

``PacedPort`` is Twisted's own ``tcp.Port`` with those two additions, so everything else (IPv6 interfaces,
``stopListening``, the reactor's accept loop and its error handling) stays Twisted's.
"""

from __future__ import annotations

import socket
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from twisted.internet import defer, tcp
from twisted.internet.error import CannotListenError

from .core.ratelimit import TokenBucket

BACKLOG = 4096


class TcpAddress(NamedTuple):
    port: int
    interface: str
    backlog: int | None  # None: the ``backlog`` option


def tcp_address(port: int | str, host: str = "") -> TcpAddress:
    """The address of a port number or of a ``tcp:PORT[:interface=HOST][:backlog=N]`` description (the
    parameters of Twisted's own ``tcp:`` endpoint); ValueError for any other kind of endpoint (``ssl:``,
    ``unix:``...), which Twisted then builds itself, without ``reuse_port`` or an accept rate."""
    if isinstance(port, int):
        return TcpAddress(port, host, None)
    if port.isdigit():
        return TcpAddress(int(port), host, None)
    kind, number, *params = [*_fields(port), ""]
    if kind != "tcp" or not number.isdigit():
        raise ValueError(f"not a TCP port number or tcp:PORT[:interface=HOST][:backlog=N] description: {port!r}")
    interface, backlog = host, None
    for param in filter(None, params):
        key, _, value = param.partition("=")
        if key == "interface":
            interface = value
        elif key == "backlog" and value.isdigit() and int(value) > 0:
            backlog = int(value)
        else:
            raise ValueError(f"a tcp: port takes interface=HOST and backlog=N, not {param!r}")
    return TcpAddress(int(number), interface, backlog)


def _fields(description: str) -> list[str]:
    """The ``:``-separated fields of an endpoint description; ``\\:`` is a colon inside a field, as in
    Twisted's own (``tcp:8080:interface=\\:\\:1``)."""
    fields, current = [], []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current.append(next(characters, ""))
        elif character == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(character)
    fields.append("".join(current))
    return fields


class AcceptPacer:
    """How many connections the port may accept now (a token bucket told the reactor's time), and for how long
    it has held back."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.bucket = TokenBucket(rate, burst, now)
        self.pauses = 0
        self.paused_seconds = 0.0

    def allowance(self, now: float) -> int:
        """Whole connections that may be accepted at ``now``."""
        return int(self.bucket.available(now) + 1e-9)  # 0.3 s at 10/s is 3 connections, not 2.9999...

    def spend(self, now: float, accepted: int) -> None:
        if accepted > 0:
            self.bucket.tokens = max(0.0, self.bucket.available(now) - accepted)

    def delay(self) -> float:
        """Seconds until the next connection may be accepted (call after ``allowance`` returned 0)."""
        return max(0.0, (1.0 - self.bucket.tokens) / self.bucket.rate)


class PacedPort(tcp.Port):
    """A listening TCP port with a chosen backlog, optionally ``SO_REUSEPORT``, and optionally paced by an
    ``AcceptPacer``: while the pacer allows nothing, the port stops reading and leaves new connections in the
    kernel's accept queue; it reads again once a connection may be accepted."""

    def __init__(self, port: int, factory: Any, backlog: int, interface: str, reactor: Any, *,
                 reuse_port: bool = False, pacer: AcceptPacer | None = None) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.reuse_port = reuse_port
        self.pacer = pacer
        self._resume: Any = None
        self._paused_at: float | None = None

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def doRead(self) -> None:
        pacer = self.pacer
        if pacer is None:
            super().doRead()
            return
        now = self.reactor.seconds()
        allowance = pacer.allowance(now)
        if allowance < 1:
            self._pause(pacer, now)
            return
        # Twisted's accept loop takes up to numberAccepts connections per call (and grows it under load).
        self.numberAccepts = min(self.numberAccepts, allowance)
        before = self.sessionno
        super().doRead()
        pacer.spend(now, self.sessionno - before)

    def _pause(self, pacer: AcceptPacer, now: float) -> None:
        self.stopReading()
        pacer.pauses += 1
        self._paused_at = now
        self._resume = self.reactor.callLater(pacer.delay(), self._read_again)

    def _read_again(self) -> None:
        self._resume = None
        if self.pacer is not None and self._paused_at is not None:
            self.pacer.paused_seconds += self.reactor.seconds() - self._paused_at
        self._paused_at = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def loseConnection(self, *args: Any, **kwargs: Any) -> Any:
        """Stop listening (``stopListening``), and stop waiting to read again."""
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        return super().loseConnection(*args, **kwargs)

    stopListening = loseConnection


@dataclass(frozen=True)
class PacedEndpoint:
    """``IStreamServerEndpoint`` listening with a ``PacedPort``."""

    reactor: Any
    port: int
    interface: str = ""
    _: KW_ONLY
    backlog: int = BACKLOG
    reuse_port: bool = False
    pacer: AcceptPacer | None = None

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        port = PacedPort(self.port, factory, self.backlog, self.interface, self.reactor,
                         reuse_port=self.reuse_port, pacer=self.pacer)
        try:
            port.startListening()
        except CannotListenError:
            return defer.fail()
        return defer.succeed(port)
