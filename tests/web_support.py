"""Helpers for tests of the HTTP side: a real HTTP client (Twisted's Agent) and log capture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from roomserver import WebSocketServer


class Response:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


async def http(server: WebSocketServer, method: str, path: str, body: bytes | None = None,
               token: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """One real HTTP request to the server on loopback."""
    from io import BytesIO

    from twisted.web.client import FileBodyProducer

    all_headers = {"user-agent": "roomserver-tests"}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    agent = Agent(reactor)
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    response = await agent.request(
        method.encode("ascii"), f"http://127.0.0.1:{server.port}{path}".encode("ascii"),
        Headers({k: [v] for k, v in all_headers.items()}), producer,
    )
    return Response(response.code, response.headers, await readBody(response))


@contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    """Collect every log event published while the block runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
