"""The HTTP API routes (contract: DESIGN.md §6).

Every route that changes state or runs code needs ``Authorization: Bearer
<api_token>``; with no token configured those routes refuse everything (a
node is never open by accident). Read routes need the token too unless the
node runs with ``open_reads``; ``/metrics`` is always open (it carries no
secrets and Prometheus scrapes it).

Routes call methods of the node object (``node/node.py``); this module only
checks auth, decodes and validates request shapes, and encodes replies.
"""
from __future__ import annotations

import hmac
import re
from datetime import datetime, timezone

from prometheus_client import CONTENT_TYPE_LATEST

from .http_server import HTTPError, Request, Response

_TASK_ROUTE = re.compile(r"^/v1/tasks/([^/]+)(?:/(pause|resume|run|runs|explain|backfill))?$")
_OWNER_ROUTE = re.compile(r"^/v1/owner/([^/]+)$")


def parse_time(value, what: str) -> int:
    """ISO 8601 (``2026-11-26T10:00:00Z``) or epoch seconds -> epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"{what}: expected an ISO 8601 time or epoch seconds")
    v = value.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", v):
        return int(float(v))
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPError(400, f"{what}: {value!r} is not an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


class Api:
    def __init__(self, node, *, token: str, open_reads: bool = False):
        self.node = node
        self.token = token
        self.open_reads = open_reads

    def _authorized(self, req: Request) -> bool:
        if not self.token:
            return False
        auth = req.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _need_auth(self, req: Request, *, write: bool) -> None:
        if not write and self.open_reads:
            return
        if not self._authorized(req):
            if not self.token:
                raise HTTPError(401, "this node has no API token configured; set api_token to use this route")
            raise HTTPError(401, "missing or wrong API token (Authorization: Bearer <token>)")

    async def __call__(self, req: Request) -> Response:
        self.node.metrics.api_requests(req.method, _route_label(req.path))
        path = req.path.rstrip("/") or "/"
        m = req.method
        if path == "/metrics" and m == "GET":
            return Response(200, self.node.metrics_text(), CONTENT_TYPE_LATEST)
        if path == "/v1/status" and m == "GET":
            self._need_auth(req, write=False)
            return Response.json(self.node.status())
        if path == "/v1/members" and m == "GET":
            self._need_auth(req, write=False)
            return Response.json(self.node.members_json())
        if path == "/v1/ring" and m == "GET":
            self._need_auth(req, write=False)
            return Response.json(self.node.ring_json())
        if path == "/v1/tasks":
            if m == "GET":
                self._need_auth(req, write=False)
                return Response.json(self.node.tasks_json())
            if m == "PUT":
                self._need_auth(req, write=True)
                body = req.json()
                if isinstance(body, dict) and "tasks" in body:
                    body = body["tasks"]
                if not isinstance(body, list):
                    raise HTTPError(400, "PUT /v1/tasks: body must be a JSON list of tasks (or {\"tasks\": [...]})")
                source = req.query.get("source", "request")
                return Response.json(await self.node.apply_tasks(body, source=source))
            raise HTTPError(405, f"{m} not allowed on /v1/tasks")
        if path == "/v1/keys":
            if m == "GET":
                self._need_auth(req, write=False)
                return Response.json(self.node.keys_json())
            if m == "POST":
                self._need_auth(req, write=True)
                body = req.json()
                if not isinstance(body, dict) or body.get("op") not in ("install", "use", "remove"):
                    raise HTTPError(400, 'POST /v1/keys: body must be {"op": "install|use|remove", "key": "<base64>"}')
                if not isinstance(body.get("key"), str):
                    raise HTTPError(400, "POST /v1/keys: 'key' must be a base64 string")
                return Response.json(await self.node.key_op(body["op"], body["key"]))
            raise HTTPError(405, f"{m} not allowed on /v1/keys")
        mo = _OWNER_ROUTE.match(path)
        if mo and m == "GET":
            self._need_auth(req, write=False)
            return Response.json(self.node.owner_json(mo.group(1)))
        mt = _TASK_ROUTE.match(path)
        if mt:
            task_id, action = mt.group(1), mt.group(2)
            if action is None:
                if m == "GET":
                    self._need_auth(req, write=False)
                    return Response.json(self.node.task_json(task_id))
                if m == "DELETE":
                    self._need_auth(req, write=True)
                    return Response.json(await self.node.delete_task(task_id))
            elif action in ("pause", "resume") and m == "POST":
                self._need_auth(req, write=True)
                return Response.json(await self.node.set_paused(task_id, action == "pause"))
            elif action == "run" and m == "POST":
                self._need_auth(req, write=True)
                return Response.json(await self.node.run_now(task_id))
            elif action == "runs" and m == "GET":
                self._need_auth(req, write=False)
                return Response.json(self.node.runs_json(task_id))
            elif action == "explain" and m == "GET":
                self._need_auth(req, write=False)
                n = req.query.get("n", "5")
                if not n.isdigit() or not 1 <= int(n) <= 100:
                    raise HTTPError(400, "n: expected an integer 1-100")
                return Response.json(self.node.explain_json(task_id, int(n)))
            elif action == "backfill" and m == "POST":
                body = req.json() or {}
                if not isinstance(body, dict):
                    raise HTTPError(400, 'backfill: body must be {"from": T1, "to": T2, "dry_run": bool}')
                dry = bool(body.get("dry_run", False))
                # a dry run changes nothing, but listing past slots is still
                # gated like the real thing: it is a step towards running code
                self._need_auth(req, write=True)
                start = parse_time(body.get("from"), "from")
                end = parse_time(body.get("to"), "to")
                if end < start:
                    raise HTTPError(400, "backfill: 'to' is before 'from'")
                return Response.json(await self.node.backfill(task_id, start, end, dry))
            raise HTTPError(405, f"{m} not allowed on {path}")
        raise HTTPError(404, f"no route {m} {req.path}")


def _route_label(path: str) -> str:
    """Low-cardinality route label for the request counter."""
    if path.startswith("/v1/tasks/"):
        parts = path.split("/")
        return "/v1/tasks/{id}" + ("/" + parts[4] if len(parts) > 4 else "")
    if path.startswith("/v1/owner/"):
        return "/v1/owner/{id}"
    if path in ("/metrics", "/v1/status", "/v1/members", "/v1/ring", "/v1/tasks", "/v1/keys"):
        return path
    return "other"
