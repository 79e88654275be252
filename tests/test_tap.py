"""The twistd plugin: options, and a real ``twistd roomserver`` subprocess answering a client."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
from twisted.python import usage

from roomserver.options import ServerOptions
from roomserver.tap import Options, makeService

from .twistd_support import free_port, reap, twistd, wait_for_port


def test_options_map_to_server_options() -> None:
    config = Options()
    config.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--path", "/chat", "--max-clients", "5",
                         "--ping-interval", "10", "--max-room-clients", "3", "--max-rooms", "0"])
    options = config.server_options()
    assert options.port == "tcp:0:interface=127.0.0.1"
    assert (options.path, options.max_clients, options.ping_interval) == ("/chat", 5, 10.0)
    assert options.max_room_clients == 3 and options.max_rooms is None
    assert options.room_protocol
    assert makeService(config).getServiceNamed("roomserver") is not None


def test_every_limit_is_a_flag() -> None:
    config = Options()
    config.parseOptions(["--max-fragments", "8", "--rate-limit", "5", "--rate-burst", "10", "--flood-factor", "4",
                         "--max-send-buffer", "65536", "--max-message-size", "32768",
                         "--allowed-origins", "https://a.example, https://*.b.example",
                         "--max-handshake-size", "8192", "--max-rooms-per-client", "7"])
    options = config.server_options()
    assert (options.max_fragments, options.rate_limit, options.rate_burst, options.flood_factor) == (8, 5.0, 10, 4.0)
    assert options.max_send_buffer == 65536 and options.max_handshake_size == 8192
    assert options.allowed_origins == ("https://a.example", "https://*.b.example")
    assert options.max_rooms_per_client == 7


@pytest.mark.parametrize("argv", [["--max-clients", "0"], ["--ping-interval", "-1"], ["--path", "ws"],
                                  ["--ping-interval", "0.5"]])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)


def _numeric_options() -> list[str]:
    """Every option that takes a number: its coercer turns "1" into an int or a float."""
    numeric = []
    for name, _, _, _, *coercer in Options.optParameters:
        try:
            parsed = coercer[0]("1") if coercer else None
        except ValueError:
            continue
        if isinstance(parsed, (int, float)):
            numeric.append(name)
    return numeric


NUMERIC_OPTIONS = _numeric_options()


def test_numeric_options_are_found() -> None:
    assert {"ping-interval", "flood-factor", "max-clients", "max-rooms", "history-ttl", "workers",
            "gc-thaw-most"} <= set(NUMERIC_OPTIONS)


@pytest.mark.parametrize("name", NUMERIC_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_numeric_options_refuse_non_finite_and_negative_values(name: str, value: str) -> None:
    """``float("nan")`` passes any range check: ``--ping-interval nan`` started a server whose every handshake
    then hung, with nothing logged."""
    with pytest.raises(usage.UsageError):
        Options().parseOptions([f"--{name}", value])


def _help_of(name: str) -> str:
    return next(parameter[3] for parameter in Options.optParameters if parameter[0] == name)


@pytest.mark.parametrize("name", NUMERIC_OPTIONS)
def test_an_option_that_takes_0_says_what_0_means(name: str) -> None:
    """0 often means "off" or "unlimited", and a 0 that switches something off silently (--open-handshake-timeout
    0 lifted the slowloris deadline, --ping-timeout 0 became the default) is a trap: an option takes 0 only if
    its --help says what 0 does."""
    config = Options()
    try:
        config.parseOptions([f"--{name}", "0"])
    except usage.UsageError:
        return  # refused: fine
    assert "0 = " in _help_of(name), f"--{name} takes 0: its --help must say what 0 means"


@pytest.mark.parametrize("name", ["open-handshake-timeout", "close-handshake-timeout", "ping-timeout"])
def test_a_0_that_would_mean_no_deadline_is_refused(name: str) -> None:
    with pytest.raises(usage.UsageError, match=name.replace("-", "_")):
        Options().parseOptions([f"--{name}", "0"])


@pytest.mark.parametrize("value", ["0", "-0", "00", "+0"])
def test_0_is_unlimited_however_it_is_spelled(value: str) -> None:
    config = Options()
    config.parseOptions(["--max-rooms", value, "--max-room-clients", value, "--max-rooms-per-client", value])
    options = config.server_options()
    assert (options.max_rooms, options.max_room_clients, options.max_rooms_per_client) == (None, None, None)


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--jwt-secret-file", "/nonexistent/secret"], {},
     "cannot read the JWT secret file '/nonexistent/secret': No such file or directory"),
    (["--jwt-public-key-file", "/nonexistent/key.pem", "--jwt-algorithm", "RS256"], {},
     "cannot read the JWT public key file '/nonexistent/key.pem': No such file or directory"),
    (["--blocked-words-file", "/nonexistent/words"], {},
     "cannot read the blocked words file '/nonexistent/words': No such file or directory"),
    ([], {"ROOMSERVER_JWT_SECRET": "short"},
     "an HMAC JWT secret must be at least 32 bytes long (ROOMSERVER_JWT_SECRET)"),
])
def test_what_the_options_name_is_checked_while_parsing_them(argv: list[str], environ: dict[str, str], message: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file or a short secret was found only by makeService: twistd printed a traceback (a raw
    FileNotFoundError for a missing file). Now a one-line usage error says which."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--store", "memory", *argv])
    assert str(info.value) == message


def test_a_jwt_key_that_does_not_fit_the_algorithm_is_a_usage_error(tmp_path: Path) -> None:
    """An RSA key with --jwt-algorithm ES256 was accepted, and then every token failed (HTTP 500 in the handshake,
    close 1011 on an auth message)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = tmp_path / "key.pem"
    key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config = Options()
    config.parseOptions(["--store", "memory", "--jwt-public-key-file", str(key), "--jwt-algorithm", "RS256"])
    assert config.loaded is not None and config.loaded.verifier is not None
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--store", "memory", "--jwt-public-key-file", str(key), "--jwt-algorithm", "ES256"])
    assert str(info.value) == ("ES256 needs an EC public key on curve P-256 in PEM format "
                               f"(the JWT public key file {str(key)!r})")


def test_what_postoptions_read_is_what_the_server_uses(tmp_path: Path) -> None:
    """Nothing is read twice: makeService hands the server what postOptions read (the files may be gone)."""
    words, secret = tmp_path / "words", tmp_path / "secret"
    words.write_text("spam\n")
    secret.write_text("s" * 40)
    config = Options()
    config.parseOptions(["--store", "memory", "--blocked-words-file", str(words), "--jwt-secret-file", str(secret)])
    words.unlink()
    secret.unlink()
    server = makeService(config).getServiceNamed("roomserver").server
    assert config.loaded is not None and server.loaded is config.loaded
    assert server.access.verifier is config.loaded.verifier is not None
    assert config.loaded.blocked_words == ("spam",)


def test_heap_thaw_options_reach_the_service() -> None:
    config = Options()
    config.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--gc-thaw-interval", "600", "--gc-thaw-most", "7200"])
    serving = makeService(config).getServiceNamed("roomserver")
    assert (serving.freeze_heap, serving.thaw_every, serving.thaw_most) == (True, 600.0, 7200.0)


def test_help_documents_every_option() -> None:
    text = str(Options())
    for option in ("--port", "--path", "--max-clients", "--ping-interval", "--max-message-size",
                   "--shutdown-timeout"):
        assert option in text


def test_twistd_plugin_serves_clients_and_sigterm_sends_1001(tmp_path: Path) -> None:
    """Start ``twistd -n roomserver`` for real, chat through it, then SIGTERM: the client sees 1001."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port = free_port()
    process = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1", "--path", "/ws", "--max-clients", "10")
    try:
        wait_for_port(port, process)
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5) as ws:
            assert '"welcome"' in ws.recv(timeout=5)
            ws.send('{"type":"join","room":"lobby"}')
            assert '"joined"' in ws.recv(timeout=5)
            ws.send('{"type":"chat","room":"lobby","text":"over twistd"}')
            assert '"seq":1' in ws.recv(timeout=5)
            process.send_signal(signal.SIGTERM)
            hint = json.loads(ws.recv(timeout=5))
            assert hint["type"] == "reconnect" and hint["resume"] is True, hint
            assert 0 <= hint["after_ms"] <= 200, "within one --drain-interval (0.2 s by default)"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1001
            assert ws.close_reason == f"server shutdown; reconnect after {hint['after_ms']} ms"
        # twistd re-raises the signal after a clean shutdown so the exit status tells why it stopped
        assert process.wait(15) in (0, -signal.SIGTERM)
    finally:
        output = reap(process)
    assert "Traceback" not in output, output


def test_twistd_exits_1_when_its_port_is_taken(tmp_path: Path) -> None:
    """A start that fails is a failure for supervisors (systemd, a shell's ``&&``): one critical line, no
    traceback, exit status 1 (twistd alone would exit 0, or wait forever for a port bound before its reactor
    ran)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1", "--store", "memory")
        try:
            status = process.wait(20)
        finally:
            output = reap(process)
    assert status == 1, output
    assert "roomserver could not start: Couldn't listen on 127.0.0.1" in output, output
    assert "Traceback" not in output and "roomserver stopped" not in output, output


def test_drain_options_map_to_server_options() -> None:
    config = Options()
    config.parseOptions([])
    options = config.server_options()
    assert (options.drain_batch, options.drain_interval, options.drain_handover) == (100, 0.2, 2.0)
    config = Options()
    config.parseOptions(["--drain-batch", "25", "--drain-interval", "0.5", "--drain-handover", "0"])
    options = config.server_options()
    assert (options.drain_batch, options.drain_interval, options.drain_handover) == (25, 0.5, 0.0)
    for argv in (["--drain-batch", "0"], ["--drain-interval", "-1"], ["--drain-handover", "-1"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(argv)
    with pytest.raises(ValueError, match="drain_handover"):
        ServerOptions(drain_handover=float("inf"))


def test_durable_options_map_to_server_options() -> None:
    config = Options()
    config.parseOptions([])
    assert config.server_options().store == "sqlite:roomserver.db", "twistd keeps rooms on disk by default"
    config = Options()
    config.parseOptions(["--store", "memory", "--history-size", "50", "--history-ttl", "3600", "--resume-ttl", "30",
                         "--dedupe-window", "60"])
    options = config.server_options()
    assert (options.store, options.history_size, options.history_ttl, options.resume_ttl, options.dedupe_window) \
        == ("memory", 50, 3600.0, 30.0, 60.0)


@pytest.mark.parametrize("argv", [["--store", "postgres://x"], ["--store", "sqlite:"], ["--history-size", "0"]])
def test_bad_durable_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(argv)
