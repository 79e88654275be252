"""``ServerOptions`` validation: what the library refuses at construction rather than misbehaving later."""

from __future__ import annotations

from dataclasses import fields
from typing import get_type_hints

import pytest

from roomserver.options import ServerOptions, check_number

HINTS = get_type_hints(ServerOptions)
NUMBERS = [option.name for option in fields(ServerOptions)
           if any(kind in str(HINTS[option.name]) for kind in ("int", "float"))]


def test_every_number_is_found() -> None:
    assert {"port", "max_clients", "ping_interval", "ping_timeout", "shutdown_timeout", "history_ttl",
            "jwt_leeway", "open_handshake_timeout", "max_rooms"} <= set(NUMBERS)


@pytest.mark.parametrize("name", NUMBERS)
@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), float("-inf")])
def test_every_number_must_be_finite_and_not_negative(name: str, value: float) -> None:
    """nan passes any range check and a negative duration fails only when it is used (a negative
    ``shutdown_timeout`` made ``stop()`` fail with Twisted's AssertionError): each is refused up front, by name."""
    with pytest.raises(ValueError, match=rf"^{name} must be (>= 0|a finite number), not "):
        ServerOptions(**{name: value})


def test_check_number() -> None:
    assert check_number(0) == 0 and check_number(2.5, "x") == 2.5 and check_number(10**400) == 10**400
    with pytest.raises(ValueError, match=r"^must be a finite number, not nan$"):
        check_number(float("nan"))
    with pytest.raises(ValueError, match=r"^x must be >= 0, not -0\.5$"):
        check_number(-0.5, "x")
