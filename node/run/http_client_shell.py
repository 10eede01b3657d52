"""A minimal async HTTP/1.1 client for ``http`` tasks: trio streams + h11.

One request per connection (``Connection: close``): a task fires at most
about once a second, so keep-alive pooling would buy nothing and would add
state that outlives a run. h11 does the parsing and framing (the
"bring-your-own-I/O" split), this module only moves bytes.

Rules:
  * ``http://`` and ``https://`` only; https wraps the TCP stream in
    ``trio.SSLStream`` with ``ssl.create_default_context()`` (certificate and
    hostname verified) unless the caller passes its own context.
  * The whole exchange (connect, TLS, send, receive) is bounded by
    ``timeout_s``; response headers by h11's ``max_incomplete_event_size``;
    the kept body by ``max_body_bytes`` (the *tail* is kept, like process
    output; the rest is read and counted, then dropped).
  * The request is framed by us: user ``Content-Length``,
    ``Transfer-Encoding`` and ``Connection`` headers are dropped; ``Host``
    defaults to the URL's authority.
  * Every failure is one of :class:`HttpError`'s subclasses with a message
    naming the host and the cause; nothing else escapes (except
    ``trio.Cancelled``).
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import trio

from node.run.urls import HttpUrl, parse_url

__all__ = [
    "HttpConnectError",
    "HttpError",
    "HttpProtocolError",
    "HttpResponse",
    "HttpTimeout",
    "request",
]

#: Largest response head (status line + headers) accepted; h11's default.
MAX_HEAD_BYTES = 16 * 1024
_READ_CHUNK_BYTES = 65536
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class HttpError(Exception):
    """Base of every error raised by :func:`request`."""


class HttpConnectError(HttpError):
    """Could not connect (refused, unreachable, DNS, TLS handshake) or the
    connection broke."""


class HttpTimeout(HttpError):
    """The exchange did not finish within ``timeout_s``."""


class HttpProtocolError(HttpError):
    """The server sent something that is not valid HTTP/1.1, or closed early."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body_tail: bytes
    body_total_bytes: int

    @property
    def body_truncated_bytes(self) -> int:
        return self.body_total_bytes - len(self.body_tail)


def _build_headers(url: HttpUrl, headers: Iterable[tuple[str, str]], body: bytes | None) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    have_host = False
    for name, value in headers:
        try:
            bname = name.encode("ascii") if isinstance(name, str) else bytes(name)
            bvalue = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        except (UnicodeError, TypeError) as e:
            raise ValueError(f"header {name!r}: {e}") from None
        lname = bname.lower()
        if lname in _FRAMING_HEADERS:
            continue
        if lname == b"host":
            have_host = True
        out.append((bname, bvalue))
    if not have_host:
        out.insert(0, (b"Host", url.authority.encode("ascii")))
    if not any(n.lower() == b"user-agent" for n, _ in out):
        out.append((b"User-Agent", b"peerd"))
    out.append((b"Connection", b"close"))
    if body is not None:
        out.append((b"Content-Length", str(len(body)).encode()))
    return out


def _connect_reason(e: OSError) -> str:
    """The leaf reasons of trio's "all attempts failed" error (happy eyeballs
    tries every address), e.g. ``Connection refused``."""
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = [x for x in cause.exceptions if isinstance(x, OSError)]
        reasons = sorted({x.strerror or str(x) for x in leaves})
        if reasons:
            return "; ".join(reasons)
    return e.strerror or str(e)


async def _open(url: HttpUrl, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    try:
        tcp = await trio.open_tcp_stream(url.host, url.port)
    except OSError as e:
        raise HttpConnectError(f"cannot connect to {url.authority}: {_connect_reason(e)}") from None
    if url.scheme == "http":
        return tcp
    ctx = ssl_context if ssl_context is not None else ssl.create_default_context()
    tls = trio.SSLStream(tcp, ctx, server_hostname=url.host, https_compatible=True)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as e:
        await trio.aclose_forcefully(tls)
        cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) and e.__cause__ else e
        raise HttpConnectError(f"TLS handshake with {url.authority} failed: {cause}") from None
    return tls


async def _exchange(
    stream: trio.abc.Stream,
    url: HttpUrl,
    method: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
    max_body_bytes: int,
) -> HttpResponse:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        out = conn.send(h11.Request(method=method.encode("ascii"), target=url.target.encode("utf-8"), headers=headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError as e:
        raise HttpProtocolError(f"cannot build request to {url.authority}: {e}") from None
    try:
        await stream.send_all(out)
    except (trio.BrokenResourceError, OSError) as e:
        # The server may answer (e.g. 413) and close before reading the
        # whole body; try to read that answer anyway below.
        send_error: BaseException | None = e
    else:
        send_error = None

    status: int | None = None
    reason = ""
    resp_headers: tuple[tuple[str, str], ...] = ()
    tail = bytearray()
    total = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise HttpProtocolError(f"bad response from {url.authority}: {e}") from None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, OSError) as e:
                cause = e.__cause__ if e.__cause__ else e
                raise HttpConnectError(f"connection to {url.authority} broke: {cause}") from None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            reason = event.reason.decode("latin-1")
            resp_headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)
            continue
        if isinstance(event, h11.Data):
            total += len(event.data)
            tail += event.data
            excess = len(tail) - max_body_bytes
            if excess > 0:
                del tail[:excess]
            continue
        if isinstance(event, h11.EndOfMessage):
            break
        if isinstance(event, h11.ConnectionClosed):
            if send_error is not None and status is None:
                raise HttpConnectError(f"connection to {url.authority} broke while sending: {send_error}")
            raise HttpProtocolError(f"{url.authority} closed the connection before the response was complete")
        if event is h11.PAUSED:  # cannot happen for a client reading one response
            break
    assert status is not None
    return HttpResponse(status=status, reason=reason, headers=resp_headers, body_tail=bytes(tail), body_total_bytes=total)


async def request(
    method: str,
    url: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout_s: float,
    max_body_bytes: int = 65536,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """Send one request and read the response.

    Args:
        method: HTTP method token (``GET``, ``POST``...).
        url: ``http://`` or ``https://`` URL.
        headers: (name, value) pairs, sent in order after ``Host``.
        body: request body (None: no body and no Content-Length).
        timeout_s: bound on the whole exchange (``math.inf``: none).
        max_body_bytes: how much of the response body tail to keep.
        ssl_context: overrides the default verifying context for https.

    Returns:
        The :class:`HttpResponse` (any status; judging it is the caller's job).

    Raises:
        ValueError: bad URL.
        HttpConnectError, HttpTimeout, HttpProtocolError: see their docs.
    """
    parsed = parse_url(url)
    hdrs = _build_headers(parsed, headers, body)
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout_s if math.isfinite(timeout_s) else math.inf):
            stream = await _open(parsed, ssl_context)
            return await _exchange(stream, parsed, method, hdrs, body, max_body_bytes)
    except trio.TooSlowError:
        raise HttpTimeout(f"no complete response from {parsed.authority} within {timeout_s:g}s") from None
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
