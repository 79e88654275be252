"""Shared fixtures: servers on ephemeral loopback ports, always stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from roomserver import WebSocketServer

from .auth_support import SECRET
from .support import start_server


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    """A file holding the tests' JWT secret (auth_support.SECRET), for ``jwt_secret_file``."""
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return str(path)


@pytest_twisted.async_yield_fixture
async def make_server() -> AsyncIterator[Callable[..., Any]]:
    """Start servers with the given options; every one is stopped when the test ends."""
    started: list[WebSocketServer] = []

    async def make(**options: Any) -> WebSocketServer:
        server = await start_server(**options)
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest_twisted.async_yield_fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own (on the shared 127.0.0.1:6379); its keys are deleted afterwards."""
    # Imported here: redis_support imports Twisted's global reactor, which must not be installed before
    # pytest-twisted installs the asyncio one.
    from .redis_support import delete_prefix, unique_prefix

    chosen = unique_prefix()
    yield chosen
    await delete_prefix(chosen)


@pytest_twisted.async_yield_fixture
async def proxied_redis(tmp_path: Path) -> AsyncIterator[Any]:
    """A dedicated ``redis-server`` reached only through a fault-injecting proxy (tests/fault_proxy.py): yields
    the ``FaultProxy``, whose ``url`` the nodes use and whose ``faults`` the test sets."""
    from .fault_proxy import FaultProxy
    from .redis_support import RedisServer
    from .support import aio

    redis = RedisServer(tmp_path)
    redis.start()
    proxy = FaultProxy(redis.port)
    await aio(proxy.start())
    yield proxy
    await aio(proxy.stop())
    redis.stop()
