"""One Redis connection that fails fast while Redis is away and comes back by itself: what the Redis store and
the Redis broker are built on.

txredisapi speaks the protocol (its ``RedisProtocol`` and ``SubscriberProtocol``), but its connection pools
queue commands until a connection comes back, however long that takes. A chat message must not wait
indefinitely for an unreachable Redis: its sender is owed an ``unavailable`` error now. So the connection is
kept here, by Twisted's ``ClientService`` (reconnect with exponential backoff and jitter), and ``command()``
fails at once with ``RedisUnavailable`` while there is no usable connection. Every command also has a reply
timeout, after which the connection is aborted and re-established: not per command, but per connection
(``LinkProtocol``), so a Redis that answers slowly but steadily, or a node too busy to read its answers in
time, is not taken for a dead one.

``redis://[:password@]host[:port][/db][?prefix=name:]`` is the URL both ``--store`` and ``--broker`` take.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from .transport import DirectWriteTransport, is_plain_tcp

DEFAULT_PREFIX = "roomserver:"
REPLY_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


class RedisUnavailable(Exception):
    """There is no usable connection to Redis right now (it is being re-established)."""


@dataclass(frozen=True)
class RedisURL:
    """Where Redis is and which keys are ours: every key starts with ``prefix``."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Parse ``redis://[:password@]host[:port][/db][?prefix=...]``; ValueError says what is wrong."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"not a redis:// URL: {url!r}")
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}") from exc
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number (redis://host:port/0)")
        query = parse_qs(parts.query)
        unknown = set(query) - {"prefix"}
        if unknown:
            raise ValueError(f"unknown redis URL parameter(s) {sorted(unknown)} in {url!r} (only prefix=)")
        prefix = query.get("prefix", [DEFAULT_PREFIX])[0]
        if not prefix:
            raise ValueError("the redis key prefix must not be empty")
        return cls(parts.hostname or "127.0.0.1", port, int(path or 0),
                   unquote(parts.password) if parts.password else None, prefix)

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class LinkProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol with a faster command encoder and a reply watch per connection.

    The encoder builds the same RESP bytes with one join instead of a ``bytearray`` grown token by token (5 µs
    instead of 11 for the store's append script call: every chat's command).

    txredisapi times out each command on its own (a timer per command) and then aborts the connection, failing
    everything in flight. Under overload that is the wrong verdict: a node whose reactor is seconds behind (a
    drain's resumes landing on it, a long collector pause) finds a command "unanswered" while Redis is answering
    the ones around it, or while the answer waits unread in its own socket, and every abort throws away the work
    in flight and adds a reconnect, resubscription and resync to the load (RELIABILITY G1 on a busy machine:
    chats refused, resumes failed).
    Here one timer per connection watches progress: the connection is given up only when commands are waiting,
    nothing at all has arrived for ``reply_timeout`` seconds, and nothing waits unread in the socket. A Redis
    that answers anything is alive; replies come in order, so a late one is behind the others, not lost."""

    reply_timeout = 0.0  # 0: no watch
    clock: Any = None
    _progress_at = 0.0
    _watch: Any = None

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        idle = not self.replyQueue.waiting
        result = super().execute_command(*args, **kwargs)
        if self.reply_timeout > 0 and self.clock is not None:
            if idle:
                self._progress_at = self.clock.seconds()  # the wait starts with this command
            if self._watch is None:
                self._watch = self.clock.callLater(self.reply_timeout, self._check_replies)
        return result

    def dataReceived(self, data: bytes) -> None:
        if self.clock is not None:
            self._progress_at = self.clock.seconds()
        super().dataReceived(data)

    def connectionLost(self, why: Any) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch.active():
            watch.cancel()
        super().connectionLost(why)

    def _check_replies(self) -> None:
        self._watch = None
        if not self.replyQueue.waiting or self.transport is None:
            return  # nothing outstanding: the next command starts a new watch
        now = self.clock.seconds()
        quiet = now - self._progress_at
        if quiet < self.reply_timeout:
            self._watch = self.clock.callLater(self.reply_timeout - quiet, self._check_replies)
        elif self._unread():
            self._progress_at = now  # the answers are here, this reactor is behind: not Redis's fault
            self._watch = self.clock.callLater(self.reply_timeout, self._check_replies)
            self._count("behind")
        else:
            self._count("reply_timeouts")
            error = txredisapi.TimeoutError(f"Not received Redis response in {self.reply_timeout} seconds")
            while self.replyQueue.waiting:
                self.replyQueue.put(error)
            self.transport.abortConnection()

    def _count(self, what: str) -> None:
        link = getattr(self, "link", None)
        if link is not None:
            setattr(link, what, getattr(link, what) + 1)

    def _unread(self) -> bool:
        """Whether bytes from Redis wait in the socket, not yet read by this (busy) reactor."""
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if not isinstance(sock, socket.socket):
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            value = arg if type(arg) is bytes else self._encode_value(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)


class _LinkFactory(protocol.Factory):
    """Builds txredisapi protocols for one ``RedisLink`` (bytes in, bytes out: ``charset=None``)."""

    isLazy = True  # txredisapi's protocol reads it on authentication errors
    noisy = False

    def __init__(self, link: RedisLink, protocol_class: type[Any]) -> None:
        self.link = link
        self.protocol_class = protocol_class

    def buildProtocol(self, addr: Any) -> Any:
        url = self.link.url
        # txredisapi's own timeout is per command (replyTimeout); LinkProtocol watches the connection instead.
        built = self.protocol_class(charset=None, replyTimeout=None, password=url.password, dbid=url.db,
                                    convertNumbers=False)
        built.reply_timeout = self.link.reply_timeout
        built.clock = self.link.reactor
        built.factory = self
        built.link = self.link
        built.callLater = self.link.reactor.callLater
        # Usable once AUTH/SELECT are answered; lost whenever it closes, usable or not (see RedisLink).
        built.whenConnected().addCallback(self.link._ready)
        built.whenDisconnected().addCallback(self.link._disconnected)
        return built

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH or SELECT fails; the link keeps retrying (and logging) anyway."""

    def connectionError(self, why: str) -> None:
        """AUTH or SELECT failed. A refusal (a wrong password, a database that does not exist) is an operator's
        error; an answer lost or late on a bad link (txredisapi's own two messages) is a transient one."""
        transient = "Lost connection" in why or "Not received Redis response" in why
        self.link.last_error = why
        if transient:
            self.link.log.warn("{name}: {why}; reconnecting", name=self.link.name, why=why)
        else:
            self.link.log.error("{name}: {why}", name=self.link.name, why=why)


class RedisLink:
    """A single, self-healing connection to Redis.

    ``on_ready(protocol)`` runs each time a connection becomes usable (after AUTH/SELECT), ``on_lost()`` each
    time it goes away; ``connected`` says whether there is one now and ``outages`` counts losses.
    """

    log = Logger()

    def __init__(
        self,
        url: RedisURL,
        reactor: Any,
        *,
        name: str = "redis",
        protocol_class: type[Any] = LinkProtocol,
        on_ready: Callable[[Any], Any] | None = None,
        on_lost: Callable[[], None] | None = None,
        reply_timeout: float = REPLY_TIMEOUT,
        max_delay: float = 2.0,
    ) -> None:
        self.url = url
        self.reactor = reactor
        self.name = name
        self.reply_timeout = reply_timeout
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.protocol: Any = None
        self.outages = 0
        self.behind = 0
        """Times the reply watch found Redis's answers waiting unread in the socket at its deadline: this node
        was behind (overloaded, or in a long pause), not Redis."""
        self.reply_timeouts = 0
        """Connections given up because nothing came from Redis for ``reply_timeout`` while commands waited."""
        self.lost_at: float | None = None  # reactor time of the last loss
        self.last_error: str | None = None
        self._waiters: list[defer.Deferred[None]] = []
        endpoint: Any = endpoints.TCP4ClientEndpoint(reactor, url.host, url.port, timeout=CONNECT_TIMEOUT)
        factory: Any = _LinkFactory(self, protocol_class)
        self._backoff = backoffPolicy(initialDelay=0.1, maxDelay=max_delay, factor=2.0, jitter=random.random)
        self._unready_losses = 0  # connections lost before they became usable, since the last usable one
        # No ``prepareConnection``: Twisted's ClientService has no transition for a connection lost while it
        # is being prepared (automat's NoTransition, and the service stays "connecting" for ever). A connection
        # that is lost before AUTH/SELECT are answered is counted here instead, in the retry policy.
        self._service = ClientService(endpoint, factory, retryPolicy=self._retry_delay, clock=reactor)

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def start(self) -> None:
        if not self._service.running:
            self._service.startService()

    def stop(self) -> defer.Deferred[None]:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(RedisUnavailable(f"{self.name}: stopped"))
        self.protocol = None
        if not self._service.running:
            return defer.succeed(None)
        return defer.maybeDeferred(self._service.stopService)

    def when_connected(self, timeout: float) -> defer.Deferred[None]:
        """Fires once a connection is usable; fails with ``RedisUnavailable`` after ``timeout`` seconds."""
        if self.protocol is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)

        def expire() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                detail = f" ({self.last_error})" if self.last_error else ""
                waiter.errback(RedisUnavailable(f"cannot reach Redis at {self.url}{detail}"))

        timer = self.reactor.callLater(timeout, expire)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(settled)

    def command(self, *args: Any) -> defer.Deferred[Any]:
        """Run one command; fails at once with ``RedisUnavailable`` when there is no connection."""
        current = self.protocol
        if current is None:
            return defer.fail(RedisUnavailable(f"{self.name}: no connection to Redis at {self.url}"))
        try:
            result: defer.Deferred[Any] = current.execute_command(*args)
        except txredisapi.ConnectionError as exc:
            return defer.fail(RedisUnavailable(f"{self.name}: {exc}"))
        return result.addErrback(self._translate)

    def _translate(self, failure: Any) -> Any:
        if failure.check(txredisapi.ConnectionError):  # lost or timed out (TimeoutError is one too)
            raise RedisUnavailable(f"{self.name}: {failure.value}")
        return failure

    # -- connection hooks ------------------------------------------------------------------------------------

    def _retry_delay(self, failed_attempts: int) -> float:
        """ClientService counts failed connects only; a connection that Redis (or a proxy in front of it)
        accepted and then lost or left unanswered before it was usable counts as a failure too, so such a loop
        backs off instead of reconnecting every 100 ms."""
        return float(self._backoff(failed_attempts + self._unready_losses))

    def _ready(self, connection: Any) -> None:
        if not self._service.running:  # stopped while AUTH/SELECT were on their way
            connection.transport.loseConnection()
            return
        if is_plain_tcp(connection.transport):
            # Each command leaves in its own write: straight to the socket (two epoll_ctl calls and a reactor
            # pass fewer per command; docs/performance.md).
            connection.transport = DirectWriteTransport(connection.transport)
        self.protocol = connection
        self.last_error = None
        self._unready_losses = 0
        self.log.info("{name}: connected to {url}", name=self.name, url=self.url)
        # on_ready first: what it sends (script loads, subscriptions) goes ahead of whatever the waiters send.
        if self.on_ready is not None:
            defer.maybeDeferred(self.on_ready, connection).addErrback(
                lambda failure: self.log.failure("{name}: setting up the connection failed", failure,
                                                 name=self.name))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _disconnected(self, connection: Any) -> None:
        if self.protocol is not connection:
            self._unready_losses += 1  # never became usable
            return
        self.protocol = None
        self.outages += 1
        self.lost_at = self.reactor.seconds()
        self.last_error = "connection lost"
        if self._service.running:
            self.log.warn("{name}: lost the connection to {url}; reconnecting", name=self.name, url=self.url)
        if self.on_lost is not None:
            self.on_lost()


class LuaScripts:
    """Lua scripts a Redis client runs with ``EVALSHA``: the store's and the cluster presence's.

    ``load`` sends ``SCRIPT LOAD`` for each of them on a new connection, ahead of any ``EVALSHA`` on it (one
    connection runs commands in order), so no call pays for a ``NOSCRIPT`` round trip, and a read that follows
    a write is never overtaken by the write's retry. ``run`` still loads a script again on ``NOSCRIPT`` (a
    restarted Redis, ``SCRIPT FLUSH``).
    """

    def __init__(self, scripts: Sequence[bytes]) -> None:
        self.scripts = tuple(scripts)
        self._shas = {script: hashlib.sha1(script).hexdigest().encode() for script in self.scripts}

    def load(self, connection: Any) -> None:
        """Load every script on ``connection`` (a txredisapi protocol; None: not connected, nothing to do)."""
        if connection is not None:
            for script in self.scripts:
                connection.execute_command("SCRIPT", "LOAD", script).addErrback(lambda failure: None)

    def run(self, link: RedisLink, script: bytes, keys: Sequence[bytes], args: Sequence[Any]
            ) -> defer.Deferred[Any]:
        """``EVALSHA`` of ``script`` over ``link``, loading it first if Redis does not know it."""

        def load_and_retry(failure: Any) -> Any:
            if "NOSCRIPT" not in str(failure.value):
                return failure
            return link.command("SCRIPT", "LOAD", script).addCallback(
                lambda sha: link.command("EVALSHA", sha, len(keys), *keys, *args))

        sha = self._shas[script]
        return link.command("EVALSHA", sha, len(keys), *keys, *args).addErrback(load_and_retry)
