"""The HTTP side over real loopback sockets: pages, /metrics, /healthz, the admin API, the dashboard feed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets

from roomserver import WebSocketServer
from roomserver.http.auth import AdminToken, AdminTokenError
from roomserver.http.health import backend_health

from .support import WSClient, aio, eventually, metric, url_of
from .web_support import http

TOKEN = "correct-horse-battery-staple-42"


async def chat_traffic(
    server: WebSocketServer, room: str = "lobby", clients: int = 2, chats: int = 3
) -> list[WSClient]:
    """``clients`` members of ``room``; the first sends ``chats`` messages that everyone receives."""
    members = []
    for _ in range(clients):
        ws = await WSClient.connect(url_of(server))
        await ws.recv()  # welcome
        assert (await ws.request({"type": "join", "room": room}))["type"] == "joined"
        members.append(ws)
    for i in range(chats):
        await members[0].send({"type": "chat", "room": room, "text": f"m{i}"})
    for ws in members:
        for _ in range(chats):
            assert (await ws.recv())["type"] == "chat"
    return members


# -- pages ---------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pages_are_served_beside_the_websocket_path(make_server: Any) -> None:
    """/, /dashboard, /roomserver.js and /static/* are served; the demo page knows the configured ws path."""
    server = await make_server(path="/chat/socket", room_protocol=True)
    index = await http(server, "GET", "/")
    assert index.code == 200 and index.header("content-type") == "text/html; charset=utf-8"
    assert 'data-ws-path="/chat/socket"' in index.text and "/roomserver.js" in index.text
    dashboard = await http(server, "GET", "/dashboard")
    assert dashboard.code == 200 and "dashboard.js" in dashboard.text
    script = await http(server, "GET", "/roomserver.js")
    assert script.code == 200 and script.header("content-type") == "text/javascript; charset=utf-8"
    assert "RoomClient" in script.text
    assert (await http(server, "GET", "/static/chat.js")).code == 200
    assert (await http(server, "GET", "/static/style.css")).header("content-type") == "text/css; charset=utf-8"
    assert (await http(server, "GET", "/static/")).code == 404, "no directory listing, no index"
    assert (await http(server, "GET", "/static/../options.py")).code == 404
    assert (await http(server, "GET", "/nothing-here")).code == 404
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome", "the WebSocket path still works beside the pages"
    await ws.close()


@pytest_twisted.ensureDeferred
async def test_a_websocket_at_the_root_path_leaves_the_other_pages_in_place(make_server: Any) -> None:
    """``--path /`` made the WebSocket the whole site: /healthz (a load balancer's check), /metrics and the
    dashboard answered 426, and any path upgraded. Only "/" itself is the WebSocket's now (no demo page)."""
    server = await make_server(path="/", room_protocol=True)
    assert (await http(server, "GET", "/healthz")).code == 200
    assert (await http(server, "GET", "/dashboard")).code == 200
    assert (await http(server, "GET", "/nothing-here")).code == 404
    assert (await http(server, "GET", "/")).code == 426, "a plain GET of the WebSocket path"
    ws = await WSClient.connect(url_of(server, "/"))
    assert (await ws.recv())["type"] == "welcome"
    await ws.close()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await WSClient.connect(url_of(server, "/elsewhere"))
    assert refused.value.response.status_code == 404


@pytest_twisted.ensureDeferred
async def test_http_pages_off_serves_the_websocket_only(make_server: Any) -> None:
    server = await make_server(http_pages=False, room_protocol=True)
    for path in ("/", "/dashboard", "/metrics", "/healthz", "/admin/rooms", "/roomserver.js"):
        assert (await http(server, "GET", path)).code == 404, path
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"
    await ws.close()
    assert not hasattr(server, "http")


# -- /metrics ------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_match_get_stats_and_count_handshake_failures(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_clients=2)
    members = await chat_traffic(server, clients=2, chats=3)
    reader, writer = await aio(asyncio.open_connection("127.0.0.1", server.port))
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n\r\n")
    assert (await aio(asyncio.wait_for(reader.readline(), 5))).startswith(b"HTTP/1.1 400")
    writer.close()
    with pytest.raises(websockets.InvalidStatus):  # max_clients=2: the third is refused with 503
        await aio(websockets.connect(url_of(server), open_timeout=5))
    await eventually(lambda: server.http.metrics.handshake_failures.labels("invalid_request")._value.get() == 1)
    response = await http(server, "GET", "/metrics")
    assert response.code == 200 and response.header("content-type").startswith("text/plain; version=")
    text = response.text
    stats = server.get_stats()
    assert metric(text, "roomserver_connections") == stats.connections == 2
    assert metric(text, "roomserver_rooms") == stats.rooms == 1
    assert metric(text, "roomserver_messages_sent_total") == stats.messages_sent
    assert metric(text, "roomserver_messages_received_total") == stats.messages_received == 5
    assert metric(text, "roomserver_bytes_sent_total") == stats.bytes_sent > 0
    assert metric(text, "roomserver_handshake_failures_total", 'reason="invalid_request"') == 1
    assert metric(text, "roomserver_handshake_failures_total", 'reason="unavailable"') == 1
    assert metric(text, "roomserver_connections_opened_total") == 2
    # one latency observation per broadcast (3 chats), not per recipient
    assert metric(text, "roomserver_broadcast_latency_seconds_count") == 3
    assert metric(text, "process_open_fds") > 0
    await members[1].send({"type": "chat", "room": "nowhere", "text": "x"})
    assert (await members[1].recv())["code"] == "not_in_room"
    text = (await http(server, "GET", "/metrics")).text
    assert metric(text, "roomserver_errors_total", 'code="not_in_room"') == 1
    for ws in members:
        await ws.close()
    await eventually(lambda: server.get_stats().connections == 0)
    text = (await http(server, "GET", "/metrics")).text
    assert metric(text, "roomserver_connections_closed_total") == 2
    assert metric(text, "roomserver_connections") == 0


@pytest_twisted.ensureDeferred
async def test_two_servers_in_one_process_keep_their_own_metrics(make_server: Any) -> None:
    first = await make_server(room_protocol=True)
    second = await make_server(room_protocol=True)
    await chat_traffic(first, clients=1, chats=2)
    assert metric((await http(first, "GET", "/metrics")).text, "roomserver_messages_received_total") == 3
    assert metric((await http(second, "GET", "/metrics")).text, "roomserver_messages_received_total") == 0


@pytest_twisted.ensureDeferred
async def test_metrics_time_the_garbage_collectors_pauses_while_the_server_runs(make_server: Any) -> None:
    """Every collection is timed per generation from start to stop; an embedded server freezes nothing (only
    ``twistd roomserver``, whose process is its own, does: tests/test_tap_web.py)."""
    server = await make_server(room_protocol=True)
    before = metric((await http(server, "GET", "/metrics")).text, "roomserver_gc_pause_seconds_count",
                    'generation="2"')
    gc.collect()
    gc.collect(0)
    text = (await http(server, "GET", "/metrics")).text
    assert metric(text, "roomserver_gc_pause_seconds_count", 'generation="2"') >= before + 1
    assert metric(text, "roomserver_gc_pause_seconds_count", 'generation="0"') >= 1
    assert metric(text, "roomserver_gc_pause_max_seconds", 'generation="2"') > 0
    assert metric(text, "roomserver_gc_frozen_objects") == gc.get_freeze_count() == 0
    callback = server.http.metrics.gc_pauses._callback
    assert callback in gc.callbacks
    await server.stop()
    assert callback not in gc.callbacks, "a stopped server stops timing (gc.callbacks is process-wide)"


# -- /healthz ------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_ok_then_degraded_when_a_backend_fails(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    response = await http(server, "GET", "/healthz")
    body = response.json()
    assert response.code == 200 and body["status"] == "ok" and body["listening"] is True
    assert body["store"] == {"backend": "MemoryStore", "ok": True}, "the durable-rooms store is found"
    assert body["broker"] == {"backend": "memory", "ok": True}, "one process: nothing that can fail"

    class Broker:
        name = "redis"
        state = "disconnected"

    server.broker = Broker()
    response = await http(server, "GET", "/healthz")
    assert response.code == 503
    assert response.json()["status"] == "degraded"
    assert response.json()["broker"] == {"backend": "redis", "state": "disconnected", "ok": False}


@pytest_twisted.ensureDeferred
async def test_healthz_names_the_sqlite_store_and_its_file(make_server: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "rooms.db")
    server = await make_server(room_protocol=True, store=f"sqlite:{path}")
    body = (await http(server, "GET", "/healthz")).json()
    assert body["status"] == "ok" and body["store"] == {"backend": "SQLiteStore", "ok": True, "path": path}


def test_backend_health_never_raises() -> None:
    class Broken:
        def health(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    class Good:
        def health(self) -> dict[str, Any]:
            return {"ok": True, "pending": 0}

    assert backend_health(Broken()) == {"backend": "Broken", "ok": False, "error": "RuntimeError"}
    assert backend_health(Good()) == {"backend": "Good", "ok": True, "pending": 0}
    assert backend_health(None) == {"backend": "none", "ok": True}


# -- admin token ---------------------------------------------------------------------------------------------


def test_admin_token_from_file_or_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    token = AdminToken.load(str(path), environ={})
    assert token.configured and token.matches(TOKEN) and not token.matches(TOKEN + "x")
    assert TOKEN not in repr(token)
    assert AdminToken.load(None, environ={"ROOMSERVER_ADMIN_TOKEN": TOKEN}).matches(TOKEN)
    assert not AdminToken.load(None, environ={}).configured
    assert not AdminToken(None).matches("anything")
    with pytest.raises(AdminTokenError, match="at least 16"):
        AdminToken("short")
    with pytest.raises(AdminTokenError, match="cannot read"):
        AdminToken.load(str(tmp_path / "missing"))


# -- admin API -----------------------------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN)
    return str(path)


@pytest_twisted.ensureDeferred
async def test_admin_api_is_off_without_a_token(make_server: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("ROOMSERVER_ADMIN_TOKEN", raising=False)
    server = await make_server(room_protocol=True)
    response = await http(server, "GET", "/admin/rooms", token="anything-at-all-here")
    assert response.code == 403 and response.json()["error"] == "disabled"


@pytest_twisted.ensureDeferred
async def test_admin_api_needs_the_bearer_token(make_server: Any, token_file: str) -> None:
    server = await make_server(room_protocol=True, admin_token_file=token_file)
    for token in (None, "wrong-token-wrong-token", TOKEN[:-1]):
        response = await http(server, "GET", "/admin/rooms", token=token)
        assert response.code == 401 and response.json()["error"] == "unauthorized"
        assert response.header("www-authenticate") == 'Bearer realm="roomserver"'
    basic = await http(server, "GET", "/admin/rooms", headers={"authorization": f"Basic {TOKEN}"})
    assert basic.code == 401


@pytest_twisted.ensureDeferred
async def test_an_admin_token_with_non_ascii_characters_is_accepted(make_server: Any, tmp_path: Path) -> None:
    token = "pässwörd-für-die-verwaltung"
    (tmp_path / "token").write_text(token, encoding="utf-8")
    server = await make_server(room_protocol=True, admin_token_file=str(tmp_path / "token"))
    request = b"GET /admin/rooms HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer %s\r\n\r\n"
    assert (await raw_exchange(server, request % token.encode("utf-8"))).startswith(b"HTTP/1.1 200 ")
    assert (await raw_exchange(server, request % token.encode("latin-1"))).startswith(b"HTTP/1.1 401 ")


@pytest_twisted.ensureDeferred
async def test_admin_api_lists_broadcasts_and_disconnects(make_server: Any, token_file: str) -> None:
    server = await make_server(room_protocol=True, admin_token_file=token_file)
    alice, bob = await chat_traffic(server, room="lobby", clients=2, chats=2)
    rooms = (await http(server, "GET", "/admin/rooms", token=TOKEN)).json()
    assert rooms == {"rooms": [{"name": "lobby", "members": 2, "seq": 2, "keep": False, "meta": {}}]}
    detail = (await http(server, "GET", "/admin/rooms/lobby", token=TOKEN)).json()
    ids = sorted(client.id for client in server.clients.values())
    assert [c["id"] for c in detail["clients"]] == ids and detail["clients"][0]["rooms"] == ["lobby"]
    assert (await http(server, "GET", "/admin/rooms/nope", token=TOKEN)).code == 404
    clients = (await http(server, "GET", "/admin/clients", token=TOKEN)).json()["clients"]
    assert [c["id"] for c in clients] == ids

    notice = {"type": "notice", "room": "lobby", "text": "maintenance at noon"}
    sent = await http(server, "POST", "/admin/rooms/lobby/broadcast", json.dumps({"message": notice}).encode(),
                      token=TOKEN)
    assert sent.code == 200 and sent.json() == {"room": "lobby", "recipients": 2}
    assert await alice.recv() == notice and await bob.recv() == notice

    bad = await http(server, "POST", "/admin/rooms/lobby/broadcast", b"{not json", token=TOKEN)
    assert bad.code == 400 and bad.json()["error"] == "invalid_json"
    missing = await http(server, "POST", "/admin/rooms/lobby/broadcast", b"{}", token=TOKEN)
    assert missing.code == 400 and missing.json()["error"] == "invalid_message"
    huge = await http(server, "POST", "/admin/rooms/lobby/broadcast", b'{"message":"' + b"x" * 70000 + b'"}',
                      token=TOKEN)
    assert huge.code == 413
    bad_code = await http(server, "POST", f"/admin/clients/{ids[0]}/disconnect", b'{"code": 1011}', token=TOKEN)
    assert bad_code.code == 400

    bob_id = ids[1]
    kicked = await http(server, "POST", f"/admin/clients/{bob_id}/disconnect",
                        b'{"code": 4000, "reason": "bye"}', token=TOKEN)
    assert kicked.code == 200 and kicked.json() == {"disconnected": bob_id, "code": 4000}
    await eventually(lambda: server.get_client(bob_id) is None)
    assert server.get_stats().connections == 1
    assert (await http(server, "POST", f"/admin/clients/{bob_id}/disconnect", token=TOKEN)).code == 404
    assert (await http(server, "GET", "/admin/nothing", token=TOKEN)).code == 404


@pytest_twisted.ensureDeferred
async def test_admin_disconnect_sends_the_close_code(make_server: Any, token_file: str) -> None:
    server = await make_server(room_protocol=True, admin_token_file=token_file)
    ws = await WSClient.connect(url_of(server))
    client_id = (await ws.recv())["id"]
    response = await http(server, "POST", f"/admin/clients/{client_id}/disconnect", token=TOKEN)
    assert response.json() == {"disconnected": client_id, "code": 1008}
    assert await ws.closed() == (1008, "disconnected by an administrator")


# -- the dashboard feed --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dashboard_pushes_samples_matching_get_stats(make_server: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("ROOMSERVER_ADMIN_TOKEN", raising=False)
    server = await make_server(room_protocol=True)
    await chat_traffic(server, room="busy", clients=3, chats=4)
    for _ in range(40):  # a history of 40 samples is far bigger than the 4 KiB a viewer may send
        server.http.feed.tick()
    viewer = await WSClient.connect(url_of(server, "/dashboard/ws"))
    snapshot = await viewer.recv()
    assert snapshot["type"] == "snapshot" and snapshot["interval"] == 1.0 and snapshot["window"] == 300
    assert snapshot["node"].endswith(f":{server.port}")
    assert len(snapshot["history"]) >= 41
    sample = (await viewer.recv(timeout=3))["sample"]
    stats = server.get_stats()
    assert (sample["connections"], sample["rooms"]) == (stats.connections, stats.rooms) == (3, 1)
    assert (sample["messages_sent"], sample["messages_received"]) == (stats.messages_sent, stats.messages_received)
    assert sample["top_rooms_by_members"] == [{"room": "busy", "members": 3}]
    assert server.get_stats().connections == 3, "a dashboard viewer is not a room client"
    await viewer.close()


@pytest_twisted.ensureDeferred
async def test_a_closed_dashboard_viewer_is_freed_by_reference_counting(make_server: Any, monkeypatch: Any) -> None:
    from roomserver.http.dashboard import DashboardProtocol

    monkeypatch.delenv("ROOMSERVER_ADMIN_TOKEN", raising=False)
    server = await make_server(room_protocol=True)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            viewer = await WSClient.connect(url_of(server, "/dashboard/ws"))
            assert (await viewer.recv())["type"] == "snapshot"
            await viewer.close()
        await eventually(lambda: not server.connections.protocols)
        assert not [obj for obj in gc.get_objects() if type(obj) is DashboardProtocol]
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_dashboard_requires_the_token_when_configured(make_server: Any, token_file: str) -> None:
    server = await make_server(room_protocol=True, admin_token_file=token_file)
    wrong = await WSClient.connect(url_of(server, "/dashboard/ws"))
    assert await wrong.recv() == {"type": "auth_required"}
    await wrong.send({"type": "auth", "token": "not-the-token-at-all"})
    assert (await wrong.closed())[0] == 4501
    right = await WSClient.connect(url_of(server, "/dashboard/ws"))
    assert await right.recv() == {"type": "auth_required"}
    await right.send({"type": "auth", "token": TOKEN})
    assert await right.recv() == {"type": "authenticated"}
    assert (await right.recv())["type"] == "snapshot"
    await right.close()


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_after_a_page_is_closed_but_not_counted_as_an_attack(make_server: Any) -> None:
    """Browsers keep page connections open: the handshake deadline closes them, yet only a connection that never
    completed a request head counts as a ``handshake_timeout`` drop."""
    server = await make_server(room_protocol=True, open_handshake_timeout=1.0)
    reader, writer = await aio(asyncio.open_connection("127.0.0.1", server.port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await aio(asyncio.wait_for(reader.readline(), 5))).startswith(b"HTTP/1.1 200")
    silent_reader, silent_writer = await aio(asyncio.open_connection("127.0.0.1", server.port))

    async def until_closed(stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionResetError):  # aborted: a reset, or an EOF
            await asyncio.wait_for(stream.read(), 5)

    await aio(until_closed(reader))  # the server closes the idle keep-alive connection
    await aio(until_closed(silent_reader))
    assert server.get_stats().drops.get("handshake_timeout") == 1, "only the connection that sent nothing counts"
    writer.close()
    silent_writer.close()


@pytest_twisted.ensureDeferred
async def test_refused_handshakes_are_counted_by_reason(make_server: Any, tmp_path: Path) -> None:
    """A bad token (401) and a foreign origin (403) show up under their own reasons."""
    (tmp_path / "secret").write_text("k" * 40)
    server = await make_server(room_protocol=True, jwt_secret_file=str(tmp_path / "secret"),
                               allowed_origins="https://app.example")
    for headers in ({"Authorization": "Bearer not-a-jwt"}, {"Origin": "https://evil.example"}):
        with pytest.raises(websockets.InvalidStatus):
            await aio(websockets.connect(url_of(server), additional_headers=headers, open_timeout=5))
    failures = server.http.metrics.handshake_failures
    await eventually(lambda: failures.labels("unauthorized")._value.get() == 1)
    await eventually(lambda: failures.labels("forbidden")._value.get() == 1)
    text = (await http(server, "GET", "/metrics")).text
    assert "not-a-jwt" not in text


async def raw_exchange(server: WebSocketServer, head: bytes, body_chunks: tuple[bytes, ...] = (),
                       pause: float = 0.0) -> bytes:
    """Send ``head`` then each of ``body_chunks`` (``pause`` seconds apart) on a raw TCP connection; everything
    the server answered until it closed the connection (at most 10 s)."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        answer = bytearray()

        async def read_all() -> None:
            with contextlib.suppress(ConnectionError):  # read as it comes: a reset would discard what waits
                while data := await reader.read(65536):
                    answer.extend(data)

        reading = asyncio.ensure_future(read_all())
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for chunk in body_chunks:
                await asyncio.sleep(pause)
                writer.write(chunk)
                await writer.drain()
        await asyncio.wait_for(reading, 10)
        writer.close()
        return bytes(answer)

    return await aio(exchange())  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_a_request_body_over_the_cap_is_refused_before_it_is_read(make_server: Any, token_file: str) -> None:
    """Twisted buffers a whole body (to disk beyond 100 KB) before a resource, token check included, sees the
    request: a body larger than any resource here takes is refused from its head, or as it comes (chunked)."""
    server = await make_server(room_protocol=True, admin_token_file=token_file)
    declared = (b"POST /admin/rooms/lobby/broadcast HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 10000000000\r\n\r\n")
    answer = await raw_exchange(server, declared)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    chunked = b"POST /admin/rooms/lobby/broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"2000\r\n" + b"x" * 0x2000 + b"\r\n"
    answer = await raw_exchange(server, chunked, (chunk,) * 40)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    fine = await http(server, "PUT", "/admin/rooms/lobby", json.dumps({"meta": {"topic": "t" * 60_000}}).encode(),
                      token=TOKEN)
    assert fine.code == 200, "a body within the cap is served as before"


@pytest_twisted.ensureDeferred
async def test_a_body_that_never_ends_is_cut_at_the_handshake_deadline(make_server: Any) -> None:
    server = await make_server(room_protocol=True, open_handshake_timeout=1)
    head = b"POST /admin/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    started = asyncio.get_event_loop().time()
    answer = await raw_exchange(server, head, (b"x",) * 3, pause=0.3)
    assert answer == b"" and asyncio.get_event_loop().time() - started < 5, "dropped at the deadline"
