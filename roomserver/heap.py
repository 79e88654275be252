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
  next full collection scans everything once. That scan is the longest pause left (up to a second at 10,000
  connections on a busy machine), and it is wasted when it finds no garbage, which is the usual case: so each
  thaw whose scan finds little (at most ``FOUND_LITTLE`` of what was frozen) doubles the time to the next, up
  to ``thaw_most``, and one that finds more goes back to ``thaw_every``. Garbage held frozen between thaws
  stays within about twice that share of the heap whatever the interval (a thaw finds at most twice what the
  previous one did at its interval, or the interval was not doubled); a program that makes more garbage than
  that is thawed every ``thaw_every``, as before.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.logger import Logger

GENERATIONS = 3
FOUND_LITTLE = 0.01  # of the objects a thaw released: a scan that finds no more lets the next thaw wait twice as long


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
    the collector's callback); ``gc.unfreeze()`` every ``thaw_every`` seconds as a safety valve, or up to
    ``thaw_most`` while the thaws find little garbage (the module's docstring). For a process that is the server's
    own (``twistd roomserver``).

    A collection can run in any thread that allocates (the SQLite store's ``adbapi`` pool among them), and
    Twisted's ``callLater`` is for the reactor's thread only: from another thread the freeze is handed over with
    ``callFromThread``."""

    log = Logger()

    def __init__(self, reactor: Any, thaw_every: float, thaw_most: float | None = None) -> None:
        self.reactor = reactor
        self.thaw_every = thaw_every
        self.thaw_most = max(thaw_every, thaw_most if thaw_most is not None else thaw_every)
        self.thaw_interval = thaw_every  # until the next thaw
        self.freezes = 0
        self.thaws = 0
        self.thawed = 0  # objects the last thaw released
        self.found: int | None = None  # garbage the full collection after the last thaw found
        self._running = False
        self._wanted = False
        self._scanning = False  # thawed; the next full collection scans the whole heap
        self._scanned = False  # ... and it has: the next thaw is to be scheduled
        self._reactor_thread = threading.get_ident()
        self._freeze_call: Any = None
        self._thaw_call: Any = None

    def start(self) -> None:
        """Called in the reactor's thread."""
        self._running = True
        self._reactor_thread = threading.get_ident()
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        self._schedule_thaw()

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
        if phase != "stop" or info["generation"] != GENERATIONS - 1 or not self._running:
            return
        if self._scanning:
            self._scanning = False
            self.found = info["collected"] + info["uncollectable"]
            self._scanned = True
        if self._wanted:
            return
        self._wanted = True
        if threading.get_ident() == self._reactor_thread:
            self._freeze_call = self.reactor.callLater(0, self._freeze)
        else:
            self.reactor.callFromThread(self._freeze)

    def _freeze(self) -> None:
        self._freeze_call = None
        if not (self._running and self._wanted):
            return  # stopped meanwhile, or thawed since the collection
        self._wanted = False
        gc.freeze()
        self.freezes += 1
        if self._scanned:
            self._scanned = False
            self._after_scan()

    def _after_scan(self) -> None:
        """The first full collection after a thaw has scanned everything: set the time to the next thaw by what
        it found."""
        assert self.found is not None
        if self.found <= self.thawed * FOUND_LITTLE:
            self.thaw_interval = min(self.thaw_interval * 2, self.thaw_most)
        else:
            self.thaw_interval = self.thaw_every
        self.log.info("heap thawed: the full collection after it found {found} garbage objects among {thawed} "
                      "thawed; next thaw in {interval:.0f} s", found=self.found, thawed=self.thawed,
                      interval=self.thaw_interval)
        self._schedule_thaw()

    def _schedule_thaw(self) -> None:
        if self.thaw_every > 0 and self._thaw_call is None:
            self._thaw_call = self.reactor.callLater(self.thaw_interval, self._thaw)

    def _thaw(self) -> None:
        """Unfreeze; the next thaw is scheduled once a full collection has scanned what this released (until
        then nothing is frozen again)."""
        self._thaw_call = None
        self.thawed = gc.get_freeze_count()
        gc.unfreeze()
        self.thaws += 1
        self._wanted = False  # a freeze still pending from before would undo the thaw before any scan
        self._scanned = False
        self._scanning = True


def malloc_trim() -> float:
    """Hand C ``malloc``'s free pages back to the system (glibc's ``malloc_trim(0)``: the top of each heap and every
    whole free page within one); returns the seconds it took, or -1 where the C library has no such call.

    Python objects larger than 512 bytes (socket reads, messages) and C libraries' buffers come from ``malloc``,
    which keeps what is freed for reuse; with thousands of connections coming and going, what it keeps grows
    with fragmentation, and RSS with it. Measured in bench/soak.py's steady soak (docs/reliability.md, L5): a trim
    every minute cut the RSS growth from 4.9 to 1.3 MiB/h, and from 9.6 to 2.8 MiB/h under ten times the load,
    for a median of 0.6 ms per trim."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc (musl, macOS)
        return -1.0
    began = perf_counter()
    trim(0)
    return perf_counter() - began


class MallocTrimmer:
    """``malloc_trim`` every ``interval`` seconds on ``clock`` (``periodic.every``: a failure is logged, the next
    runs on schedule); keeps the longest trim, for the log and for tests. For a process that is the server's own."""

    def __init__(self, clock: Any, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.trims = 0
        self.longest = 0.0
        self._loop: Any = None

    def start(self) -> None:
        from .periodic import every

        if self.interval > 0 and self._loop is None:
            self._loop = every(self.clock, self.interval, self.trim, "return freed memory to the system")

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def trim(self) -> None:
        took = malloc_trim()
        if took < 0:  # no malloc_trim in this C library: nothing to do, ever
            self.stop()
            return
        self.trims += 1
        self.longest = max(self.longest, took)
