"""The HTTP side of a roomserver, on the same port as its WebSocket path.

``install(server)`` builds the pages that ``build_root`` mounts beside the WebSocket path and attaches the
observers that feed them:

====================  ==================================================================================
``/``                 the demo chat page (static HTML + roomserver.js, no build step)
``/dashboard``        the live dashboard page; its data arrives over the WebSocket ``/dashboard/ws``
``/roomserver.js``    the browser client (docs/clients.md)
``/static/...``       the pages' scripts and styles
``/metrics``          Prometheus text format
``/healthz``          JSON health, 200 or 503
``/admin/...``        the admin API (Bearer admin token)
====================  ==================================================================================

``ServerOptions(http_pages=False)`` (``--no-http-pages``) leaves all of it out: only the WebSocket path answers.
Observers are attached here rather than in the hub, so a server without pages pays nothing for them.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from ..web import UpgradeResource
from .admin import AdminApi
from .dashboard import DashboardFactory, DashboardFeed
from .health import HealthPage
from .metrics import MetricsObserver, MetricsPage
from .static import StaticFile, static_directory

if TYPE_CHECKING:
    from ..server import WebSocketServer

__all__ = ["HttpSide", "install"]


class HttpSide:
    """Everything the HTTP pages of one server share: the token, the metrics and the dashboard feed."""

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.token = server.loaded.admin_token
        self.metrics = MetricsObserver(server)
        self.feed = DashboardFeed(server)
        server.observers.add(self.metrics)
        server.observers.add(self.feed)

    def pages(self) -> dict[bytes, Any]:
        ws_path = html.escape(self.server.options.path, quote=True).encode("utf-8")
        dashboard: Any = StaticFile("dashboard.html")
        dashboard.putChild(b"ws", UpgradeResource(DashboardFactory(self.feed, self.token, self.server.reactor)))
        return {
            b"": StaticFile("index.html", {b'data-ws-path="/ws"': b'data-ws-path="%s"' % ws_path}),
            b"dashboard": dashboard,
            b"roomserver.js": StaticFile("roomserver.js"),
            b"static": static_directory(),
            b"metrics": MetricsPage(self.metrics),
            b"healthz": HealthPage(self.server, lambda: self.feed.started_at),
            b"admin": AdminApi(self.server, self.token),
        }


def install(server: WebSocketServer) -> dict[bytes, Any]:
    """Attach the HTTP side to ``server`` (as ``server.http``) and return its top-level pages."""
    side = HttpSide(server)
    server.http = side  # type: ignore[attr-defined]
    return side.pages()



