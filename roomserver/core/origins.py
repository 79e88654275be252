"""Which browser origins may open a WebSocket: the defence against cross-site WebSocket hijacking.

Browsers always send ``Origin`` on a WebSocket upgrade; other clients usually don't. So:

- no ``Origin`` header: not a browser, no cross-site risk: allowed;
- ``Origin: null`` (sandboxed iframes, ``file:`` pages): refused, since any site can produce it;
- with no configured patterns: only the same origin as the request's ``Host`` (the page the server itself
  serves) is allowed;
- otherwise the origin must match one of the patterns (``*`` wildcards, e.g. ``https://*.example.com``;
  ``*`` alone allows every origin). The whole origin must match: ``https://app.example.com.evil.com`` does
  not match ``https://app.example.com``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit


def _pattern(wildcard: str) -> re.Pattern[str]:
    """``*`` alone matches any origin; inside a pattern it matches within one part of it (never a ``/``)."""
    if wildcard == "*":
        return re.compile(r"^.*$")
    return re.compile("^" + "[^/]*".join(re.escape(part) for part in wildcard.lower().split("*")) + "$")


class OriginPolicy:
    """Decides whether an upgrade request's ``Origin`` is acceptable."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = tuple(origin.strip() for origin in allowed if origin.strip())
        self._patterns = [_pattern(origin) for origin in self.allowed]

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True
        origin = origin.strip().lower()
        if origin == "null" or not origin:
            return False
        if not self._patterns:
            return self._same_origin(origin, host)
        return any(pattern.match(origin) for pattern in self._patterns)

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        """Same host name, and the same port where the Host header names one.

        The scheme is not compared: behind a TLS-terminating proxy the page is https while the server sees
        plain HTTP. A Host without a port matches an origin on its scheme's default port.
        """
        if not host:
            return False
        try:
            parts = urlsplit(origin)
            origin_port = parts.port
            host_parts = urlsplit("//" + host.strip().lower())
            host_port = host_parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            return False
        if parts.hostname != host_parts.hostname:
            return False
        default_port = 443 if parts.scheme == "https" else 80
        effective_origin_port = origin_port or default_port
        if host_port is None:
            return effective_origin_port == default_port
        return effective_origin_port == host_port
