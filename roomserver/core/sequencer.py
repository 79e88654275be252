"""Per-room delivery order on one node of a cluster, without I/O.

In a cluster, a room's messages reach a node from two directions: its own members' chats (stored, then handed
over directly) and the other nodes' chats (through the broker). Both carry the seq the shared store assigned,
but they can arrive out of order (two nodes appending at once publish in either order), twice (a node's own
publish comes back to it), or not at all (a subscriber connection that dropped). ``RoomSequence`` turns that
into what every member must see: each seq once, in increasing order, with no gap.

- ``offer(seq, payload)``: a message arrived. Deliverable ones come back in order; a message beyond the next
  expected seq waits and the caller is asked to ``fetch`` the missing range from the store (``Step.fetch``).
  When the broker's channel is itself in seq order (the Redis store publishing, ``Broker.fuse``), a node's own
  chat is offered with ``fetch=False``: it waits for the channel, which brings whatever it overtook.
- ``filled(messages, complete)``: the store's answer. Messages the store no longer holds (out of the history
  window) are skipped once a complete answer shows they are gone, so one loss can never stall a room.
- ``catch_up()``: ask for everything after the last delivered seq (after a resubscription: whatever was
  published while this node was deaf).
- The baseline: a room a node starts serving has no "last delivered" yet. ``start(last_seq)`` sets it from the
  store's last seq when this node began listening; messages offered before that are kept and delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_FETCH = 1000


@dataclass(frozen=True, slots=True)
class Fetch:
    """Read the store for ``since < seq < before`` (``before`` None: up to the newest), at most ``limit``."""

    since: int
    before: int | None
    limit: int


@dataclass(slots=True)
class Step:
    """What to do after an event: deliver these (seq, payload) in order, then maybe fetch a range."""

    deliver: list[tuple[int, bytes]] = field(default_factory=list)
    fetch: Fetch | None = None


class RoomSequence:
    """The delivery state of one room on one node (see the module docstring)."""

    __slots__ = ("behind", "delivered", "duplicates", "fetching", "pending", "skipped", "waiting")

    def __init__(self) -> None:
        self.delivered: int | None = None  # last seq delivered; None until the baseline is known
        self.pending: dict[int, bytes] = {}
        self.waiting: set[int] = set()  # pending seqs offered with fetch=False whose second copy has not come
        self.fetching = False
        self.behind = False  # a catch-up is owed once the running fetch is answered
        self.duplicates = 0
        self.skipped = 0

    @property
    def started(self) -> bool:
        return self.delivered is not None

    def start(self, last_seq: int) -> Step:
        """The store's last seq when this node started listening to the room: deliver what comes after it.

        Messages offered before the baseline was known are never dropped by it (a chat of this node's own
        member may have been appended before the baseline read ran)."""
        if self.delivered is not None:
            return Step()
        baseline = last_seq
        if self.pending:
            baseline = min(baseline, min(self.pending) - 1)
        self.delivered = baseline
        self.pending = {seq: payload for seq, payload in self.pending.items() if seq > baseline}
        self.waiting.intersection_update(self.pending)
        step = self._drain()
        if step.fetch is None and self.behind:
            self.behind = False
            step.fetch = self.catch_up().fetch
        return step

    def offer(self, seq: int, payload: bytes, fetch: bool = True) -> Step:
        """A message arrived. ``fetch=False``: it will come again from an ordered source that brings every seq
        before it first (a node's own chat when the store publishes in seq order: the channel carries it after
        all earlier ones), so a gap below it is left for that source to fill rather than read from the store;
        that second copy, if the gap is still there, asks for the fetch."""
        if self.delivered is not None and seq <= self.delivered:
            self.duplicates += 1
            return Step()
        if seq in self.pending:
            self.duplicates += 1
            if fetch:
                self.waiting.discard(seq)
        else:
            self.pending[seq] = payload
            if not fetch:
                self.waiting.add(seq)
        if self.delivered is None:
            return Step()
        return self._drain(fetch)

    def catch_up(self) -> Step:
        """Fetch everything after the last delivered seq (unless a fetch is already running; before the baseline
        is known, once it is)."""
        if self.delivered is None or self.fetching:
            self.behind = True
            return Step()
        self.fetching = True
        return Step(fetch=Fetch(self.delivered, None, MAX_FETCH))

    def filled(self, fetch: Fetch, messages: list[tuple[int, bytes]], complete: bool) -> Step:
        """The store's answer to ``fetch``; ``complete``: it returned everything it holds in that range.

        Seqs inside a gap fetch's range that are neither in the answer nor already here are gone from the
        store (they left the history window): they are skipped rather than stall the room. Seqs beyond the
        range are only in flight: a new gap there is fetched on its own."""
        self.fetching = False
        if self.delivered is None:
            return Step()
        for seq, payload in messages:
            if seq > self.delivered and seq not in self.pending:
                self.pending[seq] = payload
        step = Step()
        if not complete:
            step.deliver = self._drain(fetch=False).deliver
            if self.pending:
                step.fetch = self._gap_fetch()
            else:
                self.fetching = True
                step.fetch = Fetch(self.delivered, None, MAX_FETCH)
            return step
        if fetch.before is not None:
            while self.delivered < fetch.before - 1:
                following = self.delivered + 1
                if following in self.pending:
                    step.deliver.append((following, self.pending.pop(following)))
                    self.waiting.discard(following)
                else:
                    self.skipped += 1
                self.delivered = following
        more = self._drain()
        step.deliver.extend(more.deliver)
        step.fetch = more.fetch
        if step.fetch is None and self.behind:
            self.behind = False
            step.fetch = self.catch_up().fetch
        return step

    def failed(self, fetch: Fetch) -> None:
        """The fetch failed (the store is unreachable); the caller retries with ``retry()`` later."""
        self.fetching = False
        if fetch.before is None:
            self.behind = True

    def retry(self) -> Step:
        """Fetch the current gap (or the owed catch-up) again, if there still is one."""
        if self.delivered is None or self.fetching:
            return Step()
        if self.pending:
            return Step(fetch=self._gap_fetch())
        if self.behind:
            self.behind = False
            return self.catch_up()
        return Step()

    def _drain(self, fetch: bool = True) -> Step:
        step = Step()
        assert self.delivered is not None
        while self.delivered + 1 in self.pending:
            self.delivered += 1
            step.deliver.append((self.delivered, self.pending.pop(self.delivered)))
            if self.waiting:
                self.waiting.discard(self.delivered)
        # Only a seq from an ordered source proves that the ones below it are lost (``waiting``: not yet).
        if fetch and len(self.pending) > len(self.waiting) and not self.fetching:
            step.fetch = self._gap_fetch()
        return step

    def _gap_fetch(self) -> Fetch:
        assert self.delivered is not None
        self.fetching = True
        before = min(self.pending)
        return Fetch(self.delivered, before, min(before - self.delivered - 1, MAX_FETCH))
