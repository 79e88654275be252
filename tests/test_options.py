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


@pytest.mark.parametrize("name", ["open_handshake_timeout", "close_handshake_timeout", "ping_timeout",
                                  "max_frame_size", "max_text_length"])
def test_a_0_that_would_switch_a_limit_off_is_refused(name: str) -> None:
    """Autobahn and the handshake deadline read 0 as "no limit": ``open_handshake_timeout=0`` lifted the
    slowloris cut, ``max_frame_size=0`` any frame size; a text length of 0 would refuse every chat."""
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ServerOptions(**{name: 0})


def test_0_is_accepted_where_it_means_something() -> None:
    options = ServerOptions(ping_interval=0, shutdown_timeout=0, drain_interval=0, drain_handover=0, rate_limit=0,
                            error_limit=0, socket_send_buffer=0, connect_rate=0, accept_rate=0, jwt_leeway=0,
                            resume_ttl=0, dedupe_window=0, max_clients=0, max_rooms=0)
    assert options.shutdown_timeout == 0 and options.max_rooms == 0


def test_check_number() -> None:
    assert check_number(0) == 0 and check_number(2.5, "x") == 2.5 and check_number(10**400) == 10**400
    with pytest.raises(ValueError, match=r"^must be a finite number, not nan$"):
        check_number(float("nan"))
    with pytest.raises(ValueError, match=r"^x must be >= 0, not -0\.5$"):
        check_number(-0.5, "x")


@pytest.mark.parametrize("path", ["/", "/ws", "/ws/", "/api/v1/socket", "/a%20b", "/v1:rooms"])
def test_a_url_path_is_accepted(path: str) -> None:
    assert ServerOptions(path=path).path == path


@pytest.mark.parametrize("path", ["/a b", "//ws", "/ws//x", "/é", "/ws?x=1", "/ws#top"])
def test_a_path_no_request_could_carry_is_refused(path: str) -> None:
    """No request path would equal it: every upgrade got 404 from a server that looked fine."""
    with pytest.raises(ValueError, match=r"^path must be a URL path"):
        ServerOptions(path=path)
