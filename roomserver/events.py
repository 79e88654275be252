"""A tiny event emitter for the seed API's ``server.on("connection", fn)`` and ``client.on("message", fn)``.

Handlers are application code: an exception in one is logged and swallowed, so it can never take down the
connection that triggered it, its neighbours or the server. ``on`` works both as a call and as a decorator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from twisted.logger import Logger

Handler = TypeVar("Handler", bound=Callable[..., Any])


class EventEmitter:
    """Named events with any number of handlers each, restricted to a known set of event names."""

    __slots__ = ("_events", "_handlers")
    log = Logger()

    def __init__(self, events: frozenset[str]) -> None:
        self._events = events
        self._handlers: dict[str, list[Callable[..., Any]]] = {}

    @overload
    def on(self, event: str) -> Callable[[Handler], Handler]: ...

    @overload
    def on(self, event: str, handler: Handler) -> Handler: ...

    def on(self, event: str, handler: Handler | None = None) -> Handler | Callable[[Handler], Handler]:
        """Register ``handler`` for ``event``; without a handler, return a decorator that does."""
        if event not in self._events:
            raise ValueError(f"unknown event {event!r}; known events: {', '.join(sorted(self._events))}")
        if handler is None:
            def decorator(fn: Handler) -> Handler:
                self._handlers.setdefault(event, []).append(fn)
                return fn

            return decorator
        self._handlers.setdefault(event, []).append(handler)
        return handler

    def off(self, event: str, handler: Callable[..., Any]) -> None:
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)

    def has(self, event: str) -> bool:
        return bool(self._handlers.get(event))

    def emit(self, event: str, *args: Any) -> None:
        for handler in tuple(self._handlers.get(event, ())):
            try:
                handler(*args)
            except Exception:
                self.log.failure("handler {handler!r} for event {event!r} raised", handler=handler, event=event)

    def clear(self) -> None:
        self._handlers.clear()
