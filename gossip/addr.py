"""Addresses (core): the text forms of an ``Addr`` (``(host, port)``):
``HOST:PORT``, ``[V6]:PORT`` or a bare host, parsed and written back.
"""
from __future__ import annotations

from gossip.effects import Addr

__all__ = ["format_addr", "parse_addr"]


def parse_addr(text: str, default_port: int | None = None) -> Addr:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or a bare host (with default_port).
    The one address parser: node/cli/settings.py wraps it for flags and files.

    Raises:
        ValueError: ``bad address '<text>': <reason>``.
    """
    s = str(text).strip()
    host, port_s = s, None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}: missing ']'")
        host = s[1:end]
        rest = s[end + 1 :]
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest:
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    elif s.count(":") > 1:
        raise ValueError(f"bad address {text!r}: IPv6 addresses need brackets, e.g. [::1]:7946")
    if port_s is None:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT")
        port = default_port
    else:
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"bad address {text!r}: port {port_s!r} is not a number") from None
    if not host:
        raise ValueError(f"bad address {text!r}: missing host")
    if not 0 <= port <= 65535:
        raise ValueError(f"bad address {text!r}: port must be 0-65535")
    return (host, port)


def format_addr(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
