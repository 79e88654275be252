"""``Relay``: how a stored message reaches this node's members, alone or in a cluster.

One node (``--broker memory``): a chat stored by the hub goes straight to the room's local members, exactly as
before there were brokers.

A cluster (``--broker redis://...``): the relay keeps one ``RoomSequence`` (roomserver/core/sequencer.py) per
room with a member on this node, and subscribes the broker to exactly those rooms. Messages come in from the
hub's own appends (delivered at once, then published once through the broker) and from the other nodes
(through the broker); both go through the room's sequence, so the members here see every seq once, in order.
A gap (a message that overtook another, or one lost while the subscription was down) is filled by reading the
shared store; after the broker resubscribes, every room catches up from the store.

The relay also builds this node's report for the cluster view (``_report``, sent with every broker
heartbeat) and reads the view back as ``ClusterStats`` (``cluster_stats``, behind
``server.get_cluster_stats()``).

The baseline of a room this node starts serving is the store's last seq when the first local member joined.
Until it is known, the ``joined`` replies of the room's members here wait (``baseline_known``): the read is
sent when the first member joins, so a chat sent after a member holds its ``joined`` is appended after the
read and lies above the baseline; with the reply sent at once, a read that reached Redis late (a slow link, a
reconnecting connection) could come back with a baseline above such chats, and a subscription that was late
too would miss them: the member never got them.

A baseline read that fails refuses the joins waiting for it (``unavailable``: they leave the room again) rather
than answer them: a later read, once the store is back, would take a baseline above the chats stored in between,
which a subscription that was down as well never brought either.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .core.history import HistoryPage
from .core.rooms import Room
from .core.sequencer import Fetch, RoomSequence, Step
from .core.stats import NODE_DEGRADED, NODE_DRAINING, NODE_OK, ClusterStats, RateMeter, cluster_from_view, single_node
from .interfaces import Broker
from .outagelog import OutageLog

if TYPE_CHECKING:
    from .server import WebSocketServer

RETRY_DELAY = 0.5


class Relay:
    """Delivers stored messages to local members and, in a cluster, across nodes through the broker."""

    log = Logger()

    def __init__(self, server: WebSocketServer, broker: Broker) -> None:
        self.server = server
        self.broker = broker
        self.clustered = bool(getattr(broker, "clustered", False))
        self.sequences: dict[str, RoomSequence] = {}
        self._baseline_waiters: dict[str, list[defer.Deferred[None]]] = {}
        self._broadcast: dict[str, int] = {}  # one node: per room with members, the last seq fanned out
        self.gap_fetches = 0
        self.skipped = 0
        self.publish_failures = 0
        self.resets = 0
        self.fused = False  # the store publishes what it appends (``Broker.fuse``): ``stored`` publishes nothing
        self.rates = RateMeter()
        self.outages = OutageLog(self.log, server.reactor)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        if hasattr(self.broker, "report"):
            self.broker.report = self._report
        fuse = getattr(self.broker, "fuse", None)
        self.fused = bool(fuse(self.server.durable.store)) if fuse is not None else False
        return self.broker.start(self._received, self._resubscribed, self._subscribed)

    def _report(self) -> dict[str, Any]:
        """This node's part of the cluster view, sent with every heartbeat (the broker adds ``node`` and
        ``heartbeat``). The rates are measured here, between consecutive heartbeats, so every viewer of the
        view sees the same figures without keeping history of its own."""
        stats = self.server.get_stats()
        rate_in, rate_out = self.rates.update(self.server.reactor.seconds(),  # type: ignore[attr-defined]
                                              stats.messages_received, stats.messages_sent)
        return {"address": self.address, "status": self.status(), "connections": stats.connections,
                "rooms": stats.rooms, "messages_sent": stats.messages_sent,
                "messages_received": stats.messages_received, "messages_in_per_s": round(rate_in, 3),
                "messages_out_per_s": round(rate_out, 3)}

    @property
    def node_id(self) -> str:
        """This node's id in the cluster view (the broker's), else its address."""
        return str(getattr(self.broker, "node_id", None) or self.address)

    @property
    def address(self) -> str:
        """``host:port``: where this node listens (the name the dashboard's samples carry)."""
        port = self.server.port
        return f"{socket.gethostname()}:{port}" if port else socket.gethostname()

    def status(self) -> str:
        """``ok``; ``draining`` while the server is stopping; ``degraded`` while the broker or the store reports
        trouble (what ``/healthz`` says, without the HTTP side)."""
        if self.server._stopping:
            return NODE_DRAINING
        for backend in (self.broker, self.server.durable.store):
            probe = getattr(backend, "health", None)
            if callable(probe):
                try:
                    if not probe().get("ok", False):
                        return NODE_DEGRADED
                except Exception:
                    return NODE_DEGRADED
        return NODE_OK

    def cluster_stats(self) -> ClusterStats:
        """The view behind ``server.get_cluster_stats()`` (see ``roomserver.core.stats.ClusterStats``).

        One node: this node's live counters. A cluster: the view the broker read at its last heartbeat (at
        most one heartbeat interval old), or this node alone, live, until the first view is read.
        """
        view = getattr(self.broker, "cluster_view", None) if self.clustered else None
        if view is None:
            return single_node(self.server.get_stats(), self.node_id, self.address, self.status(),
                               clustered=self.clustered)
        late_after = 2 * float(getattr(self.broker, "heartbeat_interval", 2.0))
        return cluster_from_view(view.get("per_node", ()), int(view.get("rooms", 0)), self.node_id,
                                 view.get("as_of"), late_after=late_after)

    def stop(self) -> defer.Deferred[None]:
        self.sequences.clear()
        for name in list(self._baseline_waiters):
            self._baseline_settled(name)
        return self.broker.stop()

    def delivered(self, name: str) -> int:
        """The last seq of room ``name`` this node delivered to its members (0 if unknown)."""
        if not self.clustered:
            return self._broadcast.get(name, 0)
        sequence = self.sequences.get(name)
        return sequence.delivered or 0 if sequence is not None else 0

    def stats(self) -> dict[str, Any]:
        return {"rooms": len(self.sequences), "gap_fetches": self.gap_fetches, "skipped": self.skipped,
                "publish_failures": self.publish_failures, "resets": self.resets,
                "duplicates": sum(sequence.duplicates for sequence in self.sequences.values())}

    # -- membership ------------------------------------------------------------------------------------------

    def member_added(self, room: Room) -> None:
        if room.name in self.sequences or not room.clients:
            return
        if not self.clustered:
            self.broker.subscribe(room.name)
            return
        sequence = self.sequences[room.name] = RoomSequence()
        self.broker.subscribe(room.name)
        self._read_baseline(room.name, sequence)

    def baseline_known(self, name: str) -> defer.Deferred[None] | None:
        """None if room ``name``'s messages from now on are sure to reach its members here; else a Deferred that
        fires once the baseline read answered, or fails with the store's failure if the read failed: the
        ``joined`` waiting for it must then not be sent (the join is refused, the member taken out again), for
        nothing could promise it the chats stored until a later read succeeds."""
        sequence = self.sequences.get(name)
        if sequence is None or sequence.started:
            return None
        waiter: defer.Deferred[None] = defer.Deferred()
        self._baseline_waiters.setdefault(name, []).append(waiter)
        return waiter

    def _baseline_settled(self, name: str, failure: Failure | None = None) -> None:
        """Answer the joins waiting for room ``name``'s baseline: go ahead, or (``failure``) refuse them."""
        for waiter in self._baseline_waiters.pop(name, []):
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    def member_removed(self, room: Room) -> None:
        if room.clients:
            return
        self._baseline_settled(room.name)
        self.sequences.pop(room.name, None)
        self._broadcast.pop(room.name, None)
        self.broker.unsubscribe(room.name)

    def _read_baseline(self, name: str, sequence: RoomSequence) -> None:
        def read(page: HistoryPage) -> None:
            if self.sequences.get(name) is sequence:
                self._apply(name, sequence, sequence.start(page.last_seq))
                self._baseline_settled(name)

        def failed(failure: Failure) -> None:
            if self.sequences.get(name) is not sequence:
                return
            self.outages.failed("could not read the last seq of room {room} (its joins here are refused until "
                                "it can be read)", failure, room=name)
            self._baseline_settled(name, failure)  # their members leave: maybe the room's last ones here
            if self.sequences.get(name) is sequence and not sequence.started:
                # Members that waited for no ``joined`` (library, replays) are still here: read again (unless a
                # replay's read gave the baseline meanwhile: ``replayed``).
                self.server.reactor.callLater(  # type: ignore[attr-defined]
                    RETRY_DELAY, self._read_baseline, name, sequence)

        self.server.durable.store.read(name, limit=1).addCallbacks(read, failed)

    def replayed(self, name: str, last_seq: int) -> None:
        """A member's replay of room ``name`` read the store when its last seq was ``last_seq``, and the member
        now has everything up to there. If the room's baseline read has not answered here (it failed, and is
        retried), this read is the baseline: a later one would lie above the chats stored in between, which a
        subscription down at the same time never brought either, and the member would never get them."""
        sequence = self.sequences.get(name)
        if not self.clustered or sequence is None or sequence.started:
            return
        self._apply(name, sequence, sequence.start(last_seq))
        self._baseline_settled(name)

    # -- messages --------------------------------------------------------------------------------------------

    def stored(self, name: str, seq: int, payload: bytes) -> None:
        """A chat this node appended: deliver it here, and publish it once for the other nodes (unless the store
        already did, in the append itself)."""
        if not self.clustered:
            self._stored_here(name, seq, payload)
            return
        if not self.fused:
            self.broker.publish(name, seq, payload).addErrback(self._publish_failed, name)
        sequence = self.sequences.get(name)
        if sequence is not None:
            # Fused and subscribed, the channel brings this message again after every earlier seq: a chat of
            # another node that this answer overtook is on its way there, not lost. Without a subscription (the
            # subscriber connection is down) nothing is on its way: a gap is read from the store at once.
            waits = self.fused and bool(getattr(self.broker, "subscribed", False))
            self._apply(name, sequence, sequence.offer(seq, payload, fetch=not waits))

    def stored_again(self, name: str, seq: int, payload: bytes) -> None:
        """A retried chat the store already held (a duplicate ``msg_id``), with the payload it stored (empty if
        it left the history). Its first attempt may have been stored with its answer lost (the Redis connection
        dropped after the script ran): its sender was told ``unavailable``, and nothing else may ever deliver it.

        One node: if its seq was not delivered here yet, it is now (``_stored_here``). A cluster: it goes the
        way of a fresh append (``stored``): the room's sequence here drops it if delivered already, and unless
        the store published it with the append, it is published for the other nodes, which drop the copies they
        have. (Without that, a broker on another Redis server than the store never carried it: no later chat
        need come to show the nodes the gap.)"""
        if not payload:
            return
        if self.clustered:
            self.stored(name, seq, payload)
            return
        last = self._broadcast.get(name)
        if last is not None and seq > last:
            self._stored_here(name, seq, payload)

    def _stored_here(self, name: str, seq: int, payload: bytes) -> None:
        """One node: deliver at once, in seq order. A seq beyond the next one means an earlier append was stored
        but its answer was lost (a Redis store whose connection dropped after the script ran): its sender was
        told ``unavailable``, and nothing else would ever deliver it. The missing seqs are then read from the
        store and delivered first, through a ``RoomSequence`` kept until the gap is filled (``_apply``)."""
        sequence = self.sequences.get(name)
        if sequence is None:
            last = self._broadcast.get(name)
            if last is not None and seq <= last:
                return  # delivered already
            if last is None or seq == last + 1:
                self._deliver(name, seq, payload)
                return
            self.log.warn("room {room}: seq {seq} was stored after {last} while {missing} never reached this node "
                          "(an append's answer was lost?): reading them from the store", room=name, seq=seq,
                          last=last, missing=seq - last - 1)
            sequence = self.sequences[name] = RoomSequence()
            sequence.start(last)
        self._apply(name, sequence, sequence.offer(seq, payload))

    def _publish_failed(self, failure: Failure, name: str) -> None:
        self.publish_failures += 1
        self.log.warn("could not publish to room {room} (the other nodes will fetch it from the store): {error}",
                      room=name, error=failure.getErrorMessage())

    def _received(self, name: str, seq: int, payload: bytes) -> None:
        sequence = self.sequences.get(name)
        if sequence is not None:
            self._apply(name, sequence, sequence.offer(seq, payload))

    def _subscribed(self, name: str) -> None:
        """A room's subscription took effect: fetch whatever was published between the baseline and now."""
        sequence = self.sequences.get(name)
        if sequence is not None:
            self._apply(name, sequence, sequence.catch_up())

    def _resubscribed(self) -> None:
        for name, sequence in list(self.sequences.items()):
            self._apply(name, sequence, sequence.catch_up())

    def _apply(self, name: str, sequence: RoomSequence, step: Step) -> None:
        for seq, payload in step.deliver:
            if self.sequences.get(name) is not sequence:
                return
            self._deliver(name, seq, payload)
        if step.fetch is not None:
            self._fetch(name, sequence, step.fetch)
        elif not self.clustered and not sequence.pending and not sequence.fetching \
                and self.sequences.get(name) is sequence:
            del self.sequences[name]  # one node's gap is filled: deliver directly again

    def _fetch(self, name: str, sequence: RoomSequence, fetch: Fetch) -> None:
        self.gap_fetches += 1
        skipped_before = sequence.skipped

        def read(page: HistoryPage) -> None:
            if self.sequences.get(name) is not sequence:
                return
            if page.last_seq < fetch.since:
                self._history_reset(name, sequence, page.last_seq)
                return
            step = sequence.filled(fetch, [(m.seq, m.payload) for m in page.messages], complete=not page.more)
            if sequence.skipped > skipped_before:
                self.skipped += sequence.skipped - skipped_before
                self.log.warn("room {room}: {count} messages left the history before this node got them",
                              room=name, count=sequence.skipped - skipped_before)
            self._apply(name, sequence, step)

        def failed(failure: Failure) -> None:
            if self.sequences.get(name) is not sequence:
                return
            sequence.failed(fetch)
            self.outages.failed("room {room}: could not fetch missed messages (retrying)", failure, room=name)
            self.server.reactor.callLater(RETRY_DELAY, self._retry, name, sequence)  # type: ignore[attr-defined]

        self.server.durable.store.read(name, since=fetch.since, before=fetch.before, limit=fetch.limit
                                       ).addCallbacks(read, failed)

    def _history_reset(self, name: str, sequence: RoomSequence, last_seq: int) -> None:
        """The store's seqs went backwards (Redis lost its data: restarted without persistence). The members
        here saw seqs the room will assign again: close them with 1012 so they reconnect and resume (their
        resume then says ``recovered: false``), and start the room over from the store's seq."""
        self.log.error("room {room}: the store's last seq went back from {old} to {new} (Redis lost its data?); "
                       "closing the room's members here so they resume", room=name, old=sequence.delivered,
                       new=last_seq)
        fresh = self.sequences[name] = RoomSequence()
        fresh.start(last_seq)
        self.resets += 1
        room = self.server.registry.get(name)
        if room is None:
            return
        from .client import Client
        from .core.errors import CloseCode

        for member in room.clients.snapshot():
            if isinstance(member, Client):
                member.close(CloseCode.SERVICE_RESTART, "the room's history was reset: reconnect and resume")

    def _retry(self, name: str, sequence: RoomSequence) -> None:
        if self.sequences.get(name) is sequence:
            self._apply(name, sequence, sequence.retry())

    def _deliver(self, name: str, seq: int, payload: bytes) -> None:
        room = self.server.registry.get(name)
        if room is not None:
            room.last_seq = max(room.last_seq, seq)
            if not self.clustered and room.clients:
                self._broadcast[name] = max(self._broadcast.get(name, 0), seq)
            self.server._fan_out(room, payload, False, seq=seq)
