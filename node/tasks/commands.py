"""Command kinds of a task (core): shell, exec, python and http, their checks and manual-run arguments.

A task's ``command`` is one of four frozen values, each with a ``to_dict``
that is its task-file form (``type`` names the kind):

- ``shell``: ``/bin/sh -c run`` (:class:`ShellCommand`);
- ``exec``: ``argv`` executed directly, no shell (:class:`ExecCommand`);
- ``python``: ``module:function(*args, **kwargs)`` in a child process
  (:class:`PythonCommand`; node/pyrunner.py runs it);
- ``http``: one HTTP request (:class:`HttpCommand`).

:class:`CommandChecks` validates the ``command`` mapping of a task file; the
task validator (node/tasks/validate.py) mixes it in. :func:`command_with_args`
gives the command a manual run with extra arguments executes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Union

__all__ = [
    "COMMAND_TYPES",
    "Command",
    "CommandChecks",
    "ExecCommand",
    "HttpCommand",
    "PythonCommand",
    "ShellCommand",
    "command_with_args",
]

COMMAND_TYPES = ("shell", "exec", "python", "http")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_TARGET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: python command args/kwargs integers: the msgpack range replication carries.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class ShellCommand:
    """``/bin/sh -c run``."""

    run: str
    type: ClassVar[str] = "shell"

    def to_dict(self) -> dict:
        return {"type": "shell", "run": self.run}


@dataclass(frozen=True, slots=True)
class ExecCommand:
    """``argv[0]`` executed directly (no shell)."""

    argv: tuple[str, ...]
    type: ClassVar[str] = "exec"

    def to_dict(self) -> dict:
        return {"type": "exec", "argv": list(self.argv)}


@dataclass(frozen=True, slots=True)
class PythonCommand:
    """``module:function(*args, **kwargs)`` in a child process."""

    target: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    type: ClassVar[str] = "python"

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.target.split(":", 1)[1]

    def to_dict(self) -> dict:
        return {"type": "python", "target": self.target, "args": list(self.args),
                "kwargs": dict(self.kwargs)}


@dataclass(frozen=True, slots=True)
class HttpCommand:
    """An HTTP request; success when the status is in ``expect_status``.

    ``expect_status`` empty means any 2xx.
    """

    url: str
    method: str = "GET"
    headers: dict = field(default_factory=dict)
    body: str | None = None
    expect_status: tuple[int, ...] = ()
    type: ClassVar[str] = "http"

    def status_ok(self, status: int) -> bool:
        return status in self.expect_status if self.expect_status else 200 <= status < 300

    def to_dict(self) -> dict:
        return {"type": "http", "method": self.method, "url": self.url,
                "headers": dict(self.headers), "body": self.body,
                "expect_status": list(self.expect_status)}


Command = Union[ShellCommand, ExecCommand, PythonCommand, HttpCommand]


def _is_plain(value: Any, depth: int = 0) -> bool:
    """JSON/msgpack-able plain data (python command args/kwargs)."""
    if depth > 16:
        return False
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return _INT_MIN <= value <= _INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_plain(x, depth + 1) for x in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(x, depth + 1) for k, x in value.items())
    return False


class CommandChecks:
    """The checks of a task's ``command`` mapping.

    Mixed into the task validator (node/tasks/validate.py), which provides
    ``errors``, ``err``, ``_unknown`` and ``_str_map``: each problem is one
    message naming the field, and a command with any problem is None.
    """

    # provided by the validator
    errors: list[str]
    err: Callable[..., None]
    _unknown: Callable[..., None]
    _str_map: Callable[..., dict]

    def command(self, raw: Any) -> Command | None:
        if raw is None:
            self.err("command", "required", show=False)
            return None
        if not isinstance(raw, dict):
            self.err("command", "must be a mapping with type: shell|exec|python|http", raw)
            return None
        ctype = raw.get("type")
        if ctype not in COMMAND_TYPES:
            self.err("command.type", "must be one of " + ", ".join(COMMAND_TYPES), ctype)
            return None
        n = len(self.errors)
        if ctype == "shell":
            self._unknown(raw, ("type", "run"), "command.")
            run = raw.get("run")
            if not isinstance(run, str) or not run.strip() or "\x00" in run:
                self.err("command.run", "must be a non-empty string", run)
                return None
            return ShellCommand(run) if len(self.errors) == n else None
        if ctype == "exec":
            self._unknown(raw, ("type", "argv"), "command.")
            argv = raw.get("argv")
            if (not isinstance(argv, list) or not argv
                    or not all(isinstance(a, str) and "\x00" not in a for a in argv) or not argv[0]):
                self.err("command.argv", "must be a non-empty list of strings", argv)
                return None
            return ExecCommand(tuple(argv)) if len(self.errors) == n else None
        if ctype == "python":
            self._unknown(raw, ("type", "target", "args", "kwargs"), "command.")
            target = raw.get("target")
            ok = True
            if not isinstance(target, str) or not _TARGET_RE.match(target):
                self.err("command.target", "must be 'module:function' (dotted names)", target)
                ok = False
            args = raw.get("args", [])
            if not isinstance(args, list) or not _is_plain(args):
                self.err("command.args", "must be a list of plain values", args)
                ok = False
            kwargs = raw.get("kwargs", {})
            if not isinstance(kwargs, dict) or not _is_plain(kwargs):
                self.err("command.kwargs", "must be a mapping of str to plain values", kwargs)
                ok = False
            if not ok or len(self.errors) != n:
                return None
            return PythonCommand(target, tuple(args), dict(kwargs))
        # http
        self._unknown(raw, ("type", "method", "url", "headers", "body", "expect_status"), "command.")
        url = raw.get("url")
        ok = True
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            self.err("command.url", "must be an http:// or https:// URL", url)
            ok = False
        method = raw.get("method", "GET")
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            self.err("command.method", "must be one of " + ", ".join(HTTP_METHODS), method)
            ok = False
            method = "GET"
        headers = self._str_map(raw, "headers", 64)
        body = raw.get("body")
        if body is not None and not isinstance(body, str):
            self.err("command.body", "must be a string", body)
            ok = False
        exp = raw.get("expect_status", [])
        if isinstance(exp, int) and not isinstance(exp, bool):
            exp = [exp]
        if (not isinstance(exp, list)
                or not all(isinstance(x, int) and not isinstance(x, bool) and 100 <= x <= 599 for x in exp)):
            self.err("command.expect_status", "must be a status code 100-599 or a list of them", exp)
            ok = False
            exp = []
        if not ok or len(self.errors) != n:
            return None
        return HttpCommand(url=url, method=method.upper(), headers=headers, body=body,
                           expect_status=tuple(sorted(set(exp))))


def command_with_args(command: Command, args: list[str]) -> Command:
    """The command a manual run with extra ``args`` executes."""
    if not args:
        return command
    if isinstance(command, ExecCommand):
        return ExecCommand(tuple(command.argv) + tuple(args))
    if isinstance(command, PythonCommand):
        return PythonCommand(command.target, tuple(command.args) + tuple(args), dict(command.kwargs))
    if isinstance(command, ShellCommand):
        import shlex

        # sh -c 'run' sh arg1 ...: the script reads them as "$1" ...
        return ShellCommand(f"set -- {shlex.join(args)}\n{command.run}")
    raise ValueError("an http command takes no arguments")
