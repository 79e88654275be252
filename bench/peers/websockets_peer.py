"""Peer: the room protocol on ``websockets`` (asyncio), fanning out with ``websockets.broadcast()``.

Usage: python -m bench.peers.websockets_peer PORT
"""

from __future__ import annotations

import asyncio
import resource
import sys
from typing import Any

from websockets.asyncio.server import broadcast, serve

from .rooms import Rooms, new_id, welcome

ROOMS = Rooms()


def _broadcast(room: str, members: set[Any], payload: bytes) -> None:
    broadcast(members, payload.decode("utf-8"))  # a str goes out as a text frame, framed once per recipient


async def handler(ws: Any) -> None:
    member_id = new_id()
    joined: set[str] = set()
    await ws.send(welcome(member_id).decode("utf-8"))
    try:
        async for payload in ws:
            reply = ROOMS.handle(ws, member_id, payload, _broadcast)
            if reply is not None:
                if reply.startswith(b'{"type":"joined"'):
                    joined.add(reply.split(b'"room":"', 1)[1].split(b'"', 1)[0].decode())
                await ws.send(reply.decode("utf-8"))
    finally:
        ROOMS.leave_all(ws, list(joined))


async def main(port: int) -> None:
    # compression=None: no per-connection deflate (the load generator does not offer it either).
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**20):
        print(f"listening {port}", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1])))
