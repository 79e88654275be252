"""Peer: the room protocol on uWebSockets (C++), through its Python binding socketify, fanning out with
uWebSockets' own pub/sub: ``app.publish(room, payload)`` once per chat, the loop over the subscribers in C++.

The per-message Python work (a parse, the membership check, one encode) is the same as the other Python peers';
what differs is that nothing is done in Python per recipient, so its CPU per delivery is uWebSockets' own. This
stands in for "uWebSockets (C++, its native pub/sub)" of the performance issue: the Node build of uWS.js on the
registry needs a newer glibc than this machine's, socketify bundles a build that runs here.

Usage: python -m bench.peers.uws_peer PORT   (needs ``pip install socketify``; ``make bench`` installs it)
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from socketify import App, AppListenOptions, CompressOptions, OpCode
from socketify.native import ffi

from .rooms import Rooms, new_id, welcome

ROOMS = Rooms()
APP = App()
MEMBER_IDS: dict[int, str] = {}
JOINED: dict[int, set[str]] = {}


def _key(ws: Any) -> int:
    """socketify wraps the same native connection in a new object per event: its pointer is the identity."""
    return int(ffi.cast("uintptr_t", ws.ws))


def _publish(room: str, members: set[Any], payload: bytes) -> None:
    APP.publish(room, payload, OpCode.TEXT)


def on_open(ws: Any) -> None:
    key = _key(ws)
    MEMBER_IDS[key] = new_id()
    JOINED[key] = set()
    ws.send(welcome(MEMBER_IDS[key]), OpCode.TEXT)


def on_message(ws: Any, payload: bytes | str, opcode: Any) -> None:
    key = _key(ws)
    reply = ROOMS.handle(key, MEMBER_IDS[key], payload, _publish)
    if reply is None:
        return
    if reply.startswith(b'{"type":"joined"'):
        room = reply.split(b'"room":"', 1)[1].split(b'"', 1)[0].decode()
        JOINED[key].add(room)
        ws.subscribe(room)
    elif reply.startswith(b'{"type":"left"'):
        room = reply.split(b'"room":"', 1)[1].split(b'"', 1)[0].decode()
        JOINED[key].discard(room)
        ws.unsubscribe(room)
    ws.send(reply, OpCode.TEXT)


def on_close(ws: Any, code: int, message: Any) -> None:
    key = _key(ws)
    ROOMS.leave_all(key, list(JOINED.pop(key, ())))
    MEMBER_IDS.pop(key, None)


def main(port: int) -> None:
    APP.ws("/*", {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 2**20,
        "idle_timeout": 0,  # no heartbeats, like the other bare peers
        "max_backpressure": 16 * 2**20,  # a member is never dropped for back-pressure during a run
        "open": on_open,
        "message": on_message,
        "close": on_close,
    })
    APP.listen(AppListenOptions(port=port, host="127.0.0.1"), lambda config: print(f"listening {port}", flush=True))
    APP.run()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    main(int(sys.argv[1]))
