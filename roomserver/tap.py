"""``twistd roomserver``: command-line options and ``makeService``.

Every ``ServerOptions`` field that makes sense on a command line is an option here, spelled with dashes
(``max_clients`` is ``--max-clients``). ``--port`` takes a number or any Twisted endpoint description, so
``ssl:8443:privateKey=key.pem:certKey=cert.pem`` serves TLS.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.python import usage

from .loaded import Loaded, load
from .logs import LOG_FORMATS, JsonLoggingService, json_log_target
from .options import ServerOptions, check_number
from .server import WebSocketServer
from .service import RoomServerService
from .testee import as_testee

_DEFAULTS = ServerOptions()
DEFAULT_STORE = "sqlite:roomserver.db"

# The numeric coercers parse through options.check_number (finite and >= 0), the check ServerOptions applies to
# each of its numbers: "nan", "inf" and negatives are refused on the command line as in the library.


def _optional_int(value: str) -> int | None:
    """An integer option where 0 or "none" means unlimited."""
    if value.lower() in ("", "none", "unlimited"):
        return None
    # 0 by value, not by spelling: "-0" or "00" were a limit of 0 (no room could be joined), not unlimited.
    return check_number(int(value)) or None


def _non_negative_float(value: str) -> float:
    return check_number(float(value))


def _non_negative_int(value: str) -> int:
    return check_number(int(value))


def _positive_float(value: str) -> float:
    number = check_number(float(value))
    if number == 0:
        raise ValueError("must be > 0")
    return number


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in value.split(",") if origin.strip())


def _positive_int(value: str) -> int:
    number = check_number(int(value))
    if number == 0:
        raise ValueError("must be > 0")
    return number


def _log_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return value


class Options(usage.Options):
    """Options of ``twistd roomserver``; ``twistd roomserver --help`` lists them with their defaults."""

    synopsis = "[options]"
    longdesc = (
        "Run a roomserver: a WebSocket room server speaking the JSON room protocol (docs/protocol.md). "
        "Clients connect to ws://HOST:PORT/PATH, join rooms and chat; every member of a room receives every "
        "message, in order."
    )

    optFlags: list[Any] = [
        ["compression", None, "Negotiate permessage-deflate (RFC 7692) with clients that offer it."],
        ["allow-query-token", None, "Accept ?token= in the WebSocket URL (off: URLs end up in logs)."],
        ["no-compression", None, "Never negotiate permessage-deflate (the default)."],
        ["testee", None, "Echo every message instead of serving rooms: the Autobahn TestSuite testee "
         "(see docs/compliance.md for the limits it lifts)."],
        ["reuse-port", None, "Listen with SO_REUSEPORT so several processes can share the port (what "
         "--workers uses)."],
        ["supervised", None, "Stop (draining clients, as on SIGTERM) when standard input reaches its end: how "
         "the workers --workers starts follow the first process, even one killed with SIGKILL."],
        ["no-http-pages", None, "Serve the WebSocket path only: no demo page, dashboard, /metrics, /healthz or "
         "admin API."],
        ["no-gc-freeze", None, "Leave Python's garbage collector as it is: no gc.freeze() of the start-up heap "
         "and of what survives each full collection (docs/performance.md, K and M)."],
    ]

    optParameters: list[Any] = [
        ["port", "p", "8080", "TCP port number, or a Twisted endpoint description "
         "(tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem)."],
        ["path", None, _DEFAULTS.path, "The HTTP path that accepts WebSocket upgrades (others get 404)."],
        ["max-clients", None, _DEFAULTS.max_clients, "Live connections; beyond it upgrades get HTTP 503.",
         _positive_int],
        ["ping-interval", None, _DEFAULTS.ping_interval, "Seconds between heartbeat pings (0 = off).",
         _non_negative_float],
        ["ping-timeout", None, None, "Seconds to wait for a pong before dropping the peer, at least 1 "
         "(default: the ping interval, at most 10 s).", _non_negative_float],
        ["max-message-size", None, _DEFAULTS.max_message_size, "Largest client message in bytes (close 1009).",
         _positive_int],
        ["max-frame-size", None, None, "Largest client frame in bytes (default: max-message-size).", _positive_int],
        ["max-room-clients", None, None, "Members per room (0 = unlimited, the default); a join beyond it gets "
         "room_full.", _optional_int],
        ["max-rooms-per-client", None, _DEFAULTS.max_rooms_per_client,
         "Rooms one connection may be in (too_many_rooms; 0 = unlimited).", _optional_int],
        ["max-rooms", None, None, "Rooms in total (0 = unlimited, the default; too_many_rooms).", _optional_int],
        ["open-handshake-timeout", None, _DEFAULTS.open_handshake_timeout,
         "Seconds a connection has to complete its opening handshake, HTTP head included (> 0).",
         _non_negative_float],
        ["close-handshake-timeout", None, _DEFAULTS.close_handshake_timeout,
         "Seconds to wait for the peer's close frame before dropping the connection (> 0).", _non_negative_float],
        ["shutdown-timeout", None, _DEFAULTS.shutdown_timeout,
         "Seconds to wait for clients to close on shutdown before aborting them (0 = abort them at once).",
         _non_negative_float],
        ["drain-batch", None, _DEFAULTS.drain_batch, "On shutdown, clients closed (1001, with a reconnect hint) "
         "per batch.", _positive_int],
        ["drain-interval", None, _DEFAULTS.drain_interval, "Seconds between two shutdown batches (0 = every "
         "client at once).", _non_negative_float],
        ["drain-handover", None, _DEFAULTS.drain_handover, "Cluster: after the last client closed, wait for other "
         "nodes to continue its sessions until none came for this many seconds (at most 5 times as long), then "
         "leave the cluster's presence (0 = do not wait).",
         _non_negative_float],
        ["max-fragments", None, _DEFAULTS.max_fragments, "Frames per message; beyond it close 1008.", _positive_int],
        ["rate-limit", None, _DEFAULTS.rate_limit, "Messages per second per client (0 = off); over it error "
         "rate_limited and the message is dropped.", _non_negative_float],
        ["rate-burst", None, _DEFAULTS.rate_burst, "Messages a client may send in a burst.", _positive_int],
        ["flood-factor", None, _DEFAULTS.flood_factor, "Close with 1008 a client that keeps sending at more than "
         "this many times the rate limit.", _positive_float],
        ["max-send-buffer", None, _DEFAULTS.max_send_buffer, "Bytes queued for a client that does not read; "
         "beyond it close 4008 (slow consumer).", _positive_int],
        ["socket-send-buffer", None, _DEFAULTS.socket_send_buffer, "SO_SNDBUF of WebSocket connections in bytes "
         "(0 = kernel autotuning): bounds the kernel memory a client that does not read pins.", _non_negative_int],
        ["allowed-origins", None, "", "Comma-separated browser origins allowed to connect (* wildcards; * = any). "
         "Default: same origin only. Requests without Origin are allowed; 'null' is refused.", _comma_list],
        ["error-limit", None, _DEFAULTS.error_limit, "Error replies a client may earn within --error-window "
         "seconds; the one that reaches it closes with 1008 (0 = no limit).", _non_negative_int],
        ["error-window", None, _DEFAULTS.error_window, "Seconds of the error limit.", _positive_float],
        ["connect-rate", None, _DEFAULTS.connect_rate, "WebSocket upgrades per second from one client address "
         "(0 = no limit); beyond it HTTP 429.", _non_negative_float],
        ["connect-burst", None, _DEFAULTS.connect_burst, "Upgrades one address may make in a burst.", _positive_int],
        ["backlog", None, _DEFAULTS.backlog, "Connections the kernel may queue before the node accepts them "
         "(listen() backlog; Linux caps it at net.core.somaxconn).", _positive_int],
        ["accept-rate", None, _DEFAULTS.accept_rate, "Connections per second the node accepts (0 = no limit); "
         "beyond it they wait in the kernel's accept queue (reconnect storms).", _non_negative_float],
        ["accept-burst", None, _DEFAULTS.accept_burst, "Connections accepted in a burst above --accept-rate.",
         _positive_int],
        ["trusted-proxies", None, "", "Comma-separated proxy addresses/networks whose X-Forwarded-For is "
         "believed (e.g. 10.0.0.0/8); the client address is the nearest hop not among them.", _comma_list],
        ["max-handshake-size", None, _DEFAULTS.max_handshake_size, "Bytes of HTTP request head; beyond it "
         "HTTP 431.", _positive_int],
        ["jwt-secret-file", None, None, "A file holding the HS256 secret (or set ROOMSERVER_JWT_SECRET): turns on "
         "JWT authentication. Never pass a secret on the command line."],
        ["jwt-public-key-file", None, None, "A PEM public key for RS256/ES256 tokens (with --jwt-algorithm)."],
        ["jwt-algorithm", None, _DEFAULTS.jwt_algorithm, "The one algorithm tokens must use (HS256, RS256, ES256)."],
        ["jwt-audience", None, None, "Required aud claim."],
        ["jwt-issuer", None, None, "Required iss claim."],
        ["jwt-leeway", None, _DEFAULTS.jwt_leeway, "Seconds of clock skew tolerated on exp/nbf (0 = none).",
         _non_negative_float],
        ["auth-timeout", None, _DEFAULTS.auth_timeout, "Seconds to send the auth message when the handshake "
         "carried no token (then close 1008).", _non_negative_float],
        ["max-meta-size", None, _DEFAULTS.max_meta_size, "Bytes of presence metadata per join.", _positive_int],
        ["max-text-length", None, None, "Filter: longest chat text in characters (error filtered).", _positive_int],
        ["allowed-types", None, "", "Filter: comma-separated message types clients may publish.", _comma_list],
        ["blocked-words-file", None, None, "Filter: a file of blocked words, one per line (error filtered)."],
        ["admin-token-file", None, None, "A file holding the admin token of the dashboard and the admin API "
         "(or set ROOMSERVER_ADMIN_TOKEN; never the token itself on the command line)."],
        ["workers", None, 1, "Processes sharing the port (SO_REUSEPORT), one per core; more than 1 needs "
         "--broker redis://... and a port number (docs/cluster.md).", _positive_int],
        ["gc-thaw-interval", None, 900.0, "Seconds between thaws of the frozen heap, after which one full "
         "collection scans everything again (0 = never).", _non_negative_float],
        ["gc-thaw-most", None, 14400.0, "While thaws find little garbage, each doubles the time to the next, up "
         "to this many seconds (roomserver/heap.py; 0 = no doubling).", _non_negative_float],
        ["malloc-trim-interval", None, 60.0, "Seconds between two returns of C malloc's free pages to the system "
         "(glibc's malloc_trim; keeps RSS from growing with fragmentation; 0 = never).", _non_negative_float],
        ["log-format", None, "text", "Log format: text, or json (one JSON object per line).", _log_format],
        ["store", None, DEFAULT_STORE, "Where rooms and history live: sqlite:PATH (a SQLite file, created if "
         "missing), memory (lost at exit) or redis://HOST:PORT/DB[?prefix=NAME:] (shared by a cluster's nodes; "
         "docs/cluster.md)."],
        ["broker", None, _DEFAULTS.broker, "How cluster nodes exchange room messages: memory (one process) or "
         "redis://HOST:PORT/DB[?prefix=NAME:] (needs --store redis://...; docs/cluster.md)."],
        ["history-size", None, _DEFAULTS.history_size, "Chat messages kept per room for history and resume.",
         _positive_int],
        ["history-ttl", None, None, "Seconds a chat message stays in history (0 = no limit, the default).",
         _non_negative_float],
        ["resume-ttl", None, _DEFAULTS.resume_ttl, "Seconds a closed connection's session can be resumed (0 = "
         "sessions are never continued).", _non_negative_float],
        ["dedupe-window", None, _DEFAULTS.dedupe_window,
         "Seconds a chat's msg_id is remembered to acknowledge retries instead of sending them again (0 = off: "
         "a retry is sent again).", _non_negative_float],
        ["presence-ttl", None, _DEFAULTS.presence_ttl, "With --broker redis: seconds after which the members "
         "of a node that stopped heartbeating leave everywhere.", _non_negative_float],
    ]


    def server_options(self) -> ServerOptions:
        """The ``ServerOptions`` these command-line options describe (the room protocol switched on, unless
        ``--testee`` replaces it with the echo handler).

        Each ``--some-option`` maps to the ``some_option`` field; flags given as strings (``--allowed-origins``)
        are converted by their coercers, defaults by ``ServerOptions`` itself."""
        values: dict[str, Any] = {}
        for parameter in self.optParameters:
            flag = parameter[0]
            value = self[flag]
            if isinstance(parameter[2], str) and value == parameter[2] and len(parameter) > 4:
                value = parameter[4](value)  # usage.Options does not coerce string defaults
            values[flag.replace("-", "_")] = value
        port = values["port"]
        if isinstance(port, str) and port.isdigit():
            values["port"] = int(port)
        values.pop("log_format")  # a twistd logging choice, not a server option
        values.pop("workers")  # a process-supervision choice, not a server option
        values.pop("gc_thaw_interval")  # process-wide garbage collector choices, not server options
        values.pop("gc_thaw_most")
        values.pop("malloc_trim_interval")
        values["reuse_port"] = bool(self["reuse-port"]) or self["workers"] > 1
        values["http_pages"] = not self["no-http-pages"]
        values["history_ttl"] = values["history_ttl"] or None
        values["compression"] = bool(self["compression"])
        values["testee"] = bool(self["testee"])
        if values["testee"] and self["store"] == DEFAULT_STORE:
            values["store"] = "memory"  # the echo testee stores nothing: no database file for it to create
        values["allow_query_token"] = bool(self["allow-query-token"])
        options = ServerOptions(room_protocol=True, **values)
        return as_testee(options) if options.testee else options

    loaded: Loaded | None = None
    """What the options name outside themselves (JWT key, admin token, blocked words), read by ``postOptions``
    for ``makeService`` to hand to the server."""

    def postOptions(self) -> None:
        """Every configuration error is found here, as a one-line usage error: twistd prints one raised by
        ``makeService`` with a 40-line traceback. So the files and environment variables the options name are
        read here too (``roomserver.loaded``), not only when the server is built."""
        if self["compression"] and self["no-compression"]:
            raise usage.UsageError("--compression and --no-compression contradict each other")
        try:
            options = self.server_options()
            if self["workers"] > 1 and options.broker == "memory":
                raise ValueError("--workers needs --broker redis://... (and --store redis://...): the workers "
                                 "act as one server through Redis")
            self.loaded = load(options)
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from exc


def makeService(config: Options) -> service.MultiService:
    """Build the service tree twistd runs: one ``RoomServerService``, and with ``--workers N`` a
    ``WorkersService`` that starts N-1 more processes once this one listens (roomserver/workers.py).

    With ``--log-format json`` the returned service installs a JSON log observer on twistd's application
    (see ``roomserver.logs``), which twistd then uses instead of its text log."""
    root: service.MultiService = service.MultiService()
    if config["log-format"] == "json":
        root = JsonLoggingService(json_log_target(config))
    # postOptions checked the options and read what they name: nothing is read, or can be refused, again here.
    server = WebSocketServer(config.server_options(), loaded=config.loaded)
    # twistd exits 1 when the start fails; the process is the server's own, so its heap may be frozen.
    serving = RoomServerService(server, exit_status_on_failure=1, freeze_heap=not config["no-gc-freeze"],
                                thaw_every=config["gc-thaw-interval"], thaw_most=config["gc-thaw-most"],
                                malloc_trim_every=config["malloc-trim-interval"])
    serving.setServiceParent(root)
    if config["supervised"]:
        from .workers import SupervisorWatch

        SupervisorWatch(server.reactor).setServiceParent(root)
    if config["workers"] > 1:
        import sys

        from .workers import WorkersService, worker_argv

        workers = WorkersService(server.reactor, config["workers"] - 1,
                                 lambda: worker_argv(sys.argv, str(config["port"]), server.port or 0),
                                 twistd=getattr(config, "parent", None))
        workers.setServiceParent(root)
        serving.on_listening = workers.start_workers
    return root
