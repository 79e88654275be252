"""The demo page, roomserver.js and the dashboard in a real browser (Debian's Chromium through Playwright)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from playwright.async_api import expect

from roomserver import ServerOptions, WebSocketServer

from .browser import CHROMIUM, ChatPage, chromium, dashboard_totals, expect_node_row, open_dashboard, two_pages_chat
from .redis_support import REDIS_URL, delete_prefix, unique_prefix
from .support import WSClient, aio, url_of


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` (part of `make test`) installs Debian's chromium")


def base_url(server: WebSocketServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest_twisted.ensureDeferred
async def test_two_pages_chat_and_see_each_other(make_server: Any) -> None:
    """Two tabs chat through the server; each shows both messages with their seq, and both names as present."""
    server = await make_server(room_protocol=True)

    async def scenario() -> None:
        async with chromium() as browser:
            ada, bob = await two_pages_chat(browser, base_url(server))
            for page in (ada, bob):
                assert await page.chat_lines() == ["ada: hello bob", "bob: hi ada, all good here"]
                assert await page.seqs() == [1, 2]
            # Presence: the member list shows both (from presence when the server has it, else from activity).
            assert sorted(await ada.members()) == ["ada (you)", "bob"]
            assert sorted(await bob.members()) == ["ada", "bob (you)"]
            assert ada.errors == [] and bob.errors == []
            assert server.get_stats().connections == 2 and server.get_stats().rooms == 1
            # Presence: when Bob's tab goes away, Ada's list follows (the server's presence leave event).
            await bob.page.close()
            await expect(ada.page.locator("#members li.member")).to_have_text(["ada (you)"])
            assert "recently active" not in await ada.page.locator("#members").inner_text(), "real presence"

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_pages_reconnect_after_a_server_restart_and_keep_their_messages(make_server: Any) -> None:
    """The server stops (1001) and comes back on the same port: both pages show "reconnecting", come back by
    themselves, rejoin their room, keep every message they had and go on chatting."""
    server = await make_server(room_protocol=True)
    port = server.port
    restarted: list[WebSocketServer] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with chromium() as browser:
            ada, bob = await two_pages_chat(browser, base_url(server))
            await server.stop().asFuture(loop)
            await ada.wait_state("reconnecting")
            await bob.wait_state("reconnecting")
            again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True))
            restarted.append(again)
            await again.start().asFuture(loop)
            await ada.wait_state("open", timeout_ms=15_000)
            await bob.wait_state("open", timeout_ms=15_000)
            await expect(ada.page.locator("#messages li.system", has_text="rejoined").first).to_be_visible()
            await expect(bob.page.locator("#messages li.system", has_text="rejoined").first).to_be_visible()
            await bob.say("still there?")
            await ada.wait_message("bob", "still there?")
            await ada.say("yes")
            for page in (ada, bob):  # Ada's own line appears when the server's copy reaches her, maybe after Bob's
                await page.wait_message("ada", "yes")
                assert await page.chat_lines() == [
                    "ada: hello bob", "bob: hi ada, all good here", "bob: still there?", "ada: yes",
                ]
            assert ada.errors == [] and bob.errors == []
            assert again.get_stats().connections == 2 and again.get_stats().rooms == 1

    try:
        await aio(scenario())
    finally:
        for again in restarted:
            await again.stop()


@pytest_twisted.ensureDeferred
async def test_dashboard_counters_match_get_stats(make_server: Any, tmp_path: Path) -> None:
    """The dashboard (behind an admin token) shows exactly ``get_stats()`` once traffic has settled."""
    token = "dashboard-token-for-the-browser-test"
    (tmp_path / "token").write_text(token)
    server = await make_server(room_protocol=True, admin_token_file=str(tmp_path / "token"), rate_limit=1.0,
                               rate_burst=10)
    members = []
    for _ in range(3):
        ws = await WSClient.connect(url_of(server))
        await ws.recv()
        await ws.request({"type": "join", "room": "metrics-room"})
        members.append(ws)
    for i in range(5):
        await members[i % 3].send({"type": "chat", "room": "metrics-room", "text": f"n{i}"})
    for ws in members:
        for _ in range(5):
            await ws.recv()
    flooder = await WSClient.connect(url_of(server))
    await flooder.recv()
    for i in range(14):  # a burst of 10 is allowed at 1 message/s: the rest are refused
        await flooder.send({"type": "join", "room": f"flood-{i}"})
    replies = [await flooder.recv() for _ in range(14)]
    refused = sum(1 for reply in replies if reply.get("code") == "rate_limited")
    assert refused >= 3
    stats = server.get_stats()
    assert stats.errors["rate_limited"] == refused

    async def scenario() -> dict[str, int]:
        async with chromium() as browser:
            page = await open_dashboard(browser, base_url(server), token=token)
            expected = str(stats.messages_sent)
            await expect(page.locator("#messages-sent")).to_have_text(expected)
            await expect(page.locator("#top-members tr[data-key='metrics-room'] td.n")).to_have_text("3")
            await expect(page.locator("#rate-limit-hits")).to_have_text(str(refused + stats.drops.get("flood", 0)))
            await expect(page.locator("#errors tr[data-key='rate_limited'] td.n")).to_have_text(str(refused))
            await expect(page.locator("#slow-consumers")).to_have_text(str(stats.drops.get("slow_consumer", 0)))
            await expect(page.locator("#nodes-card")).to_be_hidden()  # one node: no nodes table
            return await dashboard_totals(page)

    shown = await aio(scenario())
    assert shown == {
        "connections": stats.connections, "rooms": stats.rooms, "messages-sent": stats.messages_sent,
        "messages-received": stats.messages_received, "bytes-sent": stats.bytes_sent,
        "bytes-received": stats.bytes_received,
    }
    # 4 welcomes + 3 joined replies + 5 chats x 3 members + the flooder's 14 replies delivered;
    # 3 joins + 5 chats + 14 joins received
    assert (shown["connections"], shown["messages-sent"], shown["messages-received"]) == (4, 36, 22)
    await flooder.close()
    for ws in members:
        await ws.close()


@pytest_twisted.ensureDeferred
async def test_the_dashboard_of_one_node_shows_every_node_of_the_cluster(make_server: Any) -> None:
    """Two nodes on Redis: the dashboard page of node A shows both nodes (pushed, the page polls nothing), each
    row with exactly what that node's ``get_stats()`` says, and the cluster's totals; when node B stops, its
    row goes away."""
    prefix = unique_prefix()
    url = f"{REDIS_URL}?prefix={prefix}"
    a = await make_server(room_protocol=True, store=url, broker=url, rate_limit=0)
    b = await make_server(room_protocol=True, store=url, broker=url, rate_limit=0)
    members = []
    for server, room in ((a, "spans"), (b, "spans"), (b, "spans"), (b, "only-on-b")):
        ws = await WSClient.connect(url_of(server))
        await ws.recv()
        await ws.request({"type": "join", "room": room})
        members.append(ws)
    for i in range(4):
        await members[i % 3].send({"type": "chat", "room": "spans", "text": f"n{i}", "id": i})
    for ws in members[:3]:
        for _ in range(4):
            while (await ws.recv())["type"] != "chat":
                pass
    node_a, node_b = a.broker.node_id, b.broker.node_id

    def figures(server: WebSocketServer) -> dict[str, int]:
        stats = server.get_stats()
        return {"connections": stats.connections, "rooms": stats.rooms, "received": stats.messages_received,
                "sent": stats.messages_sent}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with chromium() as browser:
            page = await open_dashboard(browser, base_url(a))
            await expect(page.locator("#nodes-card")).to_be_visible()
            await expect(page.locator("#nodes tbody tr")).to_have_count(2)
            expected_a, expected_b = figures(a), figures(b)
            assert (expected_a["connections"], expected_b["connections"], expected_b["rooms"]) == (1, 3, 2)
            await expect_node_row(page, node_a, expected_a)
            await expect_node_row(page, node_b, expected_b)
            await expect(page.locator(f"#nodes tbody tr[data-node='{node_a}'] td").first).to_contain_text(
                "(this node)")
            totals = page.locator("#cluster-totals")
            await expect(totals.locator("td.connections")).to_have_text("4")
            await expect(totals.locator("td.rooms")).to_have_text("2")  # "spans" counts once
            await expect(totals.locator("td.sent")).to_have_text(str(expected_a["sent"] + expected_b["sent"]))
            await expect(totals.locator("td.received")).to_have_text(
                str(expected_a["received"] + expected_b["received"]))
            await expect(page.locator("#cluster-nodes")).to_have_text("2")
            # The top figures stay this node's own.
            await expect(page.locator("#connections")).to_have_text(str(expected_a["connections"]))
            await b.stop().asFuture(loop)
            await expect(page.locator("#nodes tbody tr")).to_have_count(1, timeout=15_000)
            await expect(page.locator(f"#nodes tbody tr[data-node='{node_a}']")).to_be_visible()

    try:
        await aio(scenario())
    finally:
        for ws in members:
            await ws.close()
        await a.stop()
        await delete_prefix(prefix)


@pytest_twisted.ensureDeferred
async def test_pages_resume_after_a_restart_and_miss_nothing(make_server: Any, tmp_path: Path) -> None:
    """With a SQLite store, the server restarts: Ada's page resumes first and sends while Bob's tab is offline;
    when Bob comes back his page resumes from its last seq and both pages end with every message, once, in order.
    """
    store = f"sqlite:{tmp_path / 'rooms.db'}"
    server = await make_server(room_protocol=True, store=store)
    port = server.port
    restarted: list[WebSocketServer] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with chromium() as browser:
            ada = await ChatPage.open(browser, base_url(server), "ada")
            bob_context = await browser.new_context()
            bob = await ChatPage.open(bob_context, base_url(server), "bob")
            await ada.say("before the restart")
            await bob.wait_message("ada", "before the restart")
            await server.stop().asFuture(loop)
            await ada.wait_state("reconnecting")
            await bob.wait_state("reconnecting")
            # Offline only now: Chromium's offline emulation holds the frames a tab receives (the drain's
            # reconnect hint and its 1001 close) instead of failing the connection.
            await bob_context.set_offline(True)
            again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True, store=store))
            restarted.append(again)
            await again.start().asFuture(loop)
            await ada.wait_state("open", timeout_ms=15_000)
            await expect(ada.page.locator("#messages li.system", has_text="resumed").first).to_be_visible()
            for text in ("while bob was away 1", "while bob was away 2"):
                await ada.say(text)
                await ada.wait_message("ada", text)
            await bob_context.set_offline(False)
            await bob.wait_state("open", timeout_ms=15_000)
            await bob.wait_message("ada", "while bob was away 2")
            await bob.say("back, caught up")
            await ada.wait_message("bob", "back, caught up")
            expected = ["ada: before the restart", "ada: while bob was away 1", "ada: while bob was away 2",
                        "bob: back, caught up"]
            for page in (ada, bob):
                assert await page.chat_lines() == expected
                assert await page.seqs() == [1, 2, 3, 4], "seq continues across the restart, no gap, no repeat"
            assert ada.errors == [] and bob.errors == []

    try:
        await aio(scenario())
    finally:
        for again in restarted:
            await again.stop()


@pytest_twisted.ensureDeferred
async def test_roomserver_js_forgets_a_room_the_server_deleted(make_server: Any) -> None:
    """roomserver.js: a ``left`` event without an id (the room was deleted) drops the room, so a reconnect
    does not bring it back."""
    server = await make_server(room_protocol=True)

    async def scenario() -> None:
        async with chromium() as browser:
            ada = await ChatPage.open(browser, base_url(server), "ada")
            await ada.page.evaluate("roomClient.join('doomed')")
            assert sorted(await ada.page.evaluate("Object.keys(roomClient.rooms)")) == ["doomed", "lobby"]
            server.delete_room("doomed")
            await ada.page.wait_for_function("!('doomed' in roomClient.rooms)")
            assert await ada.page.evaluate("Object.keys(roomClient.rooms)") == ["lobby"]
            assert ada.errors == []

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_a_chat_lost_with_its_connection_is_sent_again_after_the_resume(make_server: Any) -> None:
    """roomserver.js: the connection dies right after a chat left the page and before the server got it; the
    page reconnects, resumes and sends the chat again (same msg_id): everyone sees it exactly once."""
    server = await make_server(room_protocol=True)

    async def scenario() -> None:
        async with chromium() as browser:
            ada_context = await browser.new_context()
            dropped: list[str] = []
            closing: list[asyncio.Future[Any]] = []

            async def route(ws: Any) -> None:
                upstream = ws.connect_to_server()

                def from_page(message: str | bytes) -> None:
                    if isinstance(message, str) and "lost on the way" in message and not dropped:
                        dropped.append(message)  # the frame never reaches the server; the connection dies
                        closing.append(asyncio.ensure_future(ws.close(code=4000, reason="network trouble")))
                        return
                    upstream.send(message)

                ws.on_message(from_page)

            await ada_context.route_web_socket("**/ws", route)
            ada = await ChatPage.open(ada_context, base_url(server), "ada")
            bob = await ChatPage.open(browser, base_url(server), "bob")
            await ada.say("first")
            await bob.wait_message("ada", "first")
            acked = await ada.page.evaluate(
                "roomClient.send('lobby', 'ada: lost on the way').then((ack) => ack.seq)")
            assert dropped and acked == 2
            await bob.wait_message("ada", "lost on the way")
            for page in (ada, bob):
                assert await page.chat_lines() == ["ada: first", "ada: lost on the way"]
            assert ada.errors == [] and bob.errors == []

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_a_page_signs_in_with_a_token_and_a_forged_one_is_refused(make_server: Any, tmp_path: Path) -> None:
    """roomserver.js sends the token as its first message (never in the URL); presence shows the token's user."""
    import jwt

    secret = "browser-secret-" + "s" * 32
    (tmp_path / "secret").write_text(secret)
    server = await make_server(room_protocol=True, jwt_secret_file=str(tmp_path / "secret"))
    good = jwt.encode({"sub": "ada@example.com"}, secret, algorithm="HS256")
    forged = jwt.encode({"sub": "mallory"}, "f" * 40, algorithm="HS256")

    async def scenario() -> None:
        async with chromium() as browser:
            ada = await ChatPage.open(browser, base_url(server), "ada", token=good)
            assert [client.user for client in server.clients.values()] == ["ada@example.com"]
            page = await browser.new_page()
            await page.goto(base_url(server) + "/")
            await page.fill("#name", "mallory")
            await page.fill("#token", forged)
            await page.click("#connect")
            await expect(page.locator("#status")).to_have_attribute("data-state", "closed")
            await expect(page.locator("#status")).to_contain_text("could not connect")
            assert ada.errors == []

    await aio(scenario())


@pytest_twisted.ensureDeferred
async def test_a_page_honours_the_drain_hint_and_sends_its_held_chat_after_the_resume(
        make_server: Any, tmp_path: Path) -> None:
    """roomserver.js: the server drains (reconnect hint, then 1001). A chat sent after the hint is held; the page
    reconnects after the hinted delay instead of its backoff, resumes on the restarted server and sends the held
    chat then: stored once, seen once."""
    store = f"sqlite:{tmp_path / 'rooms.db'}"
    server = await make_server(room_protocol=True, store=store, drain_interval=1.0)
    port = server.port
    restarted: list[WebSocketServer] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with chromium() as browser:
            ada = await ChatPage.open(browser, base_url(server), "ada")
            await ada.say("before")
            await ada.page.evaluate("""() => {
                window.drain = {hints: [], retries: []};
                roomClient.on("message", (m) => { if (m.type === "reconnect") window.drain.hints.push(m); });
                roomClient.on("state", (s, d) => {
                    if (s === "reconnecting" && "delay" in d) window.drain.retries.push(d);
                });
            }""")
            received = server.get_stats().messages_received
            stopping = server.stop().asFuture(loop)
            await ada.page.wait_for_function("window.drain.hints.length === 1")
            held = asyncio.ensure_future(ada.page.evaluate(
                "roomClient.send('lobby', 'ada: held during the drain').then((ack) => ack.seq)"))
            await stopping
            assert server.get_stats().messages_received == received, "the held chat never left the page"
            again = WebSocketServer(ServerOptions(port=port, host="127.0.0.1", room_protocol=True, store=store))
            restarted.append(again)
            await again.start().asFuture(loop)
            assert await asyncio.wait_for(held, 15) == 2
            await ada.wait_message("ada", "held during the drain")
            assert await ada.chat_lines() == ["ada: before", "ada: held during the drain"]
            drain = await ada.page.evaluate("window.drain")
            [hint] = drain["hints"]
            assert hint["resume"] is True and 0 <= hint["after_ms"] < 1000
            first = drain["retries"][0]
            assert first["hinted"] is True and first["delay"] == hint["after_ms"], drain
            assert ada.errors == []

    try:
        await aio(scenario())
    finally:
        for again in restarted:
            await again.stop()
