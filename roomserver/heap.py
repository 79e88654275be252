"""The cyclic garbage collector in a process that holds thousands of connections.

CPython frees most objects by reference counting. Its cyclic collector, for reference cycles, runs whenever
allocations outnumber deallocations by a threshold, and a collection of the oldest generation scans every
tracked container object in the process: the reactor stands still meanwhile, and every member's next message
waits. With 10,000 joined connections such a full collection takes about 270 ms here, and the heap growing by a
quarter (connections arriving) triggers one (docs/performance.md, "K"). Two things follow:

- Objects that live as long as the process (modules, classes, functions, the configuration: some 60,000 after
  start-up) never need scanning. ``freeze_startup_heap`` moves them to the permanent generation
  (``gc.freeze()``), which no collection scans, once the server listens. It is for a process that is the
  server's own (``twistd roomserver``), never for a host application that embeds a ``WebSocketServer``.
- Pauses must be visible. ``GCPauses`` times every collection, per generation (``gc.callbacks``), so /metrics
  can tell an operator that a latency spike was the collector, not the network.
- What survived a full collection need not be scanned by the next one either, as long as it is freed by
  reference counting when it dies, which a connection, a room and their objects now are (tests/
  test_concurrency.py, tests/test_core_rooms.py; a soak of 20,000 connections leaves nothing for the
  collector). ``FreezeAfterFullCollections`` freezes the heap after each full collection, so the next one scans
  only what arrived since: the pause follows the growth, not the size of the heap. Whatever ends up in a cycle
  after all would never be reclaimed while frozen, so the heap is thawed every ``thaw_every`` seconds and the
  next full collection scans everything once.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any

GENERATIONS = 3


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then exempt everything alive now from every later collection; returns
    how many objects are frozen. Objects frozen here are still freed by reference counting when they die; only a
    frozen object that later ends up in an unreachable cycle is never reclaimed, which is why this runs once,
    when what is alive is the program itself."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauses:
    """Times each collection of the cyclic collector and hands ``(generation, seconds)`` to ``observe``; keeps the
    longest pause per generation. ``install``/``remove`` bracket the server's life: ``gc.callbacks`` is one list
    for the whole process."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._began = 0.0
        self.longest = [0.0] * GENERATIONS

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = perf_counter()
            return
        seconds = perf_counter() - self._began
        generation = info["generation"]
        if seconds > self.longest[generation]:
            self.longest[generation] = seconds
        self._observe(generation, seconds)


class FreezeAfterFullCollections:
    """After every full collection, ``gc.freeze()`` what survived it (on the next reactor turn: not from inside
    the collector's callback); every ``thaw_every`` seconds, ``gc.unfreeze()`` as a safety valve. For a process
    that is the server's own (``twistd roomserver``).

    A collection can run in any thread that allocates (the SQLite store's ``adbapi`` pool among them), and
    Twisted's ``callLater`` is for the reactor's thread only: from another thread the freeze is handed over with
    ``callFromThread``."""

    def __init__(self, reactor: Any, thaw_every: float) -> None:
        self.reactor = reactor
        self.thaw_every = thaw_every
        self.freezes = 0
        self.thaws = 0
        self._running = False
        self._wanted = False
        self._reactor_thread = threading.get_ident()
        self._freeze_call: Any = None
        self._thaw_call: Any = None

    def start(self) -> None:
        """Called in the reactor's thread."""
        self._running = True
        self._reactor_thread = threading.get_ident()
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        if self.thaw_every > 0 and self._thaw_call is None:
            self._thaw_call = self.reactor.callLater(self.thaw_every, self._thaw)

    def stop(self) -> None:
        self._running = False
        self._wanted = False
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        for call in (self._freeze_call, self._thaw_call):
            if call is not None and call.active():
                call.cancel()
        self._freeze_call = self._thaw_call = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != GENERATIONS - 1 or self._wanted or not self._running:
            return
        self._wanted = True
        if threading.get_ident() == self._reactor_thread:
            self._freeze_call = self.reactor.callLater(0, self._freeze)
        else:
            self.reactor.callFromThread(self._freeze)

    def _freeze(self) -> None:
        self._freeze_call = None
        if not (self._running and self._wanted):
            return  # stopped meanwhile
        self._wanted = False
        gc.freeze()
        self.freezes += 1

    def _thaw(self) -> None:
        gc.unfreeze()
        self.thaws += 1
        self._thaw_call = self.reactor.callLater(self.thaw_every, self._thaw)
