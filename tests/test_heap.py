"""``roomserver.heap``: the collector's pauses are timed per generation, and the heap is frozen after each full
collection and thawed on a schedule (fake clock, the real ``gc``; the process-wide state is restored)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from roomserver.heap import FreezeAfterFullCollections, GCPauses


@pytest.fixture
def clean_heap() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_each_collection_is_timed_with_its_generation_and_the_longest_is_kept(clean_heap: None) -> None:
    seen: list[tuple[int, float]] = []
    pauses = GCPauses(lambda generation, seconds: seen.append((generation, seconds)))
    pauses.install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.remove()
    gc.collect(1)
    assert [generation for generation, _ in seen][-2:] == [0, 2], "not timed once removed"
    assert all(seconds >= 0 for _, seconds in seen)
    assert pauses.longest[2] == max(seconds for generation, seconds in seen if generation == 2) > 0


def test_what_survives_a_full_collection_is_frozen_on_the_next_turn_and_thawed_on_schedule(clean_heap: None) -> None:
    clock = Clock()
    freezer = FreezeAfterFullCollections(clock, thaw_every=600)
    freezer.start()
    try:
        gc.collect(0)
        gc.collect(1)
        assert len(clock.getDelayedCalls()) == 1, "young collections freeze nothing: only the thaw is due"
        gc.collect()
        gc.collect()
        assert gc.get_freeze_count() == 0, "not from inside the collector"
        clock.advance(0)
        assert freezer.freezes == 1, "two full collections in one turn, one freeze"
        assert gc.get_freeze_count() > 1000
        clock.advance(600)
        assert freezer.thaws == 1 and gc.get_freeze_count() == 0
        gc.collect()
        clock.advance(0)
        assert freezer.freezes == 2 and gc.get_freeze_count() > 1000
    finally:
        freezer.stop()
    assert not clock.getDelayedCalls(), "stop cancels the thaw"
    gc.collect()
    assert freezer.freezes == 2 and not clock.getDelayedCalls(), "stopped: no more freezes"


def test_no_thaw_when_the_interval_is_zero(clean_heap: None) -> None:
    clock = Clock()
    freezer = FreezeAfterFullCollections(clock, thaw_every=0)
    freezer.start()
    try:
        assert not clock.getDelayedCalls()
    finally:
        freezer.stop()


def test_a_full_collection_in_another_thread_hands_the_freeze_to_the_reactor_thread(clean_heap: None) -> None:
    """The SQLite store's adbapi threads allocate too: a collection there must not call ``callLater``."""
    clock = Clock()
    handed_over: list[object] = []

    def call_from_thread(function: object) -> None:
        handed_over.append(function)
        clock.callLater(0, function)  # what the reactor does with it on its next turn

    clock.callFromThread = call_from_thread  # type: ignore[attr-defined]
    freezer = FreezeAfterFullCollections(clock, thaw_every=0)
    freezer.start()
    try:
        collector = threading.Thread(target=gc.collect)
        collector.start()
        collector.join()
        assert len(handed_over) == 1 and gc.get_freeze_count() == 0
        clock.advance(0)
        assert freezer.freezes == 1 and gc.get_freeze_count() > 1000
    finally:
        freezer.stop()


def test_a_freeze_handed_over_before_stop_does_nothing_after_it(clean_heap: None) -> None:
    clock = Clock()
    clock.callFromThread = lambda function: clock.callLater(0, function)  # type: ignore[attr-defined]
    freezer = FreezeAfterFullCollections(clock, thaw_every=0)
    freezer.start()
    collector = threading.Thread(target=gc.collect)
    collector.start()
    collector.join()
    freezer.stop()
    clock.advance(0)
    assert freezer.freezes == 0 and gc.get_freeze_count() == 0


class Ring:
    """One link of a reference cycle: garbage only the cyclic collector can free."""

    def __init__(self) -> None:
        self.other: Ring | None = None


def full_collection_then_turn(clock: Clock) -> None:
    gc.collect()
    clock.advance(0)


def test_thaws_that_find_no_garbage_space_out_up_to_the_most_and_one_that_does_goes_back(clean_heap: None) -> None:
    clock = Clock()
    freezer = FreezeAfterFullCollections(clock, thaw_every=600, thaw_most=2000)
    freezer.start()
    try:
        full_collection_then_turn(clock)
        waits = []
        for _ in range(3):
            next_thaw = clock.getDelayedCalls()[0].getTime() - clock.seconds()
            waits.append(next_thaw)
            clock.advance(next_thaw)
            assert gc.get_freeze_count() == 0 and freezer.thawed > 1000
            assert len(clock.getDelayedCalls()) == 0, "the next thaw waits for the scan of this one"
            full_collection_then_turn(clock)
            assert freezer.found is not None and freezer.found <= freezer.thawed * 0.01
        assert waits == [600, 1200, 2000]
        assert freezer.thaw_interval == 2000

        # Cycles that were alive when the heap froze and died while frozen: only a thaw reclaims them.
        held: list[Ring] = []
        for _ in range(20_000):
            first, second = Ring(), Ring()
            first.other, second.other = second, first
            held.append(first)
        del first, second
        full_collection_then_turn(clock)
        held.clear()
        assert gc.collect() == 0, "frozen: the collector does not see them"
        clock.advance(2000)
        full_collection_then_turn(clock)
        assert freezer.found is not None and freezer.found >= 40_000
        assert freezer.thaw_interval == 600
        assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 600
    finally:
        freezer.stop()


def test_a_freeze_pending_at_a_thaw_does_not_refreeze_before_the_scan(clean_heap: None) -> None:
    clock = Clock()
    freezer = FreezeAfterFullCollections(clock, thaw_every=600)
    freezer.start()
    try:
        full_collection_then_turn(clock)
        clock.rightNow = 600.0  # the thaw is due ...
        gc.collect()  # ... and this collection's freeze waits for the next turn, which thaws first
        clock.advance(0)
        assert freezer.thaws == 1 and gc.get_freeze_count() == 0
        assert freezer.freezes == 1, "the stale freeze did nothing"
        full_collection_then_turn(clock)
        assert freezer.freezes == 2 and freezer.found is not None
    finally:
        freezer.stop()


def test_malloc_trim_runs_on_schedule_and_stops() -> None:
    from twisted.internet import task

    from roomserver.heap import MallocTrimmer, malloc_trim

    assert malloc_trim() >= 0, "glibc (Debian) has malloc_trim"
    clock = task.Clock()
    trimmer = MallocTrimmer(clock, 60)
    trimmer.start()
    clock.advance(60)
    clock.advance(60)
    assert trimmer.trims == 2 and trimmer.longest >= 0
    trimmer.stop()
    assert clock.getDelayedCalls() == []
    off = MallocTrimmer(clock, 0)
    off.start()
    assert clock.getDelayedCalls() == [], "0: never"


def test_twistd_trims_malloc_every_minute_unless_told_otherwise() -> None:
    from roomserver.tap import Options, makeService

    for argv, interval in (([], 60.0), (["--malloc-trim-interval", "0"], 0.0)):
        config = Options()
        config.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--store", "memory", *argv])
        [serving] = [child for child in makeService(config) if child.name == "roomserver"]
        assert serving.trimmer.interval == interval
        assert "malloc_trim_interval" not in vars(serving.server.options), "a process choice, not a server option"
