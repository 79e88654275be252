"""Structured logs: one event per connection open and close, JSON lines, and never a token."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
import pytest_twisted
import websockets
from twisted.logger import Logger

from roomserver.logs import JsonLoggingService, event_as_json_line, json_lines_observer
from roomserver.observe import Observers, ServerObserver

from .support import WSClient, eventually, url_of
from .web_support import captured_log

SECRET = "super-secret-token-value-123"


@pytest_twisted.ensureDeferred
async def test_one_event_per_open_and_close_with_reason_and_duration(make_server: Any) -> None:
    server = await make_server(room_protocol=True)
    with captured_log() as events:
        ws = await WSClient.connect(url_of(server) + f"?token={SECRET}",
                                    additional_headers={"Authorization": f"Bearer {SECRET}"})
        client_id = (await ws.recv())["id"]
        await ws.close()
        await eventually(lambda: any(e.get("event") == "connection_closed" for e in events))
    mine = [e for e in events if e.get("client") == client_id]
    assert [e["event"] for e in mine] == ["connection_opened", "connection_closed"]
    closed = mine[1]
    assert closed["code"] == 1000 and closed["clean"] is True and closed["duration"] >= 0
    assert closed["peer"].startswith("tcp4:127.0.0.1:")
    text = "".join(event_as_json_line(e) for e in events)
    assert SECRET not in text, "tokens in the query string or headers must never be logged"


@pytest_twisted.ensureDeferred
async def test_refused_handshakes_are_logged_with_a_reason(make_server: Any) -> None:
    server = await make_server(room_protocol=True, max_clients=0)
    with captured_log() as events:
        with pytest.raises(websockets.InvalidStatus):
            await WSClient.connect(url_of(server))
        await eventually(lambda: any(e.get("event") == "handshake_failed" for e in events))
    failed = next(e for e in events if e.get("event") == "handshake_failed")
    assert failed["reason"] == "unavailable"


def test_json_lines_are_flat_and_keep_the_fields() -> None:
    out = StringIO()
    observer = json_lines_observer(out)
    log = Logger(namespace="roomserver.test", observer=observer)
    log.info("connection {client} closed", event="connection_closed", client="abc", code=1000, duration=1.5,
             obj=object())
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("it failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "connection abc closed" and first["level"] == "info"
    assert first["namespace"] == "roomserver.test" and first["time"].endswith("+00:00")
    assert (first["event"], first["client"], first["code"], first["duration"]) == ("connection_closed", "abc",
                                                                                  1000, 1.5)
    assert "obj" not in first, "values JSON cannot carry are left out rather than stringified"
    assert second["level"] == "critical" and "ValueError: boom" in second["traceback"]


def test_json_logging_service_sets_the_application_observer() -> None:
    from twisted.application import service
    from twisted.logger import ILogObserver

    application = service.Application("roomserver")
    root = JsonLoggingService(StringIO())
    root.setServiceParent(application)
    assert ILogObserver(application) is root.observer


def test_the_json_log_goes_where_twistd_would_log_and_creates_no_file_outside_twistd(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import SimpleNamespace

    from roomserver.logs import json_log_target

    monkeypatch.chdir(tmp_path)
    assert json_log_target(SimpleNamespace()) is sys.stdout
    assert json_log_target(SimpleNamespace(parent={"reactor": "default"})) is sys.stdout, "twist: no twistd.log"
    assert json_log_target(SimpleNamespace(parent={"nodaemon": True, "logfile": None})) is sys.stdout
    assert not (tmp_path / "twistd.log").exists()
    daemon = json_log_target(SimpleNamespace(parent={"nodaemon": False, "logfile": None}))
    try:
        assert daemon.name == "twistd.log" and (tmp_path / "twistd.log").exists(), "twistd's default for a daemon"
    finally:
        daemon.close()


def test_a_failing_observer_never_breaks_the_others() -> None:
    seen: list[str] = []

    class Broken(ServerObserver):
        def stopping(self, server: Any) -> None:
            raise RuntimeError("observer bug")

    class Fine(ServerObserver):
        def stopping(self, server: Any) -> None:
            seen.append("stopping")

    observers = Observers()
    observers.add(Broken())
    observers.add(Fine())
    with captured_log() as events:
        observers.stopping(None)  # type: ignore[arg-type]
    assert seen == ["stopping"]
    assert any("observer bug" in str(e.get("log_failure", "")) for e in events)


def test_a_connection_that_takes_another_client_id_is_logged_with_its_duration_and_forgotten() -> None:
    """A connection that continues a cluster session takes that session's client id after it opened
    (docs/cluster.md): its close still carries its duration, and the connection log keeps nothing of it (keyed
    by the id, every such connection left an entry behind for ever)."""
    from twisted.internet.task import Clock

    from roomserver.observe import ConnectionLog

    class Connection:
        id = "new-id"
        address = peer = "tcp4:127.0.0.1:1"
        close_code, close_reason = 1000, ""

    clock = Clock()
    log = ConnectionLog(clock)
    client: Any = Connection()
    with captured_log() as events:
        log.connection_opened(client)
        client.id = "continued-id"
        clock.advance(2.5)
        log.connection_closed(client, True)
    closed = next(e for e in events if e.get("event") == "connection_closed")
    assert (closed["client"], closed["duration"]) == ("continued-id", 2.5)
    assert log._opened_at == {}
