"""``/healthz``: is this node fit to receive traffic? JSON for humans, the status code for load balancers.

``{"status": "ok"}`` with HTTP 200 while the server listens and every backend it has reports healthy;
``{"status": "degraded"}`` with HTTP 503 while a backend reports trouble, and ``{"status": "draining"}`` with
HTTP 503 once it is shutting down (SIGTERM, ``stop()``: it still answers during the drain), so a load
balancer stops sending new clients to it. Backends (a message store, a cross-node broker) are found as the
server's ``store`` and ``broker`` attributes (or those of its durable-rooms component, ``server.durable``);
each reports itself through ``health()`` (a dict with at least ``"ok": bool``) or a ``state`` string. A server
without such a backend reports ``{"backend": "none"}`` for it, which is healthy: there is nothing that can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from twisted.web.resource import Resource

if TYPE_CHECKING:
    from ..server import WebSocketServer

HEALTHY_STATES = frozenset({"ok", "open", "connected", "running", "ready", "subscribed"})
BACKENDS = ("store", "broker")


def backend_health(backend: Any) -> dict[str, Any]:
    """Describe one backend: ``{"backend": name, "ok": bool, ...}``; never raises."""
    if backend is None:
        return {"backend": "none", "ok": True}
    name = str(getattr(backend, "name", None) or type(backend).__name__)
    where = getattr(backend, "path", None)
    try:
        probe = getattr(backend, "health", None)
        if callable(probe):
            report = dict(probe())
            report.setdefault("backend", name)
            report["ok"] = bool(report.get("ok", False))
            return report
        report = {"backend": name, "ok": True}
        if isinstance(where, str):
            report["path"] = where
        state = getattr(backend, "state", None)
        if state is not None:
            report.update(state=str(state), ok=str(state) in HEALTHY_STATES)
        return report
    except Exception as exc:  # a broken probe is itself a sign of a broken backend
        return {"backend": name, "ok": False, "error": type(exc).__name__}


def find_backend(server: Any, name: str) -> Any:
    """The server's ``store`` or ``broker``: an attribute of the server, or of its durable-rooms component."""
    backend = getattr(server, name, None)
    if backend is None:
        backend = getattr(getattr(server, "durable", None), name, None)
    return backend


def health_report(server: WebSocketServer, now: float, started_at: float | None) -> dict[str, Any]:
    listening = server._listening is not None and not server._stopping
    report: dict[str, Any] = {"listening": listening}
    healthy = listening
    for name in BACKENDS:
        part = backend_health(find_backend(server, name))
        report[name] = part
        healthy = healthy and part["ok"]
    stats = server.get_stats()
    report.update(
        connections=stats.connections,
        rooms=stats.rooms,
        uptime=round(now - started_at, 3) if started_at is not None and listening else 0.0,
    )
    status = "draining" if server._stopping else "ok" if healthy else "degraded"
    return {"status": status, **report}


class HealthPage(Resource):
    """``GET /healthz``: 200 ``{"status":"ok",...}`` or 503 ``{"status":"degraded"|"draining",...}``."""

    isLeaf = True

    def __init__(self, server: WebSocketServer, started_at: Callable[[], float | None]) -> None:
        super().__init__()
        self._server = server
        self._started_at = started_at

    def render_GET(self, request: Any) -> bytes:
        report = health_report(self._server, self._server.reactor.seconds(),  # type: ignore[attr-defined]
                               self._started_at())
        request.setResponseCode(200 if report["status"] == "ok" else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps(report)
