"""One attempt of a task's command, as data (core): the typed command, the attempt's context and outcome, the facts it carries, the retry policy's checks.

Theory of operation
-------------------
A *command* is a plain dict (the task file's ``command`` field), checked by
:func:`parse_command` into one of four frozen dataclasses:

  ``{"type": "shell", "run": "echo hi"}``                  ``/bin/sh -c run``
  ``{"type": "exec", "argv": ["date", "-u"]}``             argv, no shell
  ``{"type": "python", "target": "mod:func", "args": [], "kwargs": {}}``
      ``sys.executable -u -m node.pyrunner`` child, spec on stdin
  ``{"type": "http", "method": "POST", "url": "...", "headers": {}, "body": "...",
     "expect_status": 200 | [200, 204]}``                 (default: any 2xx)

A :class:`RunContext` is everything one attempt needs besides the command; a
:class:`RunResult` is its outcome (one run record's worth). The executor
(node/run/executor_shell.py) runs the attempt. The facts of a run (task id,
slot, run id, attempt, node, fencing token, trace context) reach a process
as ``PEERD_*`` variables (``run_env`` in the executor) and an HTTP request as
the headers of :func:`run_headers`. :func:`parse_retries` checks a retry
policy (node/run/retry.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Union

from node.pyrunner import _TARGET_RE
from node.run.retry import JITTER_MODES, MAX_RETRIES, RetryPolicy
from node.run.urls import parse_url

__all__ = [
    "Command",
    "CommandError",
    "ExecCommand",
    "HttpCommand",
    "PythonCommand",
    "RunContext",
    "RunResult",
    "ShellCommand",
    "parse_command",
    "parse_retries",
    "run_headers",
    "slot_iso",
    "validate_command",
]


class CommandError(ValueError):
    """A command dict is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class ShellCommand:
    run: str


@dataclass(frozen=True, slots=True)
class ExecCommand:
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PythonCommand:
    target: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HttpCommand:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    expect_status: tuple[int, ...] | None = None  # None: any 2xx


Command = Union[ShellCommand, ExecCommand, PythonCommand, HttpCommand]

_FIELDS = {
    "shell": ({"run"}, set()),
    "exec": ({"argv"}, set()),
    "python": ({"target"}, {"args", "kwargs"}),
    "http": ({"url"}, {"method", "headers", "body", "expect_status"}),
}
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise CommandError(f"{where} must not be empty")
    if "\x00" in value:
        raise CommandError(f"{where} must not contain NUL bytes")
    return value


def parse_command(command: Any) -> Command:
    """Check a command dict and return its typed form.

    ``command`` may also be an object with a ``to_dict()`` method returning
    such a dict (``node.tasks.commands`` command classes).

    Raises:
        CommandError: naming the field and the reason
            (``command.argv[1] must be a string, got int``).
    """
    if not isinstance(command, Mapping) and callable(getattr(command, "to_dict", None)):
        command = command.to_dict()
    if not isinstance(command, Mapping):
        raise CommandError(f"command must be a mapping, got {type(command).__name__}")
    ctype = command.get("type")
    if ctype not in _FIELDS:
        raise CommandError(f"command.type must be one of {sorted(_FIELDS)}, got {ctype!r}")
    required, optional = _FIELDS[ctype]
    keys = set(command) - {"type"}
    unknown = sorted(str(k) for k in keys - required - optional)
    if unknown:
        raise CommandError(f"command ({ctype}): unknown field(s) {unknown}")
    missing = sorted(required - keys)
    if missing:
        raise CommandError(f"command ({ctype}): missing field(s) {missing}")

    if ctype == "shell":
        return ShellCommand(run=_check_text(command["run"], "command.run"))

    if ctype == "exec":
        argv = command["argv"]
        if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)) or not argv:
            raise CommandError("command.argv must be a non-empty list of strings")
        for i, arg in enumerate(argv):
            _check_text(arg, f"command.argv[{i}]", allow_empty=i > 0)
        return ExecCommand(argv=tuple(argv))

    if ctype == "python":
        target = command["target"]
        if not isinstance(target, str) or not _TARGET_RE.match(target):
            raise CommandError(f"command.target must look like 'package.module:function', got {target!r}")
        args = command.get("args", [])
        kwargs = command.get("kwargs", {})
        if args is None:
            args = []
        if kwargs is None:
            kwargs = {}
        if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
            raise CommandError("command.args must be a list")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise CommandError("command.kwargs must be a mapping with string keys")
        try:
            json.dumps({"args": list(args), "kwargs": dict(kwargs)}, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CommandError(f"command.args/kwargs must be JSON-serialisable: {e}") from None
        return PythonCommand(target=target, args=tuple(args), kwargs=dict(kwargs))

    # http
    method = command.get("method", "GET")
    if not isinstance(method, str) or not method or not set(method) <= _TOKEN_CHARS:
        raise CommandError(f"command.method must be an HTTP method token, got {method!r}")
    url = command["url"]
    try:
        parse_url(url)
    except ValueError as e:
        raise CommandError(f"command.url: {e}") from None
    raw_headers = command.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise CommandError("command.headers must be a mapping of name to value")
    headers = []
    for name in sorted(raw_headers, key=str):
        value = raw_headers[name]
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
            raise CommandError(f"command.headers: bad header name {name!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
            raise CommandError(f"command.headers[{name!r}] must be a string without CR/LF/NUL")
        headers.append((name, value))
    body = command.get("body")
    if body is not None and not isinstance(body, str):
        raise CommandError(f"command.body must be a string, got {type(body).__name__}")
    expect = command.get("expect_status")
    expect_t: tuple[int, ...] | None
    if expect is None or (isinstance(expect, (list, tuple)) and not expect):
        expect_t = None  # any 2xx
    else:
        items = expect if isinstance(expect, (list, tuple)) else [expect]
        if not items or not all(isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in items):
            raise CommandError(f"command.expect_status must be a status 100-599 or a list of them, got {expect!r}")
        expect_t = tuple(sorted(set(items)))
    return HttpCommand(method=method.upper(), url=url, headers=tuple(headers), body=body, expect_status=expect_t)


def validate_command(command: Any) -> str | None:
    """None if ``command`` is valid, else the reason (for task-file checks)."""
    try:
        parse_command(command)
    except CommandError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class RunContext:
    """Everything one attempt needs besides the command.

    ``slot`` is the scheduled time in epoch seconds (the slot's identity);
    ``attempt`` is 1 for the first run; ``env`` is the task's env overlay.
    """

    task_id: str
    slot: int
    run_id: str
    attempt: int
    node: str
    fencing_token: int | str | None
    env: Mapping[str, str]
    cwd: str | None
    timeout_s: float
    output_limit_bytes: int = 65536
    kill_grace_s: float = 5.0
    #: called with each chunk of output as it arrives (live output)
    on_output: Any = None
    #: W3C trace context of this attempt's span (node/run/tracing_shell.py): the
    #: process's ``TRACEPARENT``, the HTTP request's ``traceparent``
    traceparent: str | None = None


@dataclass(frozen=True)
class RunResult:
    """The outcome of one attempt (one run record's worth).

    ``exit_code``: process exit status, -N for death by signal N, None for
    HTTP or when nothing ran. ``started``/``finished``: wall-clock epoch
    seconds. ``output``: bounded UTF-8 tail of stdout+stderr (or the HTTP
    response body), prefixed ``[... N bytes truncated]`` when cut.
    """

    status: str
    exit_code: int | None
    started: float
    finished: float
    output: str
    error: str | None
    http_status: int | None = None


def slot_iso(slot: float) -> str:
    """Epoch seconds to ISO 8601 UTC: ``2026-11-26T23:00:00Z`` (fractions kept
    as microseconds when the slot is not a whole second)."""
    dt = datetime.fromtimestamp(slot, tz=timezone.utc)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _peerd_vars(ctx: RunContext) -> list[tuple[str, str]]:
    return [
        ("TASK_ID", ctx.task_id),
        ("SLOT", slot_iso(ctx.slot)),
        ("RUN_ID", ctx.run_id),
        ("ATTEMPT", str(ctx.attempt)),
        ("NODE", ctx.node),
    ]


def run_headers(ctx: RunContext) -> list[tuple[str, str]]:
    """The ``X-Peerd-*`` / ``X-Fencing-Token`` (and, when traced,
    ``traceparent``) headers of an HTTP run."""
    names = {"TASK_ID": "Task-Id", "SLOT": "Slot", "RUN_ID": "Run-Id", "ATTEMPT": "Attempt", "NODE": "Node"}
    out = [(f"X-Peerd-{names[k]}", v) for k, v in _peerd_vars(ctx)]
    if ctx.fencing_token is not None:
        out.append(("X-Fencing-Token", str(ctx.fencing_token)))
    if ctx.traceparent is not None:
        out.append(("traceparent", ctx.traceparent))
    return out


def _check_ctx(ctx: Any) -> str | None:
    if not isinstance(ctx, RunContext):
        return f"context must be a RunContext, got {type(ctx).__name__}"
    if not isinstance(ctx.timeout_s, (int, float)) or math.isnan(ctx.timeout_s) or ctx.timeout_s <= 0:
        return f"timeout_s must be > 0, got {ctx.timeout_s!r}"
    if not isinstance(ctx.kill_grace_s, (int, float)) or not math.isfinite(ctx.kill_grace_s) or ctx.kill_grace_s < 0:
        return f"kill_grace_s must be a finite number >= 0, got {ctx.kill_grace_s!r}"
    if not isinstance(ctx.output_limit_bytes, int) or ctx.output_limit_bytes < 0:
        return f"output_limit_bytes must be an int >= 0, got {ctx.output_limit_bytes!r}"
    if ctx.cwd is not None and not isinstance(ctx.cwd, str):
        return f"cwd must be a string, got {type(ctx.cwd).__name__}"
    if ctx.env is not None and not isinstance(ctx.env, Mapping):
        return f"env must be a mapping, got {type(ctx.env).__name__}"
    for k, v in (ctx.env or {}).items():
        if not isinstance(k, str) or not k or "=" in k or "\x00" in k or "\x00" in str(v):
            return f"env: bad variable {k!r}"
    return None


_RETRY_ALIASES = {"backoff": "backoff_s", "max_backoff": "max_backoff_s"}


def parse_retries(retries: Mapping[str, Any] | RetryPolicy | None) -> RetryPolicy:
    """Check ``{max, backoff_s, max_backoff_s, multiplier[, jitter]}``.

    Missing keys take :class:`RetryPolicy`'s defaults; None means no retries.
    The task-file spellings ``backoff`` / ``max_backoff`` are accepted too,
    and so is any object with ``max``, ``backoff_s``, ``max_backoff_s`` and
    ``multiplier`` attributes.

    Raises:
        ValueError: naming the field.
    """
    if retries is None:
        return RetryPolicy()
    if isinstance(retries, RetryPolicy):
        raw: Mapping[str, Any] = {"max": retries.max, "backoff_s": retries.backoff_s,
                                  "max_backoff_s": retries.max_backoff_s,
                                  "multiplier": retries.multiplier, "jitter": retries.jitter}
    elif isinstance(retries, Mapping):
        raw = {_RETRY_ALIASES.get(k, k): v for k, v in retries.items()}
        if len(raw) != len(retries):
            raise ValueError("retries: both a field and its alias given (backoff/backoff_s, max_backoff/max_backoff_s)")
    elif all(hasattr(retries, a) for a in ("max", "backoff_s", "max_backoff_s", "multiplier")):
        raw = {a: getattr(retries, a) for a in ("max", "backoff_s", "max_backoff_s", "multiplier")}
        if hasattr(retries, "jitter"):
            raw["jitter"] = retries.jitter
    else:
        raise ValueError(f"retries must be a mapping, got {type(retries).__name__}")
    unknown = sorted(str(k) for k in set(raw) - {"max", "backoff_s", "max_backoff_s", "multiplier", "jitter"})
    if unknown:
        raise ValueError(f"retries: unknown field(s) {unknown}")
    d = RetryPolicy()
    mx = raw.get("max", d.max)
    if isinstance(mx, bool) or not isinstance(mx, int) or not 0 <= mx <= MAX_RETRIES:
        raise ValueError(f"retries.max must be an int 0-{MAX_RETRIES}, got {mx!r}")
    vals = {}
    for name, lo in (("backoff_s", 0.0), ("max_backoff_s", 0.0), ("multiplier", 1.0)):
        v = raw.get(name, getattr(d, name))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise ValueError(f"retries.{name} must be a finite number >= {lo:g}, got {v!r}")
        vals[name] = float(v)
    jitter = raw.get("jitter", d.jitter)
    if jitter not in JITTER_MODES:
        raise ValueError(f"retries.jitter must be one of {JITTER_MODES}, got {jitter!r}")
    return RetryPolicy(max=mx, jitter=jitter, **vals)
