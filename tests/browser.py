"""Driving the demo page and the dashboard in Debian's Chromium through Playwright (async API).

The scenarios here are plain asyncio coroutines: the tests run on Twisted's asyncio reactor, so the server under
test and Playwright share one event loop (``aio`` bridges them). ``python -m tests.browser --screenshots docs``
runs a server and the same scenarios to refresh the README's screenshots.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``make browser``), never a downloaded build.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 10_000


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class ChatPage:
    """One browser tab on the demo chat page, with the errors its scripts raised."""

    def __init__(self, page: Page, name: str) -> None:
        self.page = page
        self.name = name
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_default_timeout(TIMEOUT_MS)

    @classmethod
    async def open(
        cls, browser: Browser | BrowserContext, base_url: str, name: str, room: str = "lobby", token: str = ""
    ) -> ChatPage:
        if isinstance(browser, Browser):
            page = await browser.new_page(viewport={"width": 1100, "height": 640})
        else:
            page = await browser.new_page()
        chat = cls(page, name)
        await page.goto(base_url + "/")
        await page.fill("#name", name)
        await page.fill("#first-room", room)
        await page.fill("#token", token)
        await page.click("#connect")
        await chat.wait_state("open")
        await expect(page.locator("#rooms li.active")).to_have_text(room)
        await expect(page.locator("#messages li.system").first).to_be_visible()  # joined (or history)
        return chat

    async def wait_state(self, state: str, timeout_ms: int = TIMEOUT_MS) -> None:
        await expect(self.page.locator("#status")).to_have_attribute("data-state", state, timeout=timeout_ms)

    async def say(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    async def wait_message(self, sender: str, text: str) -> None:
        item = self.page.locator("#messages li:not(.system)", has_text=text)
        await expect(item.first).to_contain_text(sender)

    async def chat_lines(self) -> list[str]:
        """The chat messages on screen as "sender: text" (system lines left out)."""
        items = self.page.locator("#messages li:not(.system)")
        lines = []
        for i in range(await items.count()):
            who = await items.nth(i).locator(".who").inner_text()
            text = await items.nth(i).locator(".text").inner_text()
            lines.append(f"{who}: {text}")
        return lines

    async def seqs(self) -> list[int]:
        texts = await self.page.locator("#messages li .seq").all_inner_texts()
        return [int(t.lstrip("#")) for t in texts]

    async def members(self) -> list[str]:
        return await self.page.locator("#members li.member").all_inner_texts()


async def two_pages_chat(browser: Browser, base_url: str) -> tuple[ChatPage, ChatPage]:
    """Ada and Bob open the page, join the lobby and talk; each sees both messages."""
    ada = await ChatPage.open(browser, base_url, "ada")
    bob = await ChatPage.open(browser, base_url, "bob")
    await ada.say("hello bob")
    await bob.wait_message("ada", "hello bob")
    await bob.say("hi ada, all good here")
    await ada.wait_message("bob", "hi ada, all good here")
    await ada.wait_message("ada", "hello bob")
    return ada, bob


async def open_dashboard(browser: Browser, base_url: str, token: str | None = None) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(base_url + "/dashboard")
    if token is not None:
        await page.fill("#token", token)
        await page.click("#auth-form button")
    await expect(page.locator("#status")).to_have_attribute("data-state", "open")
    return page


async def dashboard_totals(page: Page) -> dict[str, int]:
    values = {}
    for key in ("connections", "rooms", "messages-sent", "messages-received", "bytes-sent", "bytes-received"):
        values[key] = int(await page.locator(f"#{key}").inner_text())
    return values


NODE_COLUMNS = ("connections", "rooms", "received", "sent")


async def expect_node_row(page: Page, node: str, figures: dict[str, int], status: str = "ok") -> None:
    """Wait until the dashboard's nodes table shows ``figures`` (``NODE_COLUMNS`` -> value) for ``node``."""
    row = page.locator(f"#nodes tbody tr[data-node='{node}']")
    await expect(row).to_have_attribute("data-status", status)
    for column, value in figures.items():
        await expect(row.locator(f"td.{column}")).to_have_text(str(value))


async def _screenshots(directory: str) -> None:
    """Start a server, fill it with a little life, and photograph the chat page and the dashboard."""
    from pathlib import Path

    from twisted.internet import asyncioreactor

    asyncioreactor.install(asyncio.get_running_loop())
    from roomserver import ServerOptions, WebSocketServer

    server = WebSocketServer(ServerOptions(port=0, host="127.0.0.1", room_protocol=True))
    await server.start().asFuture(asyncio.get_running_loop())
    base = f"http://127.0.0.1:{server.port}"
    async with chromium() as browser:
        ada, bob = await two_pages_chat(browser, base)
        cleo = await ChatPage.open(browser, base, "cleo", room="lobby")
        await cleo.say("morning both! the build is green")
        await ada.wait_message("cleo", "the build is green")
        for i in range(12):
            await (ada, bob, cleo)[i % 3].say(["ship it?", "after the review", "lgtm", "deploying to staging"][i % 4])
            await asyncio.sleep(0.4)
        await ada.page.screenshot(path=str(Path(directory) / "chat.png"))
        dashboard = await open_dashboard(browser, base)
        for i in range(12):  # the picture is taken while messages still flow
            await (ada, bob, cleo)[i % 3].say(f"load {i}")
            await asyncio.sleep(0.35)
        await dashboard.screenshot(path=str(Path(directory) / "dashboard.png"), full_page=True)
    await server.stop().asFuture(asyncio.get_running_loop())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--screenshots", metavar="DIR", required=True)
    asyncio.run(_screenshots(parser.parse_args().screenshots))
