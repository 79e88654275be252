"""``WebSocketServer``: the seed API, and the hub between the Autobahn adapter and the pure core.

The hub's job is small and on the hot path: admit or refuse connections, hand each message to the room protocol
(if switched on) and the application's handlers, carry out the effects the core returns, and fan messages out.
A broadcast encodes its message once and frames it once (``prepareMessage``); each member then costs one write.

Cleanup is driven by Autobahn's ``onClose``, which fires exactly once per connection, opened or not: the client
leaves every room (empty rooms are removed), the registry forgets it and its handlers are dropped, so nothing
keeps a closed connection alive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from .client import Client, serialize
from .core import messages
from .core.errors import CloseCode, ErrorCode
from .core.messages import encode
from .core.origins import OriginPolicy
from .core.ratelimit import FloodGuard, Verdict
from .core.rooms import Room, RoomRegistry
from .core.session import Append, Effect, ReadHistory, Replay, Reply, RoomProtocol, TakeOver
from .core.sessions import SessionTable
from .core.stats import ServerStats, StatsCounters
from .durable import DurableRooms, History
from .events import EventEmitter
from .observe import ConnectionLog, Observers
from .options import ServerOptions
from .system import raise_open_files_limit
from .testee import as_testee, install_echo
from .transport import GuardedConnection
from .web import QuietSite, TrackingFactory, build_root
from .websocket import RoomServerFactory, RoomServerProtocol

SERVER_EVENTS = frozenset({"connection"})
RATE_LIMITED = encode(messages.error(ErrorCode.RATE_LIMITED, "too many messages: this one was dropped"))


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
        self.registry = RoomRegistry(
            max_rooms=self.options.max_rooms,
            max_room_clients=self.options.max_room_clients,
            max_rooms_per_client=self.options.max_rooms_per_client,
            on_removed=lambda room: self.durable.store.room_idle(room.name),
        )
        self.counters = StatsCounters()
        self.room_protocol: RoomProtocol | None = None
        if self.options.room_protocol:
            self.use_room_protocol()
        self._events = EventEmitter(SERVER_EVENTS)
        self.durable = DurableRooms(self)
        if self.options.testee:
            install_echo(self)
        self._clients: dict[str, Client] = {}
        self._admitted = 0
        self._stopping = False
        self._listening: Any = None  # IListeningPort once started
        self.observers = Observers()
        self.observers.add(ConnectionLog(self.reactor))
        self.factory = RoomServerFactory(self, self.options)
        self.origins = OriginPolicy(self.options.allowed_origins)
        self.site = QuietSite(
            build_root(self.options.path, WebSocketResource(self.factory), self._http_pages()),
            handshake_timeout=self.options.open_handshake_timeout,
            max_handshake_size=self.options.max_handshake_size,
            on_handshake_timeout=lambda: self.counters.dropped("handshake_timeout"),
            reactor=reactor,
        )
        self.connections = TrackingFactory(self.site)
        self.port: int | None = self.options.port if isinstance(self.options.port, int) else None

    # -- the seed API --------------------------------------------------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register a server event handler (``connection`` gets the new ``Client``); usable as a decorator."""
        return self._events.on(event, handler) if handler is not None else self._events.on(event)

    def use_room_protocol(self) -> WebSocketServer:
        """Serve the built-in JSON room protocol (welcome, join, leave, chat; docs/protocol.md)."""
        if self.room_protocol is None:
            sessions = SessionTable(self.options.resume_ttl)
            self.room_protocol = RoomProtocol(self.registry, sessions, clock=self.reactor.seconds)  # type: ignore[attr-defined]
        return self

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
        """Forget a room, kept or not: its members leave it, its record and history are deleted from the store.
        Its seq counter survives, so seqs are never reused."""
        self.registry.discard_room(name)
        return self.durable.room_deleted(name)

    def history(
        self, room: str, since: int | None = None, limit: int = 100, before: int | None = None
    ) -> defer.Deferred[History]:
        """A page of ``room``'s chat history (events exactly as broadcast, oldest first): the first ``limit``
        after ``since``, or the latest ``limit`` (before ``before``, if given)."""
        return defer.ensureDeferred(self.durable.history(room, since, limit, before))

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
        return self.counters.snapshot(rooms=len(self.registry))

    def start(self) -> defer.Deferred[WebSocketServer]:
        """Start listening; the Deferred fires with the server once the port is bound (``server.port`` set)."""
        return defer.ensureDeferred(self._start())

    def stop(self) -> defer.Deferred[None]:
        """Stop accepting, close every client with 1001 and fire once every connection is gone."""
        return defer.ensureDeferred(self._stop())

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _http_pages(self) -> dict[bytes, Any] | None:
        """The HTTP pages beside the WebSocket path (dashboard, metrics, health, admin), unless switched off."""
        if not self.options.http_pages:
            return None
        from .http import install

        return install(self)

    def _endpoint(self) -> Any:
        port = self.options.port
        if isinstance(port, int):
            return endpoints.TCP4ServerEndpoint(self.reactor, port, interface=self.options.host)
        if isinstance(port, str) and port.isdigit():
            return endpoints.TCP4ServerEndpoint(self.reactor, int(port), interface=self.options.host)
        return endpoints.serverFromString(self.reactor, port)

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
            self._listening = await self._endpoint().listen(self.connections)
        except BaseException:
            await self.durable.stop()
            raise
        host = self._listening.getHost()
        self.port = getattr(host, "port", None)
        self.log.info("roomserver listening on {host} path {path}", host=host, path=self.options.path)
        self.observers.started(self)
        return self

    async def _stop(self) -> None:
        self._stopping = True
        self.observers.stopping(self)
        listening, self._listening = self._listening, None
        if listening is not None:
            await defer.maybeDeferred(listening.stopListening)
        for client in list(self._clients.values()):
            client.close(CloseCode.GOING_AWAY, "server shutdown")
        self.connections.each_connection(self._close_if_not_websocket)
        everything_closed = self.connections.when_empty()
        if not everything_closed.called:
            deadline = self.reactor.callLater(  # type: ignore[attr-defined]
                self.options.shutdown_timeout, self._abort_everything
            )
            await everything_closed
            if deadline.active():
                deadline.cancel()
        await self.durable.stop()
        self.log.info("roomserver stopped")

    @staticmethod
    def _close_if_not_websocket(wrapper: Any) -> None:
        if not isinstance(wrapper.wrappedProtocol, RoomServerProtocol):
            wrapper.transport.loseConnection()

    def _abort_everything(self) -> None:
        self.connections.each_connection(lambda wrapper: wrapper.transport.abortConnection())  # type: ignore[union-attr]

    # -- called by the adapter (RoomServerProtocol) ----------------------------------------------------------------

    def on_connect(self, protocol: RoomServerProtocol, request: Any) -> None:
        try:
            self._admit(protocol, request)
        except ConnectionDeny as deny:
            protocol.refused_status = deny.code  # for the observers' handshake-failure reason
            raise

    def _admit(self, protocol: RoomServerProtocol, request: Any) -> None:
        if self._stopping:
            raise ConnectionDeny(503, "server shutting down")
        if request.path.rstrip("/") != self.options.path.rstrip("/"):
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "no WebSocket endpoint at this path")
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
                self.options.rate_limit, self.options.rate_burst, self.options.flood_factor, self.reactor.seconds()
            )
        if isinstance(protocol.transport, GuardedConnection):
            protocol.transport.watch_send_buffer(
                self.options.max_send_buffer, lambda: self._drop_slow_consumer(protocol)
            )
        self.observers.connection_opened(client)
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
            verdict = flood.check(self.reactor.seconds())
            if verdict is not Verdict.ALLOW:
                self._rate_limited(protocol, client, verdict)
                return
        try:
            if self.room_protocol is not None:
                self._execute(client, self.room_protocol.handle(client, payload, is_binary))
        except Exception:
            # A bug of ours, never the client's input: log it, tell the client nothing but 1011.
            self.log.failure("internal error while handling a message from {id}", id=client.id)
            self.counters.dropped("internal_error")
            client.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if client._events.has("message"):
            client._events.emit("message", payload if is_binary else payload.decode("utf-8"))

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
        self.counters.disconnected()
        self.registry.remove_member(client)
        self.durable.forget(client)
        if self.room_protocol is not None:
            self.room_protocol.disconnected(client)
        client.close_code = code
        client.close_reason = reason
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

    def send_payload(self, client: Client, payload: bytes, is_binary: bool) -> bool:
        protocol = client._protocol
        if protocol is None or not protocol.accepts_data:
            return False
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
        replaying = self.durable.replaying.get(room.name)
        if replaying:
            # Members still receiving a history replay get live messages after it (durable.py explains why).
            for member, state in replaying.items():
                if member in room.clients and member not in excluded:
                    state.pending.append((seq, payload, is_binary))
            excluded = frozenset(excluded) | replaying.keys()
        prepared = self.factory.prepareMessage(payload, is_binary)
        sent = 0
        for member in room.clients.snapshot():
            if member in excluded or not isinstance(member, Client):
                continue
            protocol = member._protocol
            if protocol is None or not protocol.accepts_data:
                continue
            protocol.sendPreparedMessage(prepared)
            sent += 1
        self.counters.sent(len(payload), sent)
        self.observers.broadcast_done(room, sent, perf_counter() - started)
        return sent

    def _reply(self, client: Client, event: dict[str, Any]) -> None:
        if event.get("type") == "error":
            self.counters.error(event["code"])
        self.send_payload(client, encode(event), False)

    def _execute(self, client: Client, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Reply):
                self._reply(client, effect.event)
            elif isinstance(effect, Append):
                self.durable.append(client, effect)
            elif isinstance(effect, Replay):
                self.durable.replay(client, effect)
            elif isinstance(effect, ReadHistory):
                self.durable.read_history(client, effect)
            elif isinstance(effect, TakeOver):
                self.durable.take_over(client, effect)
