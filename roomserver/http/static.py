"""Static files shipped in ``roomserver/static`` (package data): the demo page, the dashboard, roomserver.js.

Files are read from the installed package, with explicit content types and ``no-cache`` (so a browser always
revalidates after an upgrade). ``/static/`` serves only the files that exist there: no directory listings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.web.pages import notFound
from twisted.web.resource import Resource

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)


class StaticFile(Resource):
    """One file of ``roomserver/static``, read at each request (they are small and it keeps upgrades live).

    ``replacements`` fill in what only the running server knows (the demo page's WebSocket path)."""

    def __init__(self, name: str, replacements: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._replacements = replacements or {}
        self._path = STATIC_DIR / name
        self._type = CONTENT_TYPES.get(self._path.suffix, "application/octet-stream").encode("ascii")
        if not self._path.is_file():
            raise FileNotFoundError(f"missing static file {self._path} (is the package installed completely?)")

    def getChild(self, path: bytes, request: Any) -> Any:
        if path == b"":
            return self  # "/dashboard/" is "/dashboard"
        return notFound()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self._type)
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        body = self._path.read_bytes()
        for old, new in self._replacements.items():
            body = body.replace(old, new)
        return body


class StaticDirectory(Resource):
    """``/static/<name>``: one of the files of ``roomserver/static``; nothing else (no listing, no subpaths)."""

    def getChild(self, path: bytes, request: Any) -> Any:
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return notFound()
        if not name or name.startswith(".") or "/" in name or "\\" in name or not (STATIC_DIR / name).is_file():
            return notFound()
        return StaticFile(name)

    def render(self, request: Any) -> Any:
        page: Any = notFound()
        return page.render(request)


def static_directory() -> Any:
    return StaticDirectory()
