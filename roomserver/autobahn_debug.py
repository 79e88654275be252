"""Autobahn formats one debug log line per connection whatever the log level: defer that formatting.

``WebSocketProtocol._connectionMade`` (autobahn/websocket/protocol.py) logs its configuration with
``self.log.debug("\\n{attrs}", attrs=pformat(configAttrLog))``: the ``pformat`` of about 30 settings runs on every
connection, about 145 µs here, a fifth of roomserver's CPU per connection (docs/performance.md, connect
scenario), although the line is dropped unless debug logging is on. The log call itself is lazy: it formats its
arguments only when an observer renders the event. So the module's ``pformat`` is replaced by one that, for that
call (a list of settings), returns an object whose ``str()`` is the same ``pformat`` text, computed only if the
line is rendered. Every other use in the module (timings, transport details: dicts) gets the real ``pformat``.
Nothing else changes: with debug logging on, the line reads exactly as before.
"""

from __future__ import annotations

from pprint import pformat
from typing import Any

import autobahn.websocket.protocol as autobahn_protocol


class DeferredPformat:
    """``pformat(value)``, computed when the log line is rendered (``str``/``format``), not when it is logged."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return str(self)


def _pformat_when_rendered(value: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(value, list) and not args and not kwargs:
        return DeferredPformat(value)
    return pformat(value, *args, **kwargs)


def install() -> None:
    """Idempotent; called when roomserver's Autobahn adapter is imported."""
    if getattr(autobahn_protocol, "pformat", None) is pformat:
        setattr(autobahn_protocol, "pformat", _pformat_when_rendered)  # noqa: B010 - a module global, on purpose
