"""HTTP around the WebSocket path: the ``twisted.web`` resource tree and connection tracking.

WebSocket upgrades are served by Autobahn's ``WebSocketResource`` mounted at the configured path, so the same
port can serve HTTP pages beside it and every other path answers 404 from ``twisted.web`` itself.

``TrackingFactory`` wraps the site so the server knows every TCP connection it holds, whether it is still
speaking HTTP or already WebSocket: ``stop()`` needs that to close or abort all of them, and the soak tests
need it to prove that nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from .transport import GuardedConnection, HandshakeDeadlineChannel, WriteBatcher


def path_segments(path: str) -> list[bytes]:
    """``"/a/b"`` -> ``[b"a", b"b"]``; ``"/"`` -> ``[]``."""
    return [segment.encode("utf-8") for segment in path.strip("/").split("/") if segment]


class Directory(Resource):
    """A resource with children only; unknown children are a plain 404."""

    def getChild(self, path: bytes, request: Any) -> Any:
        return notFound()

    def render(self, request: Any) -> Any:
        page: Any = notFound()
        return page.render(request)


class UpgradeResource(WebSocketResource):  # type: ignore[misc]  # Autobahn is untyped
    """Autobahn's ``WebSocketResource``, which lets go of the HTTP side once it handed the connection over.

    After an upgrade the HTTP channel and its ``Request`` (headers, addresses, buffers: some 30 objects) are done
    with, but they refer to each other: the channel's list of requests in progress holds the upgrade request,
    which is never finished, and the request holds its channel. Only the cyclic garbage collector would reclaim
    them (roomserver/heap.py). Taking the request off that list once Autobahn took the transport lets reference
    counting free both at once; nothing speaks to that channel again.
    """

    def render(self, request: Any) -> Any:
        result = super().render(request)
        channel = request.channel
        if channel is not None and channel.transport is None and request in channel.requests:
            channel.requests.remove(request)  # Autobahn took the transport: the WebSocket side has it
        return result


def build_root(path: str, websocket: Any, extra: dict[bytes, Any] | None = None) -> Any:
    """A resource tree with ``websocket`` at ``path`` (and ``extra`` pages at the top level).

    Resources are typed ``Any``: ``twisted.web`` declares them through zope interfaces mypy cannot follow."""
    segments = path_segments(path)
    root: Any = Directory()
    for name, page in (extra or {}).items():
        root.putChild(name, page)
    parent = root
    for segment in segments[:-1]:
        child: Any = Directory()
        parent.putChild(segment, child)
        parent = child
    # At "/" the WebSocket is the root's child b"" (what a request for "/" looks up): the pages stay reachable
    # beside it and other paths get 404, as for any other path. (As the root itself it took every request.)
    parent.putChild(segments[-1] if segments else b"", websocket)
    return root


class QuietSite(Site):
    """A ``Site`` that shows no tracebacks, keeps no access log (connections are logged by the hub) and gives
    every connection a deadline and a size cap for its request head (see ``transport.py``)."""

    displayTracebacks = False
    noisy = False
    protocol = HandshakeDeadlineChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        *,
        handshake_timeout: float = 5.0,
        max_handshake_size: int = 16 * 1024,
        on_handshake_timeout: Callable[[], None] | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.handshake_timeout = handshake_timeout
        self.max_handshake_size = max_handshake_size
        self.on_handshake_timeout = on_handshake_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel: Any = super().buildProtocol(addr)
        channel.handshake_timeout = self.handshake_timeout
        channel.totalHeadersSize = self.max_handshake_size
        channel.MAX_LENGTH = self.max_handshake_size  # one endless header line is cut at the same cap
        channel.on_timeout = self.on_handshake_timeout
        return channel

    def log(self, request: Any) -> None:
        pass


class TrackingFactory(WrappingFactory):
    """Wraps a factory and keeps every live connection, so they can all be closed and awaited."""

    noisy = False
    protocol = GuardedConnection

    def __init__(self, wrapped: Any, reactor: Any = None) -> None:
        super().__init__(wrapped)
        self._empty_waiters: list[defer.Deferred[None]] = []
        # With a reactor, connections batch their writes per reactor iteration (transport.WriteBatcher).
        self.batcher = WriteBatcher(reactor) if reactor is not None else None

    def buildProtocol(self, addr: Any) -> Any:
        connection: Any = super().buildProtocol(addr)
        if connection is not None:
            connection.batcher = self.batcher
        return connection

    def connection_ended(self) -> None:
        """A connection is gone and its protocol was told (``GuardedConnection.connectionLost``): not at
        ``unregisterProtocol``, which Twisted calls *before* the wrapped protocol's ``connectionLost``, so a
        waiter would run before the server handled the last close (its session detached, its presence held)."""
        if not self.protocols:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_empty(self) -> defer.Deferred[None]:
        """A Deferred that fires once no connection is left, after the server handled the last one's close."""
        if not self.protocols:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._empty_waiters.append(waiter)
        return waiter

    def each_connection(self, action: Callable[[ProtocolWrapper], None]) -> None:
        for wrapper in list(self.protocols):
            action(wrapper)
