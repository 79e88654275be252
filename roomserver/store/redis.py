"""The Redis store (``--store redis://127.0.0.1:6379/0``): history and seqs shared by every node of a cluster.

Keys (all under the URL's ``prefix``, ``roomserver:`` by default; ``R`` is a room name):

- ``seq`` (hash): ``R -> last seq``. Incremented inside the append script, so the seq is assigned by Redis,
  atomically with the append, whichever node appends. Never deleted: seqs are never reused.
- ``h:R`` (stream): the room's history, one entry per message with id ``<seq>-0`` and fields ``p`` (the
  payload, exactly as broadcast) and ``t`` (when the hub accepted it). ``XADD ... MAXLEN ~ history_size`` keeps
  it bounded; reads enforce the exact window (``history_size`` and ``history_ttl``) themselves.
- ``d:R`` (hash ``msg_id -> seq``) and ``dt:R`` (sorted set of msg_ids by time): the dedupe window.
- ``rooms`` (hash): ``R -> {"keep": bool, "meta": {...}}``, the room records.

Appends and reads are Lua scripts, so each is atomic and sees one consistent state: a batch is appended
entirely (seqs, entries, msg_ids) in one script run. Every key but ``seq`` and ``rooms`` also gets a real
Redis expiry (the dedupe window, the history ttl) so rooms that stop being used leave nothing behind.

**Fused publishing.** When the Redis broker runs on the same Redis (``RedisBroker.fuse``), the append script
also publishes what it appended to the room's broker channel, in the same script run: one round trip per batch
instead of an append plus a ``PUBLISH`` per message, no window in which a message is stored but not published,
and messages on the channel in exactly seq order (the script runs atomically), so a node reading the channel
sees no gap unless one was really lost. The message is ``m <node> `` followed by ``<seq>:<length>:<payload>``
for each new message of the batch (duplicates are not published), split at about ``PUBLISH_BYTES`` of
payload; ``roomserver.broker.redis`` reads it.

Time comes from the hub's clock (passed to the scripts), not from Redis, like the other stores; a cluster's
nodes are expected to have synchronised clocks (NTP), which matters only for ``history_ttl`` and
``dedupe_window``.

If Redis is unreachable, every method fails at once with ``StoreError`` (the hub answers ``unavailable``) and
the connection is re-established in the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import txredisapi
from twisted.internet import defer
from twisted.python.failure import Failure

from ..core.history import Appended, HistoryPage, NewMessage, page_of
from ..interfaces import RoomRecord, StoreError
from ..redislink import LuaScripts, RedisLink, RedisUnavailable, RedisURL

OPEN_TIMEOUT = 5.0
PUBLISH_BYTES = 256 * 1024
"""A fused append publishes its batch in messages of about this many payload bytes at most (see ``publish_to``)."""

# The shebang makes Redis 7 check for OOM before a script runs, not at its first write: a write script either
# runs entirely or not at all. Reads are flagged no-writes.
APPEND = b"""#!lua
local room, now, size, ttl, window = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local channel, node = ARGV[6], ARGV[7]
local published, publishing = {}, 0
local function publish()
  if #published > 0 then
    redis.call('PUBLISH', channel, 'm ' .. node .. ' ' .. table.concat(published))
    published, publishing = {}, 0
  end
end
local cutoff = now - window
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. cutoff)
for i = 1, #expired, 1000 do
  redis.call('HDEL', KEYS[3], unpack(expired, i, math.min(i + 999, #expired)))
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. cutoff) end
local out, ids = {}, false
for i = 8, #ARGV, 3 do
  local id, body, ts = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local seen = false
  if id ~= '' then seen = redis.call('HGET', KEYS[3], id) end
  if seen then
    local entry = redis.call('XRANGE', KEYS[2], seen .. '-0', seen .. '-0')
    local payload = ''
    if #entry > 0 then payload = entry[1][2][2] end
    out[#out + 1] = {tonumber(seen), payload, 1}
  else
    local seq = redis.call('HINCRBY', KEYS[1], room, 1)
    local sep = ','
    if string.sub(body, -2) == '{}' then sep = '' end
    local payload = string.sub(body, 1, -2) .. sep .. '"seq":' .. seq .. '}'
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, seq .. '-0', 'p', payload, 't', ts)
    if id ~= '' then
      redis.call('HSET', KEYS[3], id, seq)
      redis.call('ZADD', KEYS[4], ts, id)
      ids = true
    end
    out[#out + 1] = {seq, payload, 0}
    if channel ~= '' then
      published[#published + 1] = seq .. ':' .. #payload .. ':' .. payload
      publishing = publishing + #payload
      if publishing >= PUBLISH_BYTES then publish() end
    end
  end
end
if channel ~= '' then publish() end
if ids then
  local ms = math.floor(window * 1000) + 1000
  redis.call('PEXPIRE', KEYS[3], ms)
  redis.call('PEXPIRE', KEYS[4], ms)
end
if ttl ~= '' then
  local oldest = now - tonumber(ttl)
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1000)
  for _, entry in ipairs(head) do
    if tonumber(entry[2][4]) >= oldest then break end
    redis.call('XDEL', KEYS[2], entry[1])
  end
  redis.call('PEXPIRE', KEYS[2], math.floor(tonumber(ttl) * 1000) + 1000)
end
return out
""".replace(b"PUBLISH_BYTES", b"%d" % PUBLISH_BYTES)

READ = b"""#!lua flags=no-writes
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local since, before, limit, now, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local oldest = nil
if ttl ~= '' then oldest = now - tonumber(ttl) end
local function seq_of(entry) return tonumber(string.match(entry[1], '^(%d+)')) end
local function fresh(entry) return oldest == nil or tonumber(entry[2][4]) >= oldest end
local floor = math.max(last - tonumber(ARGV[7]), 0)
local first = last + 1
local cursor = floor + 1
while cursor <= last do
  local batch = redis.call('XRANGE', KEYS[2], cursor .. '-0', last .. '-0', 'COUNT', 256)
  if #batch == 0 then break end
  local found = false
  for _, entry in ipairs(batch) do
    if fresh(entry) then first = seq_of(entry); found = true; break end
  end
  if found then break end
  cursor = seq_of(batch[#batch]) + 1
end
local low = first - 1
if since ~= '' then low = math.max(tonumber(since), low) end
local high = last + 1
if before ~= '' then high = tonumber(before) end
local out = {first, last}
local wanted = limit + 1
local picked = {}
if since ~= '' then
  local from = low + 1
  while #picked < wanted and from <= high - 1 do
    local batch = redis.call('XRANGE', KEYS[2], from .. '-0', (high - 1) .. '-0', 'COUNT', wanted)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if #picked < wanted and fresh(entry) then picked[#picked + 1] = entry end
    end
    from = seq_of(batch[#batch]) + 1
  end
else
  local to = high - 1
  while #picked < wanted and to >= low + 1 do
    local batch = redis.call('XREVRANGE', KEYS[2], to .. '-0', (low + 1) .. '-0', 'COUNT', wanted)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if #picked < wanted and fresh(entry) then table.insert(picked, 1, entry) end
    end
    to = seq_of(batch[#batch]) - 1
  end
end
for _, entry in ipairs(picked) do
  out[#out + 1] = seq_of(entry)
  out[#out + 1] = entry[2][2]
end
return out
"""

DELETE = b"""#!lua
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
"""


class RedisStore:
    """``Store`` in Redis, shared by every node (see ``roomserver.interfaces.Store`` for the guarantees)."""

    name = "redis"
    open_timeout = OPEN_TIMEOUT
    """Seconds ``open`` waits for a first connection before the server refuses to start."""

    def __init__(
        self,
        url: str | RedisURL,
        reactor: Any,
        *,
        clock: Any = None,
        history_size: int = 1000,
        history_ttl: float | None = None,
        dedupe_window: float = 300.0,
    ) -> None:
        self.url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        self._clock = clock if clock is not None else reactor
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.dedupe_window = dedupe_window
        self.prefix = self.url.prefix.encode()
        # Loaded on every new connection: the baseline read of a room a node starts serving runs right after
        # the join that caused it, and must not pay (or be reordered by) a NOSCRIPT round trip.
        self.scripts = LuaScripts((APPEND, READ, DELETE))
        self.link = RedisLink(self.url, reactor, name="redis store", on_ready=self.scripts.load)
        self._channel_prefix = b""
        self._node = b""
        self.published = 0  # messages the append script published (``publish_to``)

    def publish_to(self, channel_prefix: bytes, node: bytes) -> None:
        """Publish every appended batch to ``channel_prefix + room`` as node ``node`` (see "Fused publishing"
        in the module docstring); called by the Redis broker when it shares this Redis."""
        self._channel_prefix = channel_prefix
        self._node = node

    def same_server(self, url: RedisURL) -> bool:
        """Whether ``url`` names the Redis server and database this store uses (key prefixes may differ)."""
        mine = self.url
        return (mine.host, mine.port, mine.db, mine.password) == (url.host, url.port, url.db, url.password)

    def __repr__(self) -> str:
        return f"RedisStore({str(self.url)!r}, prefix={self.url.prefix!r})"

    def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"backend": "redis", "ok": self.link.connected, "url": str(self.url),
                                  "outages": self.link.outages, "reply_timeouts": self.link.reply_timeouts,
                                  "behind": self.link.behind}
        if not self.link.connected:
            report["state"] = "reconnecting"
        return report

    def key(self, kind: str, room: str | None = None) -> bytes:
        """The Redis key of ``kind`` (``seq``, ``rooms``, ``h:``, ``d:``, ``dt:``) for ``room``."""
        return self.prefix + kind.encode() + (room.encode() if room is not None else b"")

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def _open(self) -> None:
        self.link.start()
        try:
            await self.link.when_connected(self.open_timeout)
            await self.link.command("HSET", self.key("meta"), "opened_at", repr(self._clock.seconds()))
        except Exception as exc:
            await self.link.stop()
            raise StoreError(f"cannot use the Redis store at {self.url}: {exc}") from exc

    def open(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._open())

    def close(self) -> defer.Deferred[None]:
        return self.link.stop()

    # -- scripts ---------------------------------------------------------------------------------------------

    def _script(self, script: bytes, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        return self.scripts.run(self.link, script, keys, args)

    def _fail(self, failure: Failure, what: str) -> Failure:
        if failure.check(RedisUnavailable, txredisapi.RedisError):
            raise StoreError(f"Redis store ({what}): {failure.value}") from failure.value
        return failure

    # -- Store -----------------------------------------------------------------------------------------------

    def append(self, room: str, batch: Sequence[NewMessage]) -> defer.Deferred[list[Appended]]:
        args: list[Any] = [room, repr(self._clock.seconds()), self.history_size,
                           "" if self.history_ttl is None else repr(float(self.history_ttl)),
                           repr(float(self.dedupe_window)),
                           self._channel_prefix + room.encode() if self._channel_prefix else b"", self._node]
        for message in batch:
            args.extend((message.msg_id or "", message.body, repr(message.ts)))
        keys = [self.key("seq"), self.key("h:", room), self.key("d:", room), self.key("dt:", room)]
        done = self._script(APPEND, keys, args)
        done.addCallback(self._appended)
        return done.addErrback(self._fail, "append")

    def _appended(self, rows: list[Any]) -> list[Appended]:
        results = [Appended(int(seq), bytes(payload), bool(int(dup))) for seq, payload, dup in rows]
        if self._channel_prefix:
            self.published += sum(not result.duplicate for result in results)
        return results

    def read(
        self, room: str, since: int | None = None, before: int | None = None, limit: int = 100
    ) -> defer.Deferred[HistoryPage]:
        args = [room, "" if since is None else int(since), "" if before is None else int(before), int(limit),
                repr(self._clock.seconds()), "" if self.history_ttl is None else repr(float(self.history_ttl)),
                self.history_size]
        done = self._script(READ, [self.key("seq"), self.key("h:", room)], args)

        def page(reply: list[Any]) -> HistoryPage:
            first, last, flat = int(reply[0]), int(reply[1]), reply[2:]
            selected = [(int(flat[i]), bytes(flat[i + 1])) for i in range(0, len(flat), 2)]
            return page_of(selected, since is not None, limit, first, last)

        return done.addCallback(page).addErrback(self._fail, "read")

    def save_room(self, record: RoomRecord) -> defer.Deferred[None]:
        value = orjson.dumps({"keep": record.keep, "meta": record.meta})
        done = self.link.command("HSET", self.key("rooms"), record.name, value)
        return done.addCallback(lambda _: None).addErrback(self._fail, "save_room")

    def delete_room(self, name: str) -> defer.Deferred[None]:
        keys = [self.key("rooms"), self.key("h:", name), self.key("d:", name), self.key("dt:", name)]
        done = self._script(DELETE, keys, [name])
        return done.addCallback(lambda _: None).addErrback(self._fail, "delete_room")

    async def _load_rooms(self) -> list[RoomRecord]:
        flat = await self.link.command("HGETALL", self.key("rooms"))
        records = [(bytes(flat[i]).decode(), orjson.loads(flat[i + 1])) for i in range(0, len(flat), 2)]
        kept = sorted((name, value) for name, value in records if value.get("keep"))
        if not kept:
            return []
        seqs = await self.link.command("HMGET", self.key("seq"), *[name for name, _ in kept])
        return [RoomRecord(name, True, dict(value.get("meta") or {}), int(seq or 0))
                for (name, value), seq in zip(kept, seqs, strict=True)]

    def load_rooms(self) -> defer.Deferred[list[RoomRecord]]:
        return defer.ensureDeferred(self._load_rooms()).addErrback(self._fail, "load_rooms")

    def room_idle(self, name: str) -> None:
        """Shared history stays for the other nodes' members; its keys expire by ttl or stay bounded by size."""

    def room_used(self, name: str) -> None:
        """Nothing was let go: nothing to keep."""

