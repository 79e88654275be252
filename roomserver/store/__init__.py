"""Store backends and the ``--store`` spec that picks one.

``memory`` keeps history in this process (the library's default, for tests and ephemeral rooms);
``sqlite:PATH`` keeps rooms and history in a SQLite file (``twistd roomserver``'s default,
``sqlite:roomserver.db``); ``redis://HOST:PORT/DB`` keeps them in Redis, shared by the nodes of a cluster
(docs/cluster.md). The spec is checked when ``ServerOptions`` is built, so a typo fails at start with a
clear message rather than at the first chat message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..interfaces import Store
    from ..options import ServerOptions

STORE_SPECS = "memory, sqlite:PATH or redis://HOST:PORT/DB"


def parse_store_spec(spec: str) -> tuple[str, str]:
    """Split ``spec`` into (kind, argument); raise ValueError for anything unknown."""
    if spec == "memory":
        return "memory", ""
    kind, _, argument = spec.partition(":")
    if kind == "sqlite":
        if not argument:
            raise ValueError("--store sqlite needs a file: sqlite:PATH (e.g. sqlite:roomserver.db)")
        return "sqlite", argument
    if kind == "redis":
        from ..redislink import RedisURL

        RedisURL.parse(spec)
        return "redis", spec
    raise ValueError(f"unknown store {spec!r}: use {STORE_SPECS}")


def create_store(options: ServerOptions, reactor: Any, clock: Any = None) -> Store:
    """The store ``options.store`` describes (not yet opened)."""
    kind, argument = parse_store_spec(options.store)
    settings: dict[str, Any] = {
        "history_size": options.history_size,
        "history_ttl": options.history_ttl,
        "dedupe_window": options.dedupe_window,
    }
    if kind == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(argument, reactor, clock=clock, **settings)
    if kind == "redis":
        from .redis import RedisStore

        return RedisStore(argument, reactor, clock=clock, **settings)
    from .memory import MemoryStore

    return MemoryStore(clock if clock is not None else reactor, idle_grace=options.resume_ttl, **settings)
