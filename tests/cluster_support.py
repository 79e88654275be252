"""Cluster tests' parts: ``twistd roomserver`` nodes as real subprocesses on Redis, and room members that
check every seq on arrival and move to another node (with ``resume``) when theirs goes away."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed

from .redis_support import REDIS_URL, delete_prefix_now, unique_prefix
from .support import metric
from .twistd_support import free_port, twistd, wait_for_port


class Node:
    """One ``twistd roomserver`` process of a cluster."""

    def __init__(self, redis_url: str, workdir: Path, name: str, *extra: str) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.name = name
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> Node:
        with self.log.open("ab") as log:
            self.process = twistd(
                self.workdir, "--port", f"tcp:{self.port}:interface=127.0.0.1", "--store", self.redis_url,
                "--broker", self.redis_url, "--rate-limit", "0", "--shutdown-timeout", "2", *self.extra, stdout=log)
        return self

    def wait(self) -> Node:
        assert self.process is not None
        wait_for_port(self.port, self.process, timeout=20)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metric(self, name: str) -> float:
        """One unlabelled sample of this node's ``/metrics``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
            text = response.read().decode()
        return metric(text, name)

    def tracebacks(self) -> str:
        text = self.log.read_text() if self.log.exists() else ""
        return text if "Traceback" in text else ""


@contextmanager
def running_nodes(workdir: Path, count: int, *extra: str) -> Iterator[tuple[str, list[Node]]]:
    """``count`` nodes on Redis under a key prefix of their own, listening; yields the prefix and the nodes.

    On the way out the nodes are stopped and the prefix's keys deleted; when the block succeeded, a traceback
    in any node's log fails it."""
    prefix = unique_prefix()
    url = f"{REDIS_URL}?prefix={prefix}"
    nodes = [Node(url, workdir, f"node{i}", *extra).start() for i in range(count)]
    try:
        for node in nodes:
            node.wait()
        yield prefix, nodes
    finally:
        for node in nodes:
            node.stop()
        delete_prefix_now(prefix)
    for node in nodes:
        assert not node.tracebacks(), node.tracebacks()


async def open_ws(urls: list[str], attempts: int = 100) -> tuple[Any, str]:
    """Connect to the first node that answers, trying them in turn; bounded."""
    for attempt in range(attempts):
        url = urls[attempt % len(urls)]
        try:
            ws = await websockets.connect(url, ping_interval=None, max_size=None, open_timeout=3)
            return ws, url
        except (TimeoutError, OSError, websockets.InvalidStatus, websockets.InvalidHandshake):
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not connect to any of {urls}")


class Member:
    """Joins ``room`` on its node and records every chat; when its node goes away it connects to the next
    one and resumes from the last seq it saw. Every seq must arrive exactly once, in order. A draining node's
    reconnect hint is recorded and honoured (it waits ``after_ms`` before connecting again)."""

    def __init__(self, urls: list[str], room: str, expect: int) -> None:
        self.urls = urls
        self.room = room
        self.expect = expect
        self.texts: list[str] = []
        self.resumes: list[dict[str, Any]] = []
        self.hints: list[dict[str, Any]] = []
        self.nodes: list[str] = []
        self.ready = asyncio.Event()
        self._hinted: dict[str, Any] | None = None

    @property
    def last_seq(self) -> int:
        return len(self.texts)

    async def run(self) -> None:
        session: str | None = None
        urls = list(self.urls)
        while self.last_seq < self.expect:
            ws, url = await open_ws(urls)
            self.nodes.append(url)
            try:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if session is None:
                    await ws.send(json.dumps({"type": "join", "room": self.room}))
                else:
                    await ws.send(json.dumps({"type": "resume", "session": session,
                                              "rooms": {self.room: self.last_seq}}))
                session = welcome["session"]
                await self._receive(ws)
            except ConnectionClosed:
                urls = urls[1:] + urls[:1]  # that node went away: start with the next one
            finally:
                ws.transport.abort()
            hinted, self._hinted = self._hinted, None
            if hinted is not None and self.last_seq < self.expect:
                await asyncio.sleep(hinted["after_ms"] / 1000)

    async def _receive(self, ws: Any) -> None:
        while self.last_seq < self.expect:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            kind = message["type"]
            if kind == "chat":
                assert message["seq"] == self.last_seq + 1, \
                    f"expected seq {self.last_seq + 1}, got {message} (via {self.nodes}, resumes {self.resumes})"
                self.texts.append(message["text"])
            elif kind in ("joined", "resumed"):
                assert message.get("recovered", True) is True, message
                if kind == "resumed":
                    self.resumes.append(message)
                self.ready.set()
            elif kind == "reconnect":
                self.hints.append(message)
                self._hinted = message
            elif kind != "ack":
                raise AssertionError(f"unexpected message {message}")


async def publish(url: str, room: str, texts: list[str], window: int = 50, padding: str = "") -> dict[str, int]:
    """Send ``texts`` to ``room`` through one node with at most ``window`` unacknowledged; text -> seq. Each
    text is its chat's ``id`` and ``msg_id``; ``padding`` is appended to the text sent (larger messages)."""
    ws, _ = await open_ws([url])
    acked: dict[str, int] = {}
    try:
        await asyncio.wait_for(ws.recv(), 10)
        await ws.send(json.dumps({"type": "join", "room": room}))
        sent = 0
        while len(acked) < len(texts):
            while sent < len(texts) and sent - len(acked) < window:
                await ws.send(json.dumps({"type": "chat", "room": room, "text": texts[sent] + padding,
                                          "id": texts[sent], "msg_id": texts[sent]}))
                sent += 1
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "ack":
                acked[message["id"]] = message["seq"]
            else:
                assert message["type"] in ("chat", "joined"), message
    finally:
        ws.transport.abort()
    return acked


class SteadyPublisher:
    """Sends ``total`` chats at a steady pace through any node; when its node goes away it reconnects to the
    next and sends again, in order and with the same ``msg_id``, whatever was not acknowledged."""

    def __init__(self, urls: list[str], room: str, total: int, pause: float = 0.005, window: int = 20,
                 hold_last: asyncio.Event | None = None) -> None:
        self.urls = urls
        self.hold_last = hold_last  # the last chat waits for it: every member stays connected until it is set
        self.room = room
        self.total = total
        self.pause = pause
        self.window = window
        self.acked: dict[int, int] = {}  # message number -> seq
        self.duplicates = 0
        self.connections = 0

    async def run(self) -> None:
        urls = list(self.urls)
        following = 1
        while len(self.acked) < self.total:
            ws, _ = await open_ws(urls)
            self.connections += 1
            try:
                await asyncio.wait_for(ws.recv(), 10)
                await ws.send(json.dumps({"type": "join", "room": self.room}))
                following = min([n for n in range(1, following) if n not in self.acked], default=following)
                while len(self.acked) < self.total:
                    while following <= self.total and following - len(self.acked) <= self.window:
                        if following == self.total and self.hold_last is not None:
                            await self.hold_last.wait()
                        await ws.send(json.dumps({"type": "chat", "room": self.room, "text": f"m{following}",
                                                  "id": following, "msg_id": f"m{following}"}))
                        following += 1
                        await asyncio.sleep(self.pause)
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if message["type"] == "ack":
                        self.acked[message["id"]] = message["seq"]
                        self.duplicates += bool(message.get("duplicate"))
                    elif message["type"] == "error":
                        assert message["code"] == "unavailable", message
            except ConnectionClosed:
                urls = urls[1:] + urls[:1]
            finally:
                ws.transport.abort()


class RetryingPublisher:
    """Sends ``total`` chats through one node with at most ``window`` unanswered; a chat refused with
    ``unavailable`` is sent again (same ``msg_id``) a little later, as a client library would."""

    def __init__(self, url: str, room: str, total: int, window: int) -> None:
        self.url, self.room, self.total, self.window = url, room, total, window
        self.acked: dict[int, int] = {}  # message number -> seq
        self.refused = 0
        self.duplicates = 0

    async def run(self) -> None:
        ws, _ = await open_ws([self.url])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 50
        try:
            await asyncio.wait_for(ws.recv(), 10)
            await ws.send(json.dumps({"type": "join", "room": self.room}))
            pending: list[int] = list(range(self.total, 0, -1))  # a stack: the next to send is last
            retries: list[tuple[float, int]] = []  # (when, message number), refused ones to send again
            in_flight: set[int] = set()
            while len(self.acked) < self.total:
                assert loop.time() < deadline, \
                    f"{len(self.acked)} of {self.total} acknowledged; unanswered: {sorted(in_flight)}"
                now = loop.time()
                pending.extend(number for when, number in retries if when <= now)
                retries = [(when, number) for when, number in retries if when > now]
                while pending and len(in_flight) < self.window:
                    number = pending.pop()
                    await ws.send(json.dumps({"type": "chat", "room": self.room, "text": f"m{number}",
                                              "id": number, "msg_id": f"m{number}"}))
                    in_flight.add(number)
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
                except TimeoutError:
                    continue
                if message["type"] == "ack":
                    in_flight.discard(message["id"])
                    self.acked[message["id"]] = message["seq"]
                    self.duplicates += bool(message.get("duplicate"))
                elif message["type"] == "error":
                    assert message["code"] == "unavailable", message
                    number = int(message["msg_id"][1:])
                    in_flight.discard(number)
                    self.refused += 1
                    retries.append((loop.time() + 0.2, number))
                else:
                    assert message["type"] in ("chat", "joined"), message
        finally:
            ws.transport.abort()
