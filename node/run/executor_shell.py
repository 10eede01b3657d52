"""Executors (shell): run one attempt of a task's command, and retry failed attempts.

Theory of operation
-------------------
The command, the attempt's :class:`~node.run.attempt.RunContext` and its
:class:`~node.run.attempt.RunResult` are node/run/attempt.py.
:func:`execute` runs one attempt and always returns a ``RunResult``;
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
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import trio

from node.run import http_client_shell as http_client
from node.run.attempt import (
    Command,
    CommandError,
    ExecCommand,
    HttpCommand,
    PythonCommand,
    RunContext,
    RunResult,
    ShellCommand,
    _check_ctx,
    _peerd_vars,
    parse_command,
    parse_retries,
    run_headers,
)
from node.run.processes_shell import OutputTail, ProcessOutcome, run_child, signal_name
from node.state.runstatus import RETRYABLE
from node.run.retry import RetryPolicy

__all__ = [
    "RETRYABLE_STATUSES",
    "execute",
    "execute_with_retries",
    "run_env",
]

#: Statuses worth another attempt (defined once, in node.state.runstatus).
RETRYABLE_STATUSES = RETRYABLE
#: Shell used for ``shell`` commands (POSIX sh, as cron does).
SHELL = "/bin/sh"
#: Directory holding the ``node`` package; put on the python child's path so
#: ``-m node.pyrunner`` works whatever the task's cwd is.
_PEERD_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        argv, kind = [sys.executable, "-u", "-m", "node.pyrunner"], "python"
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
