"""``Drainer``: carries out a ``DrainPlan`` (core/drain.py) on the reactor's clock.

The server gives it its clients and two actions: ``hint(client, after_ms)`` (send the reconnect hint, refuse
the client's chats from then on) and ``close(client, after_ms)`` (the 1001 close). Steps due at once run in the
call itself: the first batch is told in the call, and with ``interval = 0`` everyone is told and closed in the
same turn, as before batching existed.

``Handover``: after the drain, a cluster node's wait for the other nodes to continue its sessions.
"""

from __future__ import annotations

import random as random_module
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.logger import Logger

from .core.drain import DrainPlan, DrainStep

T = TypeVar("T")

HINT, CLOSE = 0, 1
HANDOVER_CAP = 5
"""A handover (``Handover``) lasts at most this many times ``drain_handover``, however steady its progress."""


class Drainer(Generic[T]):
    """One drain: ``run()`` once; its Deferred fires after the last batch's closes were started."""

    log = Logger()

    def __init__(self, reactor: Any, plan: DrainPlan, random: Callable[[], float] = random_module.random) -> None:
        self.reactor = reactor
        self.plan = plan
        self.random = random
        self.batches_done = 0
        self._call: Any = None

    def run(self, clients: Sequence[T], hint: Callable[[T, int], None],
            close: Callable[[T, int], None]) -> defer.Deferred[None]:
        clients = list(clients)
        events: list[tuple[float, int, int, DrainStep]] = []
        for step in self.plan.steps(len(clients)):
            events += [(step.hint_at, HINT, step.index, step), (step.close_at, CLOSE, step.index, step)]
        events.sort(key=lambda event: event[:3])
        delays: dict[int, int] = {}
        done: defer.Deferred[None] = defer.Deferred()
        started = self.reactor.seconds()

        def advance() -> None:
            self._call = None
            elapsed = self.reactor.seconds() - started
            while events and events[0][0] <= elapsed + 1e-9:
                _, kind, _, step = events.pop(0)
                for position in range(step.first, step.stop):
                    try:
                        if kind == HINT:
                            delays[position] = self.plan.reconnect_after_ms(self.random)
                            hint(clients[position], delays[position])
                        else:
                            close(clients[position], delays.pop(position, 0))
                    except Exception:
                        # One client's trouble must not stop the drain (the shutdown would hang on it).
                        self.log.failure("draining {client} failed", client=clients[position])
                if kind == CLOSE:
                    self.batches_done += 1
            if events:
                self._call = self.reactor.callLater(max(0.0, events[0][0] - elapsed), advance)
            else:
                done.callback(None)

        advance()
        return done

    def cancel(self) -> None:
        """Stop before the remaining batches (their clients are left as they are)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Handover:
    """A stopping cluster node's wait for the other nodes to continue the sessions it still holds presence for
    (``WebSocketServer._await_handover``): each ``taken`` notice is one fewer. The wait lasts while the other
    nodes make progress: it ends when nothing is held any more (True), or when no session was taken for ``idle``
    seconds, or ``cap`` seconds after it began (False: the rest is left to the presence reaper). A loaded cluster
    that takes the sessions over at its own pace gets to finish; clients that do not come back cost ``idle``."""

    def __init__(self, reactor: Any, pending: set[str], idle: float, cap: float) -> None:
        self.reactor = reactor
        self.pending = pending
        self.waiting = len(pending)
        self.idle = idle
        self.cap = cap
        self.done: defer.Deferred[bool] = defer.Deferred()
        self._idle_call: Any = None
        self._cap_call: Any = None

    def wait(self) -> defer.Deferred[bool]:
        if not self.pending:
            self._finish(True)
        else:
            self._idle_call = self.reactor.callLater(self.idle, self._finish, False)
            self._cap_call = self.reactor.callLater(max(self.cap, self.idle), self._finish, False)
        return self.done

    def taken(self, token: str) -> None:
        """Session ``token`` no longer holds presence here (continued elsewhere, or never recorded)."""
        if self.done.called or token not in self.pending:
            return
        self.pending.discard(token)
        if not self.pending:
            self._finish(True)
        elif self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle)

    def _finish(self, complete: bool) -> None:
        for call in (self._idle_call, self._cap_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._cap_call = None
        if not self.done.called:
            self.done.callback(complete)
