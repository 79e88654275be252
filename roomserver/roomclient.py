"""``RoomClient``: the Python client of the room protocol, on Twisted and Autobahn (docs/clients.md).

It is roomserver.js for Python, with Deferreds instead of promises::

    client = RoomClient("ws://127.0.0.1:8080/ws")
    client.on("chat", lambda event: print(event["room"], event["text"], event["seq"]))
    await client.connect()                 # fires once the server's welcome arrived
    await client.join("lobby")             # the "joined" reply
    ack = await client.send("lobby", "hi") # {"type": "ack", "seq": S, ...}
    await client.close()

Requests carry an ``id``; the Deferred fires with the reply carrying the same id, or fails with
``RoomClientError`` (its ``code`` is the wire error code, ``timeout`` or ``disconnected``). A chat is confirmed
by the server's ``ack`` where it sends one, else by the client's own copy of the chat coming back (the server
handles one connection's requests in order, so those echoes come back in the order the chats were sent).

After a drop the client reconnects by itself with exponential backoff and jitter (``core/backoff.py``) unless
the close code says not to (1002, 1003, 1008, 1009, 4500-4999) or ``close()`` was called. A node that shuts
down first sends ``{"type":"reconnect","after_ms":N}`` (docs/protocol.md): the client then holds new chats
(and those the node refuses with ``unavailable``) for the next connection, and reconnects N ms after the close
instead of after its backoff delay, so a drained node's clients come back spread over time. Coming back it resumes:
with a server that gives sessions (its welcome carries ``session``) it sends ``{"type":"resume","session":...,
"rooms":{room: last_seq}}`` and the server replays what was missed; otherwise it joins its rooms again with
``since`` the last seq it saw (a server that replays the gap itself says ``recovered`` in its reply) or asks for
the history after it (servers with history; page after page, holding the room's live chats until the gap is
filled), or starts afresh (``recovered: false``). A room the server cannot
take back for now (``unavailable``: its gap could not be read) is joined again (or its history read again) after a
backoff, a few times at most.
A chat whose seq it has already delivered in a room is never delivered twice.

The reactor is injectable (``reactor=``): timers (backoff, request timeouts) use it, so tests drive them with
``twisted.internet.task.Clock``. ``token=`` (a JWT, or a callable returning one) authenticates with servers that
require it, as an ``Authorization: Bearer`` header of the opening handshake.
"""

from __future__ import annotations

import random as random_module
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from .core.backoff import backoff_delay
from .events import EventEmitter

CLIENT_EVENTS = frozenset({"state", "welcome", "chat", "message", "presence", "resumed", "error", "close"})
TERMINAL_CODES = frozenset({1002, 1003, 1008, 1009})
# Errors that say a room of a join or resume was not (re)joined (they carry its name in "room").
NOT_JOINED = frozenset({"room_full", "too_many_rooms", "forbidden"})
LEAVE_DONE_ANYWAY = frozenset({"not_in_room", "disconnected", "not_connected"})
"""A leave that fails so has left the room all the same: the server holds no membership for this connection (a
closed one's rooms are dropped), and the next connection must not join the room again."""
# Refusals of the opening handshake that retrying cannot fix (a bad token, a forbidden origin, a wrong path).
TERMINAL_HTTP_STATUSES = frozenset({400, 401, 403, 404})
CLOSE_HANDSHAKE_REFUSED = 4400  # what a terminal handshake refusal is reported as (close events, state detail)
_UPGRADE_FAILED = re.compile(r"upgrade failed \[(\d{3})\]")
_RECONNECT_AFTER = re.compile(r"reconnect after (\d+) ms")  # the hint in a draining node's 1001 close reason


def is_terminal(code: int | None) -> bool:
    """Close codes after which reconnecting cannot help (4400 is the client's own: a refused handshake)."""
    return code is not None and (code in TERMINAL_CODES or code == CLOSE_HANDSHAKE_REFUSED or 4500 <= code <= 4999)


class RoomClientError(Exception):
    """A request failed: ``code`` is the server's error code, or ``timeout`` / ``disconnected`` / ``closed``."""

    def __init__(self, code: str, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply


@dataclass
class _CatchUp:
    """A rejoin under way in a room: the room's live chats, held until its gap is filled."""

    held: list[dict[str, Any]] = field(default_factory=list)
    contiguous: bool = True
    """No seq was skipped so far."""
    answered: bool = False
    """A history page came."""
    timer: Any = None
    """The next history read, after one answered ``unavailable``."""


@dataclass
class RoomState:
    """What the client remembers of a joined room across reconnects."""

    last_seq: int = 0
    join_options: dict[str, Any] = field(default_factory=dict)
    catch_up: _CatchUp | None = None
    """While a rejoin fills the room's gap: its live chats wait there (they would move ``last_seq`` past the gap)."""
    leaving: bool = False
    """A ``leave()`` of the room is under way: a rejoin answered ``unavailable`` is not retried."""


@dataclass
class _Pending:
    deferred: defer.Deferred[dict[str, Any]]
    timer: Any
    room: str | None = None
    chat: dict[str, Any] | None = None
    """For a chat: the request itself, so it can be sent again (same ``msg_id``) after a resume."""
    order: int = 0
    """The request id (or, for a chat held back while the node drains, the id it would have had): chats sent
    again go in the order the application sent them."""


class RoomClientProtocol(WebSocketClientProtocol):  # type: ignore[misc]
    """One connection of a ``RoomClient``; it forwards everything to the client."""

    factory: _RoomClientFactory

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Called from Autobahn per complete message."""
        if not isBinary:
            self.factory.client._receive(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Called from Autobahn exactly once per connection; a refused opening handshake is reported with its
        HTTP status in ``wasNotCleanReason``, and a terminal one (401, 403...) becomes code 4400."""
        refused = _UPGRADE_FAILED.search(str(getattr(self, "wasNotCleanReason", "") or ""))
        if refused is not None and int(refused.group(1)) in TERMINAL_HTTP_STATUSES:
            code, reason = CLOSE_HANDSHAKE_REFUSED, f"handshake refused with HTTP {refused.group(1)}"
        self.factory.client._dropped(self, code, reason)


class _RoomClientFactory(WebSocketClientFactory):  # type: ignore[misc]
    protocol = RoomClientProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, client: RoomClient, url: str, reactor: Any) -> None:
        super().__init__(url, reactor=reactor)
        self.client = client
        self.setProtocolOptions(failByDrop=False, openHandshakeTimeout=10, closeHandshakeTimeout=2,
                                autoPingInterval=0, maxMessagePayloadSize=0, maxFramePayloadSize=0)


class RoomClient:
    """A room-protocol client with Deferred-returning requests, reconnect with backoff, and resume."""

    log = Logger()

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        reconnect: bool = True,
        min_delay: float = 0.25,
        max_delay: float = 10.0,
        factor: float = 2.0,
        request_timeout: float = 10.0,
        random: Callable[[], float] = random_module.random,
        token: str | Callable[[], str] | None = None,
        rejoin_attempts: int = 5,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        parsed = urlparse(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.url = url
        self.reactor = reactor
        self.reconnect = reconnect
        self.min_delay, self.max_delay, self.factor = min_delay, max_delay, factor
        self.request_timeout = request_timeout
        self.rejoin_attempts = rejoin_attempts
        """Joins again of a room the server could not take back for now (``unavailable``), before giving it up."""
        self._random = random
        self._token = token
        self.state = "idle"  # idle | connecting | open | reconnecting | closed
        self.id: str | None = None
        self.session: str | None = None
        self.rooms: dict[str, RoomState] = {}
        self.attempt = 0
        self._events = EventEmitter(CLIENT_EVENTS)
        self._factory = _RoomClientFactory(self, url, reactor)
        self._protocol: RoomClientProtocol | None = None
        self._pending: dict[int, _Pending] = {}
        self._echo_queue: dict[str, list[int]] = {}
        self._acks_seen = False
        self._outbox: list[_Pending] = []
        self._next_id = 1
        self._retry: Any = None
        self._connect_waiters: list[defer.Deferred[RoomClient]] = []
        self._close_waiters: list[defer.Deferred[None]] = []
        self._closed_by_user = False
        self._attempt: defer.Deferred[Any] | None = None  # the TCP connection under way, if any
        self._ever_opened = False
        self._draining = False  # the server sent a reconnect hint: this connection is about to close
        self._hinted_delay: float | None = None
        self._resume_id: int | None = None  # the id of this connection's resume request (its errors name a room each)
        self._rejoin_timers: dict[str, Any] = {}  # room -> the call of its next join, after an "unavailable"
        self._closes = 0  # close() calls: one from an event listener ends what the client was doing

    # -- events ----------------------------------------------------------------------------------------------

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register a handler: ``chat``/``message``/``presence``/``resumed``/``error``/``welcome`` get the
        event dict; ``state`` gets (state, detail); ``close`` gets (code, reason)."""
        return self._events.on(event, handler) if handler is not None else self._events.on(event)

    def _set_state(self, state: str, **detail: Any) -> None:
        if self.state != state:
            self.state = state
            self._events.emit("state", state, detail)

    # -- connection ------------------------------------------------------------------------------------------

    def connect(self) -> defer.Deferred[RoomClient]:
        """Connect (and keep reconnecting); fires with the client once the server's welcome arrived."""
        if self.state == "open":
            return defer.succeed(self)
        waiter: defer.Deferred[RoomClient] = defer.Deferred()
        self._connect_waiters.append(waiter)
        if self.state in ("idle", "closed"):
            self._closed_by_user = False
            self._open()
        return waiter

    def close(self) -> defer.Deferred[None]:
        """Close for good (no reconnect); fires once the connection is closed. Whatever still waits (requests,
        chats kept for the next connection, ``connect()``) fails with ``closed``, whenever it is called: while
        open, while a TCP connection or a WebSocket handshake is under way, or between two attempts; also from
        an event listener (the client does not go on with what the event interrupted)."""
        self._closes += 1
        self._closed_by_user = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        attempt, self._attempt = self._attempt, None
        if self._protocol is None:
            if attempt is not None:
                attempt.cancel()  # a TCP connection under way: it must not open after all
            self._set_state("closed", code=1000)
            self._fail_connect_waiters(RoomClientError("closed", "closed by the application"))
            self._fail_pending("closed", "closed by the application")
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(waiter)
        if self._protocol.state == self._protocol.STATE_OPEN:
            self._protocol.sendClose(1000)
        else:  # still in its opening handshake: nothing to close politely
            self._protocol.dropConnection(abort=True)
        return waiter

    def _endpoint(self) -> Any:
        parsed = urlparse(self.url)
        host = parsed.hostname or ""
        secure = parsed.scheme == "wss"
        port = parsed.port or (443 if secure else 80)
        endpoint: Any = endpoints.HostnameEndpoint(self.reactor, host, port)
        if secure:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    def _connect_once(self) -> defer.Deferred[Any]:
        """One TCP connection attempt carrying the WebSocket handshake (overridable for timing tests)."""
        return self._endpoint().connect(self._factory)  # type: ignore[no-any-return]

    def _open(self) -> None:
        closes = self._closes
        self._set_state("reconnecting" if self._ever_opened else "connecting", attempt=self.attempt)
        if self._closes != closes:
            return  # a state listener closed the client: no connection attempt
        token = self._token() if callable(self._token) else self._token
        # Non-browser clients send the token in the handshake (a bad one gets HTTP 401); a callable is asked
        # again at each reconnect, so it can hand out a fresh token.
        self._factory.headers = {"Authorization": f"Bearer {token}"} if token else {}
        attempt = self._attempt = self._connect_once()
        attempt.addCallback(self._connected)
        attempt.addErrback(self._connect_failed)

    def _connected(self, protocol: RoomClientProtocol) -> None:
        self._attempt = None
        self._protocol = protocol

    def _connect_failed(self, failure: Any) -> None:
        self._attempt = None
        if failure.check(defer.CancelledError) and self._closed_by_user:
            return  # close() cancelled it and has said everything
        self._schedule_retry(None)

    def _schedule_retry(self, code: int | None) -> None:
        if self._closed_by_user or not self.reconnect:
            self._set_state("closed", code=code)
            self._fail_connect_waiters(RoomClientError("closed", f"could not connect (code {code})"))
            return
        hinted, self._hinted_delay = self._hinted_delay, None
        if hinted is not None:
            delay = hinted  # the draining node chose when: its clients come back spread over time
        else:
            delay = backoff_delay(self.attempt, self._random, self.min_delay, self.max_delay, self.factor)
        self.attempt += 1
        closes = self._closes
        self._set_state("reconnecting", attempt=self.attempt, delay=delay, code=code, hinted=hinted is not None)
        if self._closes != closes:
            return  # a state listener closed the client: no retry
        self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._open()

    def _dropped(self, protocol: RoomClientProtocol, code: int | None, reason: str | None) -> None:
        if protocol is not self._protocol and self._protocol is not None:
            return
        self._protocol = None
        was_open = self.state == "open"
        self._draining = False
        if code == 1001 and self._hinted_delay is None and reason:
            hint = _RECONNECT_AFTER.search(reason)
            if hint is not None:
                self._hint(int(hint.group(1)))
        terminal = self._closed_by_user or not self.reconnect or is_terminal(code)
        self._stop_catching_up()
        self._fail_pending("disconnected", f"the connection closed (code {code})",
                           keep_chats=not terminal and self.session is not None)
        closes = self._closes
        self._events.emit("close", code, reason)
        if self._closes != closes:
            pass  # a close listener closed the client: close() did the rest, no retry
        elif terminal:
            self._set_state("closed", code=code, reason=reason)
            self._fail_connect_waiters(RoomClientError("closed", f"connection closed (code {code})"))
        else:
            if was_open:
                self.attempt = 0
            self._schedule_retry(code)
        waiters, self._close_waiters = self._close_waiters, []  # last: whoever awaited close() sees it closed
        for waiter in waiters:
            waiter.callback(None)

    def _stop_catching_up(self) -> None:
        """A dropped connection ends every catch-up and pending rejoin: the chats they held are dropped unseen, and
        the rooms keep their last seq, so the next connection's resume (or rejoin) replays them again."""
        timers, self._rejoin_timers = self._rejoin_timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()
        for state in self.rooms.values():
            if state.catch_up is not None and state.catch_up.timer is not None and state.catch_up.timer.active():
                state.catch_up.timer.cancel()
            state.catch_up = None

    def _fail_connect_waiters(self, error: RoomClientError) -> None:
        waiters, self._connect_waiters = self._connect_waiters, []
        for waiter in waiters:
            waiter.errback(error)

    # -- requests --------------------------------------------------------------------------------------------

    def _send_raw(self, message: dict[str, Any]) -> None:
        if self._protocol is None or self.state != "open":
            raise RoomClientError("not_connected", "not connected")
        self._protocol.sendMessage(orjson.dumps(message), False)

    def request(
        self, message: dict[str, Any], room: str | None = None, chat: dict[str, Any] | None = None
    ) -> defer.Deferred[dict[str, Any]]:
        """Send ``message`` with a fresh ``id``; fires with the reply carrying that id."""
        request_id = self._next_id
        self._next_id += 1
        try:
            self._send_raw({**message, "id": request_id})
        except RoomClientError as error:
            return defer.fail(error)
        deferred: defer.Deferred[dict[str, Any]] = defer.Deferred()
        timer = self.reactor.callLater(self.request_timeout, self._timed_out, request_id, message.get("type"))
        self._pending[request_id] = _Pending(deferred, timer, room, chat, request_id)
        return deferred

    def _timed_out(self, request_id: int, kind: Any) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._dequeue_echo(request_id)
            pending.deferred.errback(
                RoomClientError("timeout", f"no reply to {kind} within {self.request_timeout} s"))

    def _settle(self, request_id: Any, reply: dict[str, Any] | None, error: RoomClientError | None = None) -> bool:
        pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
        if pending is None:
            return False
        if pending.timer.active():
            pending.timer.cancel()
        if error is not None or reply is None:
            pending.deferred.errback(error or RoomClientError("internal", "no reply"))
        else:
            pending.deferred.callback(reply)
        return True

    def _fail_pending(self, code: str, message: str, keep_chats: bool = False) -> None:
        """Fail every waiting request; with ``keep_chats``, chats go to the outbox instead, to be sent again
        (same ``msg_id``, so the server stores each once) after the next resume."""
        pending, self._pending = self._pending, {}
        self._echo_queue = {}
        for _, entry in sorted(pending.items()):
            if entry.timer.active():
                entry.timer.cancel()
            if keep_chats and entry.chat is not None:
                self._outbox.append(entry)
            else:
                entry.deferred.errback(RoomClientError(code, message))
        if not keep_chats:
            self._reject_outbox(code, message)

    def _reject_outbox(self, code: str, message: str) -> None:
        outbox, self._outbox = self._outbox, []
        for entry in outbox:
            entry.deferred.errback(RoomClientError(code, message))

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        for entry in sorted(outbox, key=lambda entry: entry.order):
            if entry.chat is not None:
                self._send_chat(entry.chat).chainDeferred(entry.deferred)

    def join(self, room: str, **options: Any) -> defer.Deferred[dict[str, Any]]:
        """Join ``room`` (``options`` such as ``presence=True`` go into the request); fires with ``joined``."""
        def joined(reply: dict[str, Any]) -> dict[str, Any]:
            self.rooms.setdefault(room, RoomState()).join_options = dict(options)
            return reply

        return self.request({"type": "join", "room": room, **options}).addCallback(joined)

    def leave(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Leave ``room``; fires with the ``left`` reply. A room the client is waiting to join again (a resume or
        rejoin answered ``unavailable``: it is not in the room) is forgotten at once, without asking the server,
        and one that a resume or rejoin still in flight did not get back into (the server answers
        ``not_in_room``) is forgotten too, and so is one whose connection is gone (``LEAVE_DONE_ANYWAY``): all
        fire with ``{"type": "left", "room": room}``, and no rejoin of the room follows."""
        state = self.rooms.get(room)
        timer = self._rejoin_timers.pop(room, None) if state is not None else None
        if timer is not None:
            if timer.active():
                timer.cancel()
            self.rooms.pop(room, None)
            return defer.succeed({"type": "left", "room": room})
        if state is not None:
            state.leaving = True  # a rejoin of the room answered "unavailable" meanwhile is not retried

        def left(reply: dict[str, Any]) -> dict[str, Any]:
            self.rooms.pop(room, None)
            return reply

        def refused(failure: Any) -> Any:
            if state is None or not failure.check(RoomClientError):
                return failure
            if failure.value.code in LEAVE_DONE_ANYWAY:
                if self.rooms.get(room) is state:
                    del self.rooms[room]
                return {"type": "left", "room": room}
            state.leaving = False
            return failure

        return self.request({"type": "leave", "room": room}).addCallbacks(left, refused)

    def send(self, room: str, text: str) -> defer.Deferred[dict[str, Any]]:
        """Send a chat; fires with ``{"type": "ack", "seq": S, ...}`` once the server has it.

        Each chat carries a random ``msg_id``: if the connection drops before the ack, the chat is sent again
        after the resume and the server, which remembers msg_ids, stores and broadcasts it only once."""
        return self._send_chat({"type": "chat", "room": room, "text": text, "msg_id": secrets.token_hex(12)})

    def _send_chat(self, chat: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        if self._draining:
            # The node asked us to move: keep the chat for the next connection (sent after the resume).
            held: defer.Deferred[dict[str, Any]] = defer.Deferred()
            self._outbox.append(_Pending(held, None, chat["room"], chat, self._next_id))
            self._next_id += 1
            return held
        request_id = self._next_id
        deferred = self.request(chat, room=chat["room"], chat=chat)
        if request_id in self._pending:
            self._echo_queue.setdefault(chat["room"], []).append(request_id)
        return deferred

    def history(self, room: str, since: int | None = None, limit: int | None = None) -> defer.Deferred[dict[str, Any]]:
        """The room's history (servers with history): chat events after ``since``, or the latest ``limit``."""
        message: dict[str, Any] = {"type": "history", "room": room}
        if since is not None:
            message["since"] = since
        if limit is not None:
            message["limit"] = limit
        return self.request(message)

    def presence(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Who is in the room (servers with presence)."""
        return self.request({"type": "presence", "room": room})

    def last_seq(self, room: str) -> int:
        state = self.rooms.get(room)
        return state.last_seq if state is not None else 0

    # -- incoming --------------------------------------------------------------------------------------------

    def _receive(self, protocol: RoomClientProtocol, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.log.warn("ignoring a message that is not JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        request_id = message.get("id")
        if kind == "welcome":
            self._welcome(message)
        elif kind == "chat":
            self._chat(message)
        elif kind == "ack":
            self._acks_seen = True
            self._dequeue_echo(request_id)
            self._settle(request_id, message)
        elif kind == "reconnect":
            self._draining = True
            after_ms = message.get("after_ms")
            self._hint(after_ms if isinstance(after_ms, (int, float)) and not isinstance(after_ms, bool) else 0)
            self._events.emit("message", message)
        elif kind == "error":
            if self._draining and message.get("code") == "unavailable" and self._hold_refused_chat(request_id):
                return
            error = RoomClientError(str(message.get("code")), str(message.get("message")), message)
            if request_id is not None and request_id == self._resume_id and isinstance(message.get("room"), str):
                # One room of the resume: settles the resume only if no other room's ``resumed`` did first.
                self._settle(request_id, None, error)
                self._room_not_resumed(message)
            elif self._settle(request_id, None, error):
                self._dequeue_echo(request_id)
            else:
                self._events.emit("error", message)
        elif kind == "left" and request_id is None:
            # Taken out by the server (the room was deleted): not a room to rejoin on the next connection.
            self.rooms.pop(message.get("room"), None)  # type: ignore[arg-type]
            self._events.emit("message", message)
        elif kind == "resumed":
            if isinstance(message.get("client"), str):
                self.id = message["client"]  # a cluster's continued session keeps its client id
            state = self.rooms.get(message.get("room"))  # type: ignore[arg-type]
            if state is not None:
                if message.get("recovered") is False:
                    # The gap is older than the server's history (or its seq started again): the sequence goes
                    # on from wherever the replay starts.
                    state.last_seq = 0
                self._events.emit("resumed", message)
            self._settle(request_id, message)
        else:
            if kind == "presence" and request_id is None:
                self._events.emit("presence", message)
            if not self._settle(request_id, message):
                self._events.emit("message", message)

    def _hint(self, after_ms: float) -> None:
        self._hinted_delay = min(max(float(after_ms), 0.0), self.max_delay * 1000) / 1000

    def _hold_refused_chat(self, request_id: Any) -> bool:
        """A chat the draining node refused (not stored): keep it for the next connection; True if it was one."""
        entry = self._pending.get(request_id) if isinstance(request_id, int) else None
        if entry is None or entry.chat is None:
            return False
        del self._pending[request_id]
        if entry.timer.active():
            entry.timer.cancel()
        self._dequeue_echo(request_id)
        self._outbox.append(entry)
        return True

    def _dequeue_echo(self, request_id: Any) -> None:
        for queue in self._echo_queue.values():
            if request_id in queue:
                queue.remove(request_id)
                return

    def _chat(self, message: dict[str, Any]) -> None:
        room = message.get("room")
        state = self.rooms.get(room) if isinstance(room, str) else None
        if state is not None and state.catch_up is not None and isinstance(message.get("seq"), int):
            # A room catching up on its gap: its live chats wait for the replay, or the first of them would move
            # last_seq past the gap and every replayed chat would then be dropped as already delivered.
            state.catch_up.held.append(message)
            return
        self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        """Emit a chat event, unless its seq was already delivered in its room (a replay overlapping what we had)."""
        room = message.get("room")
        seq = message.get("seq")
        state = self.rooms.get(room) if isinstance(room, str) else None
        if state is not None and isinstance(seq, int):
            if seq <= state.last_seq:
                return  # already delivered (a replay overlapping what we had)
            state.last_seq = seq
        if message.get("from") == self.id and not self._acks_seen and isinstance(room, str):
            # Without server acks, our own copy coming back is the ack: matched by its msg_id where the server
            # echoes it, else in order (the server handles one connection's requests in order).
            queue = self._echo_queue.get(room, [])
            msg_id = message.get("msg_id")
            match = next((rid for rid in queue if msg_id is not None and (entry := self._pending.get(rid)) is not None
                          and entry.chat is not None and entry.chat.get("msg_id") == msg_id), None)
            if match is None and msg_id is None and queue:
                match = queue[0]
            if match is not None:
                queue.remove(match)
                self._settle(match, {"type": "ack", "room": room, "seq": seq})
        self._events.emit("chat", message)
        self._events.emit("message", message)

    def _welcome(self, message: dict[str, Any]) -> None:
        previous_session = self.session
        was_reconnect = self._ever_opened
        self.id = message.get("id")
        session = message.get("session")
        self.session = session if isinstance(session, str) else None
        self._ever_opened = True
        self.attempt = 0
        closes = self._closes
        self._set_state("open", resumed=was_reconnect)
        self._events.emit("welcome", message)
        if self._closes != closes:
            # A listener closed the client: no resume or rejoin on the closing connection (connect() fails with
            # "closed" once it is gone).
            return
        waiters, self._connect_waiters = self._connect_waiters, []
        for waiter in waiters:
            waiter.callback(self)
        unacknowledged = "the connection closed before the server acknowledged the chat"
        if not was_reconnect or not self.rooms:
            self._reject_outbox("disconnected", unacknowledged)
            return
        if previous_session is not None and self.session is not None:
            self._resume_id = self._next_id
            resume = self.request({"type": "resume", "session": previous_session,
                                   "rooms": {name: state.last_seq for name, state in self.rooms.items()}})
            resume.addErrback(self._resume_refused)
            self._flush_outbox()  # after the resume: the server handles requests in order, the rooms are back
            return
        self._reject_outbox("disconnected", unacknowledged)
        for name, state in list(self.rooms.items()):
            self._rejoin(name, state)

    def _resume_refused(self, failure: Any) -> None:
        """The resume's request failed. An error naming a room is about that room alone (``_room_not_resumed``
        dealt with it), and the other rooms are resumed all the same: none is joined again. Any other error
        refused the whole resume: every room is joined again."""
        failure.trap(RoomClientError)
        error = failure.value
        if error.code in ("disconnected", "timeout") or isinstance((error.reply or {}).get("room"), str):
            return
        for name, state in list(self.rooms.items()):
            self._rejoin(name, state)

    def _room_not_resumed(self, message: dict[str, Any]) -> None:
        """A room of the resume that the server did not take this connection back into (whichever reply settled
        the resume). ``unavailable`` is transient (it could not read the room's gap, and took us out of the room:
        retry later): join it again after a backoff. Any other refusal (``room_full``, ``too_many_rooms``,
        ``forbidden``) is final: the room is not one of ours any more, and an ``error`` event says so."""
        room = message["room"]
        if message.get("code") == "unavailable" and room in self.rooms:
            self._rejoin_later(room, 0, str(message.get("message")))
            return
        self.rooms.pop(room, None)
        self._events.emit("error", message)

    def _rejoin_later(self, name: str, retries: int, reason: str) -> None:
        """Join ``name`` again after a backoff (the server answered ``unavailable``: retry later), unless
        ``retries`` rejoins were refused already: then give the room up, with an ``error`` event."""
        state = self.rooms.get(name)
        if state is not None and state.leaving:
            return  # the leave under way forgets the room
        if retries >= self.rejoin_attempts:
            self.rooms.pop(name, None)
            self._events.emit("error", {"type": "error", "code": "unavailable", "room": name,
                                        "message": f"could not rejoin {name} ({retries + 1} attempts): {reason}"})
            return
        previous = self._rejoin_timers.pop(name, None)
        if previous is not None and previous.active():
            previous.cancel()
        delay = backoff_delay(retries, self._random, self.min_delay, self.max_delay, self.factor)
        self._rejoin_timers[name] = self.reactor.callLater(delay, self._rejoin_now, name, retries + 1)

    def _rejoin_now(self, name: str, retries: int) -> None:
        self._rejoin_timers.pop(name, None)
        state = self.rooms.get(name)
        if state is not None:
            self._rejoin(name, state, retries)

    def _rejoin(self, name: str, state: RoomState, retries: int = 0) -> None:
        """Join again with ``since`` the last seq; ``retries``: the rejoins (joins, history reads) already refused
        with ``unavailable``.
        A server that does not replay the gap itself (its reply says no ``recovered``) is asked for its history
        (``_fill_gap``). Until the gap is filled the room's live chats are held (``state.catch_up``)."""
        catch_up = state.catch_up = _CatchUp()

        def joined(reply: dict[str, Any]) -> None:
            if not self._is_catching_up(name, catch_up):
                return  # the connection dropped, or the room was left
            recovered = reply.get("recovered")
            if isinstance(recovered, bool):
                # The server replays the gap itself, after this reply and before any live chat of the room.
                if not recovered:
                    state.last_seq = 0  # the gap is older than its history: go on from its first seq
                self._caught_up(name, state, recovered, "join")
                return
            self._fill_gap(name, state, catch_up, retries)  # a server that ignores "since" in a join: its history

        def rejoin_failed(failure: Any) -> None:
            failure.trap(RoomClientError)
            if not self._is_catching_up(name, catch_up):
                return  # the next connection's resume lists the room; or it was left meanwhile
            state.catch_up = None
            error = failure.value
            if error.code == "unavailable":  # the server could not replay the gap and did not join us
                self._rejoin_later(name, retries, error.message)
                return
            if error.code in NOT_JOINED:
                self.rooms.pop(name, None)  # refused: not one of ours any more
            self._events.emit("error", {"type": "error", "code": error.code, "room": name,
                                        "message": f"could not rejoin {name}: {error.message}"})

        join = {"type": "join", "room": name, **state.join_options, "since": state.last_seq}
        self.request(join).addCallbacks(joined, rejoin_failed)

    def _is_catching_up(self, name: str, catch_up: _CatchUp) -> bool:
        """Whether ``catch_up`` is still the one under way in room ``name`` (not ended by a drop, the room not
        left)."""
        state = self.rooms.get(name)
        return state is not None and state.catch_up is catch_up

    def _fill_gap(self, name: str, state: RoomState, catch_up: _CatchUp, retries: int) -> None:
        """Fill the gap after the room's last seq from its history, page after page while the server says
        ``more`` (each page starting after the last seq of the one before), until a page brings nothing new or
        fails. A page answered ``unavailable`` (the history cannot be read right now) is asked for again after a
        backoff, as a join refused with ``unavailable`` is, the room's live chats still held; ``retries``: the
        rejoins and reads already refused so."""
        def page(since: int) -> None:
            def answered(reply: dict[str, Any]) -> None:
                if not self._is_catching_up(name, catch_up):
                    return
                catch_up.answered = True
                messages = [event for event in reply.get("messages") or [] if isinstance(event, dict)]
                for event in messages:
                    catch_up.contiguous = self._deliver_next(state, event) and catch_up.contiguous
                last = messages[-1].get("seq") if messages else since
                if reply.get("more") and isinstance(last, int) and last > since:
                    page(last)
                    return
                # Recovered only if every page came and none skipped a seq (history no longer holding the gap).
                self._caught_up(name, state, catch_up.contiguous and not reply.get("more"), "history")

            def failed(failure: Any) -> None:
                failure.trap(RoomClientError)
                if not self._is_catching_up(name, catch_up):
                    return  # the connection dropped (the room keeps its last seq: the next one replays the gap)
                if failure.value.code in ("unavailable", "timeout"):
                    # Unreadable for now, or no answer in time: read again after a backoff (as "no history
                    # here", last_seq would go to 0 and the next rejoin would replay chats the client had).
                    self._fill_gap_later(name, state, catch_up, retries)
                    return
                if not catch_up.answered:
                    state.last_seq = 0  # no history at all here: sequence numbers may start again, accept what comes
                self._caught_up(name, state, False, "history" if catch_up.answered else "rejoin")

            self.history(name, since=since).addCallbacks(answered, failed)

        page(state.last_seq)

    def _fill_gap_later(self, name: str, state: RoomState, catch_up: _CatchUp, retries: int) -> None:
        """Read the rest of the gap again after a backoff (its history answered ``unavailable``), unless
        ``retries`` rejoins or reads were refused already: then go on without it (the client is in the room: its
        live chats follow, and ``resumed`` says recovered: false; the room keeps its last seq, the history
        exists)."""
        if retries >= self.rejoin_attempts:
            self._caught_up(name, state, False, "history")
            return

        def again() -> None:
            catch_up.timer = None
            if self._is_catching_up(name, catch_up):
                self._fill_gap(name, state, catch_up, retries + 1)

        delay = backoff_delay(retries, self._random, self.min_delay, self.max_delay, self.factor)
        catch_up.timer = self.reactor.callLater(delay, again)

    def _deliver_next(self, state: RoomState, message: dict[str, Any]) -> bool:
        """Deliver a chat of a room catching up; False if its seq shows that chats before it were skipped."""
        seq = message.get("seq")
        skipped = state.last_seq > 0 and isinstance(seq, int) and seq > state.last_seq + 1
        self._deliver(message)
        return not skipped

    def _caught_up(self, name: str, state: RoomState, recovered: bool, via: str) -> None:
        """The gap is filled (or given up): deliver the live chats held meanwhile in seq order (those the replay
        delivered already are dropped as duplicates), then tell the application."""
        held = state.catch_up.held if state.catch_up is not None else []
        state.catch_up = None
        for message in sorted(held, key=lambda message: message["seq"]):
            recovered = self._deliver_next(state, message) and recovered
        self._events.emit("resumed", {"type": "resumed", "room": name, "recovered": recovered, "via": via})
