"""Authentication of connections and authorization of what they do: the hub side of ``core.auth``.

A connection is authenticated, in this order, by:

1. the application's hook ``server.authenticate(request) -> Identity | Deferred`` if one is set;
2. an ``Authorization: Bearer <jwt>`` header (non-browser clients);
3. a ``?token=`` query parameter, only when ``allow_query_token`` is on (it puts tokens in URLs and logs);
4. otherwise, when auth is configured, an ``{"type":"auth","token":"..."}`` first message within
   ``auth_timeout`` (browsers, which cannot set headers on a WebSocket).

A bad token in the handshake gets HTTP 401; a bad token in a message gets close 4501 (terminal); no auth
message in time gets close 1008. A token that expires mid-session closes the connection with 4001
(reconnect-class) unless a new ``auth`` message for the same user refreshed it first. Without JWT settings and
without a hook, every connection is an anonymous user (its client id) allowed everywhere.

Tokens are never logged or echoed: errors say what is wrong with a token, not what it was.

After the upgrade, every message passes through here before the room protocol acts on it (the hub only wires):

- ``handle_auth_message``: ``auth`` messages (first-message authentication, token refresh) are consumed here,
  and an unauthenticated connection's other messages are answered ``unauthenticated`` and dropped.
- ``authorize_command``: a join, resume or chat is checked against the token's claims and the application's
  ``authorize`` hook, which may answer later (a Deferred). The command comes in parsed, once, by the hub and
  goes on to the room protocol as such.
- While such an answer is pending, the connection's later messages wait in its ``inbox`` (``enqueue``) and are
  processed in arrival order once it comes (``_drain_inbox``), so replies keep the order of the requests.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger

from .core import messages
from .core.auth import Action, AuthError, Identity, TokenVerifier
from .core.errors import CloseCode, ErrorCode, RoomServerError
from .options import ServerOptions, read_option_file

if TYPE_CHECKING:
    from .client import Client
    from .server import WebSocketServer

SECRET_ENVIRONMENT_VARIABLE = "ROOMSERVER_JWT_SECRET"
INBOX_PAUSE = 64 * 1024  # bytes waiting behind a pending decision before the connection is no longer read
Authenticate = Callable[[Any], "Identity | defer.Deferred[Identity | None] | None"]
Authorize = Callable[[Identity, Action, str], "bool | defer.Deferred[bool]"]


def verifier_from_options(options: ServerOptions, environ: dict[str, str] | None = None) -> TokenVerifier | None:
    """The JWT verifier the options describe (secrets come from a file or the environment, never argv);
    ``ValueError`` with a one-line message naming where the key came from if it cannot be used."""
    environ = dict(os.environ) if environ is None else environ
    key: str | bytes | None = None
    if options.jwt_public_key_file:
        source = f"the JWT public key file {options.jwt_public_key_file!r}"
        key = read_option_file(options.jwt_public_key_file, "the JWT public key file")
        if options.jwt_algorithm.startswith("HS"):
            raise ValueError("a public key needs an asymmetric --jwt-algorithm such as RS256 or ES256")
    elif options.jwt_secret_file:
        source = f"the JWT secret file {options.jwt_secret_file!r}"
        key = read_option_file(options.jwt_secret_file, "the JWT secret file").strip()
    elif environ.get(SECRET_ENVIRONMENT_VARIABLE):
        source = SECRET_ENVIRONMENT_VARIABLE
        key = environ[SECRET_ENVIRONMENT_VARIABLE]
    if key is None:
        return None
    algorithm = options.jwt_algorithm
    if not options.jwt_public_key_file and not algorithm.startswith("HS"):
        raise ValueError(f"{algorithm} needs --jwt-public-key-file; a shared secret only works with HS256")
    try:
        return TokenVerifier(key, algorithm, audience=options.jwt_audience, issuer=options.jwt_issuer,
                             leeway=options.jwt_leeway)
    except ValueError as exc:
        raise ValueError(f"{exc} ({source})") from None


class AccessControl:
    """Per-server access decisions: the verifier, the hooks, each connection's timers, and the gate every
    message passes (authentication messages, authorization of joins and chats, the order behind a pending
    decision)."""

    log = Logger()

    def __init__(self, server: WebSocketServer, verifier: TokenVerifier | None) -> None:
        self.server = server
        self.verifier = verifier
        self.authenticate: Authenticate | None = None
        self.authorize: Authorize | None = None

    @property
    def enabled(self) -> bool:
        return self.verifier is not None or self.authenticate is not None

    # -- handshake ----------------------------------------------------------------------------------------------

    def handshake(self, request: Any) -> Identity | defer.Deferred[Identity | None] | None:
        """The identity a request proves in its handshake; None if it must send an ``auth`` message;
        ``ConnectionDeny(401)`` if it presented a bad token."""
        if self.authenticate is not None:
            return defer.maybeDeferred(self.authenticate, request).addCallbacks(
                self._hook_result, self._hook_failed)
        if self.verifier is None:
            return None
        token = self._bearer(request)
        if token is None and self.server.options.allow_query_token:
            values = (getattr(request, "params", None) or {}).get("token")
            token = values[0] if values else None
        if token is None:
            return None
        try:
            return self.verifier.verify(token, self.server.reactor.seconds())  # type: ignore[attr-defined]
        except AuthError as exc:
            self.server.counters.dropped("unauthorized")
            raise ConnectionDeny(401, exc.message) from None

    @staticmethod
    def _bearer(request: Any) -> str | None:
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, value = str(header).partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ConnectionDeny(401, "the Authorization header must be 'Bearer <token>'")
        return value.strip()

    def _hook_result(self, identity: Identity | None) -> Identity:
        if not isinstance(identity, Identity):
            self.server.counters.dropped("unauthorized")
            raise ConnectionDeny(401, "authentication refused")
        return identity

    def _hook_failed(self, failure: Any) -> Identity:
        if failure.check(ConnectionDeny):
            failure.raiseException()
        self.log.failure("the authenticate hook raised", failure)
        self.server.counters.dropped("unauthorized")
        raise ConnectionDeny(401, "authentication refused")

    # -- after the upgrade --------------------------------------------------------------------------------------

    def opened(self, client: Client) -> None:
        """Start the connection's auth deadline (no identity yet) or its expiry timer."""
        if client.identity is None:
            client.auth_deadline = self.server.reactor.callLater(  # type: ignore[attr-defined]
                self.server.options.auth_timeout, self._auth_timed_out, client)
        else:
            self._schedule_expiry(client)

    def accept_token(self, client: Client, token: Any) -> Identity | None:
        """Handle an ``auth`` message's token: the new identity, or None after closing the connection (4501)."""
        if self.verifier is None:
            client.close(CloseCode.INVALID_TOKEN, "token authentication is not configured")
            return None
        try:
            identity = self.verifier.verify(token, self.server.reactor.seconds())  # type: ignore[attr-defined]
        except AuthError as exc:
            self.server.counters.dropped("unauthorized")
            client.close(CloseCode.INVALID_TOKEN, exc.message)
            return None
        if client.identity is not None and client.identity.user != identity.user:
            self.server.counters.dropped("unauthorized")
            client.close(CloseCode.INVALID_TOKEN, "a refreshed token must be for the same user")
            return None
        self._cancel(client, "auth_deadline")
        client.identity = identity
        self._schedule_expiry(client)
        return identity

    def closed(self, client: Client) -> None:
        self._cancel(client, "auth_deadline")
        self._cancel(client, "expiry")

    def _schedule_expiry(self, client: Client) -> None:
        self._cancel(client, "expiry")
        identity = client.identity
        if identity is None or identity.expires_at is None:
            return
        # The verifier accepts a token until exp + leeway (clock skew between the issuer and us): the timer agrees,
        # or a token accepted within the leeway would be closed at once.
        expires = identity.expires_at + self.server.options.jwt_leeway
        delay = max(0.0, expires - self.server.reactor.seconds())  # type: ignore[attr-defined]
        client.expiry = self.server.reactor.callLater(delay, self._expired, client)  # type: ignore[attr-defined]

    def _auth_timed_out(self, client: Client) -> None:
        client.auth_deadline = None
        self.server.counters.dropped("auth_timeout")
        client.close(CloseCode.POLICY_VIOLATION, "no authentication in time")

    def _expired(self, client: Client) -> None:
        client.expiry = None
        self.server.counters.dropped("token_expired")
        client.close(CloseCode.TOKEN_EXPIRED, "token expired: refresh it and reconnect")

    @staticmethod
    def _cancel(client: Client, name: str) -> None:
        call = getattr(client, name)
        setattr(client, name, None)
        if call is not None and call.active():
            call.cancel()

    # -- authorization ------------------------------------------------------------------------------------------

    def decide(self, client: Client, action: Action, room: str) -> bool | defer.Deferred[bool]:
        """May ``client`` do ``action`` in ``room``? The token's claims first, then the application's hook."""
        identity = client.identity or Identity(client.id)
        if not identity.may(action, room):
            return False
        if self.authorize is None:
            return True
        try:
            decision = self.authorize(identity, action, room)
        except Exception:
            self.log.failure("the authorize hook raised; refusing")
            return False
        if isinstance(decision, defer.Deferred):
            return decision.addCallbacks(bool, lambda failure: self._hook_error(failure))
        return bool(decision)

    def _hook_error(self, failure: Any) -> bool:
        self.log.failure("the authorize hook failed; refusing", failure)
        return False

    # -- messages: authentication, authorization and their order -----------------------------------------------

    def handle_auth_message(self, client: Client, request: Any) -> bool:
        """Handle ``auth`` messages (first-message authentication and token refresh); True if consumed.

        Until a client is authenticated, nothing else it sends is acted upon: it gets error ``unauthenticated``.
        ``request`` is the raw JSON payload, or the map another codec decoded; raw JSON is only decoded here when
        it may be an ``auth`` message or the client is not authenticated yet, so an authenticated client's
        ordinary messages are not decoded twice."""
        if isinstance(request, bytes):
            if client.identity is not None and b'"auth"' not in request:
                return False
            try:
                request = messages.decode(request)
            except RoomServerError:
                request = None
        if not isinstance(request, dict) or request.get("type") != "auth":
            if client.identity is None:
                self.server._reply(client, messages.error(
                    ErrorCode.UNAUTHENTICATED, 'send {"type":"auth","token":...} first',
                    messages.request_id_of(request)))
                return True
            return False
        first = client.identity is None
        identity = self.accept_token(client, request.get("token"))
        if identity is None:
            return True
        self.server._reply(client, messages.authenticated(identity.user, messages.request_id_of(request)))
        if first:
            self.server._start_session(client)
        return True

    def authorize_command(self, client: Client, command: messages.Command, proceed: Callable[[bool], None]
                          ) -> bool:
        """Let ``command`` through (``proceed(later)``) if ``client`` may do it, else answer ``forbidden``; True
        if it did not go through now (refused, or waiting for the hook's answer). ``later`` says the command went
        through after the hook answered asynchronously (the hub then fires the client's ``message`` event itself,
        as it does for a command that went through at once).

        Joins, resumes (each listed room), history reads (as joins: reading a room is what joining it gives)
        and chats are decided by ``decide``; other commands go through. When
        any decision is asynchronous, the command waits for all of them and the client's later messages queue
        behind it in its ``inbox``: a chat sent right after a join must not overtake the join (it would be
        answered ``not_in_room``), and replies must come in the order of the requests."""
        if isinstance(command, messages.Join):
            action, rooms = Action.JOIN, [command.room]
        elif isinstance(command, messages.Resume):
            action, rooms = Action.JOIN, [name for name, _ in command.rooms]
        elif isinstance(command, messages.History):
            action, rooms = Action.JOIN, [command.room]
        elif isinstance(command, messages.Chat):
            action, rooms = Action.PUBLISH, [command.room]
        else:
            proceed(False)
            return False
        decisions = [self.decide(client, action, room) for room in rooms]
        if all(decision is True for decision in decisions):
            proceed(False)
            return False
        if not any(isinstance(decision, defer.Deferred) for decision in decisions):
            self._refuse(client, action, rooms, decisions, command)
            return True
        client.inbox = deque()
        gathered = defer.gatherResults(
            [decision if isinstance(decision, defer.Deferred) else defer.succeed(decision) for decision in decisions],
            consumeErrors=True)

        def decided(results: list[bool]) -> None:
            if not client.open:
                return  # closed meanwhile: nothing to answer, and the hub dropped its inbox
            try:
                if all(results):
                    proceed(True)
                else:
                    self._refuse(client, action, rooms, results, command)
            except Exception:
                self.server._internal_error(client)
                return
            self._drain_inbox(client)

        gathered.addCallback(decided).addErrback(lambda failure: self.log.failure("authorization failed", failure))
        return True

    def enqueue(self, client: Client, payload: bytes, is_binary: bool) -> None:
        """Keep a message that arrived while an authorization decision is pending (``client.inbox`` is set).

        Beyond ``INBOX_PAUSE`` bytes waiting, the connection is no longer read until the inbox drained: a
        client that keeps sending while a slow hook (or a cluster's session claim) decides must not pin memory
        without bound (the rate limit alone let 100 MB wait behind a hung hook). Its messages wait in TCP's
        buffers instead; if the decision takes longer than the ping timeout, its pong waits there too, and the
        connection is dropped as any unresponsive peer."""
        inbox = client.inbox
        assert inbox is not None
        inbox.append((payload, is_binary))
        if not client.inbox_paused and sum(len(waiting) for waiting, _ in inbox) > INBOX_PAUSE:
            client.inbox_paused = True
            client.reading(False)

    def _drain_inbox(self, client: Client) -> None:
        """Process the messages that waited for a decision, in order, until one waits for a decision again.

        A resume still waiting for the cluster's claim of its session (``client.claiming``) keeps them waiting:
        the hub drains them once it has answered."""
        if client.claiming:
            return
        inbox, client.inbox = client.inbox, None
        while inbox and client.open:
            payload, is_binary = inbox.popleft()
            self.server._process(client, payload, is_binary)
            if client.inbox is not None:  # paused again: keep the rest, in order, behind the new decision
                client.inbox.extend(inbox)
                return
        if client.inbox_paused and client.open:
            client.inbox_paused = False
            client.reading(True)

    def _refuse(self, client: Client, action: Action, rooms: list[str], decisions: list[Any],
                command: messages.Command) -> None:
        """One ``forbidden`` error per room that was refused (the connection stays)."""
        if isinstance(command, messages.History):
            verb = "read the history of"
        else:
            verb = "join" if action is Action.JOIN else "publish to"
        for room, decision in zip(rooms, decisions, strict=True):
            if decision is not True:
                self.server._reply(client, messages.error(
                    ErrorCode.FORBIDDEN, f"you may not {verb} room {room!r}", command.id, room=room))
