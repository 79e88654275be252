"""Authentication and per-room permissions over real sockets: header and first-message tokens, expiry,
claims, application hooks; tokens never reach the logs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
from twisted.internet import defer, task
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import provider

from roomserver import ServerOptions
from roomserver.access import verifier_from_options
from roomserver.core.auth import Action, Identity

from .auth_support import SECRET
from .auth_support import token as make_token
from .support import WSClient, aio, eventually, logged_errors, url_of


async def authed(server: Any, token: str) -> WSClient:
    ws = await WSClient.connect(url_of(server), additional_headers={"Authorization": f"Bearer {token}"})
    assert (await ws.recv())["type"] == "welcome"
    return ws


@pytest_twisted.ensureDeferred
async def test_bearer_header_authenticates_and_sub_becomes_the_user(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    users: list[str] = []
    server.on("connection", lambda client: users.append(client.user))
    ws = await authed(server, make_token("alice"))
    assert (await ws.request({"type": "join", "room": "lobby"}))["type"] == "joined"
    await eventually(lambda: users == ["alice"])


@pytest.mark.parametrize("claims", [
    {"exp": 1}, {"aud": "other"}, {"nbf": 4102444800},
])
@pytest_twisted.ensureDeferred
async def test_bad_header_token_gets_401(make_server: Any, secret_file: str, claims: dict[str, Any]) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file, jwt_audience="chat")
    token = make_token("mallory", **{"aud": "chat", **claims})
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server), additional_headers={"Authorization": f"Bearer {token}"})
    assert info.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server), additional_headers={"Authorization": "Basic abc"})
    assert info.value.response.status_code == 401


@pytest_twisted.ensureDeferred
async def test_first_message_auth(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    ws = await WSClient.connect(url_of(server))
    refused = await ws.request({"type": "join", "room": "lobby", "id": 1})
    assert refused["code"] == "unauthenticated" and refused["id"] == 1
    assert (await ws.request({"type": "auth", "token": make_token("bob"), "id": "a"})) == {
        "type": "authenticated", "user": "bob", "id": "a"}
    assert (await ws.recv())["type"] == "welcome"
    assert (await ws.request({"type": "join", "room": "lobby"}))["type"] == "joined"


@pytest_twisted.ensureDeferred
async def test_bad_first_message_token_closes_4501(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    ws = await WSClient.connect(url_of(server))
    await ws.send({"type": "auth", "token": jwt.encode({"sub": "x"}, "wrong" * 10, algorithm="HS256")})
    assert (await ws.closed())[0] == 4501


@pytest_twisted.ensureDeferred
async def test_alg_none_token_is_refused(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    ws = await WSClient.connect(url_of(server))
    await ws.send({"type": "auth", "token": jwt.encode({"sub": "root"}, None, algorithm="none")})
    assert (await ws.closed())[0] == 4501


@pytest_twisted.ensureDeferred
async def test_no_auth_message_in_time_closes_1008(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file, auth_timeout=0.3)
    ws = await WSClient.connect(url_of(server))
    assert (await ws.closed(timeout=3))[0] == 1008
    assert server.get_stats().drops["auth_timeout"] == 1


@pytest_twisted.ensureDeferred
async def test_two_hundred_silent_connections_all_close_1008_and_leave_no_timer(
        make_server: Any, secret_file: str) -> None:
    """RELIABILITY A3, scaled: 200 connections that never authenticate are all closed with 1008 at the auth
    timeout, and afterwards the reactor holds no timer more than before they came."""
    from twisted.internet import reactor

    server = await make_server(room_protocol=True, jwt_secret_file=secret_file, auth_timeout=0.5,
                               ping_interval=30)
    baseline = len(reactor.getDelayedCalls())
    silent = await aio(asyncio.gather(*(_connect(url_of(server)) for _ in range(200))))
    codes = await aio(asyncio.gather(*(_close_code(ws) for ws in silent)))
    assert codes == [1008] * 200
    assert server.get_stats().drops["auth_timeout"] == 200
    await eventually(lambda: server.get_stats().connections == 0, timeout=5)
    await eventually(lambda: len(reactor.getDelayedCalls()) <= baseline, timeout=5)


async def _connect(url: str) -> Any:
    return await websockets.connect(url, open_timeout=10, ping_interval=None)


async def _close_code(ws: Any) -> int | None:
    await asyncio.wait_for(ws.wait_closed(), 10)
    return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None


@pytest_twisted.ensureDeferred
async def test_expiring_token_closes_4001_unless_refreshed(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    expiring = await authed(server, make_token("carol", exp=time.time() + 0.6))
    refreshed = await authed(server, make_token("dave", exp=time.time() + 0.6))
    assert (await refreshed.request({"type": "auth", "token": make_token("dave")}))["type"] == "authenticated"
    assert (await expiring.closed(timeout=3))[0] == 4001
    await aio(asyncio.sleep(0.3))
    assert (await refreshed.request({"type": "join", "room": "r"}))["type"] == "joined"
    other_user = make_token("eve")
    await refreshed.send({"type": "auth", "token": other_user})
    assert (await refreshed.closed())[0] == 4501, "a refresh cannot switch users"


@pytest_twisted.ensureDeferred
async def test_a_token_accepted_within_the_leeway_lives_until_its_end(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file, jwt_leeway=2)
    skewed = await authed(server, make_token("kim", exp=time.time() - 1))  # expired 1 s ago by our clock
    assert (await skewed.request({"type": "join", "room": "r"}))["type"] == "joined", "not closed at once"
    assert (await skewed.closed(timeout=3))[0] == 4001, "closed once exp + leeway passed"


@pytest_twisted.ensureDeferred
async def test_rooms_and_publish_claims(make_server: Any, secret_file: str) -> None:
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    ws = await authed(server, make_token("frank", rooms=["team-*", "lobby"], publish=["team-*"]))
    forbidden = await ws.request({"type": "join", "room": "admin", "id": 1})
    assert forbidden["code"] == "forbidden" and forbidden["id"] == 1
    assert (await ws.request({"type": "join", "room": "team-red"}))["type"] == "joined"
    assert (await ws.request({"type": "join", "room": "lobby"}))["type"] == "joined"
    assert (await ws.request({"type": "chat", "room": "lobby", "text": "hi"}))["code"] == "forbidden"
    assert (await ws.request({"type": "chat", "room": "team-red", "text": "hi"}))["type"] in ("chat", "ack")


@pytest_twisted.ensureDeferred
async def test_history_needs_the_permission_to_join_the_room(make_server: Any, secret_file: str) -> None:
    """Reading a room's history is reading the room: the token's ``rooms`` claim and the ``authorize`` hook
    decide it as they decide a join (it needs no membership, but never less than the right to join)."""
    server = await make_server(room_protocol=True, jwt_secret_file=secret_file)
    server.authorize = lambda identity, action, room: room != "vetoed"
    insider = await authed(server, make_token("ivy", rooms=["board", "lobby", "vetoed"]))
    assert (await insider.request({"type": "join", "room": "board"}))["type"] == "joined"
    await insider.send({"type": "chat", "room": "board", "text": "layoffs on friday"})
    await insider.recv()
    outsider = await authed(server, make_token("jack", rooms=["lobby", "vetoed"]))
    refused = await outsider.request({"type": "history", "room": "board", "id": 7})
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "forbidden", 7)
    assert refused["message"] == "you may not read the history of room 'board'"
    assert (await outsider.request({"type": "history", "room": "vetoed"}))["code"] == "forbidden", "the hook too"
    page = await insider.request({"type": "history", "room": "board"})
    assert [message["text"] for message in page["messages"]] == ["layoffs on friday"]
    assert (await outsider.request({"type": "history", "room": "lobby"}))["messages"] == []


@pytest_twisted.ensureDeferred
async def test_query_token_only_when_enabled(make_server: Any, secret_file: str) -> None:
    closed_server = await make_server(room_protocol=True, jwt_secret_file=secret_file, auth_timeout=5)
    ws = await WSClient.connect(url_of(closed_server) + "?token=" + make_token())
    assert (await ws.request({"type": "join", "room": "x"}))["code"] == "unauthenticated"
    open_server = await make_server(room_protocol=True, jwt_secret_file=secret_file, allow_query_token=True)
    ws = await WSClient.connect(url_of(open_server) + "?token=" + make_token("gina"))
    assert (await ws.recv())["type"] == "welcome"


@pytest_twisted.ensureDeferred
async def test_application_hooks_authenticate_and_authorize_asynchronously(make_server: Any) -> None:
    from twisted.internet import reactor

    server = await make_server(room_protocol=True)

    def authenticate(request: Any) -> defer.Deferred[Identity | None]:
        user = request.headers.get("x-user")
        return task.deferLater(reactor, 0.05, lambda: Identity(user) if user else None)

    asked: list[tuple[str, str, str]] = []

    def authorize(identity: Identity, action: Action, room: str) -> defer.Deferred[bool]:
        asked.append((identity.user, action.value, room))
        return task.deferLater(reactor, 0.05, lambda: not room.startswith("secret"))

    server.authenticate = authenticate
    server.authorize = authorize
    seen: list[Any] = []
    server.on("connection", lambda client: client.on("message", lambda data: seen.append(json.loads(data)["id"])))
    with pytest.raises(websockets.InvalidStatus) as info:
        await WSClient.connect(url_of(server))
    assert info.value.response.status_code == 401
    ws = await WSClient.connect(url_of(server), additional_headers={"X-User": "hank"})
    assert (await ws.recv())["type"] == "welcome"
    # sent back to back: the chat must wait for the join's pending decision, and keep its place
    await ws.send({"type": "join", "room": "open", "id": 1})
    await ws.send({"type": "chat", "room": "open", "text": "in order", "id": 2})
    await ws.send({"type": "join", "room": "secret-lab", "id": 3})
    replies = [await ws.recv() for _ in range(4)]
    kinds = [(r["type"], r.get("id")) for r in replies]
    assert kinds[0] == ("joined", 1)
    assert set(kinds[1:3]) == {("chat", None), ("ack", 2)}
    assert kinds[3] == ("error", 3) and replies[3]["code"] == "forbidden"
    assert asked == [("hank", "join", "open"), ("hank", "publish", "open"), ("hank", "join", "secret-lab")]
    # the application's message handlers see what went through once the hook allowed it, in order, and never
    # the refused join
    assert seen == [1, 2]


@pytest_twisted.ensureDeferred
async def test_a_peer_gone_before_the_authenticate_hook_answers_leaves_no_client(make_server: Any) -> None:
    """The hook answers after the TCP connection dropped: no client may open on the dead connection (it was
    never closed again, and max_clients no longer counted it)."""
    server = await make_server(room_protocol=True)
    pending: list[defer.Deferred[Identity | None]] = []

    def authenticate(request: Any) -> defer.Deferred[Identity | None]:
        pending.append(defer.Deferred())
        return pending[-1]

    server.authenticate = authenticate
    host, port = "127.0.0.1", server.port

    async def knock_and_leave() -> None:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await writer.drain()
        while not pending:
            await asyncio.sleep(0.01)
        writer.transport.abort()

    with logged_errors() as errors:
        await aio(knock_and_leave())
        await eventually(lambda: server._admitted == 0)
        pending[0].callback(Identity("late"))
        await aio(asyncio.sleep(0.1))
    assert server.clients == {} and server.get_stats().connections == 0
    assert errors == []
    connecting = defer.ensureDeferred(WSClient.connect(url_of(server)))  # the server serves on
    await eventually(lambda: len(pending) == 2)
    pending[1].callback(Identity("next"))
    assert (await (await connecting).recv())["type"] == "welcome"


@pytest_twisted.ensureDeferred
async def test_a_handshake_whose_hook_answers_after_stop_began_is_refused(make_server: Any) -> None:
    """The drain may be over when the hook answers: a client opened then would get a welcome from a stopping
    server, never the hint to move on, and hold ``stop()`` until ``shutdown_timeout`` aborted it (1006)."""
    server = await make_server(room_protocol=True, shutdown_timeout=30)
    pending: list[defer.Deferred[Identity | None]] = []

    def authenticate(request: Any) -> defer.Deferred[Identity | None]:
        pending.append(defer.Deferred())
        return pending[-1]

    server.authenticate = authenticate
    connecting = defer.ensureDeferred(WSClient.connect(url_of(server)))
    await eventually(lambda: len(pending) == 1)
    stopped = server.stop()
    pending[0].callback(Identity("alice"))
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connecting
    assert refused.value.response.status_code == 503
    await stopped
    assert server.get_stats().connections == 0 and server.clients == {}


@pytest_twisted.ensureDeferred
async def test_messages_behind_a_pending_decision_are_bounded_by_not_reading_and_all_processed(
        make_server: Any) -> None:
    from roomserver.access import INBOX_PAUSE

    server = await make_server(room_protocol=True, rate_limit=0)
    decision: defer.Deferred[bool] = defer.Deferred()
    server.authorize = lambda identity, action, room: decision if action is Action.JOIN else True
    ws = await WSClient.connect(url_of(server))
    welcome = await ws.recv()
    client = server.get_client(welcome["id"])
    assert client is not None
    await ws.send({"type": "join", "room": "r", "id": 0})

    async def flood() -> None:
        for number in range(60):
            await ws.send({"type": "chat", "room": "r", "text": f"{number:02d}" + "x" * 20_000})

    sending = defer.ensureDeferred(flood())
    await eventually(lambda: client.inbox_paused)
    await aio(asyncio.sleep(0.3))  # the sender keeps going into TCP's buffers; the server reads no more
    waiting = sum(len(payload) for payload, _ in client.inbox or ())
    assert INBOX_PAUSE < waiting < INBOX_PAUSE + 200_000, waiting
    decision.callback(True)
    assert (await ws.recv())["type"] == "joined"
    texts = [(await ws.recv())["text"][:2] for _ in range(60)]
    assert texts == [f"{number:02d}" for number in range(60)], "every one, in order"
    await sending
    assert not client.inbox_paused and client.inbox is None


@pytest_twisted.ensureDeferred
async def test_tokens_never_reach_the_logs(make_server: Any, secret_file: str) -> None:
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        lines.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observe)
    try:
        server = await make_server(room_protocol=True, jwt_secret_file=secret_file, allow_query_token=True)
        good, bad = make_token("ivy"), make_token("ivy", exp=1)
        ws = await authed(server, good)
        await ws.close()
        with pytest.raises(websockets.InvalidStatus):
            await WSClient.connect(url_of(server) + "?token=" + bad)
        raw = await WSClient.connect(url_of(server))
        await raw.send({"type": "auth", "token": bad})
        await raw.closed()
        await server.stop()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines, "the server logged something"
    assert not [line for line in lines if good in line or bad in line or SECRET in line]


def test_verifier_configuration(tmp_path: Path) -> None:
    assert verifier_from_options(ServerOptions(), environ={}) is None
    from_env = verifier_from_options(ServerOptions(), environ={"ROOMSERVER_JWT_SECRET": SECRET})
    assert from_env is not None and from_env.verify(make_token("env"), now=time.time()).user == "env"
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    with pytest.raises(ValueError):
        verifier_from_options(ServerOptions(jwt_public_key_file=str(key)), environ={})  # HS256 with a public key


@pytest_twisted.ensureDeferred
async def test_with_an_authorize_hook_each_request_is_parsed_once(make_server: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook is asked about the parsed join or chat, and that same command goes on to the room protocol."""
    from roomserver.core import messages

    server = await make_server(room_protocol=True)
    reactor = server.reactor
    server.authorize = lambda identity, action, room: (
        task.deferLater(reactor, 0.01, lambda: True) if action is Action.JOIN else True)
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"
    real_parse = messages.parse
    parsed: list[Any] = []

    def counting_parse(*args: Any, **kwargs: Any) -> Any:
        parsed.append(args[0])
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(messages, "parse", counting_parse)
    assert (await ws.request({"type": "join", "room": "r", "id": 1}))["type"] == "joined"
    await ws.send({"type": "chat", "room": "r", "text": "hi", "id": 2})
    assert {(await ws.recv())["type"] for _ in range(2)} == {"chat", "ack"}
    assert len(parsed) == 2, f"parsed {len(parsed)} times for two requests"


@pytest_twisted.ensureDeferred
async def test_a_bug_after_an_asynchronous_decision_closes_with_1011(make_server: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error while acting on a request the hook allowed later is handled like one on the spot: the
    connection closes with 1011, rather than staying open with its later messages queued forever."""
    server = await make_server(room_protocol=True)
    reactor = server.reactor
    server.authorize = lambda identity, action, room: task.deferLater(reactor, 0.01, lambda: True)

    def broken(member: Any, command: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.room_protocol, "handle_command", broken)
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"
    await ws.send({"type": "join", "room": "r", "id": 1})
    code, _ = await ws.closed()
    assert code == 1011
    assert server.get_stats().drops.get("internal_error") == 1
