"""Resume sessions, without I/O: which token belongs to which connection, and until when it can be resumed.

Every connection gets a session token in its ``welcome``. While the connection is open the session cannot
expire; when it closes, the session is kept for ``ttl`` seconds so a reconnecting client can present the token
in a ``resume`` and be treated as the same member (its old identity is handed to whoever resumes it, once).

A detached session may also *hold* its user's presence in the rooms it was in (``user``, ``connection``,
``held``): so a resume within the ttl is the same member, with no leave/join flicker. Sessions dropped by expiry
are collected in ``expired`` for the room protocol to announce those leaves then.

The table is told the time (``now=``) and owns no clock. Because every detached session gets the same ``ttl``,
detaching in time order keeps the detached sessions ordered by expiry, so ``expire`` only ever looks at the
oldest ones: its cost is the number of sessions it drops, and nothing needs a timer per connection.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Session:
    """A session: the client id it was issued to and, once detached, when it stops being resumable."""

    token: str
    client_id: str
    expires: float | None = None  # None while a connection holds it
    user: str | None = None
    """The user of the connection that held the session (set when it closes)."""
    connection: Any = None
    """The closed connection still counted as that user's connection in the ``held`` rooms."""
    held: list[str] = field(default_factory=list)
    recorded: bool = False
    """A copy was written to the cluster's shared session records (Redis), so another node may claim it: a
    take here must claim that copy too (once-only, cluster-wide)."""


class SessionTable:
    """Sessions by token; attached ones never expire, detached ones expire ``ttl`` seconds after detaching."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._attached: dict[str, Session] = {}
        self._detached: OrderedDict[str, Session] = OrderedDict()
        self.expired: list[Session] = []
        """Sessions dropped by expiry that held presence, until the owner takes them (``drain_expired``)."""

    def __len__(self) -> int:
        return len(self._attached) + len(self._detached)

    def attach(self, token: str, client_id: str) -> Session:
        """A new connection's session."""
        session = Session(token, client_id)
        self._attached[token] = session
        return session

    def detach(self, token: str, now: float) -> Session | None:
        """The connection holding ``token`` closed: keep the session resumable until ``now + ttl`` (returned,
        or None if it cannot be resumed)."""
        self.expire(now)
        session = self._attached.pop(token, None)
        if session is None or self.ttl <= 0:
            return None
        session.expires = now + self.ttl
        self._detached[token] = session
        return session

    def peek(self, token: str, now: float) -> Session | None:
        """The session ``token`` if it can still be resumed, without claiming it (never with a ttl of 0: sessions
        are then never continued, not even one whose connection looks open)."""
        self.expire(now)
        if self.ttl <= 0:
            return None
        return self._detached.get(token) or self._attached.get(token)

    def take(self, token: str, now: float) -> Session | None:
        """Claim the session ``token`` for a resume: it is returned at most once, and only before it expires.

        A session whose connection is still attached (a half-open connection the server has not noticed yet)
        can be taken too; the caller then closes that old connection.
        """
        self.expire(now)
        if self.ttl <= 0:
            return None
        session = self._detached.pop(token, None)
        if session is None:
            session = self._attached.pop(token, None)
        return session

    def discard(self, token: str) -> Session | None:
        """Forget the detached session ``token`` (another node continued it); returned so its held presence can
        be let go."""
        return self._detached.pop(token, None)

    def shared_holders(self) -> set[str]:
        """Tokens of the detached sessions recorded for the cluster that still hold presence here: what a
        stopping node waits for other nodes to take over before it leaves the cluster's presence."""
        return {token for token, session in self._detached.items() if session.recorded and session.held}

    def rename(self, token: str, client_id: str) -> None:
        """The attached session ``token`` now belongs to ``client_id`` (its connection took over an older id)."""
        session = self._attached.get(token)
        if session is not None:
            session.client_id = client_id

    def expire(self, now: float) -> int:
        """Forget detached sessions whose time is up; returns how many."""
        dropped = 0
        while self._detached:
            token, session = next(iter(self._detached.items()))
            if session.expires is not None and session.expires > now:
                break
            del self._detached[token]
            if session.held:
                self.expired.append(session)
            dropped += 1
        return dropped

    def drain_expired(self) -> list[Session]:
        expired, self.expired = self.expired, []
        return expired
