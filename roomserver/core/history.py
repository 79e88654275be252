"""Message history, without I/O: the records every store speaks, the history window and the replay decision.

Every store (memory, SQLite, later Redis) exchanges the same records with the hub:

- ``NewMessage``: what the hub asks a store to append: the chat event encoded as JSON *without* its ``seq``,
  the client's optional ``msg_id`` and the time it was accepted.
- ``Appended``: what the store answers per message: the ``seq`` it assigned (or the original ``seq`` of a
  duplicate ``msg_id``) and the payload exactly as stored and broadcast.
- ``HistoryPage``: what a read answers: stored payloads oldest first, whether more exist in the direction of
  paging, and the room's bounds (first seq still available, last seq ever assigned).

The seq is spliced into the encoded event (``with_seq``) instead of re-encoding it: the event is encoded once on
the reactor thread, and any backend (a SQLite transaction, a Redis Lua script) can add the seq it assigns by
plain concatenation. History replies embed the stored payloads the same way (``history_payload``), so
"exactly as broadcast" holds byte for byte.

``RoomHistory`` is the window one room keeps in memory (the memory store is a thin wrapper around it):
the last ``size`` messages, those younger than ``ttl`` seconds, and the ``msg_id``s seen within the dedupe
window. ``replay_plan`` decides, from a client's last seen seq and what the history still holds, whether a
resume recovers everything (``recovered``) or the client must reload from ``first_seq``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from .messages import RequestId


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append: ``body`` is the encoded event without ``seq`` (a JSON object ending in ``}``)."""

    body: bytes
    msg_id: str | None
    ts: float


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome of one append: its ``seq`` and stored ``payload``; ``duplicate`` if ``msg_id`` was seen."""

    seq: int
    payload: bytes
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Stored messages, oldest first.

    ``more``: reading forward (``since`` given) there are newer messages after the last one returned;
    reading backward (no ``since``) there are older ones before the first one returned.
    ``first_seq``: the oldest seq the history still holds (``last_seq + 1`` when it holds nothing).
    ``last_seq``: the last seq ever assigned in the room (0 if none).
    """

    messages: tuple[StoredMessage, ...]
    more: bool
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Whether everything after the client's ``since`` is still available, and where the replay starts."""

    recovered: bool
    first_seq: int


def with_seq(body: bytes, seq: int) -> bytes:
    """Add ``"seq": seq`` as the last member of the encoded JSON object ``body``."""
    if body[-1:] != b"}":
        raise ValueError("body must be an encoded JSON object")
    separator = b"" if body.endswith(b"{}") else b","
    return b"%s%s\"seq\":%d}" % (body[:-1], separator, seq)


def history_payload(room: str, payloads: Iterable[bytes], more: bool, request_id: RequestId = None) -> bytes:
    """The encoded ``{"type":"history","room":R,"messages":[...],"more":B}`` reply around stored payloads."""
    head: dict[str, object] = {"type": "history", "room": room}
    tail: dict[str, object] = {"more": more}
    if request_id is not None:
        tail["id"] = request_id
    return b"%s,\"messages\":[%s],%s" % (orjson.dumps(head)[:-1], b",".join(payloads), orjson.dumps(tail)[1:])


def replay_plan(since: int, page: HistoryPage) -> ReplayPlan:
    """Decide a resume of a client that has seen everything up to ``since``, given what history holds after it.

    Recovered means the history still holds every message after ``since`` (``page`` starts right after it, or
    nothing was sent since). A ``since`` beyond the room's last seq means the room's stream is not the one the
    client knew (a memory store restarted): not recovered, the replay starts at the first available seq.
    """
    if since > page.last_seq:
        return ReplayPlan(False, page.first_seq)
    if since >= page.first_seq - 1:
        return ReplayPlan(True, since + 1)
    return ReplayPlan(False, page.first_seq)


class DedupeWindow:
    """``msg_id -> seq`` for the ids seen in the last ``window`` seconds (at most ``capacity`` of them)."""

    __slots__ = ("_capacity", "_seen", "window")

    def __init__(self, window: float, capacity: int) -> None:
        self.window = window
        self._capacity = capacity
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, msg_id: str, now: float) -> int | None:
        self.expire(now)
        entry = self._seen.get(msg_id)
        return entry[0] if entry is not None else None

    def add(self, msg_id: str, seq: int, ts: float) -> None:
        self._seen[msg_id] = (seq, ts)
        self._seen.move_to_end(msg_id)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def expire(self, now: float) -> None:
        cutoff = now - self.window
        while self._seen:
            msg_id, (_, ts) = next(iter(self._seen.items()))
            if ts >= cutoff:
                break
            del self._seen[msg_id]


MEMORY_DEDUPE_IDS = 10_000
"""The memory store's bound on the msg_ids a room remembers within the dedupe window (about 300 bytes each): a
process's memory must not grow with a room's chat rate times the window. 10,000 covers 100 seconds of a room
at 100 chats/s, and the whole default window (300 s) up to 33 chats/s; beyond that the oldest ids are forgotten
first (docs/persistence.md). SQLite and Redis keep every id of the window."""


class RoomHistory:
    """One room's history window in memory: seq assignment, bounded messages, ttl and msg_id dedupe.

    ``last_seq`` only ever grows, even when every message has expired, so a seq is never reused while the
    object lives.
    """

    __slots__ = ("_dedupe", "_messages", "last_seq", "ttl")

    def __init__(self, size: int, ttl: float | None, dedupe_window: float, last_seq: int = 0) -> None:
        self.ttl = ttl
        self.last_seq = last_seq
        self._messages: deque[tuple[int, float, bytes]] = deque(maxlen=size)
        self._dedupe = DedupeWindow(dedupe_window, capacity=max(size, MEMORY_DEDUPE_IDS))

    def __len__(self) -> int:
        return len(self._messages)

    def append(self, message: NewMessage) -> Appended:
        """Assign the next seq and keep the message, or answer a duplicate ``msg_id`` with its original seq."""
        if message.msg_id is not None:
            original = self._dedupe.get(message.msg_id, message.ts)
            if original is not None:
                return Appended(original, self._payload_of(original), duplicate=True)
        self.last_seq += 1
        payload = with_seq(message.body, self.last_seq)
        self._messages.append((self.last_seq, message.ts, payload))
        if message.msg_id is not None:
            self._dedupe.add(message.msg_id, self.last_seq, message.ts)
        return Appended(self.last_seq, payload)

    def expire(self, now: float) -> None:
        """Drop messages older than ``ttl`` and msg_ids older than the dedupe window."""
        if self.ttl is not None:
            cutoff = now - self.ttl
            while self._messages and self._messages[0][1] < cutoff:
                self._messages.popleft()
        self._dedupe.expire(now)

    def is_empty(self) -> bool:
        return not self._messages and not len(self._dedupe)

    def read(self, since: int | None, before: int | None, limit: int, now: float) -> HistoryPage:
        """Up to ``limit`` messages with ``since < seq < before``: the oldest such if ``since`` is given (paging
        forward), else the newest (paging backward); oldest first either way."""
        self.expire(now)
        low = since if since is not None else 0
        high = before if before is not None else self.last_seq + 1
        selected = [(seq, payload) for seq, _, payload in self._messages if low < seq < high]
        return page_of(selected, since is not None, limit, self.first_seq, self.last_seq)

    @property
    def first_seq(self) -> int:
        return self._messages[0][0] if self._messages else self.last_seq + 1

    def _payload_of(self, seq: int) -> bytes:
        if self._messages and seq >= self._messages[0][0]:
            index = seq - self._messages[0][0]
            if index < len(self._messages) and self._messages[index][0] == seq:
                return self._messages[index][2]
        return b""


def page_of(
    selected: Sequence[tuple[int, bytes]], forward: bool, limit: int, first_seq: int, last_seq: int
) -> HistoryPage:
    """Cut a page of at most ``limit`` from ``selected`` (ascending by seq): its head when paging forward, its
    tail when paging backward; ``more`` says whether anything was cut off."""
    more = len(selected) > limit
    chosen = selected[:limit] if forward else selected[max(len(selected) - limit, 0):]
    return HistoryPage(tuple(StoredMessage(seq, payload) for seq, payload in chosen), more, first_seq, last_seq)


def fit_page(messages: Sequence[StoredMessage], forward: bool, max_bytes: int) -> tuple[list[StoredMessage], bool]:
    """As many of ``messages`` as fit in ``max_bytes`` of payload (at least one): the oldest when paging forward,
    the newest when paging backward; True if any had to be left out (the reply then says ``more``)."""
    ordered = list(messages) if forward else list(reversed(messages))
    kept: list[StoredMessage] = []
    size = 0
    for message in ordered:
        if kept and size + len(message.payload) + 1 > max_bytes:
            break
        kept.append(message)
        size += len(message.payload) + 1
    cut = len(kept) < len(ordered)
    return (kept if forward else kept[::-1]), cut
