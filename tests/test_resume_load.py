"""Reconnection with resume under load: nothing lost, nothing duplicated, nothing out of order.

50 members in one room while a publisher sends 2,000 messages; 10 members have their TCP connection killed at
random moments (seeded) and come back with ``resume``. Every member must end with exactly seqs 1..2000 in
order, and the texts in the publisher's order. The second test does the same against a real
``twistd roomserver`` on SQLite that is stopped (SIGTERM) and started again mid-run: the publisher retries what
was not acknowledged with the same ``msg_id``, and every member resumes into the new process.

The publisher's rate limit is switched off: these tests are about delivery, not flood control.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import websockets
from websockets.exceptions import ConnectionClosed

from .support import aio, url_of
from .twistd_support import free_port, twistd, wait_for_port

MEMBERS = 50
VICTIMS = 10
MESSAGES = 2000
ROOM = "load"
SEED = 20261125


async def open_ws(url: str, attempts: int = 200) -> Any:
    """Connect, retrying while the server is down (a restart); bounded."""
    for _ in range(attempts):
        try:
            return await websockets.connect(url, ping_interval=None, max_size=None, open_timeout=5)
        except (TimeoutError, OSError, websockets.InvalidStatus, websockets.InvalidHandshake):
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not connect to {url}")


class Member:
    """A room member that checks every chat's seq on arrival and resumes after every drop."""

    def __init__(self, url: str, kill_at: list[int]) -> None:
        self.url = url
        self.kill_at = kill_at
        self.texts: list[str] = []
        self.resumes: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.trace: list[Any] = []  # connections (server ids, for twistd.out) and (re)joins, for a failure's message

    @property
    def last_seq(self) -> int:
        return len(self.texts)

    async def run(self) -> None:
        session: str | None = None
        while self.last_seq < MESSAGES:
            ws = await open_ws(self.url)
            try:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                self.trace.append(("conn", welcome["id"], self.last_seq))
                if session is None:
                    await ws.send(json.dumps({"type": "join", "room": ROOM, "since": 0}))
                else:
                    await ws.send(json.dumps({"type": "resume", "session": session,
                                              "rooms": {ROOM: self.last_seq}}))
                session = welcome["session"]
                await self._receive(ws)
            except ConnectionClosed:
                continue  # the server went away (restart): reconnect and resume
            finally:
                ws.transport.abort()

    async def _receive(self, ws: Any) -> None:
        while self.last_seq < MESSAGES:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            kind = message["type"]
            if kind == "chat":
                assert message["seq"] == self.last_seq + 1, \
                    f"expected seq {self.last_seq + 1}, got {message} trace={self.trace[-6:]} kill={self.kill_at}"
                self.texts.append(message["text"])
                if self.kill_at and self.last_seq >= self.kill_at[0]:
                    self.kill_at.pop(0)
                    return  # the caller aborts the TCP connection: no close frame, like a pulled cable
            elif kind in ("joined", "resumed"):
                self.trace.append((kind, self.last_seq, message))
                assert message.get("recovered", True) is True, message
                if kind == "resumed":
                    self.resumes.append(message)
                self.ready.set()
            elif kind == "reconnect":
                self.trace.append((kind, self.last_seq, message))  # a drain: the 1001 close follows
            else:
                raise AssertionError(f"unexpected message {message}")


class Publisher:
    """Sends MESSAGES chats with ``msg_id``s, at most ``window`` unacknowledged; after a drop it reconnects and
    resends every unacknowledged one, in order, with the same ``msg_id`` (idempotent publish)."""

    def __init__(self, url: str, window: int = 100) -> None:
        self.url = url
        self.window = window
        self.acked: dict[int, int] = {}  # message number -> seq
        self.duplicates = 0
        self.on_ack: Callable[[int], Awaitable[None]] | None = None

    async def run(self) -> None:
        next_number = 1
        while len(self.acked) < MESSAGES:
            ws = await open_ws(self.url)
            try:
                await asyncio.wait_for(ws.recv(), 10)  # welcome
                await ws.send(json.dumps({"type": "join", "room": ROOM}))
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "joined"
                # Resend, in order, whatever was sent but never acknowledged.
                next_number = min([n for n in range(1, next_number) if n not in self.acked], default=next_number)
                while len(self.acked) < MESSAGES:
                    while next_number <= MESSAGES and next_number - len(self.acked) <= self.window:
                        await ws.send(json.dumps({"type": "chat", "room": ROOM, "text": f"m{next_number}",
                                                  "id": next_number, "msg_id": f"pub-{next_number}"}))
                        next_number += 1
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if message["type"] == "ack":
                        self.acked[message["id"]] = message["seq"]
                        self.duplicates += bool(message.get("duplicate"))
                        if self.on_ack is not None:
                            await self.on_ack(len(self.acked))
                    elif message["type"] == "error":
                        # The server drains (after its reconnect hint): not stored, sent again after reconnecting.
                        assert message["code"] == "unavailable", message
                    else:
                        assert message["type"] in ("chat", "reconnect"), message
            except ConnectionClosed:
                continue
            finally:
                ws.transport.abort()


def plan_kills(rng: random.Random) -> dict[int, list[int]]:
    """Which members get killed, and after how many messages (one or two kills each)."""
    return {index: sorted(rng.sample(range(1, MESSAGES), rng.randint(1, 2)))
            for index in rng.sample(range(MEMBERS), VICTIMS)}


async def run_load(url: str, on_ack: Callable[[int], Awaitable[None]] | None = None) -> tuple[
        list[Member], Publisher]:
    kills = plan_kills(random.Random(SEED))
    members = [Member(url, kills.get(index, [])) for index in range(MEMBERS)]
    tasks = [asyncio.ensure_future(member.run()) for member in members]
    await asyncio.wait_for(asyncio.gather(*(member.ready.wait() for member in members)), 30)
    publisher = Publisher(url)
    publisher.on_ack = on_ack
    await asyncio.wait_for(asyncio.gather(publisher.run(), *tasks), 150)
    return members, publisher


def check(members: list[Member], publisher: Publisher) -> None:
    expected = [f"m{n}" for n in range(1, MESSAGES + 1)]
    assert sorted(publisher.acked.values()) == list(range(1, MESSAGES + 1))
    assert all(publisher.acked[n] == n for n in publisher.acked), "seq order is the publisher's order"
    for index, member in enumerate(members):
        assert member.texts == expected, f"member {index} got a different stream"


@pytest_twisted.ensureDeferred
async def test_resume_under_load_loses_and_duplicates_nothing(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_clients=MEMBERS + 20, rate_limit=0)
    members, publisher = await aio(run_load(url_of(server)))
    check(members, publisher)
    assert len([member for member in members if member.resumes]) == VICTIMS
    assert all(resume["continued"] for member in members for resume in member.resumes), \
        "every resume within resume_ttl continues its session"
    assert publisher.duplicates == 0


def start_twistd(port: int, database: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with (cwd / "twistd.out").open("ab") as log:  # a file, not a pipe nobody reads while the load runs
        process = twistd(cwd, "--port", f"tcp:{port}:interface=127.0.0.1", "--store", f"sqlite:{database}",
                         "--max-clients", "100", "--rate-limit", "0", "--shutdown-timeout", "2", stdout=log)
    wait_for_port(port, process)
    return process


@pytest_twisted.ensureDeferred
async def test_resume_under_load_across_a_server_restart_on_sqlite(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "load.db"
    processes = [start_twistd(port, database, tmp_path)]
    restarted = asyncio.Event()

    async def restart_midway(acked: int) -> None:
        if acked == MESSAGES * 2 // 5 and not restarted.is_set():
            restarted.set()
            old = processes[-1]
            old.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, old.wait, 15)
            processes.append(await asyncio.get_running_loop().run_in_executor(
                None, start_twistd, port, database, tmp_path))

    try:
        members, publisher = await aio(run_load(f"ws://127.0.0.1:{port}/ws", restart_midway))
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(15)
    # twistd re-raises SIGTERM after its clean shutdown, hence -SIGTERM
    assert restarted.is_set() and processes[0].returncode in (0, -signal.SIGTERM)
    output = (tmp_path / "twistd.out").read_text()
    assert "Traceback" not in output, output
    check(members, publisher)
    assert all(member.resumes for member in members), "every member resumed into the new process"
