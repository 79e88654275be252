"""Resume sessions shared by the nodes of a cluster, in the pure core (no Redis): what a node records, when a
resume waits for a claim, and what the claim's answer decides (roomserver/core/session.py, ``shared_sessions``)."""

from __future__ import annotations

import json
from typing import Any

from roomserver.core import messages
from roomserver.core.auth import Identity
from roomserver.core.presence import Presence
from roomserver.core.rooms import RoomRegistry
from roomserver.core.session import (
    Announce,
    ClaimSession,
    Replay,
    Reply,
    RoomProtocol,
    SessionTaken,
    ShareSession,
    TakeOver,
)
from roomserver.core.sessions import SessionTable


class Member:
    def __init__(self, name: str, user: str | None = None) -> None:
        self.id = name
        self.identity = Identity(user) if user is not None else None


class Node:
    """A protocol in cluster mode, with the hub's renaming done on plain members."""

    def __init__(self, shared: bool = True) -> None:
        self.now = 0.0
        self.presence = Presence()
        self.protocol = RoomProtocol(RoomRegistry(), SessionTable(ttl=60), clock=lambda: self.now,
                                     presence=self.presence, shared_sessions=shared, adopt=self.adopt)
        self.adopted: list[tuple[str, str]] = []

    def adopt(self, member: Any, client_id: str) -> bool:
        self.adopted.append((member.id, client_id))
        member.id = client_id
        return True

    def handle(self, member: Member, message: dict[str, Any]) -> list[Any]:
        return self.protocol.handle(member, json.dumps(message).encode())

    def connect(self, member: Member) -> str:
        [welcome] = self.protocol.welcome(member)
        assert isinstance(welcome, Reply)
        return str(welcome.event["session"])


def resume(token: str, **rooms: int) -> dict[str, Any]:
    return {"type": "resume", "session": token, "rooms": rooms, "id": 1}


def test_a_lost_anonymous_connection_is_recorded_and_holds_its_presence() -> None:
    node = Node()
    old = Member("c1")
    token = node.connect(old)
    node.handle(old, {"type": "join", "room": "r"})
    node.protocol.registry.remove_member(old)
    effects = node.protocol.disconnected(old, ["r"], deliberate=False)
    assert effects == [ShareSession(token, "c1", "c1", ("r",))]
    assert [m["user"] for m in node.presence.members("r")] == ["c1"], "held for a resume, as an authenticated user"


def test_on_one_node_nothing_is_recorded_and_no_resume_waits() -> None:
    node = Node(shared=False)
    old = Member("c1")
    token = node.connect(old)
    node.handle(old, {"type": "join", "room": "r"})
    node.protocol.registry.remove_member(old)
    assert not any(isinstance(e, ShareSession) for e in node.protocol.disconnected(old, ["r"], deliberate=False))
    assert node.presence.members("r") == [], "an anonymous user leaves at once on one node"
    new = Member("c2")
    node.connect(new)
    effects = node.handle(new, resume(token, r=0))
    assert not any(isinstance(e, ClaimSession) for e in effects)
    assert effects[1] == Replay("r", 0, {"type": "resumed", "room": "r", "continued": True, "id": 1})
    assert new.id == "c2" and node.adopted == [], "the client id is the new connection's on one node"
    assert node.handle(new, resume("unknown"))[0] == Reply({"type": "resumed", "continued": False, "id": 1})


def test_an_unknown_session_waits_for_the_claim_and_a_claimed_record_continues_with_its_client_id() -> None:
    node = Node()
    new = Member("c2")
    own = node.connect(new)
    [claim] = node.handle(new, resume("tok", r=3))
    assert claim == ClaimSession("tok", "c2", messages.Resume(session="tok", rooms=(("r", 3),), id=1))
    effects = node.protocol.claimed(new, claim.command, {"id": "c1", "user": "c1", "rooms": ["r"], "node": "A"})
    assert effects == [
        Replay("r", 3, {"type": "resumed", "room": "r", "continued": True, "id": 1, "client": "c1"}),
        SessionTaken("A", "tok"),
    ]
    assert new.id == "c1" and [m["user"] for m in node.presence.members("r")] == ["c1"]
    # Its own session goes on under the adopted id: resuming it again is continuing itself.
    assert node.protocol.sessions.peek(own, 0.0).client_id == "c1"  # type: ignore[union-attr]
    assert node.handle(new, resume(own)) == [Reply({"type": "resumed", "continued": True, "id": 1})]


def test_a_claim_that_found_nothing_or_failed_rejoins_as_a_new_member() -> None:
    node = Node()
    new = Member("c2")
    node.connect(new)
    [claim] = node.handle(new, resume("tok", r=0))
    assert node.protocol.claimed(new, claim.command, None) == [
        Replay("r", 0, {"type": "resumed", "room": "r", "continued": False, "id": 1})]
    other = Member("c3")
    node.connect(other)
    assert node.protocol.claimed(other, claim.command, None, failed=True) == [
        Replay("r", 0, {"type": "resumed", "room": "r", "continued": False, "id": 1})]
    assert (new.id, other.id) == ("c2", "c3")


def test_an_authenticated_users_record_continues_only_for_that_user() -> None:
    node = Node()
    mallory = Member("c2", "mallory")
    node.connect(mallory)
    [claim] = node.handle(mallory, resume("tok"))
    assert claim.user == "mallory"
    record = {"id": "c1", "user": "alice", "node": "A"}
    assert node.protocol.claimed(mallory, claim.command, record) == [
        Reply({"type": "resumed", "continued": False, "id": 1})]
    alice = Member("c3", "alice")
    node.connect(alice)
    assert node.protocol.claimed(alice, claim.command, record)[0] == Reply(
        {"type": "resumed", "continued": True, "id": 1, "client": "c1"})


def lost(node: Node, member: Member, room: str = "r") -> str:
    token = node.connect(member)
    node.handle(member, {"type": "join", "room": room})
    node.protocol.registry.remove_member(member)
    node.protocol.disconnected(member, [room], deliberate=False)
    return token


def test_this_nodes_own_recorded_session_is_claimed_too_and_continues_if_the_claim_wins() -> None:
    node = Node()
    token = lost(node, Member("c1"))
    new = Member("c2")
    node.connect(new)
    [claim] = node.handle(new, resume(token, r=0))
    assert isinstance(claim, ClaimSession), "another node may have claimed it: ask the cluster first"
    effects = node.protocol.claimed(new, claim.command, {"id": "c1", "user": "c1", "node": "this"})
    assert effects == [TakeOver("c1"),
                       Replay("r", 0, {"type": "resumed", "room": "r", "continued": True, "id": 1, "client": "c1"})]
    assert new.id == "c1" and node.presence.members("r") == [{"user": "c1", "connections": 1, "meta": {}}]


def test_this_nodes_own_session_claimed_elsewhere_is_dropped_and_its_presence_let_go() -> None:
    node = Node()
    token = lost(node, Member("c1"))
    new = Member("c2")
    node.connect(new)
    [claim] = node.handle(new, resume(token))
    effects = node.protocol.claimed(new, claim.command, None)
    assert effects == [Reply({"type": "resumed", "continued": False, "id": 1})]
    assert node.protocol.sessions.peek(token, 0.0) is None and node.presence.members("r") == []


def test_redis_unreachable_a_local_session_continues_as_on_one_node() -> None:
    node = Node()
    token = lost(node, Member("c1"))
    new = Member("c2")
    node.connect(new)
    [claim] = node.handle(new, resume(token))
    effects = node.protocol.claimed(new, claim.command, None, failed=True)
    assert Reply({"type": "resumed", "continued": True, "id": 1, "client": "c1"}) in effects


def test_an_unrecorded_session_is_taken_at_once() -> None:
    node = Node()
    token = lost(node, Member("c1"))
    node.protocol.session_unshared(token)
    new = Member("c2")
    node.connect(new)
    effects = node.handle(new, resume(token))
    assert effects == [TakeOver("c1"), Reply({"type": "resumed", "continued": True, "id": 1, "client": "c1"})]


def test_taken_elsewhere_forgets_the_session_and_lets_go_of_its_presence() -> None:
    node = Node()
    token = lost(node, Member("c1"))
    watcher = Member("w")
    node.connect(watcher)
    node.handle(watcher, {"type": "join", "room": "r", "presence": True})
    [effect] = node.protocol.taken_elsewhere(token)
    assert isinstance(effect, Announce)
    assert effect.event == {"type": "presence", "room": "r", "event": "leave", "user": "c1"}, \
        "the node-level leave: in a cluster the presence script finds the user on the other node (no event)"
    assert [m["user"] for m in node.presence.members("r")] == ["w"]
    assert node.protocol.sessions.peek(token, 0.0) is None
    assert node.protocol.taken_elsewhere(token) == [], "once"
