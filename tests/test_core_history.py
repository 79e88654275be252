"""Unit tests of the pure history pieces: seq splicing, the history window, dedupe and the replay decision."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomserver.core.history import (
    MEMORY_DEDUPE_IDS,
    DedupeWindow,
    HistoryPage,
    NewMessage,
    ReplayPlan,
    RoomHistory,
    StoredMessage,
    history_payload,
    replay_plan,
    with_seq,
)
from roomserver.core.messages import chat_body


@given(st.text(), st.text(), st.integers(min_value=0, max_value=2**53), st.one_of(st.none(), st.text(min_size=1)))
def test_with_seq_equals_encoding_the_event_with_seq(text: str, sender: str, seq: int, msg_id: str | None) -> None:
    body = chat_body("r", sender, text, msg_id)
    expected = {"type": "chat", "room": "r", "from": sender, "text": text}
    if msg_id is not None:
        expected["msg_id"] = msg_id
    decoded = json.loads(with_seq(body, seq))
    assert decoded == {**expected, "seq": seq}
    assert list(decoded)[-1] == "seq"


def test_with_seq_refuses_a_non_object() -> None:
    with pytest.raises(ValueError):
        with_seq(b"[1]", 1)


def test_history_payload_embeds_stored_payloads_verbatim() -> None:
    payloads = [with_seq(chat_body("r", "a", f"m{i}"), i) for i in (1, 2)]
    reply = history_payload("r", payloads, True, "q")
    assert orjson.loads(reply) == {"type": "history", "room": "r", "more": True, "id": "q",
                                   "messages": [orjson.loads(p) for p in payloads]}
    assert orjson.loads(history_payload("r", [], False)) == {"type": "history", "room": "r", "messages": [],
                                                             "more": False}


def message(i: int, ts: float = 0.0, msg_id: str | None = None) -> NewMessage:
    return NewMessage(chat_body("r", "a", f"m{i}", msg_id), msg_id, ts)


def seqs(page: HistoryPage) -> list[int]:
    return [m.seq for m in page.messages]


def test_room_history_assigns_gap_free_seqs_and_keeps_the_last_size_messages() -> None:
    history = RoomHistory(size=5, ttl=None, dedupe_window=60)
    assert [history.append(message(i)).seq for i in range(1, 9)] == list(range(1, 9))
    assert len(history) == 5 and history.first_seq == 4
    page = history.read(since=None, before=None, limit=3, now=0)
    assert seqs(page) == [6, 7, 8] and page.more, "without since: the latest, oldest first; older ones exist"
    page = history.read(since=0, before=None, limit=3, now=0)
    assert seqs(page) == [4, 5, 6] and page.more and page.first_seq == 4 and page.last_seq == 8
    assert seqs(history.read(since=6, before=None, limit=3, now=0)) == [7, 8]
    assert seqs(history.read(since=None, before=6, limit=10, now=0)) == [4, 5]


def test_room_history_ttl_hides_and_drops_old_messages_but_never_reuses_seqs() -> None:
    history = RoomHistory(size=100, ttl=10, dedupe_window=5)
    history.append(message(1, ts=0))
    history.append(message(2, ts=5, msg_id="x"))
    assert seqs(history.read(None, None, 10, now=10)) == [1, 2]
    assert seqs(history.read(None, None, 10, now=10.5)) == [2]
    page = history.read(None, None, 10, now=16)
    assert seqs(page) == [] and page.first_seq == 3 and page.last_seq == 2
    assert history.is_empty()
    assert history.append(message(3, ts=16)).seq == 3


def test_room_history_dedupes_msg_ids_within_the_window() -> None:
    history = RoomHistory(size=100, ttl=None, dedupe_window=30)
    first = history.append(message(1, ts=0, msg_id="u"))
    again = history.append(message(1, ts=29, msg_id="u"))
    assert (again.seq, again.duplicate, again.payload) == (first.seq, True, first.payload)
    assert len(history) == 1
    later = history.append(message(1, ts=31, msg_id="u"))
    assert (later.seq, later.duplicate) == (2, False), "after the window the msg_id is new again"


def test_a_room_remembers_the_msg_ids_of_a_busy_window() -> None:
    """A retry after 1,000 newer chats in the room (10 s at 100 chats/s) was stored and broadcast again."""
    history = RoomHistory(size=100, ttl=None, dedupe_window=300)
    first = history.append(message(1, ts=0, msg_id="retried"))
    for i in range(MEMORY_DEDUPE_IDS - 1):
        history.append(message(1, ts=i / 100, msg_id=f"other-{i}"))
    assert history.append(message(1, ts=100, msg_id="retried")).seq == first.seq, "100 s later, at 100 chats/s"
    history.append(message(1, ts=100, msg_id="one-more"))
    assert not history.append(message(1, ts=100, msg_id="retried")).duplicate, "beyond the bound: forgotten"


def test_dedupe_window_is_bounded() -> None:
    window = DedupeWindow(window=1000, capacity=3)
    for i in range(5):
        window.add(f"m{i}", i, ts=0)
    assert len(window) == 3 and window.get("m0", now=0) is None and window.get("m4", now=0) == 4


def page(first_seq: int, last_seq: int, *present: int) -> HistoryPage:
    return HistoryPage(tuple(StoredMessage(s, b"{}") for s in present), False, first_seq, last_seq)


@pytest.mark.parametrize(
    ("since", "history", "plan"),
    [
        (5, page(1, 8, 6, 7, 8), ReplayPlan(True, 6)),
        (8, page(1, 8), ReplayPlan(True, 9)),
        (0, page(1, 3, 1, 2, 3), ReplayPlan(True, 1)),
        (2, page(5, 8, 5, 6, 7, 8), ReplayPlan(False, 5)),  # 3 and 4 fell out of the window
        (3, page(9, 8), ReplayPlan(False, 9)),  # everything after 3 expired
        (12, page(1, 8, 1), ReplayPlan(False, 1)),  # the client knew a stream this room does not have
        (4, page(5, 8, 5), ReplayPlan(True, 5)),
    ],
)
def test_replay_plan(since: int, history: HistoryPage, plan: ReplayPlan) -> None:
    assert replay_plan(since, history) == plan


def test_fit_page_keeps_what_fits_from_the_right_end() -> None:
    from roomserver.core.history import fit_page

    messages = [StoredMessage(seq, b"x" * 99) for seq in range(1, 6)]  # 100 bytes each with the separator
    kept, cut = fit_page(messages, forward=True, max_bytes=250)
    assert [m.seq for m in kept] == [1, 2] and cut
    kept, cut = fit_page(messages, forward=False, max_bytes=250)
    assert [m.seq for m in kept] == [4, 5] and cut
    kept, cut = fit_page(messages, forward=True, max_bytes=10)
    assert [m.seq for m in kept] == [1] and cut, "at least one message, however large"
    assert fit_page(messages, forward=True, max_bytes=10_000) == (messages, False)
