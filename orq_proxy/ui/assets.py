"""Serving the dashboard's files: `/ui` (the page) and `/ui/static/<path>` (scripts, styles, vendored uPlot).

Every file is read once, when `routes()` runs, into a table keyed by its path relative to `static/`; a
request is answered from that table or with 404, so traversal (`..`, `%2e%2e`, absolute paths, symlinks
added later) has nothing to reach. Responses carry an ETag (`If-None-Match` gives 304) and
`Cache-Control: no-cache`, so a browser revalidates and an upgraded package is picked up at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = ["CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "routes"]

# Scripts, styles, images and API calls from this origin only; no inline script or style, no framing,
# no <base> or form posts elsewhere. `data:` images are for uPlot's legend markers, should it draw any.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
# The only file types served; anything else under static/ is left out of the table.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    "LICENSE": "text/plain; charset=utf-8",
}
_MAX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(body: bytes, content_type: str) -> _Asset:
    return _Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _content_type(name: str) -> str | None:
    if name in _CONTENT_TYPES:
        return _CONTENT_TYPES[name]
    dot = name.rfind(".")
    return _CONTENT_TYPES.get(name[dot:]) if dot > 0 else None


def _collect(folder: Traversable, prefix: str, out: dict[str, _Asset], depth: int = 0) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if depth < _MAX_DEPTH:
                _collect(entry, f"{prefix}{entry.name}/", out, depth + 1)
            continue
        content_type = _content_type(entry.name)
        if content_type is not None:
            out[prefix + entry.name] = _asset(entry.read_bytes(), content_type)


def _answer(request: Request, asset: _Asset | None) -> Response:
    if asset is None:
        return Response("not found\n", status_code=404, media_type="text/plain", headers=SECURITY_HEADERS)
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def routes() -> list[BaseRoute]:
    """The dashboard's routes, for app.py to mount: `GET /ui` (`/ui/` redirects there) and `GET /ui/static/{path}`.

    None of them needs a key: the page asks for one and sends it to the `/v2/*` API itself.
    """
    root = resources.files(__package__)
    page = _asset((root / "index.html").read_bytes(), _CONTENT_TYPES[".html"])
    files: dict[str, _Asset] = {}
    _collect(root / "static", "", files)

    async def index(request: Request) -> Response:
        return _answer(request, page)

    async def index_slash(request: Request) -> Response:
        # One address for the page, so its relative URLs (`ui/static/...`) resolve the same way; relative,
        # so it also works when the proxy is mounted under a prefix.
        return RedirectResponse("../ui", status_code=308, headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        return _answer(request, files.get(request.path_params["path"]))

    return [
        Route("/ui", index, methods=["GET"]),
        Route("/ui/", index_slash, methods=["GET"]),
        Route("/ui/static/{path:path}", static, methods=["GET"]),
    ]
