"""A synchronous Python client for a peerd node's HTTP API (stdlib only).

For scripts that would otherwise shell out to ``peerctl``::

    from node.client import Client, ApiError

    c = Client("127.0.0.1:7701", token="s3cret")          # or Client.from_env()
    c.tasks.apply([{"id": "report", "schedule": "0 6 * * *",
                    "command": {"type": "exec", "argv": ["/usr/local/bin/report"]}}])
    c.tasks.run("report")
    for r in c.runs.list("report"):
        print(r["slot"], r["status"], r["exit_code"])
    try:
        c.tasks.get("nope")
    except ApiError as e:                 # e.status == 404, e.error = node's message
        print(e.error)

Rules:
  * One method per route of the API (node/api/routes_shell.py): ``status``,
    ``members``, ``ring``, ``owner``, ``metrics``, ``tasks.{apply, list,
    get, delete, pause, resume, run, explain, backfill}``, ``runs.{list,
    cancel, logs}``, ``keys.{list, install, use, remove}``, ``audit``. Each
    returns the API's decoded JSON (the contract's keys; ``Member``,
    ``Run`` and ``Owner`` name them for type checkers), ``metrics`` and
    ``runs.logs`` return text.
  * Errors are exceptions, never return codes: the node's 4xx/5xx answer
    raises :class:`ApiError` carrying the status and the API's ``error``
    text (:class:`AuthError` for 401/403, :class:`NotFoundError` for 404);
    a node that cannot be reached or does not answer in time raises
    :class:`UnreachableError`; an answer that is not the JSON expected
    raises :class:`BadResponseError`. All derive from :class:`PeerdError`.
  * Every call is bounded by ``timeout_s`` (connect and each read).
  * ``https://`` addresses verify the node's certificate against the
    system store or ``ca_cert`` (``PEERCTL_CA_CERT``).
  * The client holds no connection between calls (one request per
    connection), so it is safe to share between threads.
"""
from __future__ import annotations

import codecs
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypedDict

__all__ = [
    "ApiError",
    "AuthError",
    "BadResponseError",
    "Client",
    "Member",
    "NotFoundError",
    "Owner",
    "PeerdError",
    "Run",
    "UnreachableError",
]

#: Default node address: ``peerctl``'s default.
DEFAULT_NODE = "127.0.0.1:7701"
#: Default bound on one call, as ``peerctl``'s.
DEFAULT_TIMEOUT_S = 10.0
#: Largest answer read (a task list of thousands of tasks is a few MB).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class PeerdError(Exception):
    """Base of every error this client raises."""


class UnreachableError(PeerdError):
    """The node could not be reached (refused, DNS, TLS) or timed out."""


class BadResponseError(PeerdError):
    """The node answered something that is not the JSON expected."""


class ApiError(PeerdError):
    """The node refused the request.

    Attributes:
        status: HTTP status (4xx or 5xx).
        error: the API's ``error`` text (the body when it has none).
        method, path: the request.
    """

    def __init__(self, status: int, error: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status}: {error}")
        self.status = status
        self.error = error
        self.method = method
        self.path = path


class AuthError(ApiError):
    """401 or 403: missing, wrong or insufficient token."""


class NotFoundError(ApiError):
    """404: no such task, run or route."""


class Member(TypedDict, total=False):
    name: str
    addr: str
    state: str  # alive | suspect | dead | left
    incarnation: int
    tags: dict[str, str]


class Run(TypedDict, total=False):
    task_id: str
    slot: float
    run_id: str
    node: str
    attempt: int
    status: str  # node/state/runstatus.py: pending, running, succeeded, failed, ...
    exit_code: int | None
    started: float | None
    finished: float | None
    fencing_token: int | None


class Owner(TypedDict):
    task_id: str
    owner: str | None
    replicas: list[str]


def _q(segment: str) -> str:
    if not isinstance(segment, str) or not segment:
        raise ValueError(f"expected a non-empty id, got {segment!r}")
    return urllib.parse.quote(segment, safe="")


class Client:
    """One peerd node's API.

    Args:
        node: ``HOST:PORT`` or an ``http://`` / ``https://`` URL.
        token: bearer token (``--api-token``); empty sends none.
        timeout_s: bound on connecting and on each read of a call.
        ca_cert: CA bundle that signed the node's certificate (https).

    Raises:
        ValueError: ``node`` is not an http(s) address.
    """

    def __init__(self, node: str = DEFAULT_NODE, token: str = "", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 ca_cert: str | None = None) -> None:
        node = node.strip()
        if "://" not in node:
            node = "http://" + node
        parts = urllib.parse.urlsplit(node)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"node {node!r}: expected HOST:PORT or an http(s):// URL")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.base = node.rstrip("/")
        self.token = token
        self.timeout_s = float(timeout_s)
        self._ssl = ssl.create_default_context(cafile=ca_cert) if parts.scheme == "https" else None
        self.tasks = _Tasks(self)
        self.runs = _Runs(self)
        self.keys = _Keys(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Client":
        """A client from ``PEERCTL_NODE``, ``PEERCTL_TOKEN``,
        ``PEERCTL_CA_CERT`` and ``PEERCTL_TIMEOUT`` (``peerctl``'s
        environment); keyword arguments win."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {
            "node": env.get("PEERCTL_NODE", DEFAULT_NODE),
            "token": env.get("PEERCTL_TOKEN", ""),
            "ca_cert": env.get("PEERCTL_CA_CERT") or None,
        }
        if env.get("PEERCTL_TIMEOUT"):
            try:
                kw["timeout_s"] = float(env["PEERCTL_TIMEOUT"])
            except ValueError:
                raise ValueError(f"PEERCTL_TIMEOUT: {env['PEERCTL_TIMEOUT']!r} is not a number") from None
        kw.update(overrides)
        return cls(**kw)

    def __repr__(self) -> str:
        return f"Client({self.base!r})"

    # -- transport -------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
                raw: bool = False) -> Any:
        """One API call: the decoded JSON answer (``raw``: the text).

        Raises:
            ApiError, AuthError, NotFoundError: the node answered 4xx/5xx.
            UnreachableError: connect failure, TLS failure or timeout.
            BadResponseError: the answer is not JSON (or too large).
        """
        url_path = path
        if query:
            url_path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + url_path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ssl) as resp:
                payload = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise self._api_error(e, method, path) from None
        except (urllib.error.URLError, OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", None) or e
            raise UnreachableError(f"cannot reach node {self.base}: {reason}") from None
        if len(payload) > MAX_RESPONSE_BYTES:
            raise BadResponseError(f"{method} {path}: answer over {MAX_RESPONSE_BYTES} bytes")
        if raw:
            return payload.decode("utf-8", "replace")
        if not payload:
            return None
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadResponseError(f"{method} {path}: answer is not JSON: {payload[:80]!r}") from None

    def stream(self, method: str, path: str, *, query: Mapping[str, Any] | None = None) -> Iterator[str]:
        """A streamed text answer, chunk by chunk as the node sends them.

        Raises:
            as :meth:`request`.
        """
        url_path = path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(self.base + url_path, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ssl)
        except urllib.error.HTTPError as e:
            raise self._api_error(e, method, path) from None
        except (urllib.error.URLError, OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", None) or e
            raise UnreachableError(f"cannot reach node {self.base}: {reason}") from None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with resp:
            while True:
                try:
                    data = resp.read1(65536)
                except (OSError, ssl.SSLError) as e:
                    raise UnreachableError(f"{self.base}: stream broken: {e}") from None
                if not data:
                    break
                text = decoder.decode(data)
                if text:
                    yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def _api_error(self, e: urllib.error.HTTPError, method: str, path: str) -> ApiError:
        try:
            text = e.read(64 * 1024)
        except OSError:
            text = b""
        message = ""
        try:
            decoded = json.loads(text)
            if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
                message = decoded["error"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if not message:
            message = text.decode("utf-8", "replace").strip() or str(e.reason)
        cls = AuthError if e.code in (401, 403) else NotFoundError if e.code == 404 else ApiError
        return cls(e.code, message, method, path)

    # -- cluster -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: this node's name, member counts, tasks owned."""
        return self.request("GET", "/v1/status")

    def members(self) -> list[Member]:
        """``GET /v1/members``: every member with its state (dead and left
        members stay listed for the reap interval)."""
        return self.request("GET", "/v1/members")

    def ring(self) -> dict[str, Any]:
        """``GET /v1/ring``: ownership per member."""
        return self.request("GET", "/v1/ring")

    def owner(self, task_id: str) -> Owner:
        """``GET /v1/owner/{id}``: ``{"task_id", "owner", "replicas"}``."""
        return self.request("GET", f"/v1/owner/{_q(task_id)}")

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self.request("GET", "/metrics", raw=True)

    def audit(self) -> list[dict[str, Any]]:
        """``GET /v1/audit``: the node's recent state-changing requests."""
        return self.request("GET", "/v1/audit")


class _Tasks:
    def __init__(self, c: Client) -> None:
        self._c = c

    def apply(self, tasks: Iterable[Mapping[str, Any] | Any], *, source: str | None = None) -> dict[str, Any]:
        """``PUT /v1/tasks``: apply tasks, all or nothing.

        Args:
            tasks: task definitions as dicts (the task file's fields) or
                objects with ``to_dict()`` (``node.tasks.model.Task``).
            source: recorded as where the tasks came from.

        Returns:
            The node's answer, with ``applied`` (the task ids).
        """
        body = [t.to_dict() if hasattr(t, "to_dict") else dict(t) for t in tasks]
        return self._c.request("PUT", "/v1/tasks", body, query={"source": source} if source else None)

    def apply_file(self, path: str) -> dict[str, Any]:
        """Load a task file (YAML, JSON or TOML) and apply it, as
        ``peerctl tasks apply -f``.

        Raises:
            node.tasks.model.TaskError: the file is invalid (names file and field).
            OSError: the file cannot be read.
        """
        from node.tasks.files_shell import load_task_file

        return self.apply(load_task_file(path), source=os.path.basename(path))

    def list(self) -> list[dict[str, Any]]:
        """``GET /v1/tasks``."""
        return self._c.request("GET", "/v1/tasks")

    def get(self, task_id: str) -> dict[str, Any]:
        """``GET /v1/tasks/{id}``: ``task`` (the definition), ``owner``,
        ``paused``, ``last_fired``, any ``conflict``."""
        return self._c.request("GET", f"/v1/tasks/{_q(task_id)}")

    def delete(self, task_id: str) -> dict[str, Any]:
        """``DELETE /v1/tasks/{id}``."""
        return self._c.request("DELETE", f"/v1/tasks/{_q(task_id)}")

    rm = delete

    def pause(self, task_id: str) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/pause``."""
        return self._c.request("POST", f"/v1/tasks/{_q(task_id)}/pause")

    def resume(self, task_id: str) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/resume``."""
        return self._c.request("POST", f"/v1/tasks/{_q(task_id)}/resume")

    def run(self, task_id: str, *, env: Mapping[str, str] | None = None,
            args: Iterable[str] | None = None) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/run``: run once now, cluster-wide; ``env``
        and ``args`` go in the optional body (node/api/routes_shell.py)."""
        body: dict[str, Any] | None = None
        if env is not None or args is not None:
            body = {}
            if env is not None:
                body["env"] = dict(env)
            if args is not None:
                body["args"] = list(args)
        return self._c.request("POST", f"/v1/tasks/{_q(task_id)}/run", body)

    def explain(self, task_id: str, n: int = 5) -> dict[str, Any]:
        """``GET /v1/tasks/{id}/explain``: next ``n`` fires, owner, why."""
        return self._c.request("GET", f"/v1/tasks/{_q(task_id)}/explain", query={"n": int(n)})

    def backfill(self, task_id: str, start: str | float, end: str | float, *,
                 dry_run: bool = False) -> dict[str, Any]:
        """``POST /v1/tasks/{id}/backfill``: run each slot in [start, end]
        once (ISO 8601 or epoch seconds); ``dry_run`` lists them only."""
        return self._c.request("POST", f"/v1/tasks/{_q(task_id)}/backfill",
                               {"from": start, "to": end, "dry_run": bool(dry_run)})


class _Runs:
    def __init__(self, c: Client) -> None:
        self._c = c

    def list(self, task_id: str) -> list[Run]:
        """``GET /v1/tasks/{id}/runs``: the task's run records."""
        return self._c.request("GET", f"/v1/tasks/{_q(task_id)}/runs")

    def cancel(self, run_id: str) -> dict[str, Any]:
        """``POST /v1/runs/{run_id}/cancel``."""
        return self._c.request("POST", f"/v1/runs/{_q(run_id)}/cancel")

    def logs(self, run_id: str) -> str:
        """``GET /v1/runs/{run_id}/logs``: the run's output so far."""
        return self._c.request("GET", f"/v1/runs/{_q(run_id)}/logs", raw=True)

    def follow(self, run_id: str, offset: int = 0) -> Iterator[str]:
        """``GET /v1/runs/{run_id}/logs?follow=1``: the run's output as it
        comes (chunked), from ``offset``, until the run ends. Each call to
        the iterator waits at most ``timeout_s`` for the next chunk."""
        yield from self._c.stream("GET", f"/v1/runs/{_q(run_id)}/logs",
                                  query={"follow": 1, "offset": int(offset)})


class _Keys:
    def __init__(self, c: Client) -> None:
        self._c = c

    def list(self) -> dict[str, Any]:
        """``GET /v1/keys``: keys with fingerprints and how many members hold each."""
        return self._c.request("GET", "/v1/keys")

    def install(self, key: str) -> dict[str, Any]:
        """Add a base64 gossip key to every member."""
        return self._c.request("POST", "/v1/keys", {"op": "install", "key": key})

    def use(self, key: str) -> dict[str, Any]:
        """Make an installed key the primary (sealing) key."""
        return self._c.request("POST", "/v1/keys", {"op": "use", "key": key})

    def remove(self, key: str) -> dict[str, Any]:
        """Drop a key that is not the primary."""
        return self._c.request("POST", "/v1/keys", {"op": "remove", "key": key})
