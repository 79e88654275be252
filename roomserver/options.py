"""``ServerOptions``: every setting of a roomserver, with safe defaults, in one dataclass.

The same names (with dashes) are the options of ``twistd roomserver`` (see ``tap.py``); docs/limits.md and the
README's option table describe them for users.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from .core.drain import DrainPlan

DEFAULT_PING_TIMEOUT_CAP = 10.0
"""A pong takes a round trip: a peer that has not answered a ping in 10 s is as good as gone on any network a
client can chat over, and waiting a whole 30-s interval kept a half-open connection (and its presence) for a
minute (RELIABILITY S2 asks for 40 s)."""

URL_PATH = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@%]+(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%]+)*/?)?")
"""What ``path`` may be: a URL path as a request carries it (RFC 3986 segments, none empty)."""
KIB = 1024
MIB = 1024 * KIB

Number = TypeVar("Number", int, float)


def check_number(value: Number, name: str = "") -> Number:
    """``value`` if it is a finite number >= 0, else ``ValueError`` (naming the option when ``name`` is given).

    Every number of the options is a count, a size, a rate or a duration: none may be negative, nan or infinite.
    ``float()`` parses "nan" and "inf", and nan passes any range check (every comparison with it is False):
    ``--ping-interval nan`` started a server whose every handshake then hung, and a negative ``shutdown_timeout``
    failed only in ``stop()``. ``ServerOptions`` checks each of its numbers here, and the command-line coercers
    of tap.py parse through here too, so both refuse the same values."""
    subject = f"{name} " if name else ""
    # Only floats can be non-finite (and math.isfinite would overflow on a huge int).
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{subject}must be a finite number, not {value}")
    if value < 0:
        raise ValueError(f"{subject}must be >= 0, not {value}")
    return value


def read_option_file(path: str, what: str) -> bytes:
    """The content of a file an option names; ``ValueError("cannot read {what} {path!r}: ...")`` if it cannot be
    read, so the start stops with one line saying which file, rather than with a FileNotFoundError traceback."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ServerOptions:
    port: int | str = 8080
    """A TCP port (0 = ephemeral) or a Twisted endpoint description such as ``tcp:8080:interface=127.0.0.1``."""
    path: str = "/ws"
    """The only HTTP path that accepts WebSocket upgrades."""
    max_clients: int = 1000
    """Live connections beyond this are refused in the opening handshake with HTTP 503."""
    ping_interval: float = 30.0
    """Seconds between heartbeat pings (0 turns heartbeats off; at least 1 otherwise, since Autobahn's timers
    round to whole seconds)."""
    ping_timeout: float | None = None
    """Seconds to wait for a pong before dropping the peer; defaults to ``ping_interval``, at most
    ``DEFAULT_PING_TIMEOUT_CAP`` (10 s): a half-open peer is gone within 40 s with the defaults."""
    host: str = ""
    """Interface to bind when ``port`` is a number ("" = every IPv4 interface)."""
    backlog: int = 4096
    """Connections the kernel may queue for this node before it accepts them (``listen()``'s backlog; Linux caps
    it at ``net.core.somaxconn``). A ``tcp:PORT:backlog=N`` port description sets its own. Twisted's default, 50,
    overflows in a reconnect storm (roomserver/listening.py)."""
    accept_rate: float = 0.0
    """Connections per second this node accepts (0 = no limit); beyond it new connections wait in the kernel's
    accept queue, so a reconnect storm is taken at a pace the node can hand-shake (roomserver/listening.py).
    Needs a TCP port (a number or a ``tcp:`` description)."""
    accept_burst: int = 100
    """Connections accepted in a burst above ``accept_rate``."""
    reuse_port: bool = False
    """Listen with ``SO_REUSEPORT`` (``port`` must be a number or a ``tcp:`` description), so several processes
    share the port and the kernel spreads connections over them; what ``twistd roomserver --workers N`` uses
    (docs/cluster.md)."""
    room_protocol: bool = False
    """Serve the built-in JSON room protocol (what ``twistd roomserver`` runs)."""
    max_message_size: int = 1 * MIB
    """Largest message (after reassembly) a client may send; beyond it the connection closes with 1009."""
    max_frame_size: int | None = None
    """Largest single frame; defaults to ``max_message_size``."""
    max_room_clients: int | None = None
    """Members per room (None = unlimited); a join beyond it gets error ``room_full``."""
    max_rooms_per_client: int | None = 100
    """Rooms one connection may be in; a join beyond it gets error ``too_many_rooms``."""
    max_rooms: int | None = None
    """Rooms in total (None = unlimited); a join that would create one more gets ``too_many_rooms``."""
    max_fragments: int = 1024
    """Frames one message may be split into; beyond it the connection closes with 1008."""
    rate_limit: float = 100.0
    """Messages per second a client may send (0 = no limit); over it error ``rate_limited``, message dropped."""
    rate_burst: int = 200
    """Messages a client may send in a burst above ``rate_limit``."""
    flood_factor: float = 3.0
    """A client that keeps sending at more than this many times ``rate_limit`` is closed with 1008."""
    error_limit: int = 20
    """Error replies a client may earn by its own requests within ``error_window`` seconds (forbidden joins,
    malformed messages...); the one that reaches it closes the connection with 1008. 0 = no limit."""
    error_window: float = 5.0
    max_send_buffer: int = 4 * MIB
    """Bytes queued for a client that does not read; beyond it the client is closed with 4008 (slow consumer)."""
    socket_send_buffer: int = 256 * KIB
    """``SO_SNDBUF`` of every plain-TCP WebSocket connection (0 = the kernel's autotuning, up to 4 MiB per
    connection on Linux). It bounds what a client that does not read pins in kernel memory before the
    ``max_send_buffer`` count starts; the kernel doubles the value for its bookkeeping."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to connect (``*`` wildcards; ``*`` = any). Empty: same origin only. Requests
    without an Origin header (non-browser clients) are allowed; ``null`` origins are refused."""
    connect_rate: float = 0.0
    """WebSocket upgrades per second from one client address (0 = no limit); beyond it HTTP 429. Behind a load
    balancer, set ``trusted_proxies`` too, or every client shares the balancer's address."""
    connect_burst: int = 100
    """Upgrades one client address may make in a burst above ``connect_rate``."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks of proxies whose ``X-Forwarded-For`` is believed (e.g. ``10.0.0.0/8``): a
    connection's client address is the nearest hop that is not one of them (roomserver/core/addresses.py)."""
    max_handshake_size: int = 16 * KIB
    """Bytes of HTTP request line and headers; beyond it HTTP 431 and the connection is closed."""
    raise_fd_limit: bool = True
    """Raise the soft open-files limit to the hard limit at start, so ``max_clients`` can be reached."""
    jwt_secret_file: str | None = None
    """File holding the HS256 secret (or set ROOMSERVER_JWT_SECRET); enables JWT authentication."""
    jwt_public_key_file: str | None = None
    """PEM public key for RS256/ES256 tokens (with ``jwt_algorithm``); enables JWT authentication."""
    jwt_algorithm: str = "HS256"
    """The one algorithm tokens must be signed with (HS256, RS256, ES256, ...)."""
    jwt_audience: str | None = None
    """Required ``aud`` claim, if set."""
    jwt_issuer: str | None = None
    """Required ``iss`` claim, if set."""
    jwt_leeway: float = 0.0
    """Seconds of clock skew tolerated on ``exp`` and ``nbf``."""
    auth_timeout: float = 10.0
    """Seconds a connection without a handshake token has to send its ``auth`` message (else close 1008)."""
    allow_query_token: bool = False
    """Accept ``?token=`` in the URL (off: URLs end up in logs and histories)."""
    max_meta_size: int = 1024
    """Bytes of public presence metadata a join may carry."""
    max_text_length: int | None = None
    """Built-in filter: longest chat text in characters (None = only ``max_message_size`` applies)."""
    allowed_types: tuple[str, ...] = ()
    """Built-in filter: message types clients may publish (empty = any)."""
    blocked_words_file: str | None = None
    """Built-in filter: a file of words (one per line); a chat containing one is rejected."""
    open_handshake_timeout: float = 5.0
    """Seconds a new connection has to complete its opening handshake, HTTP request head included (> 0)."""
    close_handshake_timeout: float = 2.0
    """Seconds to wait for the peer's close frame before dropping the TCP connection (> 0)."""
    shutdown_timeout: float = 5.0
    """Seconds ``stop()`` waits, after the drain's last batch, for clients to answer the 1001 close before
    aborting them (0: aborts them at once)."""
    drain_batch: int = 100
    """``stop()`` drains clients in batches of this many (docs/deploy.md#draining-a-node)."""
    drain_interval: float = 0.2
    """Seconds between two drain batches; also the window of the hinted reconnect delay, and twice the time
    between a batch's reconnect hint and its 1001 close (0: every client at once, no delay hinted)."""
    drain_handover: float = 2.0
    """Cluster only: once its last client is gone, ``stop()`` waits for the other nodes to continue the sessions
    it recorded (each ``taken`` notice releases the presence the session held here) for as long as they keep
    coming, until none came for this many seconds (at most 5 times as long in all), so the node leaves the
    cluster's presence as soon as the last one came instead of leaving those entries to the reaper for up to
    ``presence_ttl`` (0: do not wait)."""
    http_pages: bool = True
    """Serve the HTTP pages beside the WebSocket path (demo chat, dashboard, /metrics, /healthz, admin API,
    roomserver.js); False serves the WebSocket path only (every other path is 404)."""
    admin_token_file: str | None = None
    """A file holding the admin token (dashboard and admin API). Without it, the environment variable
    ROOMSERVER_ADMIN_TOKEN is used; with neither, the dashboard is open and the admin API is off. Never a
    command-line value: command lines are visible to every user of the machine."""
    compression: bool = False
    """Negotiate permessage-deflate (RFC 7692) with clients that offer it (roomserver/compression.py says how
    and docs/compliance.md why it is off by default)."""
    testee: bool = False
    """Echo every message back instead of serving rooms: the Autobahn TestSuite testee (roomserver/testee.py;
    the limits it lifts are listed in docs/compliance.md)."""
    store: str = "memory"
    """Where rooms and history live: ``memory`` (this process), ``sqlite:PATH`` (``twistd roomserver``'s
    default is ``sqlite:roomserver.db``) or ``redis://HOST:PORT/DB`` (shared by the nodes of a cluster,
    docs/cluster.md). See docs/persistence.md."""
    broker: str = "memory"
    """How the nodes of a cluster exchange room messages: ``memory`` (one process, local delivery only) or
    ``redis://HOST:PORT/DB`` (Redis pub/sub; needs the Redis store). See docs/cluster.md."""
    history_size: int = 1000
    """Chat messages kept per room for ``history`` and resume."""
    history_ttl: float | None = None
    """Seconds a chat message stays in history (None = until ``history_size`` pushes it out)."""
    resume_ttl: float = 120.0
    """Seconds a closed connection's session can still be resumed (0 = sessions are never continued)."""
    dedupe_window: float = 300.0
    """Seconds a chat's ``msg_id`` is remembered: a retry within it is acknowledged, not sent again (0: off)."""
    presence_ttl: float = 30.0
    """With the Redis broker: seconds after which the members of a node that stopped heartbeating (killed,
    cut off from Redis) leave the rooms everywhere (docs/cluster.md)."""

    def __post_init__(self) -> None:
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                check_number(value, option.name)  # first, so that no check below ever compares a nan
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/': {self.path!r}")
        if URL_PATH.fullmatch(self.path) is None:
            # A space, an empty segment ("//ws") or a character a URL must escape: no request path would ever
            # equal it, and every upgrade got 404 from a server that looked fine.
            raise ValueError(f"path must be a URL path of non-empty segments of letters, digits and "
                             f"-._~!$&'()*+,;=:@%: {self.path!r}")
        # Autobahn's heartbeat timers (txaio's batched timer) round deadlines down to whole seconds, so
        # sub-second heartbeats would fire at random: refuse them rather than misbehave.
        if self.ping_interval != 0 and self.ping_interval < 1:
            raise ValueError("ping_interval must be 0 (off) or at least 1 second")
        if self.ping_timeout is not None and self.ping_timeout < 1:
            raise ValueError("ping_timeout must be at least 1 second")
        if self.max_message_size <= 0:
            raise ValueError("max_message_size must be > 0")
        # Autobahn reads a frame size of 0 as "no limit", and a text length of 0 would refuse every chat.
        if self.max_frame_size is not None and self.max_frame_size < 1:
            raise ValueError("max_frame_size must be >= 1 (or None: max_message_size)")
        if self.max_text_length is not None and self.max_text_length < 1:
            raise ValueError("max_text_length must be >= 1 (or None: no limit)")
        # Both deadlines read 0 as "none at all" (Autobahn, roomserver/transport.py): a 0 would silently switch off
        # the slowloris cut or leave a peer that never answers a close connected. No use needs that.
        for deadline in ("open_handshake_timeout", "close_handshake_timeout"):
            if getattr(self, deadline) == 0:
                raise ValueError(f"{deadline} must be > 0")
        if self.max_fragments < 1 or self.max_send_buffer < 1 or self.max_handshake_size < 256:
            raise ValueError("max_fragments and max_send_buffer must be > 0, max_handshake_size >= 256")
        if self.max_send_buffer < 2 * self.max_message_size:
            # One relayed message must never make a reader that keeps up look like a slow consumer.
            raise ValueError(f"max_send_buffer ({self.max_send_buffer}) must be at least twice max_message_size "
                             f"({self.max_message_size}), or clients that read normally get closed with 4008")
        if self.rate_limit < 0 or (self.rate_limit and self.rate_burst < 1) or self.flood_factor <= 1:
            raise ValueError("rate_limit must be >= 0, rate_burst >= 1 and flood_factor > 1")
        if self.auth_timeout <= 0 or self.max_meta_size < 2:
            raise ValueError("auth_timeout must be > 0 and max_meta_size >= 2")
        if isinstance(self.allowed_types, str):
            object.__setattr__(self, "allowed_types", tuple(
                kind.strip() for kind in self.allowed_types.split(",") if kind.strip()))
        if self.error_limit < 0 or self.error_window <= 0:
            raise ValueError("error_limit must be >= 0 and error_window > 0")
        if self.connect_rate < 0 or self.connect_burst < 1:
            raise ValueError("connect_rate must be >= 0 and connect_burst >= 1")
        if isinstance(self.trusted_proxies, str):
            object.__setattr__(self, "trusted_proxies", tuple(
                proxy.strip() for proxy in self.trusted_proxies.split(",") if proxy.strip()))
        from .core.addresses import parse_networks

        parse_networks(self.trusted_proxies)  # ValueError for a malformed address or network
        if isinstance(self.allowed_origins, str):
            object.__setattr__(self, "allowed_origins", tuple(
                origin.strip() for origin in self.allowed_origins.split(",") if origin.strip()))
        from .store import parse_store_spec

        parse_store_spec(self.store)
        if self.backlog < 1 or self.accept_rate < 0 or self.accept_burst < 1:
            raise ValueError("backlog must be >= 1, accept_rate >= 0 and accept_burst >= 1")
        if self.reuse_port or self.accept_rate > 0:
            from .listening import tcp_address

            try:
                tcp_address(self.port, self.host)
            except ValueError as exc:
                what = "reuse_port" if self.reuse_port else "accept_rate"
                raise ValueError(f"{what} needs a port number or a tcp: port description ({exc})") from None
        from .broker import parse_broker_spec

        parse_broker_spec(self.broker, self.store)
        if self.history_size < 1:
            raise ValueError("history_size must be >= 1")
        if self.history_ttl is not None and self.history_ttl <= 0:
            raise ValueError("history_ttl must be > 0 (or None for no ttl)")
        DrainPlan(self.drain_batch, self.drain_interval)  # validates both
        if self.presence_ttl < 1:
            raise ValueError("presence_ttl must be at least 1 second")

    @property
    def drain_plan(self) -> DrainPlan:
        return DrainPlan(self.drain_batch, self.drain_interval)

    @property
    def effective_ping_timeout(self) -> float:
        if self.ping_timeout is not None:
            return self.ping_timeout
        return min(self.ping_interval, DEFAULT_PING_TIMEOUT_CAP)

    @property
    def effective_max_frame_size(self) -> int:
        return self.max_message_size if self.max_frame_size is None else self.max_frame_size
