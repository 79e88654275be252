"""Helpers for tests of authenticated clients: one HS256 secret, tokens signed with it, connecting as a user.

The ``secret_file`` fixture (conftest.py) writes ``SECRET`` where ``jwt_secret_file`` can read it.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from .support import WSClient, url_of

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def token(sub: str = "alice", **claims: Any) -> str:
    """A token for user ``sub``, valid for an hour unless ``exp`` says otherwise."""
    claims.setdefault("exp", time.time() + 3600)
    return jwt.encode({"sub": sub, **claims}, SECRET, algorithm="HS256")


async def connect_as(server: Any, user: str, **claims: Any) -> WSClient:
    """A client authenticated as ``user`` in the upgrade request; its welcome already read."""
    ws = await WSClient.connect(url_of(server), additional_headers={"Authorization": f"Bearer {token(user, **claims)}"})
    assert (await ws.recv())["type"] == "welcome"
    return ws


async def received_within(ws: WSClient, timeout: float = 0.4) -> list[Any]:
    """Everything ``ws`` receives until it stays quiet for ``timeout`` seconds (an empty list when a test
    expects no further event)."""
    received = []
    while True:
        try:
            received.append(await ws.recv(timeout=timeout))
        except TimeoutError:
            return received
