"""Resume sessions shared by the nodes of a Redis cluster: a client whose node died (or that a load balancer
sent elsewhere) continues its session on any node, with its client id and as the same presence member.

- When a connection's session detaches (``ShareSession``), one ``SET <prefix>s:<token> <json> PX <resume_ttl>``
  records it: its client id, user, the rooms it was in and this node's id. Best effort: if Redis cannot take
  it, the session stays this node's (``RoomProtocol.session_unshared``).
- A resume whose session this node does not know, or recorded itself, claims the record (``ClaimSession``) with
  one script that reads and deletes it: Redis runs it atomically, so of two nodes racing one wins. A session of
  an authenticated user is claimed only by that user (the script leaves it for the right one otherwise).
- The winner tells the node the session came from (``SessionTaken``: ``taken <token>`` on that node's channel
  ``<prefix>node:<id>``, which its broker is always subscribed to) after its own presence writes, on the same
  connection: that node forgets its copy and releases the presence it held, which Redis then finds the user
  still has on the winner's node, so nobody sees a leave or a join.

The token is the session's only key and an unguessable secret (192 random bits), like on one node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..redislink import LuaScripts

if TYPE_CHECKING:
    from ..core.session import ShareSession
    from .redis import RedisBroker

# KEYS: the session's record; ARGV: the claimant's user. The record if it may be claimed (then deleted), else nil.
CLAIM = b"""
local record = redis.call('GET', KEYS[1])
if not record then return false end
local ok, session = pcall(cjson.decode, record)
if ok and type(session) == 'table' and session.user ~= session.id and session.user ~= ARGV[1] then
  return false
end
redis.call('DEL', KEYS[1])
return record
"""
TAKEN = b"taken "


class ClusterSessions:
    """The Redis side of shared resume sessions for one node (module docstring)."""

    log = Logger()

    def __init__(self, broker: RedisBroker, ttl: float) -> None:
        self.broker = broker
        self.ttl = ttl
        self.link = broker.publisher
        self.prefix = broker.prefix
        self.scripts = LuaScripts((CLAIM,))
        self.shared = 0
        self.claimed = 0
        self.taken = 0
        self.failures = 0

    def start(self) -> None:
        self.scripts.load(self.link.protocol)
        self.broker.publisher_ready.append(self.scripts.load)

    def stop(self) -> None:
        if self.scripts.load in self.broker.publisher_ready:
            self.broker.publisher_ready.remove(self.scripts.load)

    def key(self, token: str) -> bytes:
        return self.prefix + b"s:" + token.encode()

    def share(self, effect: ShareSession) -> defer.Deferred[Any]:
        """Record a detached session for ``ttl`` seconds (fails if Redis does not take it)."""
        record = orjson.dumps({"id": effect.client_id, "user": effect.user, "rooms": list(effect.rooms),
                               "node": self.broker.node_id})
        written = self.link.command("SET", self.key(effect.token), record, "PX", max(1, int(self.ttl * 1000)))

        def done(result: Any) -> Any:
            self.shared += 1
            return result

        return written.addCallbacks(done, self._failed)

    def claim(self, token: str, user: str) -> defer.Deferred[dict[str, Any] | None]:
        """Take the record of session ``token`` for ``user``, once cluster-wide: the record, or None if there is
        none this user may claim. Fails if Redis cannot be asked."""

        def decode(reply: Any) -> dict[str, Any] | None:
            if not reply:
                return None
            self.claimed += 1
            try:
                record = orjson.loads(bytes(reply))
            except orjson.JSONDecodeError:
                return None
            return record if isinstance(record, dict) else None

        claimed = self.scripts.run(self.link, CLAIM, [self.key(token)], [user])
        return claimed.addCallbacks(decode, self._failed)

    def tell_taken(self, node: str, token: str) -> None:
        """Tell ``node`` that session ``token`` continued here (after this node's presence writes: same link)."""
        if node == self.broker.node_id:
            return
        channel = self.prefix + b"node:" + node.encode()
        self.link.command("PUBLISH", channel, TAKEN + token.encode()).addErrback(self._failed).addErrback(
            lambda _: None)

    def parse_notice(self, data: bytes) -> str | None:
        """The token of a ``taken`` notice on this node's channel (None for anything else)."""
        if not data.startswith(TAKEN):
            return None
        self.taken += 1
        return data[len(TAKEN):].decode("utf-8", "surrogateescape")

    def _failed(self, failure: Failure) -> Failure:
        self.failures += 1
        self.log.debug("shared sessions: Redis did not answer: {error}", error=failure.getErrorMessage())
        return failure

    def stats(self) -> dict[str, Any]:
        return {"shared": self.shared, "claimed": self.claimed, "taken": self.taken, "failures": self.failures}
