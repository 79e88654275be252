"""The live dashboard's data: a 1-second sampler and a WebSocket that pushes its samples (no polling).

``DashboardFeed`` is a server observer. While the server runs, it reads the counters once per ``interval``
(``server.get_stats()`` plus, per room, the member count and last ``seq``), turns them into a sample with
``TrafficSeries`` (pure, in ``core/timeseries.py``) and pushes the sample to every dashboard viewer. The last
``window`` seconds are kept, so a viewer that connects gets the recent history at once and its charts are
never empty.

Every sample (and the snapshot) also carries ``cluster``: ``server.get_cluster_stats()`` as JSON. In a cluster
(Redis broker) that is every live node's figures and the totals, as of the last heartbeat, so the page shows
each node without asking anything of the other nodes; with one node it is this node alone and the page
leaves its nodes table out.

Viewers connect to ``/dashboard/ws``, a WebSocket of its own beside the room path: viewers are not room clients,
so watching the server never changes its numbers. When an admin token is configured, a viewer's first message
gets ``{"type":"auth_required"}`` and its first message
must be ``{"type":"auth","token":"..."}`` within ``AUTH_TIMEOUT`` seconds; a wrong token closes with 4501
(do not retry), no token in time with 1008. Messages from viewers are otherwise ignored.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..closing import ReleasedOnClose
from ..core.timeseries import Reading, TrafficSeries
from ..observe import ServerObserver
from ..periodic import every
from .auth import AdminToken

if TYPE_CHECKING:
    from ..server import WebSocketServer

AUTH_TIMEOUT = 10.0
CLOSE_UNAUTHORIZED = 4501
MAX_VIEWERS = 64


class DashboardFeed(ServerObserver):
    """Samples the server every ``interval`` seconds and pushes each sample to the dashboard viewers."""

    log = Logger()

    def __init__(self, server: WebSocketServer, interval: float = 1.0, window: float = 300.0, top: int = 10) -> None:
        self.server = server
        self.interval = interval
        self.series = TrafficSeries(capacity=max(1, int(window / interval)), top=top)
        self.viewers: set[DashboardProtocol] = set()
        self.node = f"{socket.gethostname()}"
        self.started_at: float | None = None
        self._loop: LoopingCall | None = None

    # -- server lifecycle (observer hooks) ---------------------------------------------------------------

    def started(self, server: WebSocketServer) -> None:
        self.started_at = server.reactor.seconds()  # type: ignore[attr-defined]
        port = server.port
        self.node = f"{socket.gethostname()}:{port}" if port else socket.gethostname()
        self._loop = every(server.reactor, self.interval, self.tick, "sample the dashboard's figures", self.log,
                           now=True)

    def stopping(self, server: WebSocketServer) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for viewer in list(self.viewers):
            viewer.sendClose(code=1000, reason="server shutdown")

    # -- sampling ----------------------------------------------------------------------------------------

    def read(self) -> Reading:
        stats = self.server.get_stats()
        return Reading(
            time=self.server.reactor.seconds(),  # type: ignore[attr-defined]
            connections=stats.connections,
            rooms=stats.rooms,
            messages_sent=stats.messages_sent,
            messages_received=stats.messages_received,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            drops=stats.drops,
            errors=stats.errors,
            room_state={room.name: (len(room.clients), room.last_seq) for room in self.server.registry},
        )

    def cluster(self) -> dict[str, Any]:
        """The cluster view pushed with every sample: every live node's figures and the totals (one node:
        this node alone, ``clustered`` false, and the page shows no nodes table)."""
        return self.server.get_cluster_stats().as_json()

    def tick(self) -> None:
        sample = self.series.add(self.read())
        if not self.viewers:
            return
        payload = orjson.dumps({"type": "sample", "node": self.node, "sample": sample.as_json(),
                                "cluster": self.cluster()})
        prepared = None
        for viewer in list(self.viewers):
            if prepared is None:
                prepared = viewer.factory.prepareMessage(payload, False)  # framed once for every viewer
            viewer.sendPreparedMessage(prepared)

    def snapshot(self) -> bytes:
        """What a new viewer gets first: the node, the sampling interval and the recent samples."""
        return orjson.dumps({
            "type": "snapshot",
            "node": self.node,
            "interval": self.interval,
            "window": self.series.samples.maxlen,
            "history": self.series.history(),
            "cluster": self.cluster(),
        })

    # -- viewers -----------------------------------------------------------------------------------------

    def add_viewer(self, viewer: DashboardProtocol) -> None:
        self.viewers.add(viewer)
        # Prepared messages skip Autobahn's outgoing size check: the 4 KiB limit is for what viewers send.
        viewer.sendPreparedMessage(viewer.factory.prepareMessage(self.snapshot(), False))

    def remove_viewer(self, viewer: DashboardProtocol) -> None:
        self.viewers.discard(viewer)


class DashboardProtocol(ReleasedOnClose, WebSocketServerProtocol):  # type: ignore[misc]
    """One dashboard viewer: authenticates if needed, then only receives samples."""

    factory: DashboardFactory
    authenticated = False
    _auth_deadline: Any = None

    def onOpen(self) -> None:
        """Called from Autobahn once the viewer's handshake completed."""
        feed = self.factory.feed
        if len(feed.viewers) >= MAX_VIEWERS:
            self.sendClose(code=4503, reason="too many dashboard viewers")
            return
        if not self.factory.token.configured:
            self.authenticated = True
            feed.add_viewer(self)
            return
        self.sendMessage(b'{"type":"auth_required"}', False)
        self._auth_deadline = self.factory.reactor.callLater(AUTH_TIMEOUT, self._auth_timeout)

    def _auth_timeout(self) -> None:
        self._auth_deadline = None
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=1008, reasonUtf8=b"no auth message in time", isReply=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Called from Autobahn per viewer message; only the first (auth) message means anything."""
        if self.authenticated:
            return
        try:
            message = orjson.loads(payload) if not isBinary else None
        except orjson.JSONDecodeError:
            message = None
        token = message.get("token") if isinstance(message, dict) and message.get("type") == "auth" else None
        self._cancel_deadline()
        if not isinstance(token, str) or not self.factory.token.matches(token):
            self.sendClose(code=CLOSE_UNAUTHORIZED, reason="invalid admin token")
            return
        self.authenticated = True
        self.sendMessage(b'{"type":"authenticated"}', False)
        self.factory.feed.add_viewer(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Called from Autobahn exactly once per connection."""
        self._cancel_deadline()
        self.factory.feed.remove_viewer(self)

    def _cancel_deadline(self) -> None:
        if self._auth_deadline is not None and self._auth_deadline.active():
            self._auth_deadline.cancel()
        self._auth_deadline = None


class DashboardFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = DashboardProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, feed: DashboardFeed, token: AdminToken, reactor: Any) -> None:
        super().__init__(server="roomserver", reactor=reactor)
        self.feed = feed
        self.token = token
        self.setProtocolOptions(
            webStatus=False, failByDrop=False, maxFramePayloadSize=4096, maxMessagePayloadSize=4096,
            openHandshakeTimeout=5, closeHandshakeTimeout=2, autoPingInterval=30, autoPingTimeout=30,
            allowNullOrigin=False,
        )
