"""A small HTTP/1.1 server on trio + h11 (the trio shell for the API).

h11 does the parsing (it is the sans-IO model this project follows); this
module only moves bytes. Limits: request line and headers 16 KiB (h11's
``max_incomplete_event_size``), body ``max_body_bytes`` (1 MiB), an idle
connection closes after ``idle_timeout_s``. A handler exception becomes a
500 with a JSON error; a malformed request a 400; nothing a client sends can
stop the server.
"""
from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h11
import trio

log = logging.getLogger("peerd.http")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = ""

    def json(self):
        """Decode the body as JSON.

        Raises:
            HTTPError(400): not JSON.
        """
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj, status: int = 200) -> "Response":
        return cls(status=status, body=(json.dumps(obj, indent=None, sort_keys=False) + "\n").encode())


class HTTPError(Exception):
    """Raised by handlers: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request], Awaitable[Response]]

MAX_BODY_BYTES = 1 << 20
IDLE_TIMEOUT_S = 30.0


async def _send_response(conn: h11.Connection, stream: trio.abc.Stream, resp: Response) -> None:
    headers = [
        ("content-type", resp.content_type),
        ("content-length", str(len(resp.body))),
        ("server", "peerd"),
    ] + resp.headers
    await stream.send_all(conn.send(h11.Response(status_code=resp.status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=resp.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _handle_connection(stream: trio.SocketStream, handler: Handler, max_body_bytes: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        peer = stream.socket.getpeername()
        peer_s = f"{peer[0]}:{peer[1]}"
    except OSError:
        peer_s = "?"
    try:
        while True:
            # read one request
            req_event = None
            body = bytearray()
            too_big = False
            with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        req_event = event
                    elif isinstance(event, h11.Data):
                        if len(body) + len(event.data) > max_body_bytes:
                            too_big = True
                        else:
                            body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                    if too_big:
                        break
            if idle.cancelled_caught or req_event is None:
                return
            if too_big:
                await _send_response(
                    conn, stream, Response.json({"error": f"request body over {max_body_bytes} bytes"}, 413)
                )
                return
            target = req_event.target.decode("latin-1")
            parsed = urllib.parse.urlsplit(target)
            request = Request(
                method=req_event.method.decode("ascii", "replace").upper(),
                path=urllib.parse.unquote(parsed.path),
                query={k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()},
                headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req_event.headers},
                body=bytes(body),
                peer=peer_s,
            )
            try:
                resp = await handler(request)
            except HTTPError as e:
                resp = Response.json({"error": e.message}, e.status)
            except Exception as e:  # a bug in a handler must not kill the server
                log.exception("API handler failed: %s %s", request.method, request.path)
                resp = Response.json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
            await _send_response(conn, stream, resp)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except h11.RemoteProtocolError as e:
        try:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send_response(conn, stream, Response.json({"error": f"bad request: {e}"}, 400))
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
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started`` gets the bound (host, port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def conn_handler(stream):
        await _handle_connection(stream, handler, max_body_bytes)

    bound = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, conn_handler, listeners)
        task_status.started((bound[0], bound[1]))
