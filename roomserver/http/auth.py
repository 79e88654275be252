"""The admin token: where it comes from, and how a request proves it has it.

The token is read from ``admin_token_file`` or the ``ROOMSERVER_ADMIN_TOKEN`` environment variable, never from a
command line (visible to every user of the machine in ``ps``). It is compared in constant time and never
logged or echoed. HTTP requests present it as ``Authorization: Bearer <token>``; the dashboard's WebSocket
presents it in its first message (browsers cannot set headers on a WebSocket, and query strings end up in
proxy logs).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

ENV_VAR = "ROOMSERVER_ADMIN_TOKEN"
MIN_LENGTH = 16


class AdminTokenError(ValueError):
    """The configured admin token cannot be used (unreadable file, empty or too short)."""


class AdminToken:
    """The configured admin token, or none (``configured`` is False)."""

    __slots__ = ("_token",)

    def __init__(self, token: str | None) -> None:
        if token is not None:
            token = token.strip()
            if len(token) < MIN_LENGTH:
                raise AdminTokenError(f"the admin token must be at least {MIN_LENGTH} characters")
        self._token = token.encode("utf-8") if token is not None else None

    def __repr__(self) -> str:
        return f"AdminToken(configured={self.configured})"  # never the token itself

    @classmethod
    def load(cls, path: str | None, environ: Any = None) -> AdminToken:
        """From the file at ``path`` if given, else from ``ROOMSERVER_ADMIN_TOKEN``, else no token."""
        if path:
            try:
                value: str | None = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise AdminTokenError(f"cannot read the admin token file {path!r}: {exc.strerror}") from exc
            source = f"the admin token file {path!r}"
        else:
            value = (os.environ if environ is None else environ).get(ENV_VAR) or None
            source = ENV_VAR
        try:
            return cls(value)
        except AdminTokenError as exc:
            raise AdminTokenError(f"{exc} ({source})") from None  # which token: never the token itself

    @property
    def configured(self) -> bool:
        return self._token is not None

    def matches(self, candidate: str | bytes | None) -> bool:
        """True if ``candidate`` is the token (constant-time); always False when no token is configured."""
        if self._token is None or candidate is None:
            return False
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8", "replace")
        return hmac.compare_digest(self._token, candidate)

    def allows_request(self, request: Any) -> bool:
        """True if the HTTP request carries ``Authorization: Bearer <token>``."""
        header = request.getHeader(b"authorization")
        if header is None:
            return False
        # Compared as the bytes sent: a token with non-ASCII characters arrives UTF-8 encoded, and decoding the
        # header as latin-1 then encoding it as UTF-8 (as ``matches`` does with a str) never gave them back.
        raw = header if isinstance(header, bytes) else header.encode("latin-1")
        scheme, _, value = raw.partition(b" ")
        return scheme.lower() == b"bearer" and self.matches(value.strip())
