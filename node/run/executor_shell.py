"""Executors: run one attempt of a task's command, and retry failed attempts.

Theory of operation
-------------------
A *command* is a plain dict (the task file's ``command`` field), checked by
:func:`parse_command` into one of four frozen dataclasses:

  ``{"type": "shell", "run": "echo hi"}``                  ``/bin/sh -c run``
  ``{"type": "exec", "argv": ["date", "-u"]}``             argv, no shell
  ``{"type": "python", "target": "mod:func", "args": [], "kwargs": {}}``
      ``sys.executable -u -m node.run.pyrunner`` child, spec on stdin
  ``{"type": "http", "method": "POST", "url": "...", "headers": {}, "body": "...",
     "expect_status": 200 | [200, 204]}``                 (default: any 2xx)

:func:`execute` runs one attempt and always returns a :class:`RunResult`;
only ``trio.Cancelled`` escapes (after the child's process group was
terminated). Statuses:

  * ``succeeded`` - exit status 0 / an expected HTTP status.
  * ``failed``    - non-zero exit, death by a signal, unexpected HTTP status,
    connection refused or broken. Retried.
  * ``timeout``   - ``ctx.timeout_s`` expired (group got SIGTERM, then
    SIGKILL after ``ctx.kill_grace_s``). Retried.
  * ``error``     - the run could not start: bad command dict, bad context,
    missing executable or cwd. Not retried (the next attempt would fail the
    same way).
  * ``cancelled`` - never produced here; the daemon records it when it
    cancels a run (overlap ``replace``, shutdown).

Every process run sees the daemon's environment, overlaid with the task's
``env``, overlaid with ``PEERD_TASK_ID``, ``PEERD_SLOT`` (ISO 8601 UTC),
``PEERD_RUN_ID``, ``PEERD_ATTEMPT``, ``PEERD_NODE`` and, when fencing is on,
``PEERD_FENCING_TOKEN`` (task env cannot override them). HTTP runs carry the
same facts as ``X-Peerd-Task-Id``, ``X-Peerd-Slot``, ``X-Peerd-Run-Id``,
``X-Peerd-Attempt``, ``X-Peerd-Node`` and ``X-Fencing-Token`` headers. When
the run is traced (``RunContext.traceparent``, node/run/tracing_shell.py), processes
get ``TRACEPARENT`` (which wins over the task env's) and HTTP requests a
``traceparent`` header (which replaces the task's).

:func:`execute_with_retries` runs attempt 1, 2, ... up to ``1 + retries.max``,
reporting every attempt to ``on_attempt`` (each is a run record) and sleeping
:func:`node.run.retry.backoff_delay_s` between them with ``trio.sleep``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Union

import trio

from node.run import http_client_shell as http_client
from node.run.processes_shell import OutputTail, ProcessOutcome, run_child, signal_name
from node.run.pyrunner import _TARGET_RE
from node.state.runstatus import RETRYABLE
from node.run.retry import JITTER_MODES, MAX_RETRIES, RetryPolicy

__all__ = [
    "MAX_RETRIES",
    "RETRYABLE_STATUSES",
    "Command",
    "CommandError",
    "ExecCommand",
    "HttpCommand",
    "PythonCommand",
    "RetryPolicy",
    "RunContext",
    "RunResult",
    "ShellCommand",
    "execute",
    "execute_with_retries",
    "parse_command",
    "parse_retries",
    "run_env",
    "run_headers",
    "slot_iso",
    "validate_command",
]

#: Statuses worth another attempt (defined once, in node.state.runstatus).
RETRYABLE_STATUSES = RETRYABLE
#: Shell used for ``shell`` commands (POSIX sh, as cron does).
SHELL = "/bin/sh"
#: Directory holding the ``node`` package; put on the python child's path so
#: ``-m node.run.pyrunner`` works whatever the task's cwd is.
_PEERD_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        http_client.parse_url(url)
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


def run_env(ctx: RunContext, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child environment: ``base`` (default ``os.environ``) without the
    node's own ``PEERD_*`` settings (they may hold the API token or etcd
    password), + task env + the run's ``PEERD_*`` variables (which win)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("PEERD_")}
    env.update({str(k): str(v) for k, v in (ctx.env or {}).items()})
    for name, value in _peerd_vars(ctx):
        env[f"PEERD_{name}"] = value
    if ctx.fencing_token is not None:
        env["PEERD_FENCING_TOKEN"] = str(ctx.fencing_token)
    else:
        env.pop("PEERD_FENCING_TOKEN", None)
    if ctx.traceparent is not None:
        env["TRACEPARENT"] = ctx.traceparent
    return env


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


def _error(reason: str, started: float | None = None) -> RunResult:
    now = time.time()
    return RunResult(status="error", exit_code=None, started=now if started is None else started,
                     finished=now, output="", error=reason)


def _process_result(outcome: ProcessOutcome, ctx: RunContext, started: float, kind: str) -> RunResult:
    rc = outcome.returncode
    notes = []
    if outcome.timed_out:
        status = "timeout"
        how = "SIGTERM to the process group"
        if outcome.sigkill_sent:
            how += f", SIGKILL after {ctx.kill_grace_s:g}s grace"
        reason = f"timed out after {ctx.timeout_s:g}s ({how})"
    elif rc == 0:
        status, reason = "succeeded", None
    elif rc is not None and rc < 0:
        status, reason = "failed", f"killed by {signal_name(-rc)}"
    else:
        status, reason = "failed", f"exit status {rc}"
        if kind == "shell" and rc == 127:
            reason += " (command not found)"
        elif kind == "shell" and rc == 126:
            reason += " (command not executable)"
        elif kind == "python" and rc == 2:
            reason += " (bad python target or spec, or the callable exited with 2; see output)"
    if outcome.stragglers:
        notes.append("processes left in the run's group were terminated")
    if not outcome.reaped:
        notes.append(f"pid {outcome.pid} survived SIGKILL and was not reaped")
    if notes:
        reason = "; ".join(([reason] if reason else []) + notes)
    return RunResult(status=status, exit_code=rc, started=started, finished=time.time(),
                     output=outcome.output.render(), error=reason)


async def _execute_process(cmd: Command, ctx: RunContext) -> RunResult:
    env = run_env(ctx)
    stdin_data = None
    if isinstance(cmd, ShellCommand):
        argv, kind = [SHELL, "-c", cmd.run], "shell"
    elif isinstance(cmd, ExecCommand):
        argv, kind = list(cmd.argv), "exec"
    else:
        assert isinstance(cmd, PythonCommand)
        argv, kind = [sys.executable, "-u", "-m", "node.run.pyrunner"], "python"
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PEERD_ROOT + (os.pathsep + old if old else "")
        spec = {"target": cmd.target, "args": list(cmd.args), "kwargs": dict(cmd.kwargs)}
        stdin_data = json.dumps(spec).encode()
    started = time.time()
    if ctx.cwd is not None and not os.path.isdir(ctx.cwd):
        return _error(f"cwd {ctx.cwd!r} does not exist or is not a directory", started)
    try:
        outcome = await run_child(argv, env=env, cwd=ctx.cwd, timeout_s=ctx.timeout_s,
                                  output_limit_bytes=ctx.output_limit_bytes,
                                  kill_grace_s=ctx.kill_grace_s, stdin_data=stdin_data,
                                  on_output=ctx.on_output)
    except FileNotFoundError as e:
        if ctx.cwd is not None and e.filename == ctx.cwd:
            return _error(f"cwd {ctx.cwd!r} does not exist", started)
        return _error(f"executable not found: {argv[0]!r}", started)
    except PermissionError:
        return _error(f"permission denied executing {argv[0]!r}", started)
    except OSError as e:
        return _error(f"cannot start {argv[0]!r}: {e}", started)
    return _process_result(outcome, ctx, started, kind)


async def _execute_http(cmd: HttpCommand, ctx: RunContext, ssl_context: Any) -> RunResult:
    overridden = {n.lower() for n, _ in run_headers(ctx)}
    headers = [(n, v) for n, v in cmd.headers if n.lower() not in overridden] + run_headers(ctx)
    body = cmd.body.encode("utf-8") if cmd.body is not None else None
    started = time.time()

    def done(status: str, error: str | None, http_status: int | None = None, output: str = "") -> RunResult:
        return RunResult(status=status, exit_code=None, started=started, finished=time.time(),
                         output=output, error=error, http_status=http_status)

    try:
        resp = await http_client.request(cmd.method, cmd.url, headers=headers, body=body,
                                         timeout_s=ctx.timeout_s, max_body_bytes=ctx.output_limit_bytes,
                                         ssl_context=ssl_context)
    except http_client.HttpTimeout as e:
        return done("timeout", str(e))
    except http_client.HttpError as e:
        return done("failed", str(e))
    except ValueError as e:
        return done("error", str(e))
    tail = OutputTail(ctx.output_limit_bytes)
    tail.total_bytes = resp.body_total_bytes - len(resp.body_tail)
    tail.feed(resp.body_tail)
    if ctx.on_output is not None and resp.body_tail:
        ctx.on_output(resp.body_tail)
    output = tail.render()
    ok = 200 <= resp.status <= 299 if cmd.expect_status is None else resp.status in cmd.expect_status
    if ok:
        return done("succeeded", None, resp.status, output)
    expected = "2xx" if cmd.expect_status is None else ", ".join(map(str, cmd.expect_status))
    reason = resp.reason or _status_phrase(resp.status)
    return done("failed", f"HTTP {resp.status} {reason}".rstrip() + f", expected {expected}",
                resp.status, output)


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def execute(command: Any, ctx: RunContext, *, ssl_context: Any = None) -> RunResult:
    """Run one attempt of ``command``.

    Args:
        command: a command dict (see the module docstring).
        ctx: the run's context.
        ssl_context: for https, overrides ``ssl.create_default_context()``.

    Returns:
        A :class:`RunResult`; never raises for bad input or a failing command.

    Raises:
        trio.Cancelled: the caller was cancelled; a child process group was
            terminated (SIGTERM, grace, SIGKILL) before re-raising.
    """
    reason = _check_ctx(ctx)
    if reason is not None:
        return _error(f"bad run context: {reason}")
    try:
        cmd = parse_command(command)
    except CommandError as e:
        return _error(str(e))
    try:
        if isinstance(cmd, HttpCommand):
            return await _execute_http(cmd, ctx, ssl_context)
        return await _execute_process(cmd, ctx)
    except Exception as e:  # a bug or an unforeseen OS error: record, don't crash the node
        return _error(f"executor error: {type(e).__name__}: {e}")


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


async def execute_with_retries(
    command: Any,
    ctx_factory: Callable[[int], RunContext],
    retries: Mapping[str, Any] | RetryPolicy | None,
    rng: random.Random,
    on_attempt: Callable[[RunContext, RunResult], Awaitable[None] | None] | None = None,
    *,
    on_start: Callable[[RunContext], Awaitable[None] | None] | None = None,
    execute_fn: Callable[[Any, RunContext], Awaitable[RunResult]] | None = None,
) -> RunResult:
    """Run ``command`` until it succeeds, fails in a non-retryable way, or
    ``1 + retries.max`` attempts were made.

    Args:
        command: a command dict.
        ctx_factory: ``attempt -> RunContext`` (attempt is 1-based; the daemon
            gives each attempt its own run id and fencing token).
        retries: ``{max, backoff_s, max_backoff_s, multiplier[, jitter]}``.
        rng: randomness for the jitter.
        on_attempt: called (and awaited if it returns an awaitable) after
            every attempt with its context and result.
        on_start: called (and awaited) with the context just before each
            attempt starts (after the backoff sleep), e.g. to record a
            ``running`` run record.
        execute_fn: replaces :func:`execute` (tests).

    Returns:
        The last attempt's :class:`RunResult`. A bad ``retries`` yields one
        ``error`` result (reported to ``on_attempt``) and nothing runs.

    Raises:
        trio.Cancelled: cancelled during an attempt or a backoff sleep.
    """
    run = execute if execute_fn is None else execute_fn
    try:
        policy = parse_retries(retries)
    except ValueError as e:
        ctx = ctx_factory(1)
        result = _error(str(e))
        await _report(on_attempt, ctx, result)
        return result
    result: RunResult | None = None
    for attempt in range(1, policy.max + 2):
        if attempt > 1:
            await trio.sleep(policy.delay_s(attempt - 1, rng))
        ctx = ctx_factory(attempt)
        if on_start is not None:
            maybe = on_start(ctx)
            if inspect.isawaitable(maybe):
                await maybe
        result = await run(command, ctx)
        await _report(on_attempt, ctx, result)
        if result.status not in RETRYABLE_STATUSES:
            break
    assert result is not None
    return result


async def _report(on_attempt: Any, ctx: RunContext, result: RunResult) -> None:
    if on_attempt is None:
        return
    maybe = on_attempt(ctx, result)
    if inspect.isawaitable(maybe):
        await maybe
