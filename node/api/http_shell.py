"""A small HTTP/1.1 server on trio + h11 (the trio shell for the API).

h11 does the parsing (it is the sans-IO model this project follows); this
module only moves bytes and enforces the protocol limits below. Nothing a
client sends can stop the server or reach a 500 on its own: a handler
exception is a bug, answered 500 and logged (rate-limited).

Theory of operation, per request:

1. Read the request head (request line and headers) within
   ``idle_timeout_s``. Refuse at once with 400 and close: an HTTP version
   other than 1.0/1.1; a head over :data:`MAX_HEADER_BYTES` (16 KiB, as
   h11's default incomplete-event limit; node.js allows 16 KiB, nginx 8 KiB
   per line); both ``Content-Length`` and ``Transfer-Encoding`` (RFC 9112
   §6.3 calls it a smuggling vector); a query with more than
   :data:`MAX_QUERY_FIELDS` fields; a path that is not UTF-8 once
   percent-decoded. A declared body over ``max_body_bytes`` (1 MiB) is 413.
2. Call ``handler.check(request)`` (if the handler has one) with the head
   only, before a single body byte is read: authentication and routing
   happen there, so a client without the token costs a bounded amount of
   work whatever body it sends. A refusal is answered; if a body was
   announced the connection is closed after a bounded *lingering close*
   (at most :data:`LINGER_BYTES` read and dropped within :data:`LINGER_S`,
   so the client sees the answer instead of a reset).
3. Read the body (bounded), call the handler, answer; keep the connection
   for the next request unless either side asked to close.

With TLS (``serve_http(..., ssl_context=...)``; the node's
``api_tls_cert`` / ``api_tls_key``) every accepted connection first goes
through a TLS handshake bounded by :data:`TLS_HANDSHAKE_TIMEOUT_S`, so a
client that connects and never finishes one holds nothing for long; then
the rules above apply to the decrypted stream unchanged. A connection
whose first bytes are plain HTTP rather than a TLS record is answered a
plain-text 400 ("this port speaks https") and closed; any other failed
handshake is closed. Both are refusals with reason ``tls``.

Refusals the server makes itself (protocol errors, 413, timeouts, TLS) are
reported to ``handler.refused(reason, peer, detail)`` when the handler has
it, which counts them and logs at a bounded rate (see ``node/observe/ratelog.py``);
they are never logged one by one here.
"""
from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import h11
import trio

from node.api.messages import HTTPError, Request, Response

log = logging.getLogger("peerd.http")

#: Largest request head (request line + headers), bytes.
MAX_HEADER_BYTES = 16 * 1024
#: Largest request body, bytes (a task list of ~3,000 tasks).
MAX_BODY_BYTES = 1 << 20
#: Most query fields in one request.
MAX_QUERY_FIELDS = 32
#: A connection with no complete request within this many seconds is closed.
IDLE_TIMEOUT_S = 30.0
#: Lingering close after refusing a request with an unread body.
LINGER_BYTES = 256 * 1024
LINGER_S = 1.0
_HTTP_VERSIONS = (b"1.0", b"1.1")
#: A TLS handshake not finished within this many seconds is dropped.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: First byte of a TLS handshake record (RFC 8446 §5.1, content type 22).
_TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_ON_TLS_BODY = b"this port speaks https: use https:// with this address\n"
_PLAIN_ON_TLS = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                 b"content-length: %d\r\nserver: peerd\r\n\r\n" % len(_PLAIN_ON_TLS_BODY)) + _PLAIN_ON_TLS_BODY


Handler = Callable[[Request], Awaitable[Response]]


class _Refuse(Exception):
    """A protocol-level refusal: answer ``status`` and close."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


async def _send_response(conn: h11.Connection, stream: trio.abc.Stream, resp: Response,
                         *, close: bool = False) -> None:
    if resp.stream is not None:
        # no content-length: h11 frames it chunked (or, to an HTTP/1.0
        # client, by closing the connection at the end)
        headers = [("content-type", resp.content_type), ("server", "peerd"),
                   ("cache-control", "no-store")] + resp.headers
        await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
        try:
            async for chunk in resp.stream:
                if chunk:
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
        finally:
            aclose = getattr(resp.stream, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    headers = [
        ("content-type", resp.content_type),
        ("content-length", str(len(resp.body))),
        ("server", "peerd"),
    ] + resp.headers
    if close:
        headers.append(("connection", "close"))
    await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=resp.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


def _head_size(ev: h11.Request) -> int:
    # request line + CRLF, each header "name: value" + CRLF, final CRLF
    return (len(ev.method) + len(ev.target) + len(ev.http_version) + 8
            + sum(len(k) + len(v) + 4 for k, v in ev.headers.raw_items()) + 2)


def _build_request(ev: h11.Request, peer: str, max_body_bytes: int) -> Request:
    """Check the head (rule 1) and decode it.

    Raises:
        _Refuse: with the status and reason.
    """
    if ev.http_version not in _HTTP_VERSIONS:
        raise _Refuse(400, "protocol", f"unsupported HTTP version {ev.http_version.decode('ascii', 'replace')[:8]}")
    if _head_size(ev) > MAX_HEADER_BYTES:
        raise _Refuse(400, "protocol", f"request head over {MAX_HEADER_BYTES} bytes")
    names = [k for k, _ in ev.headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        raise _Refuse(400, "protocol", "both Content-Length and Transfer-Encoding")
    for k, v in ev.headers:
        if k == b"content-length" and (len(v) > 15 or int(v) > max_body_bytes):  # h11 checked: digits
            raise _Refuse(413, "too_large", f"request body over {max_body_bytes} bytes")
    target = ev.target.decode("latin-1")
    parsed = urllib.parse.urlsplit(target)
    try:
        path = urllib.parse.unquote(parsed.path, errors="strict")
    except UnicodeDecodeError:
        raise _Refuse(400, "protocol", "path: not UTF-8 once percent-decoded") from None
    try:
        fields = urllib.parse.parse_qsl(parsed.query, max_num_fields=MAX_QUERY_FIELDS, errors="strict")
    except ValueError:  # too many fields (UnicodeDecodeError is a ValueError too)
        raise _Refuse(400, "protocol", f"query: not UTF-8, or more than {MAX_QUERY_FIELDS} fields") from None
    return Request(
        method=ev.method.decode("ascii", "replace").upper(),
        path=path,
        query={k: v for k, v in fields},
        headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers},
        body=b"",
        peer=peer,
    )


def _report(handler, reason: str, peer: str, detail: str) -> None:
    refused = getattr(handler, "refused", None)
    if refused is not None:
        try:
            refused(reason, peer, detail)
        except Exception:  # accounting must never break serving
            log.debug("refusal accounting failed", exc_info=True)


async def _linger(stream: trio.abc.Stream) -> None:
    """Rule 2's lingering close: stop sending (where the stream can half
    close: TCP can, TLS cannot), drop a bounded amount of what the client is
    still sending, so it reads our answer rather than a reset."""
    send_eof = getattr(stream, "send_eof", None)
    try:
        if send_eof is not None:
            await send_eof()
        dropped = 0
        with trio.move_on_after(LINGER_S):
            while dropped < LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    return
                dropped += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream):
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return event


def _peer(stream: trio.abc.Stream) -> str:
    try:
        peer = stream.socket.getpeername()
        return f"{peer[0]}:{peer[1]}"
    except (OSError, AttributeError):
        return "?"


class _Replay(trio.abc.Stream):
    """``stream`` whose first reads return ``head``: the bytes read to tell
    a TLS handshake from plain HTTP, handed on to the TLS layer."""

    def __init__(self, stream: trio.abc.Stream, head: bytes):
        self.transport_stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            await trio.lowlevel.checkpoint()
            n = len(self._head) if max_bytes is None else max_bytes
            out, self._head = self._head[:n], self._head[n:]
            return out
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


async def _start_tls(stream: trio.abc.Stream, ctx: ssl.SSLContext, handler, peer_s: str,
                     timeout_s: float) -> trio.SSLStream | None:
    """The server side of the TLS handshake, bounded by ``timeout_s``; None
    (refusal reported) when the client is not speaking TLS, fails the
    handshake or does not finish it in time."""
    with trio.move_on_after(timeout_s):
        try:
            head = await stream.receive_some(4096)
            if not head:
                return None  # connected and closed again (a port probe)
            if head[0] != _TLS_HANDSHAKE_RECORD:
                _report(handler, "tls", peer_s, "plain HTTP or other non-TLS bytes on the https port")
                if head[:1].isalpha():  # an HTTP method: say why in words it shows
                    await stream.send_all(_PLAIN_ON_TLS)
                    await _linger(stream)
                return None
            tls = trio.SSLStream(_Replay(stream, head), ctx, server_side=True, https_compatible=True)
            await tls.do_handshake()
            return tls
        except trio.BrokenResourceError as e:
            _report(handler, "tls", peer_s, f"TLS handshake failed: {e.__cause__ or e}"[:300])
            return None
        except (trio.ClosedResourceError, OSError):
            return None
    _report(handler, "tls", peer_s, f"no TLS handshake in {timeout_s:g}s")
    return None


def _node_tls_context(handler) -> ssl.SSLContext | None:
    """The TLS context of the node behind ``handler`` (its config's
    ``api_tls_cert`` / ``api_tls_key``), or None."""
    cfg = getattr(getattr(handler, "node", None), "cfg", None)
    if cfg is None or not getattr(cfg, "api_tls_cert", ""):
        return None
    from node.cli.config import api_tls_context

    return api_tls_context(cfg)


async def _handle_connection(stream: trio.abc.Stream, handler: Handler, max_body_bytes: int,
                             peer_s: str | None = None) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    if peer_s is None:
        peer_s = _peer(stream)
    check = getattr(handler, "check", None)
    try:
        while True:
            request = None
            early = None
            with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):  # h11 gives a Request first
                    return
                request = _build_request(event, peer_s, max_body_bytes)
                early = check(request) if check is not None else None
                if early is None:
                    body = bytearray()
                    while True:
                        event = await _next_event(conn, stream)
                        if isinstance(event, h11.Data):
                            if len(body) + len(event.data) > max_body_bytes:
                                raise _Refuse(413, "too_large", f"request body over {max_body_bytes} bytes")
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            return
                    request.body = bytes(body)
            if idle.cancelled_caught:
                if request is not None or conn.their_state is not h11.IDLE:
                    _report(handler, "timeout", peer_s, f"no complete request in {IDLE_TIMEOUT_S:g}s")
                return
            if early is not None:
                # no body announced: h11 has EndOfMessage ready without I/O
                pending_body = not isinstance(conn.next_event(), h11.EndOfMessage)
                await _send_response(conn, stream, early, close=pending_body)
                if pending_body:
                    await _linger(stream)
                    return
            else:
                try:
                    resp = await handler(request)
                except HTTPError as e:
                    resp = Response.json({"error": e.message}, e.status)
                except Exception as e:  # a bug in a handler must not kill the server
                    _report(handler, "internal", peer_s, f"{request.method} {request.path[:200]}: "
                                                         f"{type(e).__name__}: {e}"[:500])
                    if getattr(handler, "refused", None) is None:
                        log.exception("API handler failed: %s %s", request.method, request.path[:200])
                    resp = Response.json({"error": f"internal error: {type(e).__name__}"}, 500)
                await _send_response(conn, stream, resp)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except _Refuse as e:
        _report(handler, e.reason, peer_s, e.message)
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send_response(conn, stream, Response.json({"error": e.message}, e.status), close=True)
                await _linger(stream)
        except Exception:
            pass
    except h11.RemoteProtocolError as e:
        status = 400  # h11 hints 431 for an over-long head; one status for every protocol refusal
        msg = f"bad request: {e}"
        if "buffer too long" in str(e).lower():
            msg = f"bad request: request head over {MAX_HEADER_BYTES} bytes"
        _report(handler, "protocol", peer_s, msg)
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send_response(conn, stream, Response.json({"error": msg}, status), close=True)
                await _linger(stream)
        except Exception:
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.LocalProtocolError):
        pass
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            try:
                await stream.aclose()
            except Exception:
                pass


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    ssl_context: ssl.SSLContext | None = None,
    tls_handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started`` gets the bound (host, port).

    With ``ssl_context`` (a server-side context) the API is https only.
    Without one, a handler that is a node's API (``handler.node.cfg``)
    brings its node's ``api_tls_cert`` / ``api_tls_key`` context.

    If the handler has ``flush_log(now)`` it is called every 10 s (the
    rate-limited refusal log's summaries go out even when refusals stop).
    """
    if ssl_context is None:
        ssl_context = _node_tls_context(handler)
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def conn_handler(stream):
        if ssl_context is None:
            await _handle_connection(stream, handler, max_body_bytes)
            return
        peer_s = _peer(stream)
        tls = await _start_tls(stream, ssl_context, handler, peer_s, tls_handshake_timeout_s)
        if tls is None:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()
            return
        await _handle_connection(tls, handler, max_body_bytes, peer_s)

    async def flush_loop(flush):
        while True:
            await trio.sleep(10.0)
            try:
                flush(trio.current_time())
            except Exception:
                log.debug("refusal log flush failed", exc_info=True)

    bound = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, conn_handler, listeners)
        flush = getattr(handler, "flush_log", None)
        if flush is not None:
            nursery.start_soon(flush_loop, flush)
        task_status.started((bound[0], bound[1]))
