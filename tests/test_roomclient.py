"""``roomserver.roomclient.RoomClient`` against a real server on loopback, and its timers on a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.failure import Failure

from roomserver import ServerOptions, WebSocketServer
from roomserver.core.backoff import backoff_delay
from roomserver.interfaces import StoreError
from roomserver.roomclient import RoomClient, RoomClientError, is_terminal

from .support import eventually, url_of

# -- backoff (pure) ------------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_to_the_cap_with_jitter_above_half_the_minimum() -> None:
    def top() -> float:
        return 0.999999

    def bottom() -> float:
        return 0.0

    assert [round(backoff_delay(n, top, 0.25, 10.0, 2.0), 3) for n in range(8)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert {backoff_delay(n, bottom, 0.25, 10.0) for n in range(8)} == {0.125}
    assert backoff_delay(10_000, top) <= 10.0, "huge attempt numbers do not overflow"
    with pytest.raises(ValueError):
        backoff_delay(-1, top)
    with pytest.raises(ValueError):
        backoff_delay(0, top, min_delay=5, max_delay=1)


def test_terminal_close_codes() -> None:
    assert [code for code in (1000, 1001, 1006, 1008, 1009, 1011, 4008, 4501, None) if is_terminal(code)] == [
        1008, 1009, 4501]


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        RoomClient("http://example.com/ws")


# -- reconnect schedule on a fake clock ----------------------------------------------------------------------


class UnreachableClient(RoomClient):
    """A client whose every connection attempt fails at once (a server that is down)."""

    attempts: list[float]

    def _connect_once(self) -> defer.Deferred[Any]:
        self.attempts.append(self.reactor.seconds())
        return defer.fail(ConnectionRefusedError())


def test_retries_follow_the_backoff_schedule_on_the_injected_clock() -> None:
    clock = task.Clock()
    client = UnreachableClient("ws://127.0.0.1:9/ws", reactor=clock, random=lambda: 0.5, min_delay=1.0,
                               max_delay=4.0)
    client.attempts = []
    states: list[tuple[str, dict[str, Any]]] = []
    client.on("state", lambda state, detail: states.append((state, detail)))
    connected = client.connect()
    connected.addErrback(lambda failure: None)
    assert client.attempts == [0.0] and client.state == "reconnecting"
    # delays with random()=0.5: 0.5 + 0.5 * (cap - 0.5) for caps 1, 2, 4, 4
    for expected in (0.75, 1.25, 2.25, 2.25):
        before = len(client.attempts)
        clock.advance(expected - 0.001)
        assert len(client.attempts) == before, "no retry before its delay"
        clock.advance(0.001)
        assert len(client.attempts) == before + 1
    retries = [detail for state, detail in states if state == "reconnecting"]
    assert [(r["attempt"], r["delay"]) for r in retries] == [(1, 0.75), (2, 1.25), (3, 2.25), (4, 2.25), (5, 2.25)]
    assert [round(b - a, 3) for a, b in zip(client.attempts, client.attempts[1:], strict=False)] == [
        0.75, 1.25, 2.25, 2.25]
    client.close()
    assert client.state == "closed" and not clock.getDelayedCalls(), "close() cancels the pending retry"
    assert connected.called


class PendingClient(RoomClient):
    """A client whose connection attempt neither succeeds nor fails until cancelled (a TCP connect under way)."""

    cancelled = 0

    def _connect_once(self) -> defer.Deferred[Any]:
        def cancel(_: Any) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


def test_close_while_the_tcp_connection_is_under_way_cancels_it_and_says_closed() -> None:
    clock = task.Clock()
    client = PendingClient("ws://127.0.0.1:9/ws", reactor=clock)
    connected = client.connect()
    failures: list[Any] = []
    connected.addErrback(failures.append)
    client.close()
    assert client.cancelled == 1 and client.state == "closed"
    assert failures and failures[0].value.code == "closed"
    assert not clock.getDelayedCalls(), "no retry after close"


def test_request_timeout_uses_the_clock() -> None:
    clock = task.Clock()
    client = RoomClient("ws://127.0.0.1:9/ws", reactor=clock, request_timeout=3.0)
    failed = client.request({"type": "join", "room": "r"})
    errors: list[RoomClientError] = []
    failed.addErrback(lambda failure: errors.append(failure.value))
    assert errors and errors[0].code == "not_connected", "a request while not connected fails at once"


# -- against a scripted server on a fake clock ------------------------------------------------------------
#
# What a real server cannot stage on demand (a reply held until a live chat went by, a history page that fails
# once) with no timing at all: every message of the scripted server, and every timer of the client, runs on the
# client's task.Clock, in the order due (same time: in the order scheduled). `run(until)` advances it one second
# at a time until a condition holds; a test that checks that something does NOT happen advances it well past
# every delay the client could still have pending (its backoff is at most 5 s).


class ScriptedConnection:
    """One connection to the scripted server, in the place of Autobahn's protocol: ``sent`` (what the client
    sent), ``pushed`` (what it was sent), ``later(message, delay)`` (sent ``delay`` seconds from now)."""

    STATE_OPEN, STATE_CLOSING, STATE_CLOSED = 3, 4, 5

    def __init__(self, client: ScriptedClient, number: int) -> None:
        self.client = client
        self.number = number
        self.state = self.STATE_OPEN
        self.sent: list[dict[str, Any]] = []
        self.pushed: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.pushed.append(message)
            self.client._receive(self, orjson.dumps(message))  # type: ignore[arg-type]

    def later(self, message: dict[str, Any], delay: float = 1) -> None:
        self.client.clock.callLater(delay, self.push, message)

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:
        message = orjson.loads(payload)
        self.sent.append(message)
        if self.state == self.STATE_OPEN:
            self.client.script(self, message)

    def sendClose(self, code: int = 1000) -> None:
        self._closing(code)

    def dropConnection(self, abort: bool = False) -> None:
        self._closing(1006)

    def _closing(self, code: int) -> None:
        if self.state == self.STATE_OPEN:
            self.state = self.STATE_CLOSING
            self.client.clock.callLater(0, self.drop, code)

    def drop(self, code: int = 1006) -> None:
        """The connection is gone (the server's side, or the network): the client hears of it at once."""
        if self.state != self.STATE_CLOSED:
            self.state = self.STATE_CLOSED
            self.client._dropped(self, code, "")  # type: ignore[arg-type]


def chat(room: str, seq: int) -> dict[str, Any]:
    return {"type": "chat", "room": room, "from": "other", "text": f"m{seq}", "seq": seq}


class ScriptedClient(RoomClient):
    """A client whose every connection reaches a scripted server: ``welcome(number)`` greets connection number
    ``number`` (1-based), ``script(connection, request)`` answers each request (``connection.later(...)``).
    It records ``delivered`` (room -> seqs of its chat events), ``resumed`` ((room, recovered) per event) and
    ``errors`` ("code room" per error event)."""

    def __init__(self, welcome: Callable[[int], dict[str, Any]],
                 script: Callable[[ScriptedConnection, dict[str, Any]], None], **options: Any) -> None:
        self.clock = task.Clock()
        options = {"min_delay": 5.0, "max_delay": 5.0, "random": lambda: 0.5, "request_timeout": 1000.0,
                   "rejoin_attempts": 2, **options}
        super().__init__("ws://127.0.0.1:9/ws", reactor=self.clock, **options)
        self.welcome = welcome
        self.script = script
        self.connections: list[ScriptedConnection] = []
        self.delivered: dict[str, list[int]] = {}
        self.resumed: list[tuple[str, bool]] = []
        self.errors: list[str] = []
        self.on("chat", lambda event: self.delivered.setdefault(event["room"], []).append(event["seq"]))
        self.on("resumed", lambda event: self.resumed.append((event["room"], event["recovered"])))
        self.on("error", lambda event: self.errors.append(f"{event.get('code')} {event.get('room')}"))

    def _connect_once(self) -> defer.Deferred[Any]:
        connection = ScriptedConnection(self, len(self.connections) + 1)
        self.connections.append(connection)
        connection.later(self.welcome(connection.number))
        return defer.succeed(connection)

    def run(self, until: Callable[[], object], what: str, limit: int = 1000) -> None:
        """Advance the clock a second at a time until ``until()`` holds."""
        for _ in range(limit):
            if until():
                return
            self.clock.advance(1)
        raise AssertionError(f"still waiting for {what} after {limit} s (state {self.state})")

    def settle(self) -> None:
        """Let everything still due happen (for checks that something does NOT follow)."""
        self.clock.advance(100)

    def wait(self, deferred: defer.Deferred[Any], what: str) -> Any:
        """The result of ``deferred``, advancing the clock until it fires."""
        results: list[Any] = []
        deferred.addBoth(results.append)
        self.run(lambda: results, what)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def requests(connection: ScriptedConnection) -> list[str]:
    """What the client sent on ``connection``, as "type room since"."""
    return [" ".join(str(m[key]) for key in ("type", "room", "since") if key in m) for m in connection.sent]


def answer_joins(connection: ScriptedConnection, message: dict[str, Any]) -> None:
    if message["type"] == "join":
        connection.later({"type": "joined", "room": message["room"], "size": 1, "id": message["id"]})


@pytest.mark.parametrize("close_on", ["connecting", "close", "reconnecting", "open"])
def test_close_from_an_event_listener_closes_for_good(close_on: str) -> None:
    """An application that closes the client from a listener (say, giving up after so many attempts): on the
    first "connecting" state, on the "close" event of a drop, on the "reconnecting" state after it, or on the
    "open" state of the connection that comes back. The client went on with what the listener interrupted: the
    attempt of "connecting" still went out (and connected), "reconnecting" still set its retry timer (one more
    attempt after close()), "open" still joined its room again on the closing connection."""
    client = ScriptedClient(lambda n: {"type": "welcome", "id": f"me{n}"}, answer_joins)
    states: list[str] = []
    armed = close_on == "connecting"
    closed_at: list[tuple[int, int]] = []

    def sent() -> int:
        return sum(len(connection.sent) for connection in client.connections)

    def close_now() -> None:
        if armed and not closed_at:
            closed_at.append((len(client.connections), sent()))
            client.close()

    def on_state(state: str, detail: dict[str, Any]) -> None:
        states.append(state)
        if state == close_on:
            close_now()

    client.on("state", on_state)
    client.on("close", lambda code, reason: close_now() if close_on == "close" else None)
    outcome: list[str] = []
    connected = client.connect()
    connected.addCallbacks(lambda _: outcome.append("open"), lambda failure: outcome.append(failure.value.code))
    if not armed:
        client.run(lambda: outcome, "the first connection")
        client.wait(client.join("r"), "the join")
        armed = True
        client.connections[0].drop()
    client.run(lambda: closed_at, "the listener to close the client")
    client.settle()  # no attempt, request or error may follow
    [(connections, requests_sent)] = closed_at
    assert client.state == "closed" and states[-1] == "closed" and states.count("closed") == 1, states
    assert len(client.connections) == connections, "no connection attempt after close()"
    assert sent() == requests_sent, "no request after close()"
    assert client.errors == []
    if close_on == "connecting":
        assert outcome == ["closed"], "connect() itself fails with closed"
    if close_on == "open":
        assert outcome == ["open"], outcome


# -- against a real server -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_clients_chat_with_acks_errors_and_leave(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    ada = RoomClient(url_of(server))
    bob = RoomClient(url_of(server))
    try:
        await ada.connect()
        await bob.connect()
        assert ada.id in server.clients and ada.state == "open"
        received: list[dict[str, Any]] = []
        bob.on("chat", received.append)
        assert (await ada.join("lobby"))["type"] == "joined"
        assert (await bob.join("lobby"))["size"] == 2
        acks = [await ada.send("lobby", f"hello {i}") for i in range(3)]
        assert [ack["seq"] for ack in acks] == [1, 2, 3]
        await eventually(lambda: len(received) == 3)
        assert [event["text"] for event in received] == ["hello 0", "hello 1", "hello 2"]
        assert bob.last_seq("lobby") == 3
        with pytest.raises(RoomClientError) as caught:
            await bob.send("elsewhere", "nope")
        assert caught.value.code == "not_in_room"
        with pytest.raises(RoomClientError) as bad:
            await bob.join("bad room name!")
        assert bad.value.code == "invalid_message"
        assert (await bob.leave("lobby"))["type"] == "left" and "lobby" not in bob.rooms
    finally:
        await ada.close()
        await bob.close()
    await eventually(lambda: server.get_stats().connections == 0)
    assert ada.state == "closed"


@pytest_twisted.ensureDeferred
async def test_a_room_deleted_by_the_server_is_forgotten_and_not_rejoined(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    client = RoomClient(url_of(server))
    unmatched: list[dict[str, Any]] = []
    client.on("message", unmatched.append)
    try:
        await client.connect()
        await client.join("doomed")
        await client.join("lobby")
        await server.delete_room("doomed")
        await eventually(lambda: {"type": "left", "room": "doomed", "reason": "deleted"} in unmatched)
        assert set(client.rooms) == {"lobby"}
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_close_between_attempts_fails_the_chats_kept_for_the_next_connection(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    client = RoomClient(url_of(server), min_delay=5.0, max_delay=5.0)
    await client.connect()
    await client.join("r")

    unanswered: list[defer.Deferred[Any]] = []

    class Silent:
        def append(self, room: str, batch: Any) -> defer.Deferred[Any]:
            unanswered.append(defer.Deferred())  # not answered: the chat's ack does not come
            return unanswered[-1]

    server.durable.pipeline.store = Silent()
    server.durable._append_now = None  # the memory store's synchronous path would answer at once
    sent = client.send("r", "kept for the next connection")
    await eventually(lambda: server.get_stats().messages_received >= 2)
    assert client._protocol is not None
    client._protocol.transport.abortConnection()
    await eventually(lambda: client.state == "reconnecting")
    assert client._outbox, "kept, to be sent again after the resume"
    client.close()
    with pytest.raises(RoomClientError) as closed:
        await sent
    assert closed.value.code == "closed" and client.state == "closed"
    for answer in unanswered:  # so the server's drain does not wait for them
        answer.errback(StoreError("never mind"))


@pytest_twisted.ensureDeferred
async def test_close_during_the_opening_handshake_drops_it_without_an_error() -> None:
    """A server that accepts TCP but never answers the upgrade: close() must not raise, and no connection may
    open afterwards."""
    import asyncio

    from .support import aio

    held: list[Any] = []

    async def listen() -> Any:
        return await asyncio.start_server(lambda reader, writer: held.append(writer), "127.0.0.1", 0)

    mute = await aio(listen())
    port = mute.sockets[0].getsockname()[1]
    client = RoomClient(f"ws://127.0.0.1:{port}/ws")
    connected = client.connect()
    failures: list[Any] = []
    connected.addErrback(failures.append)
    await eventually(lambda: client._protocol is not None and held)
    await client.close()
    assert client.state == "closed" and failures and failures[0].value.code == "closed"
    mute.close()


@pytest_twisted.ensureDeferred
async def test_a_resume_refused_for_one_room_gives_up_that_room_only(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_room_clients=1)
    client = RoomClient(url_of(server), min_delay=0.05, max_delay=0.05)
    errors: list[dict[str, Any]] = []
    resumed: list[dict[str, Any]] = []
    client.on("error", errors.append)
    client.on("resumed", resumed.append)
    await client.connect()
    await client.join("kept")
    await client.join("taken")
    assert client._protocol is not None
    client._protocol.transport.abortConnection()
    await eventually(lambda: server.get_stats().connections == 0)
    other = RoomClient(url_of(server), reconnect=False)
    await other.connect()
    await other.join("taken")  # the room is full when the client comes back
    before = server.get_stats().messages_received
    await eventually(lambda: errors and resumed)
    assert [error["code"] for error in errors] == ["room_full"] and errors[0]["room"] == "taken"
    assert set(client.rooms) == {"kept"} and [event["room"] for event in resumed] == ["kept"]
    await eventually(lambda: server.get_stats().messages_received >= before + 1)
    assert server.get_stats().messages_received == before + 1, "the resume alone: nothing joined again"
    await client.close()
    await other.close()


async def resume_with_one_room_unavailable(make_server: Any, failures: int) -> tuple[RoomClient, Any, list[Any],
                                                                                      list[Any], list[int]]:
    """A client in rooms "a" and "b" drops; the store cannot read b's history for its next ``failures`` reads, so
    the resume answers b with ``unavailable`` (the client is out of b), and so do joins of b with ``since``.
    Meanwhile another client sends b its chat 2. Returns the client, the server and the client's errors,
    resumed events and b's delivered seqs."""
    server = await make_server(room_protocol=True)
    client = RoomClient(url_of(server), min_delay=0.05, max_delay=0.05, rejoin_attempts=2)
    other = RoomClient(url_of(server), reconnect=False)
    errors: list[dict[str, Any]] = []
    resumed: list[dict[str, Any]] = []
    seen: list[int] = []
    client.on("error", errors.append)
    client.on("resumed", resumed.append)
    client.on("chat", lambda event: seen.append(event["seq"]) if event["room"] == "b" else None)
    await client.connect()
    await other.connect()
    await client.join("a")
    await client.join("b")
    await other.join("b")
    await other.send("b", "seen")
    await eventually(lambda: seen == [1])
    store = server.durable.store
    read = store.read
    refused = [failures]

    def failing_read(room: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if room == "b" and refused[0] > 0:
            refused[0] -= 1
            return defer.fail(StoreError("disk gone"))
        return read(room, *args, **kwargs)

    store.read = failing_read
    assert client._protocol is not None
    client._protocol.transport.abortConnection()
    await eventually(lambda: client.state == "reconnecting")
    await other.send("b", "while away")
    await other.close()
    return client, server, errors, resumed, seen


@pytest_twisted.ensureDeferred
async def test_a_room_the_resume_could_not_take_back_for_now_is_joined_again(make_server: Any) -> None:
    """It stayed listed although the client was no longer in it (or, if its error answered the resume first,
    every room was joined again): now it alone is joined again after a backoff, and catches up from its last
    seq."""
    client, server, errors, resumed, seen = await resume_with_one_room_unavailable(make_server, 2)
    await eventually(lambda: len(resumed) == 2, timeout=10)
    assert errors == [] and set(client.rooms) == {"a", "b"}
    assert sorted((event["room"], event["recovered"]) for event in resumed) == [("a", True), ("b", True)]
    assert server.registry.is_member(server.get_client(client.id), "b")
    await eventually(lambda: seen == [1, 2])
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_room_that_stays_unavailable_is_given_up_with_an_error(make_server: Any) -> None:
    client, server, errors, resumed, _ = await resume_with_one_room_unavailable(make_server, 10)
    await eventually(lambda: bool(errors), timeout=10)
    assert [(error["code"], error["room"]) for error in errors] == [("unavailable", "b")]
    assert set(client.rooms) == {"a"} and [event["room"] for event in resumed] == ["a"]
    assert not server.registry.is_member(server.get_client(client.id), "b")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_client_reconnects_after_a_restart_and_rejoins(make_server: Any) -> None:
    """The server stops and starts again on the same port: the client comes back by itself, rejoins its room
    and its chats work again; the resumed event says whether anything could be recovered."""
    server = await make_server(room_protocol=True)
    port = server.port
    client = RoomClient(url_of(server), min_delay=0.05, max_delay=0.2)
    states: list[str] = []
    resumed: list[dict[str, Any]] = []
    client.on("state", lambda state, detail: states.append(state))
    client.on("resumed", resumed.append)
    again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True))
    try:
        await client.connect()
        await client.join("lobby")
        await client.send("lobby", "before")
        await server.stop()
        await eventually(lambda: client.state == "reconnecting")
        await again.start()
        await eventually(lambda: bool(resumed), timeout=10)
        assert client.state == "open" and again.get_room("lobby") is not None
        assert resumed[0]["room"] == "lobby"
        if not resumed[0]["recovered"]:
            assert client.last_seq("lobby") == 0, "without history, seq may restart: nothing is filtered out"
        assert (await client.send("lobby", "after"))["type"] == "ack"
        assert states[:2] == ["connecting", "open"] and "reconnecting" in states and states[-1] == "open"
    finally:
        await client.close()
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_terminal_close_stops_reconnecting(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    client = RoomClient(url_of(server), min_delay=0.05)
    await client.connect()
    closes: list[Any] = []
    client.on("close", lambda code, reason: closes.append(code))
    server.get_client(client.id).close(4501, "go away")  # type: ignore[union-attr]
    await eventually(lambda: client.state == "closed")
    assert closes == [4501]
    with pytest.raises(RoomClientError):
        await client.join("lobby")


def test_roomserver_client_module_also_exports_the_python_client() -> None:
    from roomserver.client import RoomClient as Exported

    assert Exported is RoomClient


@pytest_twisted.ensureDeferred
async def test_dropped_client_resumes_and_misses_nothing(make_server: Any, tmp_path: Any) -> None:
    """Ada's TCP connection dies; Bob keeps sending while she is away. Ada reconnects, resumes from her last
    seq and ends with every message exactly once, in order; then the same across a server restart (SQLite)."""
    store = f"sqlite:{tmp_path / 'rooms.db'}"
    server = await make_server(room_protocol=True, store=store)
    ada = RoomClient(url_of(server), min_delay=0.3, max_delay=0.6)
    bob = RoomClient(url_of(server), min_delay=0.05, max_delay=0.2)
    seen: list[int] = []
    resumed: list[dict[str, Any]] = []
    ada.on("chat", lambda event: seen.append(event["seq"]))
    ada.on("resumed", resumed.append)
    again: WebSocketServer | None = None
    try:
        await ada.connect()
        await bob.connect()
        await ada.join("lobby")
        await bob.join("lobby")
        for i in range(3):
            await bob.send("lobby", f"first {i}")
        await eventually(lambda: seen == [1, 2, 3])
        ada._protocol.transport.abortConnection()  # type: ignore[union-attr]
        await eventually(lambda: ada.state == "reconnecting")
        acks = [await bob.send("lobby", f"while away {i}") for i in range(5)]
        assert [ack["seq"] for ack in acks] == [4, 5, 6, 7, 8]
        await eventually(lambda: seen == list(range(1, 9)), timeout=10)
        assert resumed and resumed[-1]["recovered"] is True
        # a chat in flight when the connection dies is sent again after the resume, and stored once
        texts: list[str] = []
        bob.on("chat", lambda event: texts.append(event["text"]))
        in_flight = ada.send("lobby", "in flight")
        ada._protocol.transport.abortConnection()  # type: ignore[union-attr]
        ack = await in_flight
        assert ack["seq"] == 9
        await eventually(lambda: seen == list(range(1, 10)), timeout=10)
        assert texts == ["in flight"], "delivered exactly once"
        # the same across a restart of the server on the same database
        port = server.port
        await server.stop()
        again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True, store=store))
        await again.start()
        await eventually(lambda: bob.state == "open" and len(resumed) >= 2, timeout=10)
        acks = [await bob.send("lobby", f"after restart {i}") for i in range(2)]
        assert [ack["seq"] for ack in acks] == [10, 11]
        await eventually(lambda: seen == list(range(1, 12)), timeout=10)
        assert all(r["recovered"] for r in resumed)
    finally:
        await ada.close()
        await bob.close()
        if again is not None:
            await again.stop()


@pytest_twisted.ensureDeferred
async def test_presence_through_the_python_client(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    ada = RoomClient(url_of(server))
    bob = RoomClient(url_of(server))
    events: list[dict[str, Any]] = []
    ada.on("presence", events.append)
    try:
        await ada.connect()
        await bob.connect()
        joined = await ada.join("hall", presence=True, meta={"name": "ada"})
        assert [m["meta"] for m in joined["members"]] == [{"name": "ada"}]
        await bob.join("hall", presence=True, meta={"name": "bob"})
        await eventually(lambda: [e.get("event") for e in events] == ["join"])
        assert events[0]["meta"] == {"name": "bob"}
        members = (await ada.presence("hall"))["members"]
        assert sorted(m["meta"]["name"] for m in members) == ["ada", "bob"]
        await bob.close()
        await eventually(lambda: [e.get("event") for e in events] == ["join", "leave"])
        assert ada.rooms["hall"].join_options == {"presence": True, "meta": {"name": "ada"}}
    finally:
        await ada.close()
        await bob.close()


@pytest_twisted.ensureDeferred
async def test_token_in_the_handshake_and_a_bad_one_is_final(make_server: Any, tmp_path: Any) -> None:
    import jwt

    secret = "s" * 40
    (tmp_path / "secret").write_text(secret)
    server = await make_server(room_protocol=True, jwt_secret_file=str(tmp_path / "secret"))
    issued: list[str] = []

    def fresh_token() -> str:
        issued.append(jwt.encode({"sub": "alice"}, secret, algorithm="HS256"))
        return issued[-1]

    alice = RoomClient(url_of(server), token=fresh_token)
    await alice.connect()
    assert len(issued) == 1 and server.get_client(alice.id).user == "alice"  # type: ignore[union-attr]
    await alice.close()

    forger = RoomClient(url_of(server), token=jwt.encode({"sub": "mallory"}, "x" * 40, algorithm="HS256"),
                        min_delay=0.05)
    closes: list[Any] = []
    forger.on("close", lambda code, reason: closes.append((code, reason)))
    with pytest.raises(RoomClientError) as refused:
        await forger.connect()
    assert refused.value.code == "closed" and forger.state == "closed"
    assert closes == [(4400, "handshake refused with HTTP 401")], "a bad token is not retried"


@pytest_twisted.ensureDeferred
async def test_client_honours_the_drain_hint_and_loses_no_chat(make_server: Any, tmp_path: Any) -> None:
    """The server drains: a chat in flight when the hint arrives is refused (unavailable) and one sent after the
    hint is held; the client reconnects after the hinted delay (not its backoff), resumes on the restarted
    server and sends both again, in order: each stored once, nothing lost."""
    store = f"sqlite:{tmp_path / 'rooms.db'}"
    server = await make_server(room_protocol=True, store=store, drain_interval=1.0)
    client = RoomClient(url_of(server), min_delay=0.5, max_delay=1.0)
    hints: list[dict[str, Any]] = []
    states: list[tuple[str, dict[str, Any]]] = []
    chats: list[tuple[int, str]] = []
    client.on("message", lambda event: event["type"] == "reconnect" and hints.append(event))
    client.on("state", lambda state, detail: states.append((state, detail)))
    client.on("chat", lambda event: chats.append((event["seq"], event["text"])))
    again: WebSocketServer | None = None
    try:
        await client.connect()
        await client.join("lobby")
        assert (await client.send("lobby", "before"))["seq"] == 1
        port = server.port
        stopped = server.stop()  # the hint goes out in this call; the client reads it after sending the next chat
        in_flight = client.send("lobby", "in flight")
        await eventually(lambda: hints)
        held = client.send("lobby", "held")
        assert not in_flight.called and not held.called
        await stopped
        assert server.get_stats().errors.get("unavailable") == 1, "the chat in flight was refused, not stored"
        again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True, store=store))
        await again.start()
        assert [(await in_flight)["seq"], (await held)["seq"]] == [2, 3]
        await eventually(lambda: len(chats) == 3)
        assert chats == [(1, "before"), (2, "in flight"), (3, "held")], "each once, in the order sent"
        [hint] = hints
        assert hint["resume"] is True and 0 <= hint["after_ms"] < 1000
        retries = [detail for state, detail in states if state == "reconnecting" and "delay" in detail]
        assert retries[0]["hinted"] is True and retries[0]["delay"] == hint["after_ms"] / 1000, retries
    finally:
        await client.close()
        if again is not None:
            await again.stop()


def test_a_drop_while_the_rejoins_history_is_pending_keeps_the_rooms_last_seq() -> None:
    """A server without sessions that ignores ``since`` in a join: chats 1-3, then the client comes back twice;
    the second connection drops while the history of the rejoin is pending. The failed history request
    (``disconnected``) counted as "no history here": the room's last seq went to 0 and the third connection's
    rejoin asked for everything again, delivering 1-3 twice."""
    def script(connection: ScriptedConnection, message: dict[str, Any]) -> None:
        if message["type"] == "join":
            connection.later({"type": "joined", "room": message["room"], "size": 1, "id": message["id"]})
            if connection.number == 1:
                for seq in (1, 2, 3):
                    connection.later(chat("r", seq), 1 + seq)
        if message["type"] == "history" and connection.number == 2:
            connection.client.clock.callLater(1, connection.drop)  # the connection goes before the reply
        elif message["type"] == "history":
            seqs = range(message["since"] + 1, 6)
            connection.later({"type": "history", "room": "r", "id": message["id"], "more": False,
                              "messages": [chat("r", seq) for seq in seqs]})

    client = ScriptedClient(lambda n: {"type": "welcome", "id": f"me{n}"}, script)
    client.wait(client.connect(), "the first connection")
    client.wait(client.join("r"), "the join")
    client.run(lambda: client.delivered.get("r") == [1, 2, 3], "chats 1-3")
    client.connections[0].drop()
    client.run(lambda: len(client.connections) == 2 and client.connections[1].state == ScriptedConnection.STATE_CLOSED,
               "the second connection to drop")
    assert requests(client.connections[1]) == ["join r 3", "history r 3"]
    assert client.last_seq("r") == 3 and client.resumed == [], "nothing was replayed, nothing is said yet"
    client.run(lambda: client.resumed, "the rejoin on the third connection")
    assert requests(client.connections[2]) == ["join r 3", "history r 3"]
    assert client.delivered["r"] == [1, 2, 3, 4, 5] and client.resumed == [("r", True)]


def pushed(connection: ScriptedConnection) -> list[str]:
    """What the client was sent on ``connection``, as "type code room seq"."""
    return [" ".join(str(m[key]) for key in ("type", "code", "room", "seq") if key in m) for m in connection.pushed]


def rejoin_from_history(history: Callable[[dict[str, Any]], tuple[list[int], bool]], live: list[int] | None = None,
                        rooms: tuple[str, ...] = ("r",)) -> ScriptedClient:
    """A server without sessions that ignores ``since`` in a join (so the client fills the gap from its history):
    chats 1-3 of each room while the client is connected; then it drops, and chats ``live`` (of the first room)
    follow its join on the second connection, one a second. ``history(request)`` gives each history reply its
    seqs and ``more``, 10 s after the request when there are live chats, else 2 s. Returns the client once every
    room said ``resumed``."""
    def script(connection: ScriptedConnection, message: dict[str, Any]) -> None:
        room = message.get("room", "")
        if message["type"] == "join":
            connection.later({"type": "joined", "room": room, "size": 2, "id": message["id"]})
            seqs = [1, 2, 3] if connection.number == 1 else (live or []) if room == rooms[0] else []
            for i, seq in enumerate(seqs):
                connection.later(chat(room, seq), 2 + i)
        if message["type"] == "history":
            seqs, more = history(message)
            connection.later({"type": "history", "room": room, "id": message["id"], "more": more,
                              "messages": [chat(room, seq) for seq in seqs]}, 10 if live else 2)

    client = ScriptedClient(lambda n: {"type": "welcome", "id": f"me{n}"}, script)
    client.wait(client.connect(), "the first connection")
    for room in rooms:
        client.wait(client.join(room), f"the join of {room}")
    client.run(lambda: all(client.delivered.get(room) == [1, 2, 3] for room in rooms), "chats 1-3")
    client.connections[0].drop()
    client.run(lambda: len(client.resumed) == len(rooms), "the rejoins")
    client.settle()  # no more requests may follow
    return client


def test_a_rejoin_holds_the_live_chats_until_the_history_filled_the_gap() -> None:
    """Chats 4-7 came while the client was away; live chats 8 and 9 reach it between its join and the history
    reply (which holds 8 too). Delivered at once, 8 moved the room's last seq past the gap and the replayed 4-7
    were dropped as already seen, while the client still said recovered."""
    client = rejoin_from_history(lambda request: (list(range(request["since"] + 1, 9)), False), live=[8, 9])
    second = client.connections[1]
    assert requests(second) == ["join r 3", "history r 3"]
    assert pushed(second) == ["welcome", "joined r", "chat r 8", "chat r 9", "history r"]  # as staged
    assert client.delivered["r"] == list(range(1, 10)), "in order, 8 once (history and live)"
    assert client.resumed == [("r", True)] and client.last_seq("r") == 9


def test_a_rejoin_reads_every_page_of_the_gap() -> None:
    """A history that answers at most two chats a page (``more``: newer ones follow): the gap is 4-8. Only the
    first page was read."""
    def history(request: dict[str, Any]) -> tuple[list[int], bool]:
        page = list(range(request["since"] + 1, min(request["since"] + 2, 8) + 1))
        return page, page[-1] < 8

    client = rejoin_from_history(history)
    assert requests(client.connections[1]) == ["join r 3", "history r 3", "history r 5", "history r 7"]
    assert client.delivered["r"] == list(range(1, 9)) and client.resumed == [("r", True)]


def test_a_rejoin_that_could_not_fill_the_whole_gap_is_not_recovered() -> None:
    """Two rooms whose gap (4-7) the history cannot give whole: in "stuck", a second page that says ``more`` but
    brings nothing (the paging stops: no endless asking); in "trimmed", a history that no longer holds 4-5."""
    def history(request: dict[str, Any]) -> tuple[list[int], bool]:
        if request["room"] == "trimmed":
            return [6, 7], False
        return ([4, 5] if request["since"] == 3 else []), True

    client = rejoin_from_history(history, rooms=("stuck", "trimmed"))
    assert [r for r in requests(client.connections[1]) if r.startswith("history stuck")] == [
        "history stuck 3", "history stuck 5"]
    assert client.delivered == {"stuck": [1, 2, 3, 4, 5], "trimmed": [1, 2, 3, 6, 7]}
    assert sorted(client.resumed) == [("stuck", False), ("trimmed", False)]


@pytest.mark.parametrize(("when", "sent"), [("pending", ["resume"]), ("resuming", ["resume", "leave b"]),
                                            ("rejoining", ["resume", "join b 0", "leave b"])])
def test_a_leave_cancels_the_rejoin_of_the_room(when: str, sent: list[str]) -> None:
    """A server with sessions resumes room "a" but cannot take the client back into "b" (it answers the resume,
    and every join of b, with ``unavailable``). The application leaves b: while the rejoin retry of b waits for
    its backoff ("pending": in the same call as the resume's error), while the resume is in flight ("resuming"),
    or while the retry's join is ("rejoining"). The leave was answered not_in_room (the client is not in b), and
    then the retry joined b again (or gave it up with an error). Now the room is forgotten and no rejoin follows;
    the leave fires with ``left``, without asking the server when a retry was only waiting for its backoff."""
    outcome: list[Any] = []

    def leave() -> None:
        if not outcome:
            outcome.append("pending")
            client.leave("b").addCallbacks(outcome.append, lambda failure: outcome.append(failure.value.code))

    def script(connection: ScriptedConnection, message: dict[str, Any]) -> None:
        unavailable = {"type": "error", "code": "unavailable", "room": "b", "id": message["id"],
                       "message": "retry later"}
        if connection.number == 1:
            answer_joins(connection, message)
            return

        def push_and_leave() -> None:
            connection.push(unavailable)
            leave()

        if message["type"] == "resume":
            if when == "resuming":
                client.clock.callLater(0, leave)
            connection.later({"type": "resumed", "room": "a", "continued": True, "recovered": True,
                              "id": message["id"]})
            if when == "pending":
                client.clock.callLater(2, push_and_leave)
            else:
                connection.later(unavailable, 2)
        if message["type"] == "join":
            if when == "rejoining":
                client.clock.callLater(0, leave)
            connection.later(unavailable)
        if message["type"] == "leave":
            connection.later({"type": "error", "code": "not_in_room", "message": "not in b", "id": message["id"]}, 3)

    client = ScriptedClient(lambda n: {"type": "welcome", "id": "me", "session": f"s{n}"}, script)
    client.wait(client.connect(), "the first connection")
    client.wait(client.join("a"), "the join of a")
    client.wait(client.join("b"), "the join of b")
    client.connections[0].drop()
    client.run(lambda: outcome and outcome[-1] != "pending", "the leave of b")
    client.settle()  # no join of b may follow
    assert outcome[-1] == {"type": "left", "room": "b"}
    assert list(client.rooms) == ["a"] and client.errors == []
    assert requests(client.connections[1]) == sent


@pytest.mark.parametrize("when", ["in flight", "between connections"])
def test_a_leave_whose_connection_is_gone_forgets_the_room(when: str) -> None:
    """A leave in flight when the connection dropped ("disconnected"), or asked for between two connections
    ("not_connected"), left the room listed: the next connection joined it again. The server drops a closed
    connection's rooms, so the room has been left: it is forgotten, and the leave fires with ``left``."""
    def script(connection: ScriptedConnection, message: dict[str, Any]) -> None:
        answer_joins(connection, message)  # a leave is never answered: the connection drops first

    client = ScriptedClient(lambda n: {"type": "welcome", "id": f"me{n}"}, script)
    client.wait(client.connect(), "the first connection")
    client.wait(client.join("a"), "the join of a")
    client.wait(client.join("b"), "the join of b")
    outcome: list[Any] = []
    if when == "in flight":
        client.leave("b").addCallbacks(outcome.append, lambda failure: outcome.append(failure.value.code))
        client.connections[0].drop()
    else:
        client.connections[0].drop()
        client.leave("b").addCallbacks(outcome.append, lambda failure: outcome.append(failure.value.code))
    assert outcome == [{"type": "left", "room": "b"}] and list(client.rooms) == ["a"]
    client.run(lambda: len(client.connections) == 2 and client.connections[1].sent, "the rejoin of a")
    client.settle()
    assert [r for r in requests(client.connections[1]) if r.startswith("join")] == ["join a 0"], \
        "b is not joined again"


def rejoin_with_history_unavailable(failures: int, silent: bool = False) -> ScriptedClient:
    """A server without sessions that ignores ``since`` in a join (the client fills the gap, 4-7, from its
    history), whose history cannot be read for its first ``failures`` requests after the client comes back
    (``unavailable``: retry later; ``silent``: no answer, the request times out after 20 s). Live chat 8 comes
    5 s after the join, while the client waits to ask again."""
    refused = [0]

    def script(connection: ScriptedConnection, message: dict[str, Any]) -> None:
        if message["type"] == "join":
            connection.later({"type": "joined", "room": "r", "size": 2, "id": message["id"]})
            for seq in [1, 2, 3] if connection.number == 1 else [8]:
                connection.later(chat("r", seq), 1 + seq if connection.number == 1 else 5)
        if message["type"] == "history" and refused[0] < failures:
            refused[0] += 1
            if not silent:
                connection.later({"type": "error", "code": "unavailable", "room": "r", "id": message["id"],
                                  "message": "the history is unavailable right now; retry later"}, 2)
        elif message["type"] == "history":
            connection.later({"type": "history", "room": "r", "id": message["id"], "more": False,
                              "messages": [chat("r", seq) for seq in range(message["since"] + 1, 8)]}, 2)

    client = ScriptedClient(lambda n: {"type": "welcome", "id": f"me{n}"}, script,
                            **({"request_timeout": 20.0} if silent else {}))
    client.wait(client.connect(), "the first connection")
    client.wait(client.join("r"), "the join")
    client.run(lambda: client.delivered.get("r") == [1, 2, 3], "chats 1-3")
    client.connections[0].drop()
    client.run(lambda: client.resumed, "the rejoin of r")
    client.settle()  # no more requests may follow
    return client


@pytest.mark.parametrize("silent", [False, True], ids=["unavailable", "timed out"])
def test_a_rejoins_history_answered_unavailable_is_read_again_after_a_backoff(silent: bool) -> None:
    """The first page answered ``unavailable`` (or not answered in time) counted as "no history here": the room's
    last seq went to 0, resumed said recovered: false, and the gap was never read. Now it is read again after a
    backoff, as a join refused with ``unavailable`` is joined again; the live chat that came meanwhile waits."""
    client = rejoin_with_history_unavailable(1, silent)
    assert requests(client.connections[1]) == ["join r 3", "history r 3", "history r 3"]
    assert client.delivered["r"] == list(range(1, 9)) and client.last_seq("r") == 8
    assert client.resumed == [("r", True)] and client.errors == []


def test_a_rejoins_history_that_stays_unavailable_goes_on_live_with_the_gap() -> None:
    """``rejoin_attempts`` (2) reads again at most; then the client, which is in the room, goes on with its live
    chats and says the gap was not recovered (keeping its last seq: the history did not say the sequence
    restarted)."""
    client = rejoin_with_history_unavailable(5)
    assert requests(client.connections[1]) == ["join r 3", "history r 3", "history r 3", "history r 3"]
    assert client.delivered["r"] == [1, 2, 3, 8] and client.last_seq("r") == 8
    assert client.resumed == [("r", False)] and client.errors == [] and list(client.rooms) == ["r"]
