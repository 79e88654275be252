"""The Redis broker (``--broker redis://127.0.0.1:6379/0``): room messages between the nodes of a cluster.

Two connections per node:

- a **command** connection that publishes: ``PUBLISH <prefix>c:<room> "<seq> <node id> <payload>"``, once
  per message (a node skips its own);
- a **subscriber** connection, subscribed to ``<prefix>c:<room>`` for every room with a member on this node
  (``subscribe``/``unsubscribe`` follow local membership) and to ``<prefix>node:<id>``, this node's own
  channel, so it is always in subscribed mode.

No deaf node: the subscriber connection is pinged every ``PING_INTERVAL`` seconds (PING works in subscribed
mode); a connection that is closed (``CLIENT KILL TYPE pubsub``, the output-buffer limit, a Redis restart)
is noticed at once, one that hangs once its ping timeout passes without a pong or any other push (a node
that is only behind, its pong queued after a backlog of messages, is still receiving), when it is aborted.
The ping timeout is learned from the pongs' round trips (``roomserver.core.roundtrip``): ``PING_TIMEOUT`` on a
LAN, longer over a slow link (a fixed 1.5 s would abort every connection of a node whose round trip to Redis
is 2 s before its first pong, and that node would never hear the cluster again), at most
``PING_TIMEOUT_CEILING``.
Either way the broker reports itself unhealthy (the node says ``degraded``), reconnects with backoff,
subscribes to every room again, and once Redis confirmed the subscriptions, calls ``on_resubscribed`` so the
node fetches what its members missed from the room streams.

**Fused with the store.** When the Redis store uses the same Redis server (the usual cluster: one URL for
``--store`` and ``--broker``), ``fuse`` makes the store's append script publish each appended batch itself, as
one ``m <node> <seq>:<length>:<payload>...`` message (roomserver/store/redis.py, "Fused publishing"), and the
node publishes nothing more: one Redis round trip per batch instead of one per message, and the channel carries
every node's messages in seq order. So the node offers its own messages from the channel to the room's
sequence too (``on_message``): they are duplicates of what it delivered from the append's answer, unless the
channel was faster, and either way a message of another node that follows them finds no gap.

A publish that fails (Redis unreachable) is remembered per room (its latest message) and published again once
the command connection is back: the other nodes then see the gap and fill it from the store.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import defer, task
from twisted.logger import Logger

from ..core.roundtrip import RoundTrip
from ..interfaces import BrokerError
from ..redislink import LinkProtocol, LuaScripts, RedisLink, RedisUnavailable, RedisURL

HEARTBEAT_INTERVAL = 2.0
NODE_TTL = 3 * HEARTBEAT_INTERVAL
CLUSTER_VIEW = b"""
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local nodes, rooms = {}, {}
for _, node in ipairs(live) do
  local report = redis.call('HGET', ARGV[2] .. 'n:' .. node, 'report')
  if report then nodes[#nodes + 1] = report end
  rooms[#rooms + 1] = ARGV[2] .. 'nr:' .. node
end
local count = 0
if #rooms > 0 then count = #redis.call('SUNION', unpack(rooms)) end
return {count, nodes}
"""
# KEYS: n:<node>, nr:<node>; ARGV: the report, the ttl (ms), 1 to rewrite the room set, then the rooms. The
# report and its expiry in one step (a node that died in between would leave a report for ever). Returns 0 if the
# room set is not there (it expired: a reactor stall longer than the ttl; or the node has no room), 1 if it is.
NODE_BEAT = b"""
redis.call('HSET', KEYS[1], 'report', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])
  for i = 4, #ARGV, 1000 do redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
end
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""
# KEYS: nr:<node>; ARGV: SADD or SREM, a room, the ttl (ms) if that room is the node's only one. Changes the room
# set only if it is there, or if the room is all of it: a set the beat did not build (expired, or never written)
# would lack the node's other rooms, and nothing would ever complete it. Returns 0 if it was left out (the next
# beat builds the set whole).
NODE_ROOM = b"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[3] == '' then return 0 end
  redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call(ARGV[1], KEYS[1], ARGV[2])
return 1
"""
PING_INTERVAL = 0.5
PING_TIMEOUT = 1.5
PING_TIMEOUT_CEILING = 15.0
START_TIMEOUT = 5.0
SUBSCRIBE_CHUNK = 500
PRESENCE_SNAPSHOT = b"presence "
"""Starts the messages on a node's own channel that carry a room's presence read for it (``on_presence_snapshot``)."""


class _Subscriber(LinkProtocol):
    """A txredisapi protocol in subscribed mode: pushes (messages, confirmations, pongs) go to the broker."""

    broker: RedisBroker

    def replyReceived(self, reply: Any) -> None:
        if isinstance(reply, list) and reply and reply[0] in (b"message", b"subscribe", b"unsubscribe", b"pong"):
            self.broker._pushed(self, reply)
        else:
            super().replyReceived(reply)

    def send(self, *args: Any) -> None:
        """Write a command whose answer comes back as a push (SUBSCRIBE, UNSUBSCRIBE, PING)."""
        if self.transport is not None:
            self.transport.write(self._build_command(*args))


class RedisBroker:
    """``Broker`` over Redis pub/sub (see ``roomserver.interfaces.Broker`` and the module docstring)."""

    name = "redis"
    clustered = True
    heartbeat_interval = HEARTBEAT_INTERVAL
    log = Logger()

    def __init__(self, url: str | RedisURL, reactor: Any, *, node_id: str | None = None) -> None:
        self.url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        self.reactor = reactor
        self.node_id = node_id or secrets.token_hex(6)
        self.prefix = self.url.prefix.encode()
        self._node = self.node_id.encode()
        self.rooms: set[str] = set()
        self.subscribed = False  # Redis confirmed every subscription of the current connection
        self.resubscriptions = 0
        self.received = 0
        self.published = 0
        self._fused: Any = None  # the Redis store that publishes for this broker (``fuse``)
        self._owed: dict[str, tuple[int, bytes]] = {}
        self._rooms_dirty = True  # rewrite ``nr:<node>`` whole at the next heartbeat
        self.scripts = LuaScripts((NODE_BEAT, NODE_ROOM))
        self._on_message: Callable[[str, int, bytes], None] | None = None
        self._on_resubscribed: Callable[[], None] | None = None
        self._on_subscribed: Callable[[str], None] | None = None
        self._ping_sent: float | None = None
        self.round_trip = RoundTrip(PING_TIMEOUT, PING_TIMEOUT_CEILING)
        """The subscriber connection's round trip to Redis, measured by its pongs: sets the ping timeout."""
        self._pushes = 0  # pushes received on the subscriber connection (messages, confirmations, pongs)
        self._pushes_seen = 0  # ``_pushes`` at the last liveness check
        self._pushes_at_ping = 0  # ``_pushes`` when the last PING was sent
        self._progress_at = 0.0  # when the last liveness check found new pushes
        self._sync_pending = False
        self._pinger: task.LoopingCall | None = None
        self._heart: task.LoopingCall | None = None
        self.report: Callable[[], dict[str, Any]] = lambda: {}
        self.on_presence: Callable[[str, bytes, bytes], None] | None = None
        """(room, sender node, event) for every cluster presence event on a subscribed room's channel
        (``p <node> <json>``, published by roomserver/broker/presence.py's scripts), this node's own included."""
        self.publisher_ready: list[Callable[[Any], None]] = []
        """Called with each new publisher connection (the cluster presence resyncs on it)."""
        self.resubscribed: list[Callable[[], None]] = []
        """Called once Redis confirmed every subscription of a new subscriber connection, after
        ``on_resubscribed`` (the cluster presence catches its watchers up: nothing told it what it missed)."""
        self.on_presence_snapshot: Callable[[bytes], None] | None = None
        """Called with every ``presence <json>`` message on this node's own channel: a room's presence as Redis
        held it, read for this node (roomserver/broker/presence.py, ``SNAPSHOT``)."""
        self.presence_report: Callable[[], dict[str, Any]] | None = None
        self.on_node_message: Callable[[bytes], None] | None = None
        """Called with every message on this node's own channel (``<prefix>node:<id>``: notices other nodes
        address to this one, e.g. a shared resume session taken elsewhere, roomserver/broker/sessions.py)."""
        self.sessions_report: Callable[[], dict[str, Any]] | None = None
        self.cluster_view: dict[str, Any] | None = None
        broker = self

        class Subscriber(_Subscriber):
            pass

        Subscriber.broker = broker
        self.publisher = RedisLink(self.url, reactor, name="redis broker (publish)", on_ready=self._publisher_ready)
        self.subscriber = RedisLink(self.url, reactor, name="redis broker (subscribe)", protocol_class=Subscriber,
                                    on_ready=self._subscriber_ready, on_lost=self._subscriber_lost)

    def __repr__(self) -> str:
        return f"RedisBroker({str(self.url)!r}, node={self.node_id})"

    def channel(self, room: str) -> bytes:
        return self.prefix + b"c:" + room.encode()

    @property
    def node_channel(self) -> bytes:
        return self.prefix + b"node:" + self.node_id.encode()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def _start(self) -> None:
        self.publisher.start()
        self.subscriber.start()
        try:
            await self.publisher.when_connected(START_TIMEOUT)
            await self.subscriber.when_connected(START_TIMEOUT)
        except RedisUnavailable as exc:
            await self.stop()
            raise BrokerError(f"cannot use the Redis broker at {self.url}: {exc}") from exc
        self._pinger = task.LoopingCall(self._ping)
        self._pinger.clock = self.reactor
        self._pinger.start(PING_INTERVAL, now=False)
        self._heart = task.LoopingCall(self._heartbeat)
        self._heart.clock = self.reactor
        self._heart.start(HEARTBEAT_INTERVAL, now=True)

    def start(self, on_message: Callable[[str, int, bytes], None], on_resubscribed: Callable[[], None],
              on_subscribed: Callable[[str], None]) -> defer.Deferred[None]:
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._on_subscribed = on_subscribed
        return defer.ensureDeferred(self._start())

    async def _stop(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        if self._heart is not None and self._heart.running:
            self._heart.stop()
        self._heart = None
        if self.publisher.connected:  # leave the cluster view now rather than when the ttl runs out
            try:
                await self.publisher.command("ZREM", self.prefix + b"nodes", self._node)
                await self.publisher.command("DEL", self.prefix + b"n:" + self._node,
                                             self.prefix + b"nr:" + self._node)
            except Exception as exc:
                self.log.warn("redis broker: could not leave the cluster view: {error}", error=exc)
        self.subscribed = False
        await self.subscriber.stop()
        await self.publisher.stop()

    def stop(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    def health(self) -> dict[str, Any]:
        ok = self.subscribed and self.publisher.connected
        report: dict[str, Any] = {
            "backend": "redis", "ok": ok, "url": str(self.url), "node": self.node_id,
            "subscriptions": len(self.rooms), "resubscriptions": self.resubscriptions,
            "received": self.received,
            "published": self.published + (self._fused.published if self._fused is not None else 0),
            "fused": self._fused is not None,
            "outages": self.subscriber.outages + self.publisher.outages,
            "reply_timeouts": self.publisher.reply_timeouts, "behind": self.publisher.behind,
            "ping_timeout": round(self.round_trip.timeout, 3),
        }
        if self.cluster_view is not None:
            report["cluster"] = self.cluster_view
        if self.presence_report is not None:
            report["presence"] = self.presence_report()
        if self.sessions_report is not None:
            report["sessions"] = self.sessions_report()
        if not ok:
            report["state"] = "resubscribing" if self.subscriber.connected else "reconnecting"
        return report

    # -- subscriptions ---------------------------------------------------------------------------------------

    def subscribe(self, room: str) -> None:
        if room in self.rooms:
            return
        self.rooms.add(room)
        connection = self.subscriber.protocol
        if connection is not None:
            connection.send("SUBSCRIBE", self.channel(room))
        self._node_rooms("SADD", room)

    def unsubscribe(self, room: str) -> None:
        if room not in self.rooms:
            return
        self.rooms.discard(room)
        connection = self.subscriber.protocol
        if connection is not None:
            connection.send("UNSUBSCRIBE", self.channel(room))
        self._node_rooms("SREM", room)

    def _node_rooms(self, verb: str, room: str) -> None:
        """Keep ``<prefix>nr:<node>``, this node's rooms, for the cluster view (best effort: the heartbeat
        rewrites it whole after a reconnect, or when it was not there)."""
        if self.publisher.connected:
            whole = int(NODE_TTL * 1000) if verb == "SADD" and self.rooms == {room} else ""
            changed = self.scripts.run(self.publisher, NODE_ROOM, [self.prefix + b"nr:" + self._node],
                                       [verb, room, whole])
            changed.addCallbacks(self._node_rooms_changed, lambda _: None)

    def _node_rooms_changed(self, there: Any) -> None:
        if not int(there):
            self._rooms_dirty = True

    def _heartbeat(self) -> defer.Deferred[None]:
        """Every HEARTBEAT_INTERVAL: publish this node's report (with a ttl), then read the cluster view."""
        return defer.ensureDeferred(self._beat()).addErrback(
            lambda failure: self.log.debug("heartbeat failed: {error}", error=failure.getErrorMessage()))

    async def _beat(self) -> None:
        if not self.publisher.connected:
            return
        now = self.reactor.seconds()
        report = orjson.dumps({"node": self.node_id, **self.report(), "heartbeat": now})
        if not await self._write_node(report) and self.rooms:
            await self._write_node(report)  # the room set had expired (a stall longer than the ttl): build it now
        await self.publisher.command("ZADD", self.prefix + b"nodes", now, self._node)
        count, reports = await self.publisher.command(
            "EVAL", CLUSTER_VIEW, 1, self.prefix + b"nodes", now - NODE_TTL, self.prefix)
        nodes = [orjson.loads(item) for item in reports]
        self.cluster_view = {
            "nodes": len(nodes), "rooms": int(count),
            "connections": sum(int(node.get("connections", 0)) for node in nodes),
            "per_node": sorted(nodes, key=lambda node: str(node.get("node"))), "as_of": now,
        }

    async def _write_node(self, report: bytes) -> bool:
        """Write this node's report and refresh its room set (rewritten whole if it is due); False if the room
        set was not there, which makes it due."""
        rebuild = self._rooms_dirty
        rooms = sorted(self.rooms) if rebuild else []
        self._rooms_dirty = False
        try:
            there = await self.scripts.run(
                self.publisher, NODE_BEAT, [self.prefix + b"n:" + self._node, self.prefix + b"nr:" + self._node],
                [report, int(NODE_TTL * 1000), 1 if rebuild else 0, *rooms])
        except Exception:
            self._rooms_dirty = self._rooms_dirty or rebuild
            raise
        if not int(there):
            self._rooms_dirty = True
        return bool(int(there))

    def _subscriber_ready(self, connection: Any) -> None:
        """A new subscriber connection: subscribe to everything, then a PING whose pong (which Redis sends
        after every confirmation) marks the node as subscribed again."""
        self.subscribed = False
        channels = [self.node_channel] + [self.channel(room) for room in sorted(self.rooms)]
        for start in range(0, len(channels), SUBSCRIBE_CHUNK):
            connection.send("SUBSCRIBE", *channels[start:start + SUBSCRIBE_CHUNK])
        self._sync_pending = True
        self._sent_ping()
        connection.send("PING")

    def _sent_ping(self) -> None:
        self._ping_sent = self.reactor.seconds()
        self._pushes_at_ping = self._pushes

    def _subscriber_lost(self) -> None:
        self.subscribed = False
        self._ping_sent = None
        self._sync_pending = False

    def _ping(self) -> None:
        """Every PING_INTERVAL: abort a subscriber connection whose last PING went unanswered too long."""
        connection = self.subscriber.protocol
        if connection is None:
            return
        now = self.reactor.seconds()
        if self._pushes != self._pushes_seen:
            # Still receiving: a pong queued behind a backlog of messages is late, not lost. A node that is
            # merely behind must not drop its subscription (and then find the backlog trimmed from history).
            self._pushes_seen = self._pushes
            self._progress_at = now
        if self._ping_sent is not None:
            if now - max(self._ping_sent, self._progress_at) > self.round_trip.timeout:
                self.log.warn("redis broker: the subscriber connection stopped answering for {timeout:.1f} s; "
                              "reconnecting", timeout=self.round_trip.timeout)
                self.round_trip.timed_out()
                self.subscribed = False
                if connection.transport is not None:
                    connection.transport.abortConnection()
            return
        self._sent_ping()
        connection.send("PING")

    def _pushed(self, connection: Any, reply: list[Any]) -> None:
        if connection is not self.subscriber.protocol:
            return
        self._pushes += 1
        kind = reply[0]
        if kind == b"message":
            self._message(bytes(reply[1]), bytes(reply[2]))
        elif kind == b"subscribe" and not self._sync_pending and self._on_subscribed is not None:
            # One room's new subscription is in effect: the node reads what was published just before it.
            head = self.prefix + b"c:"
            channel = bytes(reply[1])
            if channel.startswith(head):
                room = channel[len(head):].decode("utf-8", "surrogateescape")
                if room in self.rooms:
                    self._on_subscribed(room)
        elif kind == b"pong":
            if self._ping_sent is not None and self._pushes == self._pushes_at_ping + 1:
                # Only a pong that nothing else came before is a round trip; one queued behind messages or
                # subscription confirmations measures the queue (Karn's rule: ambiguous samples are not taken).
                self.round_trip.measured(self.reactor.seconds() - self._ping_sent)
            self._ping_sent = None
            if self._sync_pending:
                self._sync_pending = False
                self.subscribed = True
                self.resubscriptions += 1
                if self.resubscriptions > 1:
                    self.log.info("redis broker: resubscribed to {count} rooms", count=len(self.rooms))
                if self._on_resubscribed is not None:
                    self._on_resubscribed()
                for hook in self.resubscribed:
                    hook()

    def _message(self, channel: bytes, data: bytes) -> None:
        if channel == self.node_channel:
            if data.startswith(PRESENCE_SNAPSHOT):
                if self.on_presence_snapshot is not None:
                    self.on_presence_snapshot(data[len(PRESENCE_SNAPSHOT):])
            elif self.on_node_message is not None:
                self.on_node_message(data)
            return
        head = self.prefix + b"c:"
        if not channel.startswith(head) or self._on_message is None:
            return
        room = channel[len(head):].decode("utf-8", "surrogateescape")
        seq_text, _, rest = data.partition(b" ")
        sender, _, payload = rest.partition(b" ")
        if seq_text == b"p":  # a cluster presence event: every node forwards it to its local subscribers once
            if room in self.rooms and self.on_presence is not None:
                self.on_presence(room, sender, payload)
            return
        if seq_text == b"m":
            if room in self.rooms:
                self._batch(room, sender, payload, self._on_message)
            return
        if sender == self._node:
            return  # our own message: already delivered locally
        try:
            seq = int(seq_text)
        except ValueError:
            self.log.warn("redis broker: ignoring a malformed message on {channel!r}", channel=channel)
            return
        if room not in self.rooms:
            return  # an unsubscription in flight
        self.received += 1
        self._on_message(room, seq, payload)

    def _batch(self, room: str, sender: bytes, entries: bytes, deliver: Callable[[str, int, bytes], None]) -> None:
        """A fused append's batch (``<seq>:<length>:<payload>`` repeated), this node's own included."""
        own = sender == self._node
        position, end = 0, len(entries)
        try:
            while position < end:
                colon = entries.index(b":", position)
                seq = int(entries[position:colon])
                second = entries.index(b":", colon + 1)
                start = second + 1
                stop = start + int(entries[colon + 1:second])
                if stop > end:
                    raise ValueError("a payload runs past the end")
                position = stop
                if not own:
                    self.received += 1
                deliver(room, seq, entries[start:stop])
        except ValueError:
            self.log.warn("redis broker: ignoring the malformed end of a batch on room {room!r}", room=room)

    def fuse(self, store: Any) -> bool:
        """Have ``store`` publish what it appends, if it is the Redis store on this broker's Redis server (see
        the module docstring); True if so, and then the node must not ``publish`` its messages again."""
        from ..store.redis import RedisStore

        if not isinstance(store, RedisStore) or not store.same_server(self.url):
            return False
        store.publish_to(self.prefix + b"c:", self._node)
        self._fused = store
        return True

    # -- publishing ------------------------------------------------------------------------------------------

    def publish(self, room: str, seq: int, payload: bytes) -> defer.Deferred[None]:
        done = self.publisher.command("PUBLISH", self.channel(room), b"%d %s %s" % (seq, self._node, payload))

        def published(_: Any) -> None:
            self.published += 1
            owed = self._owed.get(room)
            if owed is not None and owed[0] <= seq:
                del self._owed[room]

        def failed(failure: Any) -> Any:
            owed = self._owed.get(room)
            if owed is None or owed[0] < seq:
                self._owed[room] = (seq, payload)
            return failure

        return done.addCallbacks(published, failed)

    def _publisher_ready(self, connection: Any) -> None:
        self.scripts.load(connection)
        self._rooms_dirty = True
        for hook in self.publisher_ready:
            hook(connection)
        owed, self._owed = self._owed, {}
        for room, (seq, payload) in owed.items():
            self.publish(room, seq, payload).addErrback(lambda failure: None)
