"""twistd flags of the HTTP side and the JSON log format, down to a real ``twistd roomserver`` process."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from pathlib import Path

import pytest
from twisted.python import usage

from roomserver.tap import Options, makeService

from .support import metric
from .twistd_support import free_port, reap, twistd, wait_for_port

TOKEN = "a-long-enough-admin-token-0001"


def test_http_flags_map_to_server_options(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = Options()
    config.parseOptions(["--no-http-pages", "--admin-token-file", str(token_file), "--log-format", "json"])
    options = config.server_options()
    assert options.http_pages is False and options.admin_token_file == str(token_file)
    assert config["log-format"] == "json"
    defaults = Options()
    defaults.parseOptions([])
    assert defaults.server_options().http_pages is True and defaults["log-format"] == "text"
    assert makeService(defaults).getServiceNamed("roomserver") is not None


@pytest.mark.parametrize("argv", [["--log-format", "xml"], ["--admin-token-file", "/nonexistent/token"]])
def test_bad_http_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)


def test_a_too_short_token_file_is_a_usage_error(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(usage.UsageError, match="at least 16"):
        Options().parseOptions(["--admin-token-file", str(short)])


def test_a_too_short_token_in_the_environment_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was found only by makeService, which twistd reports with a 40-line traceback."""
    monkeypatch.setenv("ROOMSERVER_ADMIN_TOKEN", "short")
    with pytest.raises(usage.UsageError, match=r"^the admin token must be at least 16 characters "
                                                r"\(ROOMSERVER_ADMIN_TOKEN\)$"):
        Options().parseOptions([])
    config = Options()
    config.parseOptions(["--no-http-pages"])  # no HTTP pages: the token is not ours to check
    assert config.loaded is not None and not config.loaded.admin_token.configured


def test_the_admin_token_is_read_once(tmp_path: Path) -> None:
    """makeService builds the server with what postOptions read: the file may be gone by then."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = Options()
    config.parseOptions(["--admin-token-file", str(token_file), "--store", "memory"])
    token_file.unlink()
    server = makeService(config).getServiceNamed("roomserver").server
    assert server.http.token.matches(TOKEN)


def test_twistd_says_what_is_wrong_with_the_token_in_one_line(tmp_path: Path) -> None:
    process = twistd(tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--store", "memory",
                     env={"ROOMSERVER_ADMIN_TOKEN": "short"})
    try:
        status = process.wait(20)
    finally:
        output = reap(process)
    assert status == 1, output
    assert "Traceback" not in output, output
    assert output.rstrip().splitlines()[-1].endswith(
        ": the admin token must be at least 16 characters (ROOMSERVER_ADMIN_TOKEN)"), output


def test_help_documents_the_http_flags() -> None:
    text = str(Options())
    for option in ("--no-http-pages", "--admin-token-file", "--log-format"):
        assert option in text
    assert "ROOMSERVER_ADMIN_TOKEN" in text


def test_twistd_json_logs_one_line_per_event_and_no_token(tmp_path: Path) -> None:
    """``twistd -n roomserver --log-format json``: stdout is JSON lines with the connection events; the token
    given through the environment is accepted by the admin API and appears nowhere in the log."""
    from websockets.sync.client import connect

    port = free_port()
    process = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json",
                     env={"ROOMSERVER_ADMIN_TOKEN": TOKEN})
    try:
        wait_for_port(port, process)
        with connect(f"ws://127.0.0.1:{port}/ws?token={TOKEN}", open_timeout=5) as ws:
            assert '"welcome"' in ws.recv(timeout=5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/rooms",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == {"rooms": []}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert json.loads(response.read())["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) in (0, -signal.SIGTERM)
    finally:
        output = reap(process)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert lines, output
    events = [line.get("event") for line in lines]
    assert events.count("connection_opened") == 1 and events.count("connection_closed") == 1
    closed = next(line for line in lines if line.get("event") == "connection_closed")
    assert closed["code"] == 1000 and isinstance(closed["duration"], float)
    assert TOKEN not in output


def metrics_of_twistd(tmp_path: Path, *args: str) -> tuple[str, str]:
    """Start ``twistd roomserver ARGS``, read its /metrics once it listens, stop it: (metrics text, its output)."""
    port = free_port()
    process = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1", *args)
    try:
        wait_for_port(port, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) in (0, -signal.SIGTERM)
    finally:
        output = reap(process)
    return text, output


def test_twistd_freezes_its_startup_heap_and_reports_collector_pauses(tmp_path: Path) -> None:
    """``twistd roomserver`` exempts its start-up heap from the garbage collector once it listens (the process
    is the server's own), and /metrics shows that and the collection it made first, as a generation-2 pause."""
    text, output = metrics_of_twistd(tmp_path)
    frozen = metric(text, "roomserver_gc_frozen_objects")
    assert frozen > 10_000, "modules, classes and functions are frozen"
    logged = re.search(r"froze (\d+) objects of the start-up heap", output)
    assert logged, output
    # Frozen objects are still freed by reference counting when they die (the count shrinks a little), and a full
    # collection since would have frozen more.
    assert frozen >= 0.99 * int(logged.group(1))
    assert metric(text, "roomserver_gc_pause_seconds_count", 'generation="2"') >= 1
    assert metric(text, "roomserver_gc_pause_max_seconds", 'generation="2"') > 0
    assert metric(text, "python_gc_collections_total", 'generation="2"') >= 1


def test_no_gc_freeze_leaves_the_collector_alone(tmp_path: Path) -> None:
    text, output = metrics_of_twistd(tmp_path, "--no-gc-freeze")
    assert metric(text, "roomserver_gc_frozen_objects") == 0
    assert "froze" not in output
