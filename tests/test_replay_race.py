"""A replay must not duplicate a message whose append the store committed before the hub heard of it.

SQLite commits an append in its writer thread, and the reactor hears of it a moment later. A history read on a
reader thread can see that commit and answer first: the joining member gets the message in its replay, the
replay ends, and only then does the append's confirmation arrive and broadcast the message. Under load that
happened at random (tests/test_resume_load.py saw members get a message, or a whole group-commit batch, twice
after a resume). Here the confirmation is held back on purpose, against the real SQLite store, so the
interleaving happens every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer

from .support import WSClient, eventually, url_of


async def joined(server: Any, **join: Any) -> WSClient:
    ws = await WSClient.connect(url_of(server))
    assert (await ws.recv())["type"] == "welcome"
    assert (await ws.request({"type": "join", "room": "r", **join}))["type"] == "joined"
    return ws


@pytest_twisted.ensureDeferred
async def test_a_replay_that_read_an_unconfirmed_append_gets_no_second_copy_of_it(
        make_server: Any, tmp_path: Path) -> None:
    server = await make_server(room_protocol=True, store=f"sqlite:{tmp_path / 'race.db'}")
    store = server.durable.store
    real_append = store.append
    committed: list[Any] = []
    confirm: defer.Deferred[None] = defer.Deferred()

    def late_append(room: str, batch: Any) -> defer.Deferred[Any]:
        """The real append, committed on disk; its confirmation reaches the hub only once ``confirm`` fires."""
        def hold(results: Any) -> defer.Deferred[Any]:
            committed.append(results)
            return confirm.addCallback(lambda _: results)
        return real_append(room, batch).addCallback(hold)

    publisher = await joined(server)
    store.append = late_append
    await publisher.send({"type": "chat", "room": "r", "text": "one", "id": "c1", "msg_id": "m1"})
    await eventually(lambda: committed)

    late = await WSClient.connect(url_of(server))
    assert (await late.recv())["type"] == "welcome"
    await late.send({"type": "join", "room": "r", "since": 0})
    assert (await late.recv())["type"] == "joined"
    replayed = await late.recv()
    assert (replayed["seq"], replayed["text"]) == (1, "one"), "the replay read the committed message"

    store.append = real_append
    confirm.callback(None)  # the confirmation arrives after the replay: the broadcast of seq 1
    assert (await publisher.recv())["seq"] == 1
    assert (await publisher.recv()) == {"type": "ack", "id": "c1", "seq": 1, "msg_id": "m1"}
    await publisher.send({"type": "chat", "room": "r", "text": "two"})
    following = await late.recv()
    assert (following["seq"], following["text"]) == (2, "two"), f"seq 1 came twice: {following}"
    assert server.durable.floors == {}, "the floor is gone once the broadcasts caught up"
