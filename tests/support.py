"""Test helpers: a real WebSocket client (the ``websockets`` library) driven from Twisted tests.

The tests run on Twisted's asyncio reactor (``--reactor=asyncio`` in setup.cfg), so the server under test and
the asyncio client share one event loop; ``aio`` turns the client's coroutines into Deferreds a Twisted test can
await.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import websockets
from twisted.internet import defer

from roomserver import ServerOptions, WebSocketServer


def aio(coro: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
    return defer.Deferred.fromFuture(asyncio.ensure_future(coro))


class WSClient:
    """One real WebSocket connection with JSON helpers; every wait is bounded by ``timeout``."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WSClient:
        kwargs.setdefault("ping_interval", None)
        kwargs.setdefault("open_timeout", 5)
        kwargs.setdefault("max_size", None)
        return cls(await aio(websockets.connect(url, **kwargs)))

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, (str, bytes)) else json.dumps(message)
        await aio(self.ws.send(data))

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes:
        return await aio(asyncio.wait_for(self.ws.recv(), timeout))  # type: ignore[no-any-return]

    async def recv(self, timeout: float = 5.0) -> Any:
        return json.loads(await self.recv_raw(timeout))

    async def request(self, message: Any, timeout: float = 5.0) -> Any:
        await self.send(message)
        return await self.recv(timeout)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Wait until the server closes the connection; returns the close code and reason received."""
        await aio(asyncio.wait_for(self.ws.wait_closed(), timeout))
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")

    async def close(self) -> None:
        await aio(self.ws.close())

    def abort(self) -> None:
        """Drop the TCP connection with no close frame, as a crashed client or a pulled cable would."""
        self.ws.transport.abort()


async def eventually(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait (bounded) until ``predicate()`` is true; fails the test on timeout."""
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await aio(asyncio.sleep(interval))


async def start_server(**options: Any) -> WebSocketServer:
    options.setdefault("port", 0)
    options.setdefault("host", "127.0.0.1")
    server = WebSocketServer(ServerOptions(**options))
    await server.start()
    return server


def url_of(server: WebSocketServer, path: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}{path if path is not None else server.options.path}"
