"""Presence across the nodes of a Redis cluster: who is in a room on every node, read in one Redis command.

Each node keeps its own members in ``roomserver.core.presence.Presence`` (per user, with connection counts;
a detached session holding its user's presence counts as a connection). This module mirrors that node-level
state into Redis, where the cluster-level decisions are taken atomically by Lua scripts:

- ``<prefix>p:<room>`` (hash): ``<node>|<user>`` -> ``{"c": connections, "m": meta}``, one field per node the
  user is on. The member list of a room is one ``HGETALL`` of it (``cluster_members`` merges the fields).
- ``<prefix>pu:<room>`` (hash): user -> on how many nodes. A user joins the room when it goes 0 -> 1 and leaves
  when it goes back to 0: the script that does it publishes the event once, on the room's channel
  (``p <node> {"event": ..., "user": ..., "meta": ...}``), and every node subscribed to the room forwards it to
  its local presence subscribers (the publishing node too: it has no other way of telling its own).
- ``<prefix>pn:<node>`` (set, no expiry): ``<room>\\n<user>`` for every field the node owns, so its entries can
  be found and removed when it dies.
- ``<prefix>pnodes`` (sorted set): node -> the time (Redis ``TIME``, ms) after which it counts as dead. Every
  node's heartbeat (every ``presence_ttl / 4`` s, at most 2 s) moves its own deadline forward and reaps the
  nodes past theirs: their entries are removed and the leaves they cause published, once, in the same script
  (atomic: two nodes reaping at once cannot both announce). So a node killed with ``kill -9`` has its members
  leave everywhere within ``presence_ttl``; a member that resumed on another node meanwhile is on two nodes for
  a moment and never leaves. A beat that finds the node's own deadline past reaps no one: Redis was away (or
  this node could not beat), and the other nodes' deadlines passed for the same reason, not because they died;
  each node past its deadline gets a full ``presence_ttl`` from then to beat again (one that really died is
  reaped that much later). Reaped, every live node would have had its members leave and join again everywhere
  after any Redis outage longer than the ttl.

Writes are state-based (``put``: "this node has N connections of user U in room R") and go over the broker's
command connection, in order, so they are idempotent and read-your-writes for the member list that follows a
join. When Redis is unreachable, local presence keeps working: a node-level event whose write failed is
announced to this node's subscribers right away (as on a single node), and once the connection is back (or the
node finds it was reaped) the node resyncs its whole presence with one script that diffs it against what Redis
holds, publishing the cluster-level events of the difference (not to itself, which already announced them).

Events published while this node's subscriber connection is down never reach it. So for every room with a
presence subscriber here (a *watched* room) the node keeps the members its subscribers were told (``known``:
the room read when it became watched, then every event announced), and once it has resubscribed it reads the
watched rooms again and announces the difference, each join and leave once. The read (``SNAPSHOT``) is
published to this node alone on its own channel: on the subscriber connection it comes in order with the rooms'
events (those published before the read ahead of it, the later ones behind it), which a reply on the command
connection would not, so no change is announced both from the read and from an event. It runs at the beat, after
the resync if one is due (on the same connection), so Redis holds this node's own members as its subscribers
were told them (while Redis was away, by the node itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.presence import PresenceEvent, cluster_members
from ..core.session import identity_of
from ..redislink import LuaScripts
from .redis import PRESENCE_SNAPSHOT

if TYPE_CHECKING:
    from ..server import WebSocketServer
    from .redis import RedisBroker

MAX_BEAT_INTERVAL = 2.0
REAP_BATCH = 1000
SNAPSHOT_ROOMS = 100  # watched rooms read by one SNAPSHOT script run

_LIB = b"""
local function put(prefix, node, room, user, conns, meta, echo)
  local field = node .. '|' .. user
  local new = redis.call('HSET', prefix .. 'p:' .. room, field, '{"c":' .. conns .. ',"m":' .. meta .. '}')
  redis.call('SADD', prefix .. 'pn:' .. node, room .. '\\n' .. user)
  if new == 1 and redis.call('HINCRBY', prefix .. 'pu:' .. room, user, 1) == 1 then
    redis.call('PUBLISH', prefix .. 'c:' .. room, 'p ' .. node .. ' {"event":"join","user":' ..
      cjson.encode(user) .. ',"meta":' .. meta .. echo .. '}')
    return 1
  end
  return 0
end
local function drop(prefix, node, room, user, echo)
  if redis.call('HDEL', prefix .. 'p:' .. room, node .. '|' .. user) == 0 then
    redis.call('SREM', prefix .. 'pn:' .. node, room .. '\\n' .. user)
    return 0
  end
  redis.call('SREM', prefix .. 'pn:' .. node, room .. '\\n' .. user)
  local users = prefix .. 'pu:' .. room
  if redis.call('HINCRBY', users, user, -1) <= 0 then
    redis.call('HDEL', users, user)
    redis.call('PUBLISH', prefix .. 'c:' .. room, 'p ' .. node .. ' {"event":"leave","user":' ..
      cjson.encode(user) .. echo .. '}')
    return -1
  end
  return 0
end
local function split(entry)
  local cut = string.find(entry, '\\n', 1, true)
  return string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# ARGV: prefix, node, room, user, connections (0: gone from this node), meta JSON
PUT = _LIB + b"""
if tonumber(ARGV[5]) > 0 then
  return put(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], '')
end
return drop(ARGV[1], ARGV[2], ARGV[3], ARGV[4], '')
"""

# ARGV: prefix, node, echo (1: this node wants the events too), then room, user, connections, meta per entry
SYNC = _LIB + b"""
local prefix, node = ARGV[1], ARGV[2]
local echo = ''
if ARGV[3] == '0' then echo = ',"echo":false' end
local want = {}
for i = 4, #ARGV, 4 do want[ARGV[i] .. '\\n' .. ARGV[i + 1]] = true end
local dropped = 0
for _, entry in ipairs(redis.call('SMEMBERS', prefix .. 'pn:' .. node)) do
  if not want[entry] then
    local room, user = split(entry)
    drop(prefix, node, room, user, echo)
    dropped = dropped + 1
  end
end
for i = 4, #ARGV, 4 do put(prefix, node, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], echo) end
return dropped
"""

# KEYS: the nodes' deadlines; ARGV: prefix, node, ms this node stays alive without another beat, reap budget,
# the ttl in ms. Returns {1 if this node was not listed (new, or reaped while away), leaves published, 1 if more
# to reap, 1 if this node's own deadline had passed (the others were given a ttl instead of being reaped)}.
BEAT = _LIB + b"""
local prefix, node = ARGV[1], ARGV[2]
local now = now_ms()
local previous = redis.call('ZSCORE', KEYS[1], node)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), node)
if previous and tonumber(previous) < now then
  local grace = now + tonumber(ARGV[5])
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. grace)) do
    if other ~= node then redis.call('ZADD', KEYS[1], grace, other) end
  end
  return {added, 0, 0, 1}
end
local budget = tonumber(ARGV[4])
local left, more = 0, 0
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)) do
  local index = prefix .. 'pn:' .. dead
  if budget > 0 then
    for _, entry in ipairs(redis.call('SPOP', index, budget)) do
      local room, user = split(entry)
      if drop(prefix, dead, room, user, '') == -1 then left = left + 1 end
      budget = budget - 1
    end
  end
  if redis.call('EXISTS', index) == 0 then
    redis.call('ZREM', KEYS[1], dead)
  else
    more = 1
  end
end
return {added, left, more, 0}
"""

# ARGV: prefix, this node's own channel, the message head, then rooms. Each room's presence hash, published to
# this node alone as ``<head>[room, [field, value, ...]]`` (an empty hash encodes as ``{}``).
SNAPSHOT = b"""
for i = 4, #ARGV do
  local fields = redis.call('HGETALL', ARGV[1] .. 'p:' .. ARGV[i])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. cjson.encode({ARGV[i], fields}))
end
return #ARGV - 3
"""

# KEYS: the nodes' deadlines, this node's index; ARGV: node. A clean stop with nobody held here: forget the node.
FORGET = b"""
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class ClusterPresence:
    """Mirrors one node's presence into Redis and forwards the cluster's presence events to its subscribers."""

    log = Logger()

    def __init__(self, server: WebSocketServer, broker: RedisBroker, ttl: float) -> None:
        self.server = server
        self.broker = broker
        self.ttl = ttl
        self.interval = min(MAX_BEAT_INTERVAL, ttl / 4)
        self.link = broker.publisher
        self.prefix = broker.prefix
        self.node = broker.node_id.encode()
        self.tracker = server.presence_tracker
        self.dirty = False
        """Some write failed (or the connection is new): resync this node's whole presence at the next beat."""
        self.fallbacks = False
        """Node-level events were announced here while Redis could not take them: the resync must not announce
        them here a second time."""
        self.known: dict[str, dict[str, Any]] = {}
        """Per watched room (one with presence subscribers here) once read: its members over all nodes (user ->
        meta) as this node's subscribers were told them. What the room's read after a resubscription is diffed
        against (see the module docstring)."""
        self._watched: set[str] = set()
        self._reads_owed: set[str] = set()  # watched rooms to read at the next beat (after the resync, if due)
        self.beats = 0
        self.reaped = 0
        self.syncs = 0
        self.failures = 0
        self.graces = 0  # beats that found this node's own deadline past, and reaped no one (see BEAT)
        self.caught_up = 0  # presence events announced here after a resubscription: what the events lost said
        # Loaded on every new connection, ahead of any EVALSHA: a NOSCRIPT retry would let the member list read
        # that follows a join overtake the join's own write.
        self.scripts = LuaScripts((PUT, SYNC, BEAT, FORGET, SNAPSHOT))
        self._heart: task.LoopingCall | None = None
        self._beating = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.tracker.listener = self._changed
        self.tracker.watch_listener = self._watch
        self.broker.on_presence = self._received
        self.broker.on_presence_snapshot = self._snapshot_read
        self.broker.presence_report = self.stats
        self.broker.publisher_ready.append(self._reconnected)
        self.broker.resubscribed.append(self._resubscribed)
        self.scripts.load(self.link.protocol)
        self._heart = task.LoopingCall(self._beat)
        self._heart.clock = self.server.reactor
        self._heart.start(self.interval, now=True)

    async def _stop(self) -> None:
        if self._heart is not None and self._heart.running:
            self._heart.stop()
        self._heart = None
        self.tracker.listener = None
        self.tracker.watch_listener = None
        self.broker.on_presence = None
        self.broker.on_presence_snapshot = None
        if self._reconnected in self.broker.publisher_ready:
            self.broker.publisher_ready.remove(self._reconnected)
        if self._resubscribed in self.broker.resubscribed:
            self.broker.resubscribed.remove(self._resubscribed)
        self._watched.clear()
        self.known.clear()
        if not self.link.connected:
            return
        # Members still here are held by resumable sessions: leave them to the reaper (within the ttl), so a
        # client that resumes on another node meanwhile never leaves. Otherwise the node leaves the list now.
        try:
            await self._script(FORGET, [self.prefix + b"pnodes", self.prefix + b"pn:" + self.node], [self.node])
        except Exception as exc:
            self.log.warn("cluster presence: could not leave the node list: {error}", error=exc)

    def stop(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    def stats(self) -> dict[str, Any]:
        return {"ttl": self.ttl, "beats": self.beats, "reaped": self.reaped, "syncs": self.syncs,
                "failures": self.failures, "in_sync": not self.dirty, "caught_up": self.caught_up,
                "graces": self.graces}

    # -- reads -----------------------------------------------------------------------------------------------

    def members(self, room: str) -> defer.Deferred[list[dict[str, Any]]]:
        """The room's members on every node (one HGETALL); this node's own if Redis cannot answer. Never
        fails. Sent after this node's own writes on the same connection, so it includes them."""

        def merge(reply: list[bytes]) -> list[dict[str, Any]]:
            fields = [(bytes(reply[i]).decode("utf-8", "surrogateescape"), bytes(reply[i + 1]))
                      for i in range(0, len(reply) - 1, 2)]
            return self._told(room, cluster_members(fields))

        def local(failure: Failure) -> list[dict[str, Any]]:
            self.log.debug("cluster presence: members of {room} from this node only: {error}", room=room,
                           error=failure.getErrorMessage())
            return self._told(room, self.tracker.members(room))

        return self.link.command("HGETALL", self.prefix + b"p:" + room.encode()).addCallbacks(merge, local)

    def _told(self, room: str, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A member list about to be sent to a member. A watched room not read yet while the subscriber
        connection is down (its read for the watchers was lost, or never sent) takes it as what its watchers
        know: nothing else is, and no event can come in between until the resubscription reads the room."""
        if room in self._watched and room not in self.known and not self.broker.subscribed:
            self.known[room] = {member["user"]: member["meta"] for member in listed}
        return listed

    # -- writes ----------------------------------------------------------------------------------------------

    def _changed(self, room: str, user: str, event: PresenceEvent | None) -> None:
        """A member changed here: write this node's entry for it (the script decides the cluster's event)."""
        member = self.tracker.member(room, user)
        connections = len(member.connections) if member is not None else 0
        meta = orjson.dumps(dict(member.meta)) if member is not None else b"{}"
        written = self._script(PUT, [], [self.prefix, self.node, room, user, connections, meta])
        written.addErrback(self._write_failed, event)

    def _write_failed(self, failure: Failure, event: PresenceEvent | None) -> None:
        self.failures += 1
        if not self.dirty:
            self.log.warn("cluster presence: Redis did not take a change ({error}); local presence goes on, and "
                          "this node resyncs once Redis is back", error=failure.getErrorMessage())
        self.dirty = True
        if event is not None:
            self.fallbacks = True
            self._announce(event.room, event.as_json(), event.user)

    def _reconnected(self, connection: Any) -> None:
        """A new command connection: Redis may have lost or missed this node's writes; resync at once."""
        self.scripts.load(connection)
        self.dirty = True
        self.server.reactor.callLater(0, self._beat)  # type: ignore[attr-defined]

    def _beat(self) -> defer.Deferred[None]:
        if self._beating:
            return defer.succeed(None)
        self._beating = True

        def done(result: Any) -> None:
            self._beating = False
            if isinstance(result, Failure):
                self.log.debug("cluster presence heartbeat failed: {error}", error=result.getErrorMessage())
            elif self._reads_owed and self.link.connected:  # asked for while this beat ran
                self.server.reactor.callLater(0, self._beat)  # type: ignore[attr-defined]

        return defer.ensureDeferred(self._beat_once()).addBoth(done)

    async def _beat_once(self) -> None:
        """Move this node's deadline forward, reap dead nodes, and resync if needed."""
        if not self.link.connected:
            return
        alive_ms = int(max(self.ttl - self.interval, self.interval) * 1000)
        added, left, more, late = await self._script(
            BEAT, [self.prefix + b"pnodes"], [self.prefix, self.node, alive_ms, REAP_BATCH, int(self.ttl * 1000)])
        self.beats += 1
        self.reaped += int(left)
        if int(late):
            self.graces += 1
            self.log.info("cluster presence: this node's own deadline had passed (Redis away, or this node could "
                          "not beat): the nodes whose deadline passed too get {ttl} s to beat again before they are "
                          "reaped", ttl=self.ttl)
        if int(more):
            self.server.reactor.callLater(0, self._beat)  # type: ignore[attr-defined]
        if int(added) or self.dirty:
            await self._sync()
        if self._reads_owed:
            await self._read_for_watchers()

    async def _sync(self) -> None:
        self.dirty = False
        echo = b"0" if self.fallbacks else b"1"
        args: list[Any] = [self.prefix, self.node, echo]
        for room, member in self.tracker.entries():
            args += [room, member.user, len(member.connections), orjson.dumps(dict(member.meta))]
        try:
            await self._script(SYNC, [], args)
        except Exception:
            self.dirty = True
            raise
        self.fallbacks = False
        self.syncs += 1

    # -- watched rooms: what their presence subscribers were told ------------------------------------------

    def _watch(self, room: str, watched: bool) -> None:
        """A room got its first presence subscriber here (read it for them, in order with its events), or lost
        its last one (forget what they were told)."""
        if not watched:
            self._watched.discard(room)
            self._reads_owed.discard(room)
            self.known.pop(room, None)
            return
        self._watched.add(room)
        if self.broker.subscribed:  # else the resubscription reads it (and ``_told`` seeds it meanwhile)
            self._read_soon({room})

    def _resubscribed(self) -> None:
        """The subscriber connection is back: the events published while it was down are lost; read every
        watched room again, and announce the difference."""
        self._read_soon(self._watched)

    def _read_soon(self, rooms: set[str]) -> None:
        """Read ``rooms`` for their watchers now, or, if this node's presence is to be resynced first (Redis
        may not hold it as its subscribers were told it), right after the resync, at a beat."""
        self._reads_owed |= rooms
        if self.dirty or self._beating or not self.link.connected:
            self.server.reactor.callLater(0, self._beat)  # type: ignore[attr-defined]
            return
        defer.ensureDeferred(self._read_for_watchers()).addErrback(
            lambda failure: self.log.debug("cluster presence: could not read watched rooms ({error}); again at "
                                           "the next beat", error=failure.getErrorMessage()))

    async def _read_for_watchers(self) -> None:
        rooms = sorted(self._reads_owed & self._watched)
        self._reads_owed.clear()
        for start in range(0, len(rooms), SNAPSHOT_ROOMS):
            chunk = rooms[start:start + SNAPSHOT_ROOMS]
            try:
                await self._script(SNAPSHOT, [], [self.prefix, self.broker.node_channel, PRESENCE_SNAPSHOT, *chunk])
            except Exception:
                self._reads_owed.update(rooms[start:])  # again at the next beat
                raise

    def _snapshot_read(self, data: bytes) -> None:
        """A watched room's presence as Redis held it (``SNAPSHOT``), in order with the room's events: the first
        read of the room is what its watchers know; a later one (a resubscription) tells them the difference."""
        try:
            room, fields = orjson.loads(data)
            fields = fields or []  # an empty hash comes as {}
            entries = [(str(fields[i]), fields[i + 1]) for i in range(0, len(fields) - 1, 2)]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            self.log.warn("cluster presence: ignoring a malformed presence read")
            return
        if room not in self._watched:
            return
        members = {member["user"]: member["meta"] for member in cluster_members(entries)}
        told = self.known.get(room)
        self.known[room] = members
        if told is None:
            return
        for user in sorted(members.keys() - told.keys()):
            self._send(room, PresenceEvent(room, "join", user, members[user]).as_json(), user)
            self.caught_up += 1
        for user in sorted(told.keys() - members.keys()):
            self._send(room, PresenceEvent(room, "leave", user, told[user]).as_json(), user)
            self.caught_up += 1

    # -- events ----------------------------------------------------------------------------------------------

    def _received(self, room: str, sender: bytes, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            kind, user = message["event"], message["user"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.log.warn("cluster presence: ignoring a malformed event in room {room}", room=room)
            return
        if message.get("echo") is False and sender == self.node:
            return  # this node's resync: its subscribers already heard of it while Redis was away
        if kind not in ("join", "leave") or not isinstance(user, str):
            return
        meta = message.get("meta") if kind == "join" else None
        event = PresenceEvent(room, kind, user, meta if isinstance(meta, dict) else {})
        self._announce(room, event.as_json(), user)

    def _announce(self, room: str, event: dict[str, Any], user: str) -> None:
        """Send ``event`` to this node's presence subscribers of ``room``, and keep what they were told."""
        told = self.known.get(room)
        if told is not None:
            if event["event"] == "join":
                told[user] = event.get("meta", {})
            else:
                told.pop(user, None)
        self._send(room, event, user)

    def _send(self, room: str, event: dict[str, Any], user: str) -> None:
        """Send ``event`` to this node's presence subscribers of ``room``, except the user it is about."""
        from ..client import Client

        server = self.server
        encoded: dict[Any, bytes] = {}
        for subscriber in self.tracker.subscribers(room):
            if not isinstance(subscriber, Client) or identity_of(subscriber).user == user:
                continue
            codec = subscriber.codec
            if codec not in encoded:
                encoded[codec] = codec.encode(event)
            server.send_payload(subscriber, encoded[codec], codec.binary, encoded=True)

    # -- scripts ---------------------------------------------------------------------------------------------

    def _script(self, script: bytes, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        return self.scripts.run(self.link, script, keys, args)
