"""What the options point at outside themselves, read and checked once: the JWT key, the admin token, the
blocked words.

They live in files and environment variables, so a mistake in one (a missing file, a token or secret too short,
a key the JWT algorithm cannot use) shows only when it is read. ``load(options)`` reads all of them and raises
``ValueError`` with a one-line message for the first that is unusable. ``WebSocketServer`` calls it when it is
built; ``twistd roomserver`` calls it earlier, while it parses its command line, so that such a mistake is a
usage error rather than a traceback from ``makeService``, and hands what it read to the server
(``WebSocketServer(options, loaded=...)``), which then reads nothing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .access import verifier_from_options
from .core.auth import TokenVerifier
from .http.auth import AdminToken
from .options import ServerOptions, read_option_file


@dataclass(frozen=True)
class Loaded:
    """The outside configuration of one ``ServerOptions`` (``load`` makes it)."""

    verifier: TokenVerifier | None
    """The JWT verifier (None: no JWT authentication)."""
    admin_token: AdminToken
    """The admin token of the HTTP pages (not configured when there is none, or no HTTP pages to use it)."""
    blocked_words: tuple[str, ...]
    """The words of ``blocked_words_file`` (empty without one)."""


def load(options: ServerOptions, environ: Mapping[str, str] | None = None) -> Loaded:
    """Read and check what ``options`` name (``environ`` defaults to the process's environment)."""
    return Loaded(
        verifier=verifier_from_options(options, None if environ is None else dict(environ)),
        # Only the HTTP pages use the admin token: without them a token set in the environment is none of ours.
        admin_token=AdminToken.load(options.admin_token_file, environ) if options.http_pages else AdminToken(None),
        blocked_words=_blocked_words(options.blocked_words_file),
    )


def _blocked_words(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        text = read_option_file(path, "the blocked words file").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the blocked words file {path!r} is not UTF-8 text") from None
    return tuple(text.splitlines())
