"""The status page at ``/`` of every node's HTTP API (routes in node/api/routes_shell.py).

Static files only: ``node/api/static/index.html``, ``app.js`` and ``app.css``
ship inside the package (setuptools package-data) and are served as they
are; there is no build step and nothing comes from a CDN. The page's script
reads the same JSON routes as ``peerctl`` (``/v1/status``, ``/v1/members``,
``/v1/ring``, ``/v1/tasks``, ``/v1/tasks/{id}``, ``.../explain``,
``.../runs``, ``/metrics``) and posts ``pause``/``resume``/``run`` with the
bearer token the user types, kept in the browser's ``sessionStorage`` only.

Rules:

1. The files carry no data, so they are served without a token; every data
   route keeps its own auth check (the page asks for the token when a read
   answers 401, i.e. on a node without ``open_reads``).
2. User data (task ids, names, commands, outputs, tags) is put in the page
   with ``textContent`` and ``createElement`` only, never ``innerHTML``.
3. Every file goes out with a Content-Security-Policy that allows scripts,
   styles and fetches from the node itself only (no inline script, no
   ``eval``), ``frame-ancestors 'none'``, ``X-Content-Type-Options:
   nosniff`` and no caching, so a browser that loaded a hostile string
   could still not run it.
"""
from __future__ import annotations

from importlib import resources

from node.api.messages import HTTPError, Response

__all__ = ["ASSETS", "SECURITY_HEADERS", "is_page_path", "serve"]

#: URL path -> (file in node/api/static, content type)
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS: list[tuple[str, str]] = [
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]

_cache: dict[str, bytes] = {}


def is_page_path(path: str) -> bool:
    """True for ``/`` and anything under ``/ui/`` (the page and its assets)."""
    return path == "/" or path.startswith("/ui/")


def _read(name: str) -> bytes:
    data = _cache.get(name)
    if data is None:
        data = resources.files("node.api").joinpath("static", name).read_bytes()
        _cache[name] = data
    return data


def serve(path: str, method: str = "GET") -> Response:
    """The response for a page path (``is_page_path(path)`` is true).

    Raises:
        HTTPError(405): not GET.
        HTTPError(404): no such asset.
    """
    if method != "GET":
        raise HTTPError(405, f"{method} not allowed on {path}")
    entry = ASSETS.get(path)
    if entry is None:
        raise HTTPError(404, f"no status page file {path}")
    name, ctype = entry
    try:
        body = _read(name)
    except OSError as e:
        raise HTTPError(404, f"status page file {name} is missing from this installation: {e}") from None
    return Response(200, body, ctype, list(SECURITY_HEADERS))
