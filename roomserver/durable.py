"""The hub's durable side: store appends in seq order, history replies, replays that switch to live cleanly.

``WebSocketServer`` hands the core's durable effects to ``DurableRooms``:

- ``Append``: the chat goes through ``AppendPipeline`` to the store, which assigns its seq; only once it is
  stored is it broadcast (and acknowledged to its sender). A store failure becomes error ``unavailable`` to the
  sender: the message was neither stored nor sent, and the sender may retry (with the same ``msg_id``).
- ``ReadHistory``: a page from the store, sent as one ``history`` reply around the stored payloads.
- ``Replay``: a (re)joining member first gets the room's history after the seq it names, then live messages,
  with no gap and no duplicate. Live broadcasts reaching the room while the history read is in flight are
  queued for that member (``replaying``), then flushed after the replay, skipping any seq already replayed.

Why that is gap-free: a chat is broadcast only after the store confirmed it, and reads see every confirmed
append. So a message broadcast before the member was registered as replaying is in the history read (issued
after the registration), and one broadcast after it is in the queue; a message in both is skipped by seq.

Why it is duplicate-free: a read may also see an append the store has committed but whose confirmation has not
reached the hub yet (SQLite commits in its writer thread; the reader thread's answer can overtake the writer's),
so its broadcast comes after the replay ended. The member's replay then went further than this node's
broadcasts (``Relay.delivered``): its ``floors`` entry keeps those late broadcasts from it.

Why broadcast order equals seq order although a SQLite append is asynchronous: ``AppendPipeline`` keeps at most
one append batch per room in flight, and the store assigns seqs in call order. Chats that arrive meanwhile wait
and go to the store together as the next batch (a group commit): fewer transactions under load, and with the
memory store, whose Deferreds have already fired, no waiting at all.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .core import messages
from .core.errors import CloseCode, ErrorCode
from .core.filters import SubscriptionFilter
from .core.history import (
    Appended,
    HistoryPage,
    NewMessage,
    StoredMessage,
    fit_page,
    history_payload,
    replay_plan,
)
from .core.rooms import Room
from .core.session import Announce, Append, ReadHistory, Replay, TakeOver
from .interfaces import RoomRecord, Store
from .outagelog import OutageLog
from .periodic import every
from .store import create_store

if TYPE_CHECKING:
    from .client import Client
    from .server import WebSocketServer

MAX_BATCH = 256
MAX_REPLAY_PAGES = 64
SESSION_SWEEP_INTERVAL = 30.0


@dataclass(frozen=True)
class History:
    """A page of a room's history for the library (``server.history``): chat events as dicts, oldest first."""

    room: str
    messages: list[dict[str, Any]]
    more: bool
    first_seq: int
    last_seq: int


@dataclass(eq=False)
class ReplayState:
    """Live payloads (seq, payload, is_binary) that reached a replaying member's room during its replay and that
    the member wants (``DurableRooms.hold_back``), and further replays of the same room the member asked for
    meanwhile (run, in order, once this one is done)."""

    pending: list[tuple[int | None, bytes, bool]] = field(default_factory=list)
    followers: list[Replay] = field(default_factory=list)
    refused: list[Any] = field(default_factory=list)
    """Request ids of joins of the room held meanwhile for a baseline that could not be read: refused with this
    replay's end (``_held_join_failed``)."""


class AppendPipeline:
    """Per room: at most one append batch in flight; chats arriving meanwhile go together as the next batch.

    ``submit`` returns a Deferred per message that fires, in submission order per room, with its ``Appended``
    (or fails with the store's error). Callbacks run right when the store answers, so whatever they do (the
    broadcast) happens in seq order.

    A room's first append waits for the end of the current reactor turn (``later`` is ``reactor.callLater``:
    ``callLater(0)`` runs after the turn's I/O, before the next poll), so the chats of one read go to the store as
    one batch, their broadcasts leave together, and each member gets them in one ``send``. Started at once, the
    first chat would go alone and the ones behind it in a second batch: twice the store round trips and twice the
    sends per member for two chats that arrived together.
    """

    def __init__(self, store: Store, later: Callable[..., Any]) -> None:
        self.store = store
        self.later = later
        self._waiting: dict[str, list[tuple[NewMessage, defer.Deferred[Appended]]]] = {}
        self._busy: set[str] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []

    def submit(self, room: str, message: NewMessage) -> defer.Deferred[Appended]:
        done: defer.Deferred[Appended] = defer.Deferred()
        self._waiting.setdefault(room, []).append((message, done))
        if room not in self._busy:
            self._busy.add(room)  # the batch is being gathered: later chats of this turn join it
            self.later(0, self._next, room)
        return done

    def busy(self, room: str) -> bool:
        return room in self._busy

    def idle(self) -> defer.Deferred[None]:
        """Fires once no append is in flight or waiting (used before closing the store)."""
        if not self._busy:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _next(self, room: str) -> None:
        waiting = self._waiting.get(room)
        if not waiting:
            self._waiting.pop(room, None)
            self._busy.discard(room)
            if not self._busy:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return
        batch = waiting[:MAX_BATCH]
        del waiting[:MAX_BATCH]
        self._busy.add(room)
        try:
            stored = self.store.append(room, [message for message, _ in batch])
        except Exception:
            stored = defer.fail()
        stored.addCallbacks(self._stored, self._failed, callbackArgs=(room, batch), errbackArgs=(room, batch))

    def _stored(self, results: list[Appended], room: str, batch: Sequence[tuple[Any, defer.Deferred[Appended]]]
                ) -> None:
        for (_, done), result in zip(batch, results, strict=True):
            done.callback(result)
        self._next(room)

    def _failed(self, failure: Failure, room: str, batch: Sequence[tuple[Any, defer.Deferred[Appended]]]) -> None:
        for _, done in batch:
            done.errback(failure)
        self._next(room)


class DurableRooms:
    """Runs the core's durable effects for one ``WebSocketServer`` against its store."""

    log = Logger()

    def __init__(self, server: WebSocketServer, store: Store | None = None, clock: Any = None) -> None:
        self.server = server
        self.clock = clock if clock is not None else server.reactor
        self.store: Store = store if store is not None else create_store(server.options, server.reactor, clock)
        self.pipeline = AppendPipeline(self.store, self.clock.callLater)
        self.outages = OutageLog(self.log, self.clock)
        self._append_now: Callable[[str, Sequence[NewMessage]], list[Appended]] | None = getattr(
            self.store, "append_now", None)
        self.replaying: dict[str, dict[Any, ReplayState]] = {}
        self.floors: dict[str, dict[Any, int]] = {}
        """Per room, members whose replay went further than this node has broadcast yet (they resumed here
        from a node that was ahead, or the replay read a message whose append confirmation had not arrived):
        live messages up to their floor are not sent to them again."""
        self._open = False
        self._session_sweeper: task.LoopingCall | None = None
        self._in_flight: dict[Any, int] = {}
        """Per client, its chats sent to the store and not yet acknowledged or refused (a drain closes a
        client only once these are answered: ``settled``)."""
        self._settle_waiters: dict[Any, list[defer.Deferred[None]]] = {}

    def _expire_sessions(self) -> None:
        """Forget resume sessions past their ttl even when no connection closes to trigger it, and announce the
        presence leaves they were holding back."""
        if self.server.room_protocol is not None:
            for effect in self.server.room_protocol.expire_sessions():
                if isinstance(effect, Announce):
                    self.server._announce(effect)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and bring back the kept rooms (and their last seq); save rooms kept before start."""
        await self.store.open()
        self._open = True
        try:
            await self._restore_rooms()
        except BaseException:
            await self.stop()
            raise
        if self._session_sweeper is None:
            ttl = self.server.options.resume_ttl
            self._session_sweeper = every(self.clock, min(SESSION_SWEEP_INTERVAL, max(ttl / 4, 1.0)),
                                          self._expire_sessions, "expire resume sessions")

    async def _restore_rooms(self) -> None:
        registry = self.server.registry
        stored = await self.store.load_rooms()
        stored_names = set()
        for record in stored:
            room = registry.get(record.name)
            if room is None:
                room = registry.create(record.name, keep=True)
                room.meta = dict(record.meta)
            room.keep = True
            room.last_seq = max(room.last_seq, record.last_seq)
            stored_names.add(record.name)
        for room in registry:
            if room.keep and room.name not in stored_names:
                await self.store.save_room(RoomRecord(room.name, True, dict(room.meta)))
        if stored:
            self.log.info("restored {count} kept rooms from {store}", count=len(stored), store=self.store)

    async def stop(self) -> None:
        """Let in-flight appends finish, then close the store."""
        if self._session_sweeper is not None and self._session_sweeper.running:
            self._session_sweeper.stop()
        self._session_sweeper = None
        if not self._open:
            return
        await self.pipeline.idle()
        self._open = False
        await self.store.close()

    # -- room records ----------------------------------------------------------------------------------------

    def room_kept(self, room: Room) -> defer.Deferred[None]:
        """Store a kept room's record (after start; rooms kept before start are saved by ``start``)."""
        if not self._open:
            return defer.succeed(None)
        return self.store.save_room(RoomRecord(room.name, True, dict(room.meta)))

    def room_deleted(self, name: str) -> defer.Deferred[None]:
        return self.store.delete_room(name) if self._open else defer.succeed(None)

    # -- effects ---------------------------------------------------------------------------------------------

    def append(self, client: Client, effect: Append) -> None:
        message = NewMessage(effect.body, effect.msg_id, self.clock.seconds())
        if self._append_now is not None and not self.pipeline.busy(effect.room):
            # The hot path of an in-process store: stored and broadcast in this call, no Deferred.
            try:
                [result] = self._append_now(effect.room, (message,))
            except Exception:
                self._append_failed(Failure(), client, effect)
            else:
                self._appended(result, client, effect)
            return
        stored = self.pipeline.submit(effect.room, message)
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        stored.addCallbacks(self._appended, self._append_failed, callbackArgs=(client, effect),
                            errbackArgs=(client, effect))
        stored.addBoth(self._answered, client)

    def settled(self, client: Client) -> defer.Deferred[None]:
        """Fires once every chat of ``client`` in flight to the store was answered (ack or error)."""
        if not self._in_flight.get(client):
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._settle_waiters.setdefault(client, []).append(waiter)
        return waiter

    def _answered(self, result: Any, client: Client) -> Any:
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._release(client)
        return result

    def _release(self, client: Client) -> None:
        self._in_flight.pop(client, None)
        for waiter in self._settle_waiters.pop(client, []):
            waiter.callback(None)

    def _appended(self, result: Appended, client: Client, effect: Append) -> None:
        if result.duplicate:
            self.server.relay.stored_again(effect.room, result.seq, result.payload)
        else:
            self.server.relay.stored(effect.room, result.seq, result.payload)
            if effect.request_id is None:
                return
        self.server._reply(client, messages.ack(result.seq, effect.request_id, effect.msg_id, result.duplicate))

    def _append_failed(self, failure: Failure, client: Client, effect: Append) -> None:
        self.outages.failed("could not store a message for room {room}", failure, room=effect.room)
        event = messages.error(ErrorCode.UNAVAILABLE, "the message could not be stored, so it was not sent; "
                               "retry later (with the same msg_id)", effect.request_id, room=effect.room)
        if effect.msg_id is not None:
            event["msg_id"] = effect.msg_id
        self.server._reply(client, event)

    def read_history(self, client: Client, effect: ReadHistory) -> None:
        page = self.store.read(effect.room, effect.since, effect.before, effect.limit)
        page.addCallbacks(self._history_read, self._history_failed, callbackArgs=(client, effect),
                          errbackArgs=(client, effect))

    def _history_read(self, page: HistoryPage, client: Client, effect: ReadHistory) -> None:
        # One reply stays within max_message_size (a client's own limit is usually the same, and Autobahn refuses
        # to send more): a page of large messages is cut short and says "more". The reply's own envelope (room
        # name, request id: up to about 250 bytes) counts too.
        envelope = len(history_payload(effect.room, (), True, effect.request_id))
        fitted, cut = fit_page(page.messages, effect.since is not None,
                               self.server.options.max_message_size - envelope)
        payload = history_payload(effect.room, [m.payload for m in fitted], page.more or cut, effect.request_id)
        self.server.send_payload(client, payload, False)

    def _history_failed(self, failure: Failure, client: Client, effect: ReadHistory) -> None:
        self.outages.failed("could not read the history of room {room}", failure, room=effect.room)
        self.server._reply(client, messages.error(ErrorCode.UNAVAILABLE, "the history is unavailable right now",
                                                  effect.request_id, room=effect.room))

    def take_over(self, client: Client, effect: TakeOver) -> None:
        previous = self.server.get_client(effect.client_id)
        if previous is not None and previous is not client:
            previous.close(CloseCode.SESSION_TAKEN_OVER, "session resumed by another connection")

    def replay(self, client: Client, effect: Replay) -> None:
        states = self.replaying.setdefault(effect.room, {})
        current = states.get(client)
        if current is not None:
            current.followers.append(effect)  # one replay per member and room at a time, each fully answered
            return
        state = states[client] = ReplayState()
        read = defer.ensureDeferred(self._members_then_read(effect))
        read.addCallbacks(self._replay_read, self._replay_failed, callbackArgs=(client, effect, state),
                          errbackArgs=(client, effect, state))

    async def _members_then_read(self, effect: Replay) -> tuple[HistoryPage, list[StoredMessage]]:
        """In a cluster, a ``joined`` reply that lists members lists those of every node (read first)."""
        cluster = self.server.cluster_presence
        if cluster is not None and "members" in effect.reply:
            effect.reply["members"] = await cluster.members(effect.room)
        return await self._read_after(effect.room, effect.since)

    def hold_reply(self, client: Client, room: str, request_id: Any, ready: defer.Deferred[dict[str, Any]]) -> None:
        """Send a ``joined`` reply once ``ready`` gives it (its member list read, the room's baseline known); the
        room's live messages to the joiner wait behind it meanwhile, as behind a replay. If ``ready`` fails (the
        baseline could not be read: ``Relay.baseline_known``), the join is refused (``_refuse_joins``)."""
        states = self.replaying.setdefault(room, {})
        if client in states:  # already replaying this room: its messages are held by that replay
            ready.addCallbacks(lambda reply: self.server._reply(client, reply) if client.open else None,
                               self._held_join_failed, errbackArgs=(client, room, [request_id], states[client]))
            return
        state = states[client] = ReplayState()

        def send(reply: dict[str, Any]) -> None:
            current = self._end_replay(client, room, state)
            if not client.open:
                return
            try:
                if not self.server.registry.is_member(client, room):
                    self._overtaken(client, room, reply.get("id"))
                    return
                self.server._reply(client, reply)
                if current:
                    for _, payload, is_binary in state.pending:  # already filtered (hold_back)
                        self.server.send_payload(client, payload, is_binary)
            finally:
                self._run_followers(client, state)

        def failed(failure: Failure) -> None:
            if self._end_replay(client, room, state):
                queued = [request_id, *(follower.reply.get("id") for follower in state.followers)]
                self._held_join_failed(failure, client, room, queued)

        ready.addCallbacks(send, failed).addErrback(
            lambda failure: self.outages.failed("could not answer a join in room {room}", failure, room=room))

    def hold_back(
        self,
        room: Room,
        replaying: dict[Any, ReplayState],
        excluded: Container[Any],
        seq: int | None,
        payload: bytes,
        is_binary: bool,
        wanted: dict[Any, SubscriptionFilter] | None,
        kind: str | None,
    ) -> None:
        """Queue a live message for the members of ``room`` still replaying it, each as its join filter says.

        ``wanted`` is the room's per-member type filters and ``kind`` the message's type, as the fan-out computed
        them once for every member. The filter is applied here, when the message arrives, rather than when the
        queue is flushed: that is the moment a live member's copy is filtered too, so a replaying member gets
        exactly what it would have got live, whatever filter a later join of the same room sets; the payload
        need not be parsed again per member at flush time; and a filtered-out message takes no room in the
        queue of a long replay.
        """
        for member, state in replaying.items():
            if member not in room.clients or member in excluded:
                continue
            if wanted and member in wanted and not wanted[member].wants(kind):
                continue
            state.pending.append((seq, payload, is_binary))

    async def _read_after(self, room: str, since: int) -> tuple[HistoryPage, list[StoredMessage]]:
        """Everything the history holds after ``since`` (one page unless the window is larger than a page)."""
        size = self.server.options.history_size
        first = await self.store.read(room, since=since, limit=size)
        if since > first.last_seq:
            # The client knew another stream (a memory store restarted): nothing follows its ``since`` here, and
            # the reply tells it to start over at the first seq held (``replay_plan``), so that is what is replayed.
            first = await self.store.read(room, since=first.first_seq - 1, limit=size)
        collected = list(first.messages)
        page = first
        for _ in range(MAX_REPLAY_PAGES):
            if not page.more or not page.messages:
                break
            page = await self.store.read(room, since=page.messages[-1].seq, limit=size)
            collected.extend(page.messages)
        return first, collected

    def _end_replay(self, client: Client, room: str, state: ReplayState) -> bool:
        """Unregister the replay; True if it was still registered and the connection is open (not superseded,
        not closed): its request is to be answered, whether or not the client is still in the room."""
        states = self.replaying.get(room)
        if states is None or states.get(client) is not state:
            return False
        del states[client]
        if not states:
            del self.replaying[room]
        return client.open

    def _replay_read(
        self, result: tuple[HistoryPage, list[StoredMessage]], client: Client, effect: Replay, state: ReplayState
    ) -> None:
        if not self._end_replay(client, effect.room, state):
            return
        if state.refused:  # a join held meanwhile could not get the room's baseline: the member is out
            self._refuse_joins(client, effect.room, self._asked(effect, state))
            return
        try:
            if self.server.registry.is_member(client, effect.room):
                self._send_replay(result, client, effect, state)
            else:
                self._overtaken(client, effect.room, effect.reply.get("id"))
        finally:
            self._run_followers(client, state)

    def _overtaken(self, client: Client, room: str, request_id: Any) -> None:
        """Answer a join whose member was taken out of the room before its answer was ready (its own ``leave``,
        ``delete_room``). It is answered, for it asked, but not ``joined``: coming after the ``left`` the client
        already had, that would tell it it is in the room again, and the client libraries would rejoin it at
        every reconnect."""
        self.server._reply(client, messages.error(
            ErrorCode.NOT_IN_ROOM, "the room was left before this join was answered", request_id, room=room),
            blame=False)  # a join and a leave sent together are no fault: no error budget spent

    def _send_replay(
        self, result: tuple[HistoryPage, list[StoredMessage]], client: Client, effect: Replay, state: ReplayState
    ) -> None:
        first, stored = result
        room = self.server.registry.get(effect.room)
        if room is not None:
            room.last_seq = max(room.last_seq, first.last_seq)
        plan = replay_plan(effect.since, first)
        self.server._reply(client, messages.recovery(dict(effect.reply), plan.recovered, plan.first_seq))
        last = plan.first_seq - 1
        wants_chats = self._wants_chats(client, effect.room)
        for message in stored:
            if message.seq > last:
                if wants_chats:
                    self.server.send_payload(client, message.payload, False)
                last = message.seq
        for seq, payload, is_binary in state.pending:  # already filtered by the join filter (hold_back)
            if seq is None or seq > last:
                self.server.send_payload(client, payload, is_binary)
                last = seq if seq is not None else last
        if last > self.server.relay.delivered(effect.room):
            # The read saw messages whose broadcast has not reached this node's members yet: in a cluster,
            # stored by a node that is ahead; on one node, committed by the store while its confirmation was
            # still on its way (SQLite's writer thread commits before the reactor hears of it). Their broadcast
            # must not reach this member a second time.
            self.floors.setdefault(effect.room, {})[client] = last
        self.server.relay.replayed(effect.room, first.last_seq)

    def ahead_of(self, room: str, seq: int) -> frozenset[Any]:
        """Members of ``room`` that already got ``seq`` through their replay; forgets those caught up."""
        floors = self.floors[room]
        ahead = frozenset(member for member, floor in floors.items() if floor >= seq)
        for member in [member for member, floor in floors.items() if floor <= seq]:
            del floors[member]
        if not floors:
            del self.floors[room]
        return ahead

    def _wants_chats(self, client: Client, room: str) -> bool:
        """False if the member joined ``room`` with a ``filter`` that leaves chats out."""
        protocol = self.server.room_protocol
        wanted = protocol.subscriptions.get(room, {}).get(client) if protocol is not None else None
        return wanted is None or bool(wanted.wants("chat"))

    def _replay_failed(self, failure: Failure, client: Client, effect: Replay, state: ReplayState) -> None:
        self.outages.failed("could not replay the history of room {room}", failure, room=effect.room)
        if self._end_replay(client, effect.room, state):
            self._refuse_joins(client, effect.room, self._asked(effect, state))

    @staticmethod
    def _asked(effect: Replay, state: ReplayState) -> list[Any]:
        """The request ids a replay's end answers: its own, the joins queued behind it, those refused meanwhile."""
        return [effect.reply.get("id"), *(follower.reply.get("id") for follower in state.followers), *state.refused]

    def _held_join_failed(self, failure: Failure, client: Client, room: str, request_ids: list[Any],
                          replay: ReplayState | None = None) -> None:
        """A held ``joined`` whose room's baseline could not be read (the relay logged why). Behind a replay of
        the room still under way (``replay``), the refusal waits for the replay's end and takes its answer along:
        taken out now, the member would be answered ``joined`` by that replay while out of the room."""
        if replay is not None and self.replaying.get(room, {}).get(client) is replay:
            replay.refused.extend(request_ids)
        elif client.open:
            self._refuse_joins(client, room, request_ids)

    def _refuse_joins(self, client: Client, room: str, request_ids: list[Any]) -> None:
        """The member could not be brought up to date (its replay failed), or the node cannot promise it the
        room's messages (the room's baseline could not be read): take it out again (presence and filters too, as
        a leave would) so it can retry, rather than leave it joined with a hole in its sequence. Every join of
        the room that waited on it (``request_ids``: queued behind a replay too) is refused alike: the member
        they would have answered is out."""
        self.server.remove_from_room(client, room)
        for request_id in request_ids:
            self.server._reply(client, messages.error(
                ErrorCode.UNAVAILABLE, "the room's messages are unavailable right now; the room was not joined, "
                "retry later", request_id, room=room))

    def _run_followers(self, client: Client, state: ReplayState) -> None:
        """The joins queued behind a replay, each answered in turn (``not_in_room`` for a member that left
        meanwhile: ``_overtaken``)."""
        for follower in state.followers:
            if client.open:
                self.replay(client, follower)

    def forget(self, client: Client) -> None:
        """A closed connection: drop its replay queues (and its in-flight count: nothing can reach it now)."""
        self._release(client)
        for room in [room for room, states in self.replaying.items() if client in states]:
            self._end_replay(client, room, self.replaying[room][client])
        for room in [room for room, floors in self.floors.items() if client in floors]:
            del self.floors[room][client]
            if not self.floors[room]:
                del self.floors[room]

    # -- library ---------------------------------------------------------------------------------------------

    async def history(self, room: str, since: int | None, limit: int, before: int | None) -> History:
        page = await self.store.read(room, since=since, before=before, limit=limit)
        return History(room, [orjson.loads(m.payload) for m in page.messages], page.more, page.first_seq,
                       page.last_seq)
