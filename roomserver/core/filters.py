"""Server-side message filtering: a pipeline every client publish goes through before it reaches a room.

A filter is any callable ``(client, room, message) -> message`` that returns the message (possibly changed) or
raises ``Rejected`` with a reason; the sender then gets error ``filtered`` with that reason and nothing is
published. Built-in filters, switched on by options: ``max_text_length``, ``allowed_types`` and a word list
(``blocked_words``: a message containing one is rejected; matching is case-insensitive on whole words).

Per-subscription filters are the receiving side: a client that joined with ``"filter": {"types": [...]}``
gets only messages of those types from that room (``SubscriptionFilter``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import RoomServerError

Filter = Callable[[Any, str, dict[str, Any]], dict[str, Any]]


class Rejected(RoomServerError):
    """A filter refused the message; ``message`` is the reason the sender sees."""

    code = "filtered"


class Pipeline:
    """Filters applied in order; each gets what the previous one returned."""

    def __init__(self, filters: Iterable[Filter] = ()) -> None:
        self.filters: list[Filter] = list(filters)

    def add(self, filter_: Filter) -> None:
        self.filters.append(filter_)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def apply(self, client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        for filter_ in self.filters:
            result = filter_(client, room, message)
            if not isinstance(result, dict):
                raise Rejected("the message was rejected")
            message = result
        return message


def max_text_length(limit: int) -> Filter:
    def check(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        text = message.get("text")
        if isinstance(text, str) and len(text) > limit:
            raise Rejected(f"text longer than {limit} characters")
        return message

    return check


def allowed_types(types: Iterable[str]) -> Filter:
    allowed = frozenset(types)

    def check(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("type") not in allowed:
            raise Rejected(f"message type {message.get('type')!r} is not allowed")
        return message

    return check


def blocked_words(words: Iterable[str]) -> Filter:
    cleaned = [word.strip() for word in words if word.strip()]
    if not cleaned:
        return lambda client, room, message: message
    # Whole words: not next to a letter, digit or underscore. ``\b`` would say the same only for words that
    # begin and end with one: "@everyone" or "c++" never matched.
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(word) for word in cleaned) + r")(?!\w)", re.IGNORECASE)

    def check(client: Any, room: str, message: dict[str, Any]) -> dict[str, Any]:
        text = message.get("text")
        if isinstance(text, str) and pattern.search(text):
            raise Rejected("the message contains a blocked word")
        return message

    return check


@dataclass(frozen=True, slots=True)
class SubscriptionFilter:
    """What one member of a room wants to receive from it."""

    types: frozenset[str]

    @classmethod
    def parse(cls, value: Any) -> SubscriptionFilter | None:
        """From a join's ``"filter"`` field; ``ValueError`` if malformed."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {"types"}:
            raise ValueError('"filter" must be an object like {"types": ["chat"]}')
        types = value.get("types")
        if not isinstance(types, list) or not types or len(types) > 32 or not all(
                isinstance(t, str) and 0 < len(t) <= 64 for t in types):
            raise ValueError('"filter.types" must be a list of 1 to 32 message type names')
        return cls(frozenset(types))

    def wants(self, message_type: str | None) -> bool:
        return message_type in self.types
