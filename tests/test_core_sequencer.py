"""``RoomSequence``: per-room delivery in seq order on one node, with gaps fetched and duplicates dropped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roomserver.core.sequencer import Fetch, RoomSequence


def p(seq: int) -> bytes:
    return b"m%d" % seq


def seqs(step_deliver: list[tuple[int, bytes]]) -> list[int]:
    return [seq for seq, _ in step_deliver]


def test_in_order_messages_go_straight_through_and_duplicates_are_dropped() -> None:
    room = RoomSequence()
    assert room.start(10).deliver == []
    assert seqs(room.offer(11, p(11)).deliver) == [11]
    assert seqs(room.offer(12, p(12)).deliver) == [12]
    assert room.offer(12, p(12)).deliver == [] and room.offer(3, p(3)).deliver == []
    assert room.duplicates == 2


def test_a_gap_asks_the_store_and_delivers_in_order_once_filled() -> None:
    room = RoomSequence()
    room.start(0)
    step = room.offer(3, p(3))
    assert step.deliver == [] and step.fetch == Fetch(0, 3, 2)
    assert room.offer(4, p(4)).fetch is None, "one fetch at a time"
    step = room.offer(1, p(1))
    assert seqs(step.deliver) == [1]
    step = room.filled(Fetch(0, 3, 2), [(1, p(1)), (2, p(2))], complete=True)
    assert seqs(step.deliver) == [2, 3, 4] and step.fetch is None


def test_an_own_message_ahead_waits_for_the_ordered_channel_instead_of_reading_the_store() -> None:
    room = RoomSequence()
    room.start(4)
    step = room.offer(6, p(6), fetch=False)  # this node's own chat, answered before the channel brought seq 5
    assert step.deliver == [] and step.fetch is None
    assert seqs(room.offer(5, p(5)).deliver) == [5, 6], "the channel's seq 5 releases both"
    assert room.offer(6, p(6)).deliver == [] and room.duplicates == 1, "the channel's copy of 6 is dropped"
    room.offer(9, p(9), fetch=False)
    room.offer(10, p(10), fetch=False)
    step = room.offer(7, p(7))  # another node's 7 on the channel: 8 is on its way there too, no fetch yet
    assert seqs(step.deliver) == [7] and step.fetch is None
    assert seqs(room.offer(8, p(8)).deliver) == [8, 9, 10] and not room.waiting


def test_the_channels_copy_of_a_waiting_own_message_asks_for_a_gap_still_open() -> None:
    room = RoomSequence()
    room.start(4)
    room.offer(6, p(6), fetch=False)
    step = room.offer(6, p(6))  # the channel brought 6 but not 5: 5 is lost, read it
    assert step.fetch == Fetch(4, 6, 1) and step.deliver == []
    assert seqs(room.filled(Fetch(4, 6, 1), [(5, p(5))], complete=True).deliver) == [5, 6]


def test_a_gap_beyond_the_fetched_range_is_fetched_not_skipped() -> None:
    room = RoomSequence()
    room.start(0)
    assert room.offer(2, p(2)).fetch == Fetch(0, 2, 1)
    room.offer(5, p(5))  # 3 and 4 are still in flight
    step = room.filled(Fetch(0, 2, 1), [(1, p(1))], complete=True)
    assert seqs(step.deliver) == [1, 2] and step.fetch == Fetch(2, 5, 2) and room.skipped == 0


def test_messages_gone_from_the_store_are_skipped_instead_of_stalling() -> None:
    room = RoomSequence()
    room.start(0)
    assert room.offer(5, p(5)).fetch == Fetch(0, 5, 4)
    step = room.filled(Fetch(0, 5, 4), [(4, p(4))], complete=True)
    assert seqs(step.deliver) == [4, 5] and room.skipped == 3


def test_messages_offered_before_the_baseline_are_kept() -> None:
    room = RoomSequence()
    assert room.offer(7, p(7)).deliver == []
    step = room.start(9)  # the baseline read ran after this node's own append of 7
    assert seqs(step.deliver) == [7]
    assert seqs(room.offer(8, p(8)).deliver) == [8]


def test_catch_up_after_a_deaf_spell_and_while_a_fetch_runs() -> None:
    room = RoomSequence()
    room.start(0)
    room.offer(2, p(2))  # fetch (0, 2) in flight
    assert room.catch_up().fetch is None, "owed, not issued twice"
    step = room.filled(Fetch(0, 2, 1), [(1, p(1))], complete=True)
    assert seqs(step.deliver) == [1, 2] and step.fetch == Fetch(2, None, 1000)
    step = room.filled(Fetch(2, None, 1000), [(3, p(3)), (4, p(4))], complete=True)
    assert seqs(step.deliver) == [3, 4] and step.fetch is None


def test_a_failed_fetch_is_retried() -> None:
    room = RoomSequence()
    room.start(0)
    fetch = room.offer(2, p(2)).fetch
    assert fetch is not None
    room.failed(fetch)
    assert room.retry().fetch == Fetch(0, 2, 1)
    room.failed(Fetch(0, 2, 1))
    catch = room.catch_up().fetch
    assert catch is not None
    room.failed(catch)
    retried = room.retry().fetch
    assert retried == Fetch(0, 2, 1)


@given(st.permutations(list(range(1, 31))), st.lists(st.integers(1, 30), max_size=20))
def test_any_arrival_order_with_duplicates_delivers_each_seq_once_in_order(
        order: list[int], repeats: list[int]) -> None:
    room = RoomSequence()
    room.start(0)
    delivered: list[int] = []
    for seq in order + repeats:
        step = room.offer(seq, p(seq))
        delivered += seqs(step.deliver)
        while step.fetch is not None:  # the store holds everything
            fetch = step.fetch
            high = fetch.before if fetch.before is not None else 31
            step = room.filled(fetch, [(s, p(s)) for s in range(fetch.since + 1, high)][:fetch.limit], complete=True)
            delivered += seqs(step.deliver)
    assert delivered == list(range(1, 31))


def test_a_subscription_confirmed_before_the_baseline_catches_up_once_it_is_known() -> None:
    room = RoomSequence()
    assert room.catch_up().fetch is None, "no baseline yet: owed"
    step = room.start(4)
    assert step.fetch == Fetch(4, None, 1000), "what was published before the subscription took effect"
    step = room.filled(Fetch(4, None, 1000), [(5, p(5)), (6, p(6))], complete=True)
    assert seqs(step.deliver) == [5, 6] and step.fetch is None


@given(st.data())
def test_own_messages_answered_at_any_time_beside_an_ordered_channel_never_need_a_fetch(data: st.DataObject) -> None:
    """The fused cluster: the channel brings every seq in order; this node's own chats (any subset) are also
    offered from the append's answer, before or after their channel copy. Nothing is read from the store."""
    total = 30
    events = [(seq, True) for seq in range(1, total + 1)]
    for seq in sorted(data.draw(st.sets(st.integers(1, total)))):
        events.insert(data.draw(st.integers(0, len(events))), (seq, False))
    room = RoomSequence()
    room.start(0)
    delivered: list[int] = []
    for seq, from_channel in events:
        step = room.offer(seq, p(seq), fetch=from_channel)
        assert step.fetch is None
        delivered += seqs(step.deliver)
    assert delivered == list(range(1, total + 1)) and not room.waiting and not room.pending
