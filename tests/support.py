"""Test helpers: a real WebSocket client (the ``websockets`` library) driven from Twisted tests.

The tests run on Twisted's asyncio reactor (``--reactor=asyncio`` in setup.cfg), so the server under test and
the asyncio client share one event loop; ``aio`` turns the client's coroutines into Deferreds a Twisted test can
await.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import websockets
from twisted.internet import defer

from roomserver import ServerOptions, WebSocketServer


@contextmanager
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect every error or critical log event (and every logged failure) emitted inside the block."""
    from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
    from zope.interface import provider

    problems: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            problems.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield problems
    finally:
        globalLogPublisher.removeObserver(observe)


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
        kwargs.setdefault("max_queue", None)  # tests read when they like; never stall the connection
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


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line of the Prometheus text format."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise AssertionError(f"no sample {wanted} in:\n{text}")


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
    # A test's clients never come back after its servers stop: a cluster node would wait its whole
    # drain_handover for them at every teardown. The tests of the handover set it themselves.
    options.setdefault("drain_handover", 0)
    server = WebSocketServer(ServerOptions(**options))
    await server.start()
    return server


def url_of(server: WebSocketServer, path: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}{path if path is not None else server.options.path}"


HANDSHAKE_TEMPLATE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One client frame built by hand, so tests can send what no well-behaved client library would."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes([first, mask_bit | length])
    elif length < 2**16:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = b"\x37\xfa\x21\x3d"
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a bare asyncio stream: it sends hand-built frames and reads raw server frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, server: WebSocketServer, *, path: str | None = None, headers: str = "", recv_buffer: int | None = None
    ) -> RawClient:
        """Open a TCP connection and complete the upgrade (asserting the 101)."""
        client = await cls.open_tcp(server, recv_buffer=recv_buffer)
        request = HANDSHAKE_TEMPLATE.format(path=path or server.options.path, port=server.port, extra=headers)
        client.writer.write(request.encode())
        head = await aio(asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5))
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    @classmethod
    async def open_tcp(cls, server: WebSocketServer, *, recv_buffer: int | None = None) -> RawClient:
        import socket

        sock = socket.socket()
        if recv_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.setblocking(False)
        await aio(asyncio.get_event_loop().sock_connect(sock, ("127.0.0.1", server.port)))
        reader, writer = await aio(asyncio.open_connection(sock=sock))
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload)."""
        async def read() -> tuple[int, bytes]:
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            return head[0] & 0x0F, await self.reader.readexactly(length)

        return await aio(asyncio.wait_for(read(), timeout))  # type: ignore[no-any-return]

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read frames until the server's close frame; its code (None if the TCP connection ended first)."""
        try:
            while True:
                opcode, payload = await self.read_frame(timeout)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        except asyncio.IncompleteReadError:
            return None

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server closed the TCP connection (reading everything that is left)."""
        try:
            while await aio(asyncio.wait_for(self.reader.read(65536), timeout)):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()
