"""The seams between the hub and its backends, each with the guarantees every implementation must keep.

A backend is chosen by option (``--store memory``, ``--store sqlite:PATH``, ``--store redis://...``;
``--broker memory``, ``--broker redis://...``) and the hub only ever talks to these interfaces.
tests/test_store_contract.py runs the same contract suite against every store, so a new backend proves these
guarantees by joining its parametrization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer

from .core.history import Appended, HistoryPage, NewMessage


class StoreError(Exception):
    """A store could not do what was asked (I/O error, locked or read-only database, unreachable server).

    Its message is meant for operators (logs, start-up errors); clients only ever see error code
    ``unavailable``.
    """


class BrokerError(StoreError):
    """A broker could not be reached at start (a ``StoreError`` so the server reports it the same way)."""


@dataclass(frozen=True)
class RoomRecord:
    """A room the store keeps: created with ``keep=True`` (recreated at start) and/or holding history."""

    name: str
    keep: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0


class SyncAppend(Protocol):
    """Optional for a store that works in process memory: append without a Deferred.

    Same guarantees as ``Store.append``; the hub calls it on its hot path instead (no Deferred to build and
    fire per chat) whenever no asynchronous append of that room is in flight.
    """

    def append_now(self, room: str, batch: Sequence[NewMessage]) -> list[Appended]: ...


class Store(Protocol):
    """Message history and room records.

    Guarantees every implementation keeps:

    - **Seq.** ``append`` assigns each room's seqs: 1, 2, 3... with no gap and no reuse, even across restarts of
      a persistent store and after every message of the room expired. A failed append assigns nothing.
    - **Order.** Appends to one room take effect in call order, and their Deferreds fire in that order. (The hub
      also keeps at most one append per room in flight, so a backend needs no per-room locking of its own.)
    - **Atomic batches.** ``append(room, batch)`` stores the whole batch or nothing; its Deferred fails with
      ``StoreError`` in the latter case.
    - **Read-your-writes.** A read started after an append's Deferred fired sees that append.
    - **Window.** A read returns only messages among the room's last ``history_size`` and younger than
      ``history_ttl`` seconds (if set). Older ones may linger on disk until pruned, but are never returned.
    - **Dedupe.** A message whose ``msg_id`` the room stored within the last ``dedupe_window`` seconds is not
      stored again: its ``Appended`` carries the original seq and ``duplicate=True``. (The memory store
      remembers at most ``history.MEMORY_DEDUPE_IDS`` ids a room within the window, the oldest forgotten first.)
    - **Payloads are opaque and exact.** The stored payload is ``history.with_seq(body, seq)``, returned
      byte for byte by reads.
    - **Never blocks the reactor.** Every method returns a Deferred; blocking I/O happens in threads or over
      non-blocking sockets. An in-memory store returns Deferreds that have already fired.
    """

    def open(self) -> defer.Deferred[None]:
        """Connect, create or migrate the schema and prove the store is writable; fails with a ``StoreError``
        whose message says what is wrong (the server then refuses to start)."""

    def close(self) -> defer.Deferred[None]:
        """Release connections and threads; pending operations finish first."""

    def append(self, room: str, batch: Sequence[NewMessage]) -> defer.Deferred[list[Appended]]:
        """Assign seqs to ``batch`` (in order) and store it; one ``Appended`` per message, in order."""

    def read(
        self, room: str, since: int | None = None, before: int | None = None, limit: int = 100
    ) -> defer.Deferred[HistoryPage]:
        """Up to ``limit`` stored messages with ``since < seq < before``, oldest first: the oldest such when
        ``since`` is given (paging forward), else the newest (paging backward). An unknown room reads as an
        empty page with ``last_seq`` 0."""

    def save_room(self, record: RoomRecord) -> defer.Deferred[None]:
        """Create or update a room's record (``keep`` and ``meta``; ``last_seq`` is the store's own)."""

    def delete_room(self, name: str) -> defer.Deferred[None]:
        """Forget a room's record, history and msg_ids; only its seq counter survives, so seqs are never
        reused."""

    def load_rooms(self) -> defer.Deferred[list[RoomRecord]]:
        """The records of every kept room (``keep=True``), with their ``last_seq``."""

    def room_idle(self, name: str) -> None:
        """A room that is not kept has no member left on this server.

        A store holding history in process memory may drop that history once the room stays unused for its
        ``idle_grace`` (the resume ttl: long enough for its members to resume), so churning room names cannot
        grow memory without bound; its seq counter stays. Persistent and shared stores ignore it: their history
        lasts as long as ``history_size``/``history_ttl`` say. Any later append makes the room used again.
        """

    def room_used(self, name: str) -> None:
        """A room has a member on this server again (after ``room_idle``): its history must stay, even if no one
        appends to it (members who only read, resume or ask for history)."""


class Broker(Protocol):
    """Carries a room's stored messages to the other nodes of a cluster that have members in it.

    The hub always delivers its own members' chats locally, straight after the store assigned their seq; the
    broker only crosses nodes (``memory``: there are none). Guarantees every implementation keeps:

    - **Published once.** ``publish(room, seq, payload)`` sends the stored message once to every node
      subscribed to ``room`` (not back through the broker to local members). Delivery between nodes is at most
      once and in no guaranteed order: every message carries the seq the shared store assigned, and the
      receiving node restores the order and fills gaps from the store (``roomserver.core.sequencer``).
    - **Subscriptions follow local membership.** The hub calls ``subscribe(room)`` when the room gets its
      first member on this node and ``unsubscribe(room)`` after the last one left, so subscriptions never grow
      with room churn. Both are idempotent and never fail: while the broker is disconnected they take effect
      when it is back.
    - **No deaf node.** A lost or silently dead subscription is noticed within 2 seconds; until the broker has
      resubscribed, ``health()`` reports ``ok: False`` (the node reports ``degraded``). After resubscribing
      it calls ``on_resubscribed()``, so the node fetches from the store whatever its members missed.
    - **Failures are reported, never swallowed.** ``publish`` fails (``StoreError``-like, logged by the hub)
      while the broker is unreachable; the message is already stored, and the broker publishes the room's
      latest message again once it is back, so the other nodes see the gap and fill it from the store.
    - **Never blocks the reactor.**

    Optionally, ``fuse(store) -> bool``: the broker may have the store publish what it appends, in the same
    step (the Redis broker does with the Redis store on the same server: one round trip, and the channel in seq
    order). When it returns True the hub calls ``publish`` no more, and offers its own chats to a room's sequence
    as "will come again in order" while subscribed (``RoomSequence.offer(..., fetch=False)``).
    """

    name: str

    def start(self, on_message: Callable[[str, int, bytes], None], on_resubscribed: Callable[[], None],
              on_subscribed: Callable[[str], None]) -> defer.Deferred[None]:
        """Connect; ``on_message(room, seq, payload)`` for every message another node published to a subscribed
        room; ``on_subscribed(room)`` once a new subscription is in effect (what was published before it is
        read from the store). Fails if the broker cannot be reached at start (the server then refuses to
        start)."""

    def stop(self) -> defer.Deferred[None]:
        """Unsubscribe everything and disconnect."""

    def subscribe(self, room: str) -> None:
        """Start receiving ``room``'s messages from other nodes."""

    def unsubscribe(self, room: str) -> None:
        """Stop receiving ``room``'s messages."""

    def publish(self, room: str, seq: int, payload: bytes) -> defer.Deferred[None]:
        """Send a stored message (``payload`` with its ``seq``) to the other nodes subscribed to ``room``."""

    def health(self) -> dict[str, Any]:
        """``{"backend": name, "ok": bool, ...}`` for /healthz and the stats."""
