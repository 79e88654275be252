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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger

from .core.auth import Action, AuthError, Identity, TokenVerifier
from .core.errors import CloseCode
from .options import ServerOptions

if TYPE_CHECKING:
    from .client import Client
    from .server import WebSocketServer

SECRET_ENVIRONMENT_VARIABLE = "ROOMSERVER_JWT_SECRET"
Authenticate = Callable[[Any], "Identity | defer.Deferred[Identity | None] | None"]
Authorize = Callable[[Identity, Action, str], "bool | defer.Deferred[bool]"]


def verifier_from_options(options: ServerOptions, environ: dict[str, str] | None = None) -> TokenVerifier | None:
    """The JWT verifier the options describe (secrets come from a file or the environment, never argv)."""
    environ = dict(os.environ) if environ is None else environ
    key: str | bytes | None = None
    if options.jwt_public_key_file:
        key = Path(options.jwt_public_key_file).read_bytes()
        if options.jwt_algorithm.startswith("HS"):
            raise ValueError("a public key needs an asymmetric --jwt-algorithm such as RS256 or ES256")
    elif options.jwt_secret_file:
        key = Path(options.jwt_secret_file).read_text().strip()
    elif environ.get(SECRET_ENVIRONMENT_VARIABLE):
        key = environ[SECRET_ENVIRONMENT_VARIABLE]
    if key is None:
        return None
    algorithm = options.jwt_algorithm
    if not options.jwt_public_key_file and not algorithm.startswith("HS"):
        raise ValueError(f"{algorithm} needs --jwt-public-key-file; a shared secret only works with HS256")
    return TokenVerifier(key, algorithm, audience=options.jwt_audience, issuer=options.jwt_issuer,
                         leeway=options.jwt_leeway)


class AccessControl:
    """Per-server authentication state: the verifier, the hooks and each connection's timers."""

    log = Logger()

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.verifier = verifier_from_options(server.options)
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
        delay = max(0.0, identity.expires_at - self.server.reactor.seconds())  # type: ignore[attr-defined]
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
