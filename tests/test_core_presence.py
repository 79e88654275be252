"""The pure side of cluster presence (roomserver/core/presence.py): the listener that mirrors a node's changes,
and the merge of per-node entries into one member list."""

from __future__ import annotations

from typing import Any

from roomserver.core.presence import Presence, PresenceEvent, cluster_members


def test_the_listener_hears_every_change_with_the_node_level_event() -> None:
    presence = Presence()
    heard: list[tuple[str, str, Any]] = []
    presence.listener = lambda room, user, event: heard.append((room, user, event))
    presence.join("r", "alice", "tab1", {"n": 1})
    presence.join("r", "alice", "tab2")
    assert presence.leave("r", "alice", "tab-unknown") is None
    presence.leave("r", "alice", "tab1")
    presence.leave("r", "alice", "tab2")
    assert heard == [
        ("r", "alice", PresenceEvent("r", "join", "alice", {"n": 1})),
        ("r", "alice", None),
        ("r", "alice", None),
        ("r", "alice", PresenceEvent("r", "leave", "alice", {"n": 1})),
    ], "a connection that was never there changes nothing and is not heard"
    assert presence.member("r", "alice") is None and list(presence.entries()) == []


def test_the_watch_listener_hears_a_rooms_first_and_last_presence_subscriber() -> None:
    presence = Presence()
    heard: list[tuple[str, bool]] = []
    presence.watch_listener = lambda room, watched: heard.append((room, watched))
    presence.subscribe("r", "tab1")
    presence.subscribe("r", "tab2")
    presence.unsubscribe("r", "tab1")
    presence.unsubscribe("r", "tab-unknown")
    presence.join("r", "alice", "tab2")
    presence.leave("r", "alice", "tab2")  # a leave unsubscribes too
    assert heard == [("r", True), ("r", False)]


def test_entries_list_the_whole_node() -> None:
    presence = Presence()
    presence.join("r1", "a", 1)
    presence.join("r2", "a", 2)
    presence.join("r2", "b", 3)
    assert sorted((room, member.user, len(member.connections)) for room, member in presence.entries()) == [
        ("r1", "a", 1), ("r2", "a", 1), ("r2", "b", 1)]


def test_cluster_members_count_a_user_on_two_nodes_once_with_all_its_connections() -> None:
    entries: list[tuple[str, bytes | str]] = [
        ("n2|alice", b'{"c":2,"m":{"name":"A2"}}'),
        ("n1|alice", b'{"c":1,"m":{"name":"A1"}}'),
        ("n1|bob|x", '{"c":1,"m":{}}'),
        ("garbage", b'{"c":1}'),
        ("n3|carol", b"not json"),
    ]
    assert cluster_members(entries) == [
        {"user": "alice", "connections": 3, "meta": {"name": "A1"}},
        {"user": "bob|x", "connections": 1, "meta": {}},
    ]
    assert cluster_members([]) == []
