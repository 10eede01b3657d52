"""The HTTP API routes (the contract: the :data:`ROUTES` table below; README.md,
"Operating: peerctl, API, metrics, logs", documents it).

Every route that changes state or runs code needs ``Authorization: Bearer
<api_token>``; with no token configured those routes refuse everything (a
node is never open by accident). Read routes need the token too unless the
node runs with ``open_reads``; ``/metrics`` is always open (it carries no
secrets and Prometheus scrapes it).

Routes call methods of the node object (``node/facade_shell.py``); this module only
checks auth, decodes and validates request shapes, and encodes replies.

Rules:

1. **Routes are a table** (:data:`ROUTES`): a template such as
   ``/v1/tasks/{id}/runs``, and per method the endpoint, whether it reads or
   writes, and whether it takes a body. The request counter's labels come
   from the table only: the matched template, ``unknown`` for any other
   path, and the method if it is one of :data:`METHODS`, else ``other``. A
   client cannot create a label.
2. **Check before body** (:meth:`Api.check`, called by the server with the
   request head only): routing, 404/405, path parameters and the token are
   checked before a body byte is read or parsed.
3. **Refusals are cheap and quiet**: a refused request costs the head's
   parsing and one constant-time token comparison; it is counted in
   ``peerd_api_refusals_total{reason}`` and logged through a rate limit
   (``node/observe/ratelog.py``: at most 5 lines a minute, then one summary).
4. **Every decoder names the field**: bodies go through
   ``node/tasks/decoding.py`` (depth, numbers, duplicate keys); path ids must be
   task ids (``[A-Za-z0-9._-]{1,128}``, not only dots); query parameters
   and time values are checked with bounds, so bad input is a 4xx whose
   message names the field, never a 500.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from node.api import status_page
from node.api.messages import HTTPError, Request, Response
from node.observe.ratelog import RateLimitedLog
from node.tasks.decoding import DecodeError, check_tree, loads_json
from node.tasks.model import MAX_INSTANT, MIN_INSTANT, valid_id
from node.tasks.parse import decode_error_message
from node.api.tokens import ApiToken, TokenSet, role_allows

log = logging.getLogger("peerd.http")

#: Methods counted under their own label; any other is ``other``.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
#: Longest ``source`` query value (it is quoted in error messages).
MAX_SOURCE_LEN = 128
#: explain's ``n``: 1 to this many upcoming fires.
MAX_EXPLAIN_N = 100


@dataclass(frozen=True)
class Endpoint:
    name: str
    auth: str | None  # "read", "write" or None (open)
    body: bool = False

    @property
    def role(self) -> str:
        """The role a token needs (node/api/tokens.py)."""
        if self.auth != "write":
            return "operate" if self.name == "audit" else "read"
        return "admin" if self.name in ADMIN_ENDPOINTS else "operate"


#: Writes only an ``admin`` token may make; other writes need ``operate``.
ADMIN_ENDPOINTS = frozenset({"apply", "delete", "key_op"})


# (template, {method: Endpoint}). ``{id}`` is one path segment.
ROUTES: tuple[tuple[str, dict[str, Endpoint]], ...] = (
    ("/metrics", {"GET": Endpoint("metrics", None)}),
    ("/v1/status", {"GET": Endpoint("status", "read")}),
    ("/v1/members", {"GET": Endpoint("members", "read")}),
    ("/v1/ring", {"GET": Endpoint("ring", "read")}),
    ("/v1/tasks", {"GET": Endpoint("tasks", "read"), "PUT": Endpoint("apply", "write", body=True)}),
    ("/v1/keys", {"GET": Endpoint("keys", "read"), "POST": Endpoint("key_op", "write", body=True)}),
    ("/v1/owner/{id}", {"GET": Endpoint("owner", "read")}),
    ("/v1/tasks/{id}", {"GET": Endpoint("task", "read"), "DELETE": Endpoint("delete", "write")}),
    ("/v1/tasks/{id}/pause", {"POST": Endpoint("pause", "write")}),
    ("/v1/tasks/{id}/resume", {"POST": Endpoint("resume", "write")}),
    ("/v1/tasks/{id}/run", {"POST": Endpoint("run", "write", body=True)}),
    ("/v1/tasks/{id}/runs", {"GET": Endpoint("runs", "read")}),
    ("/v1/tasks/{id}/explain", {"GET": Endpoint("explain", "read")}),
    # a dry run changes nothing, but listing past slots is gated like the
    # real thing: it is a step towards running code
    ("/v1/tasks/{id}/backfill", {"POST": Endpoint("backfill", "write", body=True)}),
    ("/v1/runs/{id}/cancel", {"POST": Endpoint("cancel", "write")}),
    ("/v1/runs/{id}/logs", {"GET": Endpoint("logs", "read")}),
    ("/v1/audit", {"GET": Endpoint("audit", "read")}),
)
UNKNOWN_ROUTE = "unknown"

_STATIC = {t: (t, eps) for t, eps in ROUTES if "{id}" not in t}
_PARAM = [(re.compile("/".join("([^/]*)" if p == "{id}" else re.escape(p) for p in t.split("/"))), t, eps)
          for t, eps in ROUTES if "{id}" in t]


def match_route(path: str) -> tuple[str, dict[str, Endpoint], str | None] | None:
    """``(template, endpoints, id)`` for a path, or None (rule 1)."""
    p = path.rstrip("/") or "/"
    hit = _STATIC.get(p)
    if hit is not None:
        return hit[0], hit[1], None
    for rx, template, eps in _PARAM:
        m = rx.fullmatch(p)
        if m:
            return template, eps, m.group(1)
    return None


#: Route label of the status page and its files (``node/api/status_page.py``).
PAGE_ROUTE = "page"


def route_label(path: str) -> str:
    """The request counter's route label: a template, ``page`` or ``unknown``."""
    if status_page.is_page_path(path):
        return PAGE_ROUTE
    hit = match_route(path)
    return hit[0] if hit else UNKNOWN_ROUTE


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


#: How often a followed run's node is asked for new output.
FOLLOW_POLL_S = 0.25
#: A followed stream ends after this long even if the run goes on (the
#: client reconnects from its offset).
FOLLOW_MAX_S = 3600.0


async def _follow_logs(node, run_id: str, first: dict):
    """``?follow=1``: the run's output as it comes, chunk by chunk, until it
    ends (read from its node every ``FOLLOW_POLL_S`` when nothing is new)."""
    chunk = first
    with trio.move_on_after(FOLLOW_MAX_S):
        while True:
            data = str(chunk.get("data") or "")
            if data:
                yield data.encode("utf-8")
            if not chunk.get("running"):
                return
            if not data:
                await trio.sleep(FOLLOW_POLL_S)
            try:
                chunk = await node.run_logs(run_id, int(chunk.get("next_offset") or 0))
            except HTTPError as e:
                yield f"\n[peerd: output stream ended: {e.message}]\n".encode()
                return


def _who(req: Request, tok: ApiToken | None) -> str:
    host = req.peer.rsplit(":", 1)[0]
    return f"token {tok.name} from {host}" if tok else f"api client {host}"


def _flag(req: Request, name: str) -> bool:
    """A boolean query parameter: absent, ``0``/``false`` or ``1``/``true``."""
    v = req.query.get(name)
    if v is None or v in ("0", "false"):
        return False
    if v in ("1", "true", ""):
        return True
    raise HTTPError(400, f"{name}: expected 1, true, 0 or false")


def parse_time(value, what: str) -> int:
    """ISO 8601 (``2026-11-26T10:00:00Z``) or epoch seconds -> epoch seconds
    in years 1-9999.

    Raises:
        HTTPError(400): naming ``what``.
    """
    span = "years 0001-9999"
    if isinstance(value, bool) or value is None:
        raise HTTPError(400, f"{what}: expected an ISO 8601 time or epoch seconds")
    if isinstance(value, (int, float)):
        if value != value or not MIN_INSTANT <= value <= MAX_INSTANT:
            raise HTTPError(400, f"{what}: epoch seconds outside {span}")
        return int(value // 1)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise HTTPError(400, f"{what}: expected an ISO 8601 time or epoch seconds")
    v = value.strip()
    if re.fullmatch(r"-?[0-9]{1,20}(\.[0-9]{1,9})?", v):
        return parse_time(float(v), what)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        ts = dt.timestamp()
    except (ValueError, OverflowError):
        raise HTTPError(400, f"{what}: {value[:40]!r} is not an ISO 8601 time in {span}") from None
    return parse_time(ts, what)


class Api:
    def __init__(self, node, *, token: str, open_reads: bool = False, clock=None, tokens: TokenSet | None = None):
        self.node = node
        self.token = token
        self.tokens = TokenSet.single(token).merged(tokens or TokenSet())
        self.open_reads = open_reads
        self._log = RateLimitedLog()
        self._clock = clock or trio.current_time

    # ------------------------------------------------------------ refusals
    def refused(self, reason: str, peer: str, detail: str) -> None:
        """Count a refusal and log it within the rate limit (rule 3)."""
        metrics = self.node.metrics
        metrics.api_refusals.labels(reason).inc()
        for line in self._log.note(self._clock(), reason, f"API refused a request from {peer}: {detail}"):
            log.warning("%s", line)

    def flush_log(self, now: float) -> None:
        for line in self._log.flush(now):
            log.warning("%s", line)

    # ------------------------------------------------------------ auth
    def set_tokens(self, tokens: TokenSet) -> None:
        """Named tokens from the token file (reloaded on SIGHUP); the single
        ``api_token`` stays."""
        self.tokens = TokenSet.single(self.token).merged(tokens)

    def _authorized(self, req: Request) -> ApiToken | None:
        if not self.tokens:
            return None
        auth = req.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        return self.tokens.check(given.strip())

    def _need_auth(self, req: Request, ep: Endpoint) -> ApiToken | None:
        """The request's token (None on an open route), or 401/403."""
        if ep.auth is None:
            return None
        tok = self._authorized(req)
        if ep.auth == "read" and self.open_reads and ep.role == "read":
            return tok
        if tok is None:
            if not self.tokens:
                raise HTTPError(401, "this node has no API token configured; set api_token or api_tokens_file "
                                     "to use this route")
            raise HTTPError(401, "missing or wrong API token (Authorization: Bearer <token>)")
        if not role_allows(tok.role, ep.role):
            raise HTTPError(403, f"token {tok.name!r} has role {tok.role}; {ep.name} needs {ep.role}")
        return tok

    def _resolve(self, req: Request) -> tuple[Endpoint, str | None]:
        ep, ident, _ = self._resolve_token(req)
        return ep, ident

    def _resolve_token(self, req: Request) -> tuple[Endpoint, str | None, ApiToken | None]:
        """Route, path parameter and token (rules 1, 2, 4), body not needed."""
        hit = match_route(req.path)
        if hit is None:
            raise HTTPError(404, f"no route {method_label(req.method)} {req.path[:100]!r}")
        template, eps, ident = hit
        ep = eps.get(req.method)
        if ep is None:
            raise HTTPError(405, f"{method_label(req.method)} not allowed on {template}")
        tok = self._need_auth(req, ep)
        if ident is not None and template.startswith("/v1/runs/"):
            if not 0 < len(ident) <= 200 or not ident.isprintable() or " " in ident:
                raise HTTPError(400, f"run id {ident[:80]!r}: 1-200 printable characters without spaces")
        elif ident is not None and not valid_id(ident):
            raise HTTPError(400, f"task id {ident[:140]!r}: must be 1-128 characters of A-Z a-z 0-9 . _ - "
                                 "(not only dots)")
        return ep, ident, tok

    def check(self, req: Request) -> Response | None:
        """The server's pre-body hook: a refusal, or None to go on (rule 2)."""
        if status_page.is_page_path(req.path):
            return None
        try:
            self._resolve(req)
        except HTTPError as e:
            self.node.metrics.api_requests(method_label(req.method), route_label(req.path))
            if e.status == 401:
                self.refused("unauthorized", req.peer,
                             f"{method_label(req.method)} {route_label(req.path)}: no valid token")
            elif e.status == 403:
                self.refused("forbidden", req.peer, f"{method_label(req.method)} {route_label(req.path)}: {e.message}")
                hit = match_route(req.path)
                tok = self._authorized(req)
                ep = hit[1].get(req.method) if hit is not None else None
                if tok is not None and ep is not None and ep.auth == "write":
                    # a known token refused a write: audited like the writes it may make
                    ident = hit[2] if hit[2] is not None and len(hit[2]) <= 200 else None
                    self._audit(req, tok, ident, 403, e.message)
            return Response.json({"error": e.message}, e.status)
        return None

    # ------------------------------------------------------------ routes
    async def __call__(self, req: Request) -> Response:
        self.node.metrics.api_requests(method_label(req.method), route_label(req.path))
        if status_page.is_page_path(req.path):
            return status_page.serve(req.path, req.method)
        ep, ident, tok = self._resolve_token(req)
        if ep.auth != "write":
            return await self._route(req, ep, ident)
        # every state-changing request answered: one audit entry
        status, detail = 200, ""
        try:
            resp = await self._route(req, ep, ident)
            status = resp.status
            return resp
        except HTTPError as e:
            status, detail = e.status, e.message
            raise
        except BaseException as e:
            status, detail = 500, type(e).__name__
            raise
        finally:
            self._audit(req, tok, ident, status, detail)

    def _audit(self, req: Request, tok: ApiToken | None, ident: str | None, status: int, detail: str) -> None:
        """One audit entry for a state-changing request (node.audit)."""
        self.node.audit({"token": tok.name if tok else None, "role": tok.role if tok else None,
                         "peer": req.peer.rsplit(":", 1)[0], "method": req.method,
                         "route": route_label(req.path), "path": req.path[:200], "task": ident,
                         "status": status, "detail": detail[:300]})

    async def _route(self, req: Request, ep: Endpoint, ident: str | None) -> Response:
        node = self.node
        name = ep.name
        if name == "metrics":
            return Response(200, node.metrics_text(), CONTENT_TYPE_LATEST)
        if name == "status":
            return Response.json(node.status())
        if name == "members":
            return Response.json(node.members_json())
        if name == "ring":
            return Response.json(node.ring_json())
        if name == "tasks":
            return Response.json(node.tasks_json())
        if name == "apply":
            source = req.query.get("source", "request")
            if not 0 < len(source) <= MAX_SOURCE_LEN or not source.isprintable():
                raise HTTPError(400, f"source: 1-{MAX_SOURCE_LEN} printable characters")
            body = _task_document(req.body, source)
            if isinstance(body, dict) and list(body) == ["tasks"]:
                body = body["tasks"]
            if not isinstance(body, list):
                raise HTTPError(400, 'PUT /v1/tasks: body must be a JSON list of tasks (or {"tasks": [...]})')
            return Response.json(await node.apply_tasks(body, source=source, dry_run=_flag(req, "dry_run"),
                                                        prune=_flag(req, "prune")))
        if name == "keys":
            return Response.json(node.keys_json())
        if name == "key_op":
            body = req.json()
            if not isinstance(body, dict) or body.get("op") not in ("install", "use", "remove"):
                raise HTTPError(400, 'POST /v1/keys: body must be {"op": "install|use|remove", "key": "<base64>"}')
            if not isinstance(body.get("key"), str) or len(body["key"]) > 1024:
                raise HTTPError(400, "POST /v1/keys: 'key' must be a base64 string")
            return Response.json(await node.key_op(body["op"], body["key"]))
        if name == "owner":
            return Response.json(node.owner_json(ident))
        if name == "task":
            return Response.json(node.task_json(ident))
        if name == "delete":
            return Response.json(await node.delete_task(ident))
        if name in ("pause", "resume"):
            return Response.json(await node.set_paused(ident, name == "pause"))
        if name == "run":
            body = req.json() or {}
            if not isinstance(body, dict) or set(body) - {"env", "args"}:
                raise HTTPError(400, 'POST /v1/tasks/{id}/run: body must be {"env": {NAME: value}, '
                                     '"args": [string, ...]} (both optional)')
            return Response.json(await node.run_now(ident, body.get("env"), body.get("args")))
        if name == "audit":
            return Response.json(node.audit_json())
        if name == "logs":
            off = req.query.get("offset", "0")
            if not re.fullmatch(r"[0-9]{1,15}", off):
                raise HTTPError(400, "offset: expected a byte offset (a non-negative integer)")
            fmt = req.query.get("format", "text")
            if fmt not in ("text", "json"):
                raise HTTPError(400, "format: expected text or json")
            body = await node.run_logs(ident, int(off))
            if _flag(req, "follow") and fmt == "text":
                return Response(200, b"", "text/plain; charset=utf-8",
                                [("x-peerd-node", str(body.get("node", "")))],
                                stream=_follow_logs(node, ident, body))
            if fmt == "json":
                return Response.json(body)
            return Response(200, str(body.get("data") or "").encode(), "text/plain; charset=utf-8",
                            [("x-peerd-running", "1" if body.get("running") else "0"),
                             ("x-peerd-next-offset", str(body.get("next_offset", 0)))])
        if name == "cancel":
            return Response.json(await node.cancel_run(ident, _who(req, self._authorized(req))))
        if name == "runs":
            return Response.json(node.runs_json(ident))
        if name == "explain":
            n = req.query.get("n", "5")
            if not re.fullmatch(r"[0-9]{1,3}", n) or not 1 <= int(n) <= MAX_EXPLAIN_N:
                raise HTTPError(400, f"n: expected an integer 1-{MAX_EXPLAIN_N}")
            return Response.json(node.explain_json(ident, int(n)))
        if name == "backfill":
            body = req.json()
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise HTTPError(400, 'backfill: body must be {"from": T1, "to": T2, "dry_run": bool}')
            unknown = sorted(k for k in body if k not in ("from", "to", "dry_run"))
            if unknown:
                raise HTTPError(400, f"backfill: {unknown[0][:40]}: unknown field (from, to, dry_run)")
            dry = body.get("dry_run", False)
            if not isinstance(dry, bool):
                raise HTTPError(400, "dry_run: must be true or false")
            start = parse_time(body.get("from"), "from")
            end = parse_time(body.get("to"), "to")
            if end < start:
                raise HTTPError(400, "backfill: 'to' is before 'from'")
            return Response.json(await node.backfill(ident, start, end, dry))
        raise HTTPError(404, f"no route {name}")  # a table entry without a branch: a bug


def _task_document(body: bytes, source: str):
    """Decode a task list; a decoding error names the task and the field
    (``request: task 'a': schedule: duplicate key ...``)."""
    data = None
    try:
        data = loads_json(body, check=False)
        check_tree(data)
    except DecodeError as e:
        raise HTTPError(400, decode_error_message(data, e, source)) from None
    return data
