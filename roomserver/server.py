"""``WebSocketServer``: the seed API, and the hub between the Autobahn adapter and the pure core.

The hub's job is small and on the hot path: admit or refuse connections, hand each message to the room protocol
(if switched on) and the application's handlers, carry out the effects the core returns, and fan messages out.
Who may do what (authentication, the ``authorize`` hook and the order of messages behind its pending answers) is
decided in ``access.py``; the hub only wires it in.
A broadcast encodes its message once and frames it once (``prepareMessage``); each member then costs one write.

Cleanup is driven by Autobahn's ``onClose``, which fires exactly once per connection, opened or not: the client
leaves every room (empty rooms are removed), the registry forgets it and its handlers are dropped, so nothing
keeps a closed connection alive.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

import orjson
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from .access import AccessControl, Authenticate, Authorize
from .broker import create_broker, create_cluster_presence, create_cluster_sessions
from .client import Client, serialize
from .cluster import Relay
from .core import filters as builtin_filters
from .core import messages
from .core.addresses import AddressResolver
from .core.clock import SteadyClock
from .core.codecs import JSON_PROTOCOL, Codec, CodecRegistry
from .core.errors import CLIENT_FAULTS, CloseCode, ErrorCode, RoomServerError
from .core.filters import Filter, Pipeline
from .core.messages import encode
from .core.origins import OriginPolicy
from .core.presence import Presence
from .core.ratelimit import ErrorBudget, FloodGuard, KeyedRateLimit, Verdict
from .core.rooms import Room, RoomRegistry
from .core.session import (
    Announce,
    Append,
    ClaimSession,
    Effect,
    ReadHistory,
    Replay,
    Reply,
    RoomProtocol,
    SessionTaken,
    ShareSession,
    TakeOver,
)
from .core.sessions import SessionTable
from .core.stats import ClusterStats, ServerStats, StatsCounters
from .draining import HANDOVER_CAP, Drainer, Handover
from .durable import DurableRooms, History
from .events import EventEmitter
from .fanout import STATE_OPEN, send_prepared
from .listening import AcceptPacer, PacedEndpoint, tcp_address
from .loaded import Loaded, load
from .observe import ConnectionLog, Observers
from .options import ServerOptions
from .system import raise_open_files_limit
from .testee import as_testee, install_echo
from .transport import GuardedConnection
from .web import QuietSite, TrackingFactory, UpgradeResource, build_root
from .websocket import RoomServerFactory, RoomServerProtocol

SERVER_EVENTS = frozenset({"connection", "join", "leave"})
RATE_LIMITED = encode(messages.error(ErrorCode.RATE_LIMITED, "too many messages: this one was dropped"))


def recoded(codec: Codec, payload: bytes) -> bytes:
    """A text payload for a client of another codec (msgpack): JSON is decoded and encoded again; text that is
    not JSON (an application's ``broadcast(room, "plain text")``) goes as that string, so one such member
    neither stops the fan-out to the others nor misses the message."""
    try:
        value: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        value = payload.decode("utf-8", "replace")
    return codec.encode(value)


def _message_type(payload: bytes, is_binary: bool) -> str | None:
    """The ``type`` of a JSON message, for per-subscription filters (binary payloads have none)."""
    if is_binary:
        return None
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None



def _peer_host(protocol: Any) -> str:
    """The TCP peer's host ("" if the transport has no IP peer, e.g. a test transport)."""
    transport = protocol.transport
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", ""))


def closing_code(protocol: Any, code: int | None, reason: str | None) -> tuple[int | None, str | None]:
    """The close code and reason that ended a connection: the server's own when it closed first (Autobahn's
    ``onClose`` reports the peer's, or 1006 whenever the closing handshake did not complete, as after most
    protocol violations, where the peer never answers our 1002); the peer's otherwise, 1006 if it sent none."""
    local = getattr(protocol, "localCloseCode", None)
    if getattr(protocol, "closedByMe", False) and isinstance(local, int):
        own = getattr(protocol, "localCloseReason", None)
        if isinstance(own, bytes):  # Autobahn keeps the encoded reason of the frame it sent
            own = own.decode("utf-8", "replace")
        return local, own or reason
    return code, reason


class WebSocketServer:
    """A WebSocket room server: ``start()``, ``stop()``, rooms, broadcasts, stats and events."""

    log = Logger()

    def __init__(
        self,
        port: int | str | ServerOptions = 8080,
        path: str | None = None,
        max_clients: int | None = None,
        ping_interval: float | None = None,
        *,
        reactor: Any = None,
        loaded: Loaded | None = None,
        **options: Any,
    ) -> None:
        explicit: dict[str, Any] = {
            name: value
            for name, value in (("path", path), ("max_clients", max_clients), ("ping_interval", ping_interval))
            if value is not None
        }
        explicit.update(options)
        if isinstance(port, ServerOptions):
            self.options = dataclasses.replace(port, **explicit)
        else:
            self.options = ServerOptions(port=port, **explicit)
        if self.options.testee:
            self.options = as_testee(self.options)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor: IReactorCore = reactor
        # Intervals (rate limits, error budgets, resume sessions) are measured on this, never set back with the
        # system clock (reactor.seconds is time.time: core/clock.py).
        self.steady_seconds = SteadyClock(self.reactor.seconds)  # type: ignore[attr-defined]
        self.registry = RoomRegistry(
            max_rooms=self.options.max_rooms,
            max_room_clients=self.options.max_room_clients,
            max_rooms_per_client=self.options.max_rooms_per_client,
            on_removed=lambda room: self.durable.store.room_idle(room.name),
            on_created=lambda room: self.durable.store.room_used(room.name),
        )
        self.counters = StatsCounters()
        self.codecs = CodecRegistry()
        self.json_codec = self.codecs.get(JSON_PROTOCOL)
        self.presence_tracker = Presence()
        # The files and environment variables the options name; twistd read them while parsing its options.
        self.loaded = load(self.options) if loaded is None else loaded
        self.filters = Pipeline(self._builtin_filters())
        self.access = AccessControl(self, self.loaded.verifier)
        self.room_protocol: RoomProtocol | None = None
        if self.options.room_protocol:
            self.use_room_protocol()
        self._events = EventEmitter(SERVER_EVENTS)
        self.registry.on_member_added = self._member_added
        self.registry.on_member_removed = self._member_removed
        self.durable = DurableRooms(self)
        self.broker = create_broker(self.options, reactor)
        self.relay = Relay(self, self.broker)
        self.cluster_presence = create_cluster_presence(self, self.broker)
        self.cluster_sessions = create_cluster_sessions(self, self.broker)
        self._share_sessions()
        if self.options.testee:
            install_echo(self)
        self._clients: dict[str, Client] = {}
        self._admitted = 0
        self._stopping = False
        self._drained: set[Client] = set()  # told to reconnect (stop() is draining them): chats are refused
        self._handover: Handover | None = None  # stop() awaiting ``taken`` notices
        self._listening: Any = None  # IListeningPort once started
        # ServerOptions allows an accept rate for TCP ports only, which _endpoint listens on with this pacer.
        self.accept_pacer = (
            AcceptPacer(self.options.accept_rate, self.options.accept_burst, self.reactor.seconds())
            if self.options.accept_rate > 0 else None)
        self.observers = Observers()
        self.observers.add(ConnectionLog(self.reactor))
        self.factory = RoomServerFactory(self, self.options)
        self.origins = OriginPolicy(self.options.allowed_origins)
        self.addresses = AddressResolver(self.options.trusted_proxies)
        self.connect_limit = (KeyedRateLimit(self.options.connect_rate, self.options.connect_burst)
                              if self.options.connect_rate > 0 else None)
        self.site = QuietSite(
            build_root(self.options.path, UpgradeResource(self.factory), self._http_pages()),
            handshake_timeout=self.options.open_handshake_timeout,
            max_handshake_size=self.options.max_handshake_size,
            on_handshake_timeout=lambda: self.counters.dropped("handshake_timeout"),
            reactor=reactor,
        )
        self.connections = TrackingFactory(self.site, reactor)
        self.port: int | None = self.options.port if isinstance(self.options.port, int) else None

    # -- the seed API --------------------------------------------------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register a server event handler (``connection`` gets the new ``Client``); usable as a decorator."""
        return self._events.on(event, handler) if handler is not None else self._events.on(event)

    def use_room_protocol(self) -> WebSocketServer:
        """Serve the built-in JSON room protocol (welcome, join, leave, chat; docs/protocol.md)."""
        if self.room_protocol is None:
            sessions = SessionTable(self.options.resume_ttl)
            self.room_protocol = RoomProtocol(
                self.registry, sessions, clock=self.steady_seconds,
                presence=self.presence_tracker, filters=self.filters, max_meta_bytes=self.options.max_meta_size,
            )
            self._share_sessions()
        return self

    def _share_sessions(self) -> None:
        """With the Redis broker, resume sessions are the cluster's (roomserver/broker/sessions.py)."""
        if self.room_protocol is not None and getattr(self, "cluster_sessions", None) is not None:
            self.room_protocol.shared = True
            self.room_protocol.adopt = self._adopt_id

    def _adopt_id(self, client: Any, client_id: str) -> bool:
        """Give ``client`` the id of the session it continues (False if a connection here has that id)."""
        if not isinstance(client, Client) or client_id in self._clients or self._clients.get(client.id) is not client:
            return False
        del self._clients[client.id]
        client.id = client_id
        self._clients[client_id] = client
        return True

    # -- authentication, presence, filters, subprotocols (docs/auth.md) ---------------------------------------------

    @property
    def authenticate(self) -> Authenticate | None:
        """``fn(request) -> Identity | Deferred``: the application's own handshake authentication."""
        return self.access.authenticate

    @authenticate.setter
    def authenticate(self, hook: Authenticate | None) -> None:
        self.access.authenticate = hook

    @property
    def authorize(self) -> Authorize | None:
        """``fn(identity, action, room) -> bool | Deferred``: the application's say on joins and publishes."""
        return self.access.authorize

    @authorize.setter
    def authorize(self, hook: Authorize | None) -> None:
        self.access.authorize = hook

    def presence(self, room: str) -> list[dict[str, Any]]:
        """The members of ``room`` as users: ``[{"user", "connections", "meta"}]``."""
        return self.presence_tracker.members(room)

    def add_filter(self, filter_: Filter) -> None:
        """Add ``fn(client, room, message) -> message`` to the publish pipeline (raise ``Rejected`` to refuse).

        A filter that raises anything else (a bug in it) is logged with its traceback and the chat is refused
        with ``internal_error``, as a failing ``authorize`` hook refuses: the sender stays connected. (It was
        closed with 1011, which clients retry: a reconnect, the same chat again, the same close.)"""

        def guarded(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
            try:
                return filter_(client, room, message)
            except RoomServerError:
                raise
            except Exception:
                self.log.failure("the message filter {filter!r} raised; the chat is refused", filter=filter_)
                raise RoomServerError("the message could not be checked; it was not sent",
                                      code=ErrorCode.INTERNAL) from None

        self.filters.add(guarded)

    def add_protocol(self, name: str, codec: Codec) -> None:
        """Offer another WebSocket subprotocol, framed by ``codec``."""
        self.codecs.add(name, codec)

    def _builtin_filters(self) -> list[Filter]:
        chosen: list[Filter] = []
        if self.options.max_text_length is not None:
            chosen.append(builtin_filters.max_text_length(self.options.max_text_length))
        if self.options.allowed_types:
            chosen.append(builtin_filters.allowed_types(self.options.allowed_types))
        if self.options.blocked_words_file:
            chosen.append(builtin_filters.blocked_words(self.loaded.blocked_words))
        return chosen

    def create_room(self, name: str, keep: bool = False, meta: dict[str, Any] | None = None) -> Room:
        """The room called ``name``, created if needed.

        ``keep=True`` keeps it when it becomes empty and stores it (with ``meta``, any JSON-serializable dict)
        so a persistent store recreates it at the next start, with its history and seq.
        """
        room = self.registry.create(name, keep=keep)
        if meta is not None:
            room.meta = dict(meta)
        if keep:
            self.durable.room_kept(room).addErrback(
                lambda failure: self.log.failure("could not store room {name}", failure, name=name))
        return room

    def delete_room(self, name: str) -> defer.Deferred[None]:
        """Forget a room, kept or not: its members leave it (told with a ``left`` event, reason ``deleted``, under
        the room protocol), its record and history are deleted from the store. Its seq counter survives, so seqs
        are never reused."""
        room = self.registry.get(name)
        for member in room.clients.snapshot() if room is not None else ():
            told = self.room_protocol is not None and isinstance(member, Client) and member.open
            if self.remove_from_room(member, name) and told:
                self._reply(member, {**messages.left(name), "reason": "deleted"})
        self.registry.discard_room(name)
        return self.durable.room_deleted(name)

    def remove_from_room(self, client: Any, name: str) -> bool:
        """Take ``client`` (or any member an application put in the room) out of room ``name`` at the server's
        initiative, with the bookkeeping of a leave (``_member_removed``); False if it was not a member."""
        return self.registry.leave(client, name)

    def history(
        self, room: str, since: int | None = None, limit: int = 100, before: int | None = None
    ) -> defer.Deferred[History]:
        """A page of ``room``'s chat history (events exactly as broadcast, oldest first): the first ``limit``
        after ``since``, or the latest ``limit`` (before ``before``, if given)."""
        return defer.ensureDeferred(self.durable.history(room, since, limit, before))

    def _member_added(self, room: Room, member: Any) -> None:
        self.relay.member_added(room)
        self._events.emit("join", member, room.name)

    def _member_removed(self, room: Room, member: Any) -> None:
        self.relay.member_removed(room)
        if self.room_protocol is not None and isinstance(member, Client) and self._clients.get(member.id) is member:
            # Out of the room while connected, whoever took it out (its own leave, ``remove_from_room``, an
            # application's ``room.clients.discard``): the presence and subscription bookkeeping of a leave
            # (``RoomProtocol.removed``; done once: a leave's own bookkeeping then finds nothing left). A closed
            # connection's is ``RoomProtocol.disconnected``'s, which may hold its presence for a resume.
            self._execute(member, self.room_protocol.removed(member, room.name))
        self._events.emit("leave", member, room.name)

    def get_room(self, name: str) -> Room | None:
        return self.registry.get(name)

    @property
    def clients(self) -> dict[str, Client]:
        """Open clients by id (a copy)."""
        return dict(self._clients)

    def get_client(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    def broadcast(self, room: str | Room, message: Any, exclude: Client | Iterable[Client] | None = None) -> int:
        """Send ``message`` to every open member of ``room`` except ``exclude``; returns how many got it.

        The message is serialized once (bytes: binary frame; str: text as-is; anything else: JSON) and framed
        once, whatever the number of members.
        """
        room_obj = self.registry.get(room) if isinstance(room, str) else room
        if room_obj is None or not room_obj.clients:
            return 0
        payload, is_binary = serialize(message)
        return self._fan_out(room_obj, payload, is_binary, exclude)

    def get_stats(self) -> ServerStats:
        """This node's counters (in a cluster too: see ``get_cluster_stats`` for every node)."""
        return self.counters.snapshot(rooms=len(self.registry))

    def get_cluster_stats(self) -> ClusterStats:
        """Connections, rooms and messages over every live node of the cluster, with each node's own figures.

        With the Redis broker, the view every node reads at its heartbeat (every 2 s; ``as_of`` says when);
        with the memory broker, this node alone (``clustered=False``), read now. docs/cluster.md.
        """
        return self.relay.cluster_stats()

    def start(self) -> defer.Deferred[WebSocketServer]:
        """Start listening; the Deferred fires with the server once the port is bound (``server.port`` set)."""
        return defer.ensureDeferred(self._start())

    def stop(self) -> defer.Deferred[None]:
        """Stop accepting, drain the clients (reconnect hint, then 1001, in batches of ``drain_batch`` every
        ``drain_interval`` seconds) and fire once every connection is gone."""
        return defer.ensureDeferred(self._stop())

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _http_pages(self) -> dict[bytes, Any] | None:
        """The HTTP pages beside the WebSocket path (dashboard, metrics, health, admin), unless switched off."""
        if not self.options.http_pages:
            return None
        from .http import install

        return install(self)

    def _endpoint(self) -> Any:
        """A TCP port listens through roomserver/listening.py (its backlog, ``reuse_port``, the accept rate);
        any other endpoint description (``ssl:``, ``unix:``, ``systemd:``...) is Twisted's own."""
        options = self.options
        try:
            address = tcp_address(options.port, options.host)
        except ValueError:
            return endpoints.serverFromString(self.reactor, str(options.port))
        return PacedEndpoint(self.reactor, address.port, address.interface,
                             backlog=address.backlog or options.backlog, reuse_port=options.reuse_port,
                             pacer=self.accept_pacer)

    async def _start(self) -> WebSocketServer:
        if self._listening is not None:
            raise RuntimeError("the server is already started")
        self._stopping = False
        if self.options.raise_fd_limit:
            soft, hard = raise_open_files_limit()
            if self.options.max_clients + 64 > soft:
                self.log.warn(
                    "max_clients {max_clients} is close to the open-files limit {soft} (hard limit {hard})",
                    max_clients=self.options.max_clients, soft=soft, hard=hard,
                )
        await self.durable.start()
        try:
            await self.relay.start()
        except BaseException:
            await self.durable.stop()
            raise
        if self.cluster_presence is not None:
            self.cluster_presence.start()
        if self.cluster_sessions is not None:
            self.cluster_sessions.start()
            self.cluster_sessions.broker.on_node_message = self._node_notice
            self.cluster_sessions.broker.sessions_report = self.cluster_sessions.stats
        try:
            self._listening = await self._endpoint().listen(self.connections)
        except BaseException:
            if self.cluster_presence is not None:
                await self.cluster_presence.stop()
            await self.relay.stop()
            await self.durable.stop()
            raise
        host = self._listening.getHost()
        self.port = getattr(host, "port", None)
        self.log.info("roomserver listening on {host} path {path}", host=host, path=self.options.path)
        self.observers.started(self)
        return self

    @property
    def draining(self) -> bool:
        """``stop()`` began: new upgrades are refused (503), ``/healthz`` says ``draining``."""
        return self._stopping

    async def _stop(self) -> None:
        self._stopping = True
        self.observers.stopping(self)
        if self.options.reuse_port or not self._clients:
            # Processes sharing the port (--workers): the kernel sends new connections to the others only once
            # this one stops listening. Otherwise the port stays open during the drain, for /healthz to say
            # "draining" and for new upgrades to get a 503 a load balancer retries elsewhere.
            await self._stop_listening()
        drainer: Drainer[Client] = Drainer(self.reactor, self.options.drain_plan)
        await drainer.run(list(self._clients.values()), self._drain_hint, self._drain_close)
        await self._stop_listening()
        for client in list(self._clients.values()):  # opened during the drain: their handshake was under way
            if client not in self._drained:
                self._drain_hint(client, 0)
                self._drain_close(client, 0)
        self.connections.each_connection(self._close_if_not_websocket)
        everything_closed = self.connections.when_empty()
        if not everything_closed.called:
            deadline = self.reactor.callLater(  # type: ignore[attr-defined]
                self.options.shutdown_timeout, self._abort_everything
            )
            await everything_closed
            if deadline.active():
                deadline.cancel()
        await self._await_handover()
        if self.cluster_presence is not None:
            await self.cluster_presence.stop()
        if self.cluster_sessions is not None:
            self.cluster_sessions.stop()
            self.cluster_sessions.broker.on_node_message = None
        await self.relay.stop()
        await self.durable.stop()
        self.log.info("roomserver stopped")

    async def _await_handover(self) -> None:
        """Wait for the other nodes to continue the sessions this node recorded and still holds presence for:
        the drained clients resuming elsewhere (``draining.Handover``: while they keep coming, until none came for
        ``drain_handover`` seconds, at most ``HANDOVER_CAP`` times that). Each ``taken`` notice releases a
        session's presence here (``_node_notice``); once none is held the node leaves the cluster's presence at
        once (``ClusterPresence.stop``), instead of listing those users with a second connection until the
        reaper removes its entries, ``presence_ttl`` after its last heartbeat. Sessions nobody continued within
        the wait are left to the reaper as before: their users may still come back."""
        if self.cluster_sessions is None or self.room_protocol is None or self.options.drain_handover <= 0:
            return
        pending = self.room_protocol.sessions.shared_holders()
        if not pending or not self.cluster_sessions.link.connected:
            return  # nothing held, or no notice can come
        idle = self.options.drain_handover
        self._handover = handover = Handover(self.reactor, pending, idle, idle * HANDOVER_CAP)
        try:
            complete = await handover.wait()
        finally:
            self._handover = None
        left = len(handover.pending)
        self.log.info("{taken} of {waiting} held sessions continued on other nodes{rest}",
                      taken=handover.waiting - left, waiting=handover.waiting,
                      rest="" if complete else f"; {left} left to the presence reaper")

    def _handed_over(self, token: str) -> None:
        """Session ``token`` no longer holds presence here (taken elsewhere, or never recorded): one fewer for
        ``_await_handover`` to wait for."""
        if self._handover is not None:
            self._handover.taken(token)

    async def _stop_listening(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await defer.maybeDeferred(listening.stopListening)

    def _drain_hint(self, client: Client, after_ms: int) -> None:
        """Tell the client to reconnect (room protocol: a ``reconnect`` message) and, from now on, refuse its
        chats with ``unavailable``: it will send them again on the node it resumes on."""
        if client._protocol is None:
            return  # gone already
        self._drained.add(client)
        if self.room_protocol is not None:
            self._reply(client, messages.reconnect(after_ms))

    def _drain_close(self, client: Client, after_ms: int) -> None:
        """Close with 1001 once the client's chats in flight to the store are answered (bounded by the close
        handshake timeout: a store that hangs must not hold the shutdown)."""
        reason = f"server shutdown; reconnect after {after_ms} ms"
        settled = self.durable.settled(client)
        if settled.called:
            client.close(CloseCode.GOING_AWAY, reason)
            return
        settled.addTimeout(self.options.close_handshake_timeout, self.reactor)  # > 0 (ServerOptions)
        settled.addBoth(lambda _: client.close(CloseCode.GOING_AWAY, reason))

    def _refuse_while_draining(self, client: Client, effect: Append) -> None:
        event = messages.error(ErrorCode.UNAVAILABLE, "this node is shutting down: the message was not stored; "
                               "send it again (same msg_id) after reconnecting", effect.request_id, room=effect.room)
        if effect.msg_id is not None:
            event["msg_id"] = effect.msg_id
        self._reply(client, event)

    @staticmethod
    def _close_if_not_websocket(wrapper: Any) -> None:
        if not isinstance(wrapper.wrappedProtocol, RoomServerProtocol):
            wrapper.transport.loseConnection()

    def _abort_everything(self) -> None:
        self.connections.each_connection(lambda wrapper: wrapper.transport.abortConnection())  # type: ignore[union-attr]

    # -- called by the adapter (RoomServerProtocol) ----------------------------------------------------------------

    def on_connect(self, protocol: RoomServerProtocol, request: Any) -> Any:
        """Admit the connection, pick its subprotocol and authenticate it; returns the subprotocol (or a
        Deferred of it, while an application hook authenticates)."""
        try:
            self._admit(protocol, request)
            subprotocol = self._negotiate(request)
            identity = self.access.handshake(request)
        except ConnectionDeny as deny:
            protocol.refused_status = deny.code  # for the observers' handshake-failure reason
            raise
        protocol.subprotocol = subprotocol
        if isinstance(identity, defer.Deferred):
            def authenticated(proven: Any) -> str | None:
                if protocol.state == protocol.STATE_CLOSED:
                    # The peer left while the hook was deciding: its close has been handled (and its admission
                    # released). Succeeding now would open a client on a dead connection, never closed again.
                    raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "the connection closed meanwhile")
                if self._stopping:
                    # stop() began while the hook was deciding: the drain may have passed already, and a client
                    # opened now would get a welcome from a stopping server and never its hint to move on.
                    raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "server shutting down")
                protocol.identity = proven
                return subprotocol

            return identity.addCallback(authenticated)
        protocol.identity = identity
        return subprotocol

    def _negotiate(self, request: Any) -> str | None:
        offered = list(request.protocols or ())
        if not offered:
            return None
        chosen = self.codecs.negotiate(offered)
        if chosen is None:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "no supported subprotocol; this server speaks "
                                 + ", ".join(self.codecs.names()))
        return chosen

    def _admit(self, protocol: RoomServerProtocol, request: Any) -> None:
        if self._stopping:
            raise ConnectionDeny(503, "server shutting down")
        if request.path.rstrip("/") != self.options.path.rstrip("/"):
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "no WebSocket endpoint at this path")
        address = self.addresses.client_address(_peer_host(protocol), request.headers.get("x-forwarded-for"))
        protocol.client_address = address
        if self.connect_limit is not None and not self.connect_limit.allow(address, self.steady_seconds()):
            self.counters.dropped("connect_rate")
            raise ConnectionDeny(429, "too many connections from this address; retry later")
        if not self.origins.allows(request.headers.get("origin"), request.headers.get("host")):
            self.counters.dropped("origin_refused")
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        if self._admitted >= self.options.max_clients:
            self.counters.dropped("server_full")
            raise ConnectionDeny(503, "server full")
        self._admitted += 1
        protocol.admitted = True
        protocol.http_request = request

    def on_open(self, protocol: RoomServerProtocol) -> None:
        client = Client(protocol, self, getattr(protocol, "http_request", None))
        protocol.client = client
        self._clients[client.id] = client
        self.counters.connected()
        if self.options.rate_limit > 0:
            protocol.flood = FloodGuard(
                self.options.rate_limit, self.options.rate_burst, self.options.flood_factor, self.steady_seconds()
            )
        if self.options.error_limit > 0:
            client.error_budget = ErrorBudget(self.options.error_limit, self.options.error_window)
        if isinstance(protocol.transport, GuardedConnection):
            protocol.transport.watch_send_buffer(
                self.options.max_send_buffer, lambda: self._drop_slow_consumer(protocol),
                socket_buffer=self.options.socket_send_buffer,
            )
        self.observers.connection_opened(client)
        if self.access.enabled:
            self.access.opened(client)
            if client.identity is None:
                return  # the session starts once an auth message proves who this is
        self._start_session(client)

    def _start_session(self, client: Client) -> None:
        if self.room_protocol is not None:
            self._execute(client, self.room_protocol.welcome(client))
        self._events.emit("connection", client)

    def on_message(self, protocol: RoomServerProtocol, payload: bytes, is_binary: bool) -> None:
        client = protocol.client
        if client is None or not protocol.accepts_data:
            return  # closing: messages still in flight from the peer are not acted upon
        self.counters.received(len(payload))
        flood = protocol.flood
        if flood is not None:
            verdict = flood.check(self.steady_seconds())
            if verdict is not Verdict.ALLOW:
                self._rate_limited(protocol, client, verdict)
                return
        if client.inbox is not None:  # an authorization decision is pending: wait behind it, in order
            self.access.enqueue(client, payload, is_binary)
            return
        self._process(client, payload, is_binary)

    def _process(self, client: Client, payload: bytes, is_binary: bool) -> None:
        """Decode, let access control see it, and handle one message (rate limit and ordering already checked;
        ``AccessControl`` also calls this for the messages that waited behind an authorization decision)."""
        request: Any = payload
        try:
            if client.codec is not self.json_codec:
                if is_binary != client.codec.binary:
                    kind = "binary" if client.codec.binary else "text"
                    self._reply(client, messages.error(ErrorCode.UNSUPPORTED, f"this subprotocol uses {kind} frames"))
                    return
                try:
                    request = client.codec.decode(payload)
                except RoomServerError as exc:
                    self._reply(client, messages.error(exc.code, exc.message))
                    return
                if not isinstance(request, dict):
                    self._reply(client, messages.error(ErrorCode.INVALID_MESSAGE, "a message must be a map"))
                    return
                is_binary = False
            if self.access.enabled and self.access.handle_auth_message(client, request):
                return
            if self.room_protocol is not None and self._handle_request(client, self.room_protocol, request,
                                                                       payload, is_binary):
                return
        except Exception:
            self._internal_error(client)
            return
        self._emit_message(client, payload, is_binary)

    def _emit_message(self, client: Client, payload: bytes, is_binary: bool) -> None:
        """The client's ``message`` event, for a message the server accepted (handled or not by the room
        protocol; never one access control refused)."""
        if client._events.has("message"):
            client._events.emit("message", payload if is_binary or client.codec.binary else payload.decode("utf-8"))

    def _handle_request(self, client: Client, protocol: RoomProtocol, request: Any, payload: bytes,
                        is_binary: bool) -> bool:
        """Parse a room-protocol request once and act on it; True if access control held it back (refused, or
        waiting for the application's ``authorize`` hook, which sees the parsed command first and lets it go on
        to the room protocol, now or once it answered: then the ``message`` event fires here, in order)."""
        command = protocol.parse(request, is_binary)
        if isinstance(command, Reply):
            self._execute(client, [command])
            return False
        if self.access.authorize is None:
            self._execute(client, protocol.handle_command(client, command))
            return False

        def proceed(later: bool) -> None:
            self._execute(client, protocol.handle_command(client, command))
            if later:
                self._emit_message(client, payload, is_binary)

        return self.access.authorize_command(client, command, proceed)

    def _internal_error(self, client: Client) -> None:
        """A bug of ours, never the client's input: log it, tell the client nothing but 1011."""
        self.log.failure("internal error while handling a message from {id}", id=client.id)
        self.counters.dropped("internal_error")
        client.close(CloseCode.INTERNAL_ERROR, "internal error")

    def on_close(self, protocol: RoomServerProtocol, was_clean: bool, code: int | None, reason: str | None) -> None:
        if protocol.admitted:
            protocol.admitted = False
            self._admitted -= 1
        client = protocol.client
        if client is None:
            self.observers.handshake_failed(protocol)
            return
        protocol.client = None
        self._clients.pop(client.id, None)
        self._drained.discard(client)
        self.counters.disconnected()
        rooms = self.registry.remove_member(client)
        self.access.closed(client)
        client.inbox = None
        self.durable.forget(client)
        if self.room_protocol is not None:
            # Lost rather than closed on purpose (no clean 1000/1001 from the peer): the client will probably
            # resume, so its user's presence is held for the resume ttl (core/session.py).
            deliberate = was_clean and code in (1000, 1001) and not getattr(protocol, "closedByMe", False)
            self._execute(client, self.room_protocol.disconnected(client, rooms, deliberate))

        client.close_code, client.close_reason = closing_code(protocol, code, reason)
        client._detach()
        self.observers.connection_closed(client, was_clean)
        client._events.emit("close")
        client._events.clear()

    def _rate_limited(self, protocol: RoomServerProtocol, client: Client, verdict: Verdict) -> None:
        self.counters.error(ErrorCode.RATE_LIMITED)
        if verdict is Verdict.CLOSE:
            self.counters.dropped("flood")
            self.log.info("closing {id}: it keeps sending far over the rate limit", id=client.id)
            protocol.close_with(CloseCode.POLICY_VIOLATION, "message rate limit exceeded")
        else:
            self.send_payload(client, RATE_LIMITED, False)

    def _drop_slow_consumer(self, protocol: RoomServerProtocol) -> None:
        """The client stopped reading and its queue passed ``max_send_buffer``: close it (4008, reconnect-class);
        if it does not answer the close either, Autobahn aborts the TCP connection after the close timeout."""
        self.counters.dropped("slow_consumer")
        client = protocol.client
        self.log.info("closing slow consumer {id}", id=client.id if client else protocol.peer)
        protocol.close_with(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume")

    # -- sending -------------------------------------------------------------------------------------------------

    def send_payload(self, client: Client, payload: bytes, is_binary: bool, encoded: bool = False) -> bool:
        """Send one message; JSON text is re-encoded for clients of another codec (unless ``encoded``)."""
        protocol = client._protocol
        if protocol is None or not protocol.accepts_data:
            return False
        if not (is_binary or encoded) and client.codec is not self.json_codec:
            payload, is_binary = recoded(client.codec, payload), client.codec.binary
        protocol.sendMessage(payload, is_binary)
        self.counters.sent(len(payload))
        return True

    def _fan_out(
        self,
        room: Room,
        payload: bytes,
        is_binary: bool,
        exclude: Client | Iterable[Client] | None = None,
        seq: int | None = None,
    ) -> int:
        if exclude is None:
            excluded: frozenset[Any] | tuple[Any, ...] = ()
        elif isinstance(exclude, Client):
            excluded = (exclude,)
        else:
            excluded = frozenset(exclude)
        started = perf_counter()
        wanted = self.room_protocol.subscriptions.get(room.name) if self.room_protocol is not None else None
        kind = _message_type(payload, is_binary) if wanted else None
        replaying = self.durable.replaying.get(room.name)
        if replaying:
            # Members still receiving a history replay get live messages after it (durable.py explains why).
            self.durable.hold_back(room, replaying, excluded, seq, payload, is_binary, wanted, kind)
            excluded = frozenset(excluded) | replaying.keys()
        if seq is not None and room.name in self.durable.floors:
            excluded = frozenset(excluded) | self.durable.ahead_of(room.name, seq)
        prepared = self.factory.prepareMessage(payload, is_binary)
        # Other codecs' framings of this message, made once each, on demand: [framing, its size, recipients].
        per_codec: dict[Any, list[Any]] = {}
        sent = 0
        for member in room.clients.snapshot():
            if member in excluded or not isinstance(member, Client):
                continue
            protocol = member._protocol
            if protocol is None or protocol.state != STATE_OPEN:
                continue
            if wanted and member in wanted and not wanted[member].wants(kind):
                continue
            codec = member.codec
            if codec is not self.json_codec and not is_binary:
                framed = per_codec.get(codec)
                if framed is None:
                    other = recoded(codec, payload)
                    framed = per_codec[codec] = [self.factory.prepareMessage(other, codec.binary), len(other), 0]
                send_prepared(protocol, framed[0])
                framed[2] += 1
            else:
                send_prepared(protocol, prepared)
            sent += 1
        recoded_to = 0
        for _, size, recipients in per_codec.values():  # bytes_sent counts what each member was sent
            self.counters.sent(size, recipients)
            recoded_to += recipients
        self.counters.sent(len(payload), sent - recoded_to)
        self.observers.broadcast_done(room, sent, perf_counter() - started)
        return sent

    def _reply(self, client: Client, event: dict[str, Any], blame: bool = True) -> None:
        """Send ``event`` to ``client``; an error whose code is the client's fault spends its error budget, unless
        ``blame`` is False (an error the client's requests could not avoid, such as a join overtaken by its own
        leave)."""
        over_budget = False
        if event.get("type") == "error":
            self.counters.error(event["code"])
            budget = client.error_budget
            if blame and budget is not None and event["code"] in CLIENT_FAULTS:
                over_budget = not budget.spend(self.steady_seconds())
        if client.codec is self.json_codec:
            self.send_payload(client, encode(event), False)
        else:
            self.send_payload(client, client.codec.encode(event), client.codec.binary, encoded=True)
        if over_budget:
            self.counters.dropped("too_many_errors")
            client.close(CloseCode.POLICY_VIOLATION, "too many errors")

    def _announce(self, effect: Announce) -> None:
        """Send a presence event to the room's presence subscribers, encoded once per codec.

        In a cluster the node-level events the core returns are not the room's: the cluster presence decides
        (and announces) them instead."""
        if self.cluster_presence is not None:
            return
        encoded: dict[Any, bytes] = {}
        for subscriber in self.presence_tracker.subscribers(effect.room):
            if subscriber is effect.exclude or not isinstance(subscriber, Client):
                continue
            codec = subscriber.codec
            if codec not in encoded:
                encoded[codec] = codec.encode(effect.event)
            self.send_payload(subscriber, encoded[codec], codec.binary, encoded=True)

    def _reply_when_ready(self, client: Client, event: dict[str, Any]) -> bool:
        """Hold a reply that needs more than the core knows, and send it once that is known: a ``joined`` of a
        room whose baseline this node is still reading (``Relay.baseline_known``), or a ``joined``/``presence``
        that lists the members of every node (one Redis read). A held ``joined`` holds the room's live messages
        to the joiner until it is sent, so it still comes first. False: nothing to wait for, send it now."""
        joined = event.get("type") == "joined"
        baseline = self.relay.baseline_known(event["room"]) if joined else None
        cluster = self.cluster_presence if "members" in event else None
        if baseline is None and cluster is None:
            return False
        ready: defer.Deferred[Any] = baseline if baseline is not None else defer.succeed(None)
        if cluster is not None:
            ready.addCallback(lambda _: cluster.members(event["room"]))
            ready.addCallback(lambda listed: {**event, "members": listed})
        else:
            ready.addCallback(lambda _: event)
        if joined:
            self.durable.hold_reply(client, event["room"], event.get("id"), ready)
        else:
            ready.addCallback(lambda reply: self._reply(client, reply) if client.open else None).addErrback(
                lambda failure: self.durable.outages.failed("could not answer a presence request in room {room}",
                                                            failure, room=event["room"]))
        return True

    def _execute(self, client: Client, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Reply):
                if not self._reply_when_ready(client, effect.event):
                    self._reply(client, effect.event)
            elif isinstance(effect, Append):
                if client in self._drained:
                    self._refuse_while_draining(client, effect)
                else:
                    self.durable.append(client, effect)
            elif isinstance(effect, Replay):
                self.durable.replay(client, effect)
            elif isinstance(effect, ReadHistory):
                self.durable.read_history(client, effect)
            elif isinstance(effect, TakeOver):
                self.durable.take_over(client, effect)
            elif isinstance(effect, Announce):
                self._announce(effect)
            elif isinstance(effect, ShareSession):
                self._share_session(effect)
            elif isinstance(effect, ClaimSession):
                self._claim_session(client, effect)
            elif isinstance(effect, SessionTaken) and self.cluster_sessions is not None:
                self.cluster_sessions.tell_taken(effect.node, effect.token)

    # -- resume sessions shared by the nodes of a cluster (roomserver/broker/sessions.py) -------------------------

    def _share_session(self, effect: ShareSession) -> None:
        if self.cluster_sessions is None:
            return
        protocol = self.room_protocol

        def unshared(_: Any) -> None:
            if protocol is not None:
                protocol.session_unshared(effect.token)
            self._handed_over(effect.token)  # no other node can continue it

        self.cluster_sessions.share(effect).addErrback(unshared)

    def _claim_session(self, client: Client, effect: ClaimSession) -> None:
        """Ask Redis for the session, holding the client's later messages (in order) until it answered."""
        protocol = self.room_protocol
        if self.cluster_sessions is None or protocol is None:
            return
        client.claiming = True
        if client.inbox is None:
            client.inbox = deque()

        def answer(record: dict[str, Any] | None, failed: bool) -> None:
            client.claiming = False
            if not client.open:
                return  # closed meanwhile: nothing to resume (the hub dropped its inbox)
            try:
                self._execute(client, protocol.claimed(client, effect.command, record, failed))
            except Exception:
                self._internal_error(client)
                return
            self.access._drain_inbox(client)

        claim = self.cluster_sessions.claim(effect.token, effect.user)
        claim.addCallbacks(answer, lambda _: answer(None, True), callbackArgs=(False,))
        claim.addErrback(lambda failure: self.log.failure("could not answer a resume", failure))

    def _node_notice(self, data: bytes) -> None:
        """A notice on this node's channel: a session it recorded was continued on another node."""
        if self.cluster_sessions is None or self.room_protocol is None:
            return
        token = self.cluster_sessions.parse_notice(data)
        if token is not None:
            for effect in self.room_protocol.taken_elsewhere(token):
                if isinstance(effect, Announce):
                    self._announce(effect)
            self._handed_over(token)
