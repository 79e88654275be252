"""Helpers for tests of the HTTP side: a real HTTP client (Twisted's Agent) and log capture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
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


class _BodyCollector(Protocol):
    """The whole response body. (``twisted.web.client.readBody`` warns that the Agent's transport cannot be
    aborted: true here and harmless, since every test reads bodies to the end.)"""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: Any) -> defer.Deferred[bytes]:
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_BodyCollector(done))
    return done


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
    return Response(response.code, response.headers, await read_body(response))


@contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    """Collect every log event published while the block runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
