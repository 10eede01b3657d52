"""Runs: one attempt of a command as data, retries, trace ids and what follows a
finished run (notifications, chained runs); the shells start child processes,
send HTTP requests and export traces.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.run.attempt.<function>``):
    attempt        One attempt of a task's command, as data (core): the typed c
    followups      What follows a finished run (sans-IO): notifications and cha
    retry          Retry backoff: exponential growth capped at a maximum, with 
    traceids       Trace ids of runs (sans-IO, pure): deterministic from the cl
    urls           HTTP URLs (core): split and check the ``http(s)://host[:port

Shells (I/O; import them by their full path, e.g. ``node.run.executor_shell``):
    executor_shell Executors (shell): run one attempt of a task's command, and 
    http_client_shell A minimal async HTTP/1.1 client for ``http`` tasks: trio str
    processes_shell Child processes for task runs: own process group, timeout, b
    tracing_shell  Traces of runs (OpenTelemetry), optional.
"""
from node.run.attempt import (
    Command, CommandError, ExecCommand, HttpCommand, PythonCommand, RunContext,
    RunResult, ShellCommand,
)
from node.run.followups import (
    FAILURE, OUTPUT_TAIL, MISSED_REASONS,
)
from node.run.retry import (
    JITTER_MODES, MAX_RETRIES, RetryPolicy,
)
from node.run.urls import (
    HttpUrl,
)

__all__ = [
    'Command', 'CommandError', 'ExecCommand', 'HttpCommand', 'PythonCommand',
    'RunContext', 'RunResult', 'ShellCommand', 'FAILURE', 'OUTPUT_TAIL',
    'MISSED_REASONS', 'JITTER_MODES', 'MAX_RETRIES', 'RetryPolicy', 'HttpUrl',
]
