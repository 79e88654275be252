"""A real ``twistd roomserver`` on SQLite, stopped and started again on the same file: kept rooms (made through
the admin API), their history and every room's seq are still there; an unusable database stops the start with
one clear line."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from .twistd_support import free_port, stop, twistd, wait_for_port

TOKEN = "durable-admin-token-0123456789abcdef"


def admin(port: int, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers={"authorization": f"Bearer {TOKEN}"},
        data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def chat(port: int, room: str, texts: list[str]) -> list[int]:
    """Join ``room``, send ``texts``, return the seqs they got (from the acks)."""
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
        json.loads(ws.recv(timeout=5))
        ws.send(json.dumps({"type": "join", "room": room}))
        assert json.loads(ws.recv(timeout=5))["type"] == "joined"
        seqs = []
        for number, text in enumerate(texts):
            ws.send(json.dumps({"type": "chat", "room": room, "text": text, "id": number}))
            while True:
                message = json.loads(ws.recv(timeout=5))
                if message["type"] == "ack":
                    seqs.append(message["seq"])
                    break
        return seqs


def history(port: int, room: str) -> list[str]:
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
        json.loads(ws.recv(timeout=5))
        ws.send(json.dumps({"type": "history", "room": room, "since": 0}))
        return [message["text"] for message in json.loads(ws.recv(timeout=5))["messages"]]


def test_twistd_restart_keeps_kept_rooms_history_and_seq(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--admin-token-file", str(tmp_path / "token")]
    first = twistd(tmp_path, *args)  # the default store: sqlite:roomserver.db in the working directory
    try:
        wait_for_port(port, first)
        assert admin(port, "PUT", "/admin/rooms/lobby", {"meta": {"title": "Lobby"}})["keep"] is True
        assert chat(port, "lobby", ["one", "two"]) == [1, 2]
        assert chat(port, "side", ["a", "b", "c"]) == [1, 2, 3]
    finally:
        output = stop(first)
    assert "Traceback" not in output, output
    assert (tmp_path / "roomserver.db").exists()
    second = twistd(tmp_path, *args)
    try:
        wait_for_port(port, second)
        rooms = admin(port, "GET", "/admin/rooms")["rooms"]
        assert rooms == [{"name": "lobby", "members": 0, "seq": 2, "keep": True, "meta": {"title": "Lobby"}}], \
            "the kept room is back (the implicit one is not: it had no members left)"
        assert history(port, "lobby") == ["one", "two"]
        assert history(port, "side") == ["a", "b", "c"], "an implicit room's history stays in the store"
        assert chat(port, "lobby", ["three"]) == [3] and chat(port, "side", ["d"]) == [4], "seq continues"
        assert admin(port, "DELETE", "/admin/rooms/lobby") == {"deleted": "lobby"}
        assert admin(port, "GET", "/admin/rooms")["rooms"] == []
    finally:
        output = stop(second)
    assert "Traceback" not in output and "restored 1 kept rooms" in output, output


def test_twistd_refuses_to_start_on_an_unusable_database(tmp_path: Path) -> None:
    port = free_port()
    process = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1", "--store",
                     f"sqlite:{tmp_path / 'missing-dir' / 'rooms.db'}")
    try:
        status = process.wait(20)
    finally:
        output = stop(process)
    assert "roomserver could not start: SQLite store" in output and "unable to open database file" in output, \
        output
    assert "Traceback" not in output, output
    assert status == 1, f"a failed start is a failure for supervisors: exit status {status}\n{output}"
