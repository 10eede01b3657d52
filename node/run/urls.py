"""HTTP URLs (core): split and check the ``http(s)://host[:port]/path?query`` URL of an ``http`` task.

Used by the command checks (node/run/attempt.py) and by the HTTP client
(node/run/http_client_shell.py), which connects to :class:`HttpUrl`'s host
and port and sends its target and authority.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["HttpUrl", "parse_url"]


@dataclass(frozen=True, slots=True)
class HttpUrl:
    scheme: str
    host: str
    port: int
    target: str  # path + query, never empty
    authority: str  # for the Host header


def parse_url(url: str) -> HttpUrl:
    """Split and check an ``http(s)://host[:port]/path?query`` URL.

    Raises:
        ValueError: with the reason (scheme, missing host, bad port,
            credentials in the URL, whitespace).
    """
    if not isinstance(url, str) or not url:
        raise ValueError("url must be a non-empty string")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(f"url {url!r} contains whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"url {url!r}: scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"url {url!r}: credentials in the URL are not supported; use headers")
    host = parts.hostname
    if not host:
        raise ValueError(f"url {url!r}: missing host")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"url {url!r}: bad port ({e})") from None
    default_port = 443 if scheme == "https" else 80
    port = default_port if port is None else port
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"url {url!r}: bad host name ({e})") from None
    host_for_header = f"[{host}]" if ":" in host else host
    authority = host_for_header if port == default_port else f"{host_for_header}:{port}"
    return HttpUrl(scheme=scheme, host=host, port=port, target=target, authority=authority)
