"""Peer: the room protocol on bare Autobahn|Python over Twisted, in two fan-out styles.

``naive``: ``sendMessage(payload)`` per member (Autobahn frames the message again for every member).
``prepared``: ``factory.prepareMessage(payload)`` once, then ``sendPreparedMessage`` per member.

Autobahn's defaults otherwise (no heartbeats, no limits): the "bare Autobahn" of the idle-memory target.

Usage: python -m bench.peers.autobahn_peer PORT naive|prepared
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

from .rooms import Rooms, new_id, welcome

ROOMS = Rooms()
MODE = "naive"


def broadcast_naive(room: str, members: set[Any], payload: bytes) -> None:
    for member in members:
        member.sendMessage(payload)


def broadcast_prepared(room: str, members: set[Any], payload: bytes) -> None:
    prepared = FACTORY.prepareMessage(payload)
    for member in members:
        member.sendPreparedMessage(prepared)


class RoomPeerProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    member_id = ""
    joined: set[str]

    def onOpen(self) -> None:
        self.member_id = new_id()
        self.joined = set()
        self.sendMessage(welcome(self.member_id))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        reply = ROOMS.handle(self, self.member_id, payload, BROADCAST)
        if reply is not None:
            if reply.startswith(b'{"type":"joined"'):
                self.joined.add(reply.split(b'"room":"', 1)[1].split(b'"', 1)[0].decode())
            self.sendMessage(reply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        joined = getattr(self, "joined", None)
        if joined:
            ROOMS.leave_all(self, list(joined))


FACTORY = WebSocketServerFactory()
FACTORY.protocol = RoomPeerProtocol
BROADCAST = broadcast_naive

if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port, mode = int(sys.argv[1]), sys.argv[2]
    BROADCAST = {"naive": broadcast_naive, "prepared": broadcast_prepared}[mode]
    reactor.listenTCP(port, FACTORY, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    print(f"listening {port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
