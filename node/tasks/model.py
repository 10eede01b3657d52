"""Task model (core): the :class:`Task` value, its fields, their limits and defaults.

A :class:`Task` is a frozen, validated value. It has one canonical dict form
(:meth:`Task.to_dict`, msgpack- and JSON-able) that is also the file format:
the keys of a task in a YAML/JSON/TOML file are the keys of ``to_dict``.
:meth:`Task.from_dict` validates everything (node/tasks/validate.py), because
a dict may come from the network. The command kinds are in
node/tasks/commands.py; reading a task file is node/tasks/files_shell.py.

Besides the task itself this module holds the checks of fields other modules
also apply: ``notify`` targets and ``after`` chains (:func:`check_notify_target`,
:func:`after_cycle`), secret references in ``env`` (:func:`resolve_env`) and a
manual run's parameters (:func:`bind_run`).

Schedules (see :mod:`node.schedule.parse`): a cron string (5 or 6 fields, the 6th
being seconds at the end, croniter's convention), an alias (``@hourly``...),
``@every 30s``, ``now`` or a one-shot time. In YAML write a one-shot time as
``schedule: {once: "2026-12-01T10:00:00Z"}`` (TOML: ``schedule = {once =
2026-12-01T10:00:00Z}``) or as the string ``"once:2026-12-01T10:00:00Z"``; a
time without an offset is read in the task's ``timezone``. The canonical form
is the string ``once:YYYY-MM-DDTHH:MM:SSZ``. ``schedule: now`` stays ``now``
in the task; the daemon calls :meth:`Task.resolve_now` when it applies the
task, so the cluster stores one instant and fires it once.

Defaults (and why):
- ``timeout`` 3600 s (one hour: long jobs must say so; cron has no timeout,
  Kubernetes' activeDeadlineSeconds none, so we pick a finite bound);
- ``retries`` ``max 0`` (cron does not retry), ``backoff 1s``,
  ``max_backoff 60s``, ``multiplier 2.0``;
- ``overlap forbid`` (Kubernetes CronJob's ``Forbid`` / systemd timers never
  start a second instance);
- ``misfire run_once`` with ``catchup_window 1h`` (anacron runs a missed job
  once; APScheduler's ``coalesce=True``);
- ``on_owner_loss rerun``; ``history 100``; ``timezone UTC``.
"""

from __future__ import annotations

import difflib
import re
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from node.run.retry import RetryPolicy
from node.schedule.parse import ScheduleError, parse_duration, resolve_now
from node.schedule.slots import DstPolicy
from node.tasks.commands import Command, HttpCommand, _is_plain

__all__ = [
    "SecretError",
    "resolve_env",
    "secret_label",
    "shown_env",
    "CHAIN_ON",
    "NOTIFY_EVENTS",
    "after_cycle",
    "check_notify_target",
    "bind_run",
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "OWNER_LOSS_POLICIES",
    "Task",
    "TaskError",
    "valid_id",
]

#: Task ids: 1-128 of these characters, not only dots (``.`` and ``..`` would
#: read as path segments in ``/v1/tasks/{id}``). Use :func:`valid_id`
#: (``fullmatch``: ``$`` alone would also match before a trailing newline).
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
OVERLAP_POLICIES = ("allow", "forbid", "replace", "buffer_one", "buffer_all")
MISFIRE_POLICIES = ("skip", "run_once", "run_all")
OWNER_LOSS_POLICIES = ("rerun", "skip")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Limits (TigerStyle: put a limit on everything).
MAX_NAME_LEN = 256
MAX_TIMEOUT_S = 7 * 86400.0
MAX_JITTER_S = 86400.0
MAX_CATCHUP_WINDOW_S = 7 * 86400.0
MAX_HISTORY = 10_000
MAX_TAGS = 64
MAX_ENV = 256
#: Parameters per task, and the longest value (or default) of one.
MAX_PARAMS = 64
MAX_PARAM_LEN = 4096
#: Most members one slot of a ``target: {mode: count}`` task runs on.
MAX_SHARDS = 1024
#: ``output: {keep: file}``: default and largest size of a run's output file.
DEFAULT_OUTPUT_FILE_BYTES = 10 << 20
MAX_OUTPUT_FILE_BYTES = 1 << 30
#: Extra arguments a manual run may add.
MAX_RUN_ARGS = 64
MAX_TASKS_PER_FILE = 100_000
#: Longest schedule string (a cron line is ~100 characters).
MAX_SCHEDULE_LEN = 1024
#: Longest ``@every`` period: ten years of 365 days. Slots are multiples of
#: the period since the epoch, so the next 100 (explain's maximum) stay
#: within year 9999, the last year the platform's time functions represent.
MAX_EVERY_S = 10 * 365 * 86400
#: One-shot instants: what ``datetime`` represents, 0001-01-01T00:00:00Z to
#: 9999-12-31T23:59:59Z (and the instant must also exist in the task's zone).
MIN_INSTANT = int(datetime(1, 1, 1, tzinfo=timezone.utc).timestamp())
MAX_INSTANT = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())


def valid_id(value: Any) -> bool:
    """True for a task id: 1-128 of ``A-Z a-z 0-9 . _ -``, not only dots."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None and value.strip(".") != ""


class TaskError(ValueError):
    """One or more validation errors; ``errors`` lists every message."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------- task


@dataclass(frozen=True)
class Task:
    """A validated task. Build with :meth:`from_dict` (or :func:`parse_tasks`).

    Durations are float seconds; dict fields are plain dicts (treat as
    read-only).
    """

    id: str
    schedule: str
    command: Command
    name: str = ""
    timezone: str = "UTC"
    dst: DstPolicy | None = None
    jitter_s: float = 0.0
    timeout_s: float = 3600.0
    retries: RetryPolicy = RetryPolicy()
    overlap: str = "forbid"
    misfire: str = "run_once"
    catchup_window_s: float = 3600.0
    on_owner_loss: str = "rerun"
    tags: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    paused: bool = False
    history: int = 100
    #: the operator has read how peerd's day-field reading differs from
    #: croniter's for this schedule (node.schedule.slots.reading_notes): no warning
    cron_reading_ack: bool = False
    #: parameters a manual run may set: name -> {"required": bool,
    #: "default": str | None, "description": str} (see :func:`bind_run`)
    params: dict = field(default_factory=dict)
    #: fire once per finished run of another task: {"task": ID, "on":
    #: "success" | "failure" | "always"} (node/run/followups.py)
    after: dict | None = None
    #: where to report this task's runs: a tuple of webhook targets
    #: (node/run/followups.py has the fields and their defaults)
    notify: tuple = ()
    #: where a run's output is kept: {"keep": "tail" | "file", "max_bytes": N}
    #: (tail: the last 64 KiB in the run record; file: also the whole output,
    #: up to max_bytes, in a file on the node that ran it)
    output: dict | None = None
    #: where each slot runs: None (one member, the owner), {"mode": "all"}
    #: (every eligible member) or {"mode": "count", "count": N} (the first N
    #: of the task's preference list); node/ownership/shards.py
    target: dict | None = None

    FIELDS: ClassVar[tuple[str, ...]] = (
        "id", "name", "schedule", "timezone", "dst", "jitter", "command", "timeout",
        "retries", "overlap", "misfire", "catchup_window", "on_owner_loss", "tags",
        "env", "cwd", "paused", "history", "cron_reading_ack", "params", "after", "notify", "output",
        "target",
    )

    def __hash__(self) -> int:  # dict fields are unhashable; equal tasks share these
        return hash((self.id, self.schedule))

    @property
    def is_immediate(self) -> bool:
        """True for one-shot tasks (``now`` or ``once:``)."""
        return self.schedule == "now" or self.schedule.startswith("once:")

    def param_defaults(self) -> dict[str, str]:
        """Environment every run gets from ``params`` defaults."""
        return {k: v["default"] for k, v in self.params.items() if v.get("default") is not None}

    def resolve_now(self, now: float) -> "Task":
        """Return the task with ``schedule: now`` turned into ``once:<now>``."""
        spec = resolve_now(self.schedule, now)
        return self if spec == self.schedule else replace(self, schedule=spec)

    def to_dict(self) -> dict:
        """Canonical dict (msgpack/JSON-able); ``from_dict`` round-trips it."""
        d = {
            "id": self.id,
            "name": self.name,
            "schedule": self.schedule,
            "timezone": self.timezone,
            "dst": self.dst.to_dict() if self.dst else None,
            "jitter": self.jitter_s,
            "command": self.command.to_dict(),
            "timeout": self.timeout_s,
            "retries": self.retries.to_dict(),
            "overlap": self.overlap,
            "misfire": self.misfire,
            "catchup_window": self.catchup_window_s,
            "on_owner_loss": self.on_owner_loss,
            "tags": dict(self.tags),
            "env": {k: dict(v) if isinstance(v, dict) else v for k, v in self.env.items()},
            "cwd": self.cwd,
            "paused": self.paused,
            "history": self.history,
            "cron_reading_ack": self.cron_reading_ack,
        }
        # fields added after the first release appear only when set, so a
        # definition without them is byte-for-byte what older nodes wrote
        if self.params:
            d["params"] = {k: dict(v) for k, v in self.params.items()}
        if self.after:
            d["after"] = dict(self.after)
        if self.notify:
            d["notify"] = [dict(n) for n in self.notify]
        if self.output:
            d["output"] = dict(self.output)
        if self.target:
            d["target"] = dict(self.target)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None, index: int | None = None) -> "Task":
        """Validate ``d`` and build a Task.

        Args:
            d: a mapping with the task-file keys.
            source: prefix for error messages (a file name), or None.
            index: position in a file (for messages about tasks without id).

        Raises:
            TaskError: every problem found, one message each.
        """
        from node.tasks.validate import _Validator  # it builds Tasks: imported here, not above

        v = _Validator(source, index)
        task = v.task(d)
        if v.errors:
            raise TaskError(v.errors)
        assert task is not None
        return task

# ---------------------------------------------------------------- notify targets

#: When a chained task fires, by its upstream run's status.
CHAIN_ON = ("success", "failure", "always")
#: Events a notification target subscribes to.
NOTIFY_EVENTS = ("success", "failure", "recovery", "missed", "lost")
MAX_NOTIFY = 8
MAX_NOTIFY_TIMEOUT_S = 120.0
MAX_NOTIFY_RETRIES = 10
_NOTIFY_FIELDS = ("on", "type", "url", "headers", "template", "timeout", "retries")


def _yaml_on(d: dict) -> dict:
    """YAML 1.1 reads an unquoted ``on:`` key as the boolean true: take it
    back as ``on``."""
    if True in d and "on" not in d:
        d = dict(d)
        d["on"] = d.pop(True)
    return d


def check_notify_target(t: Any) -> tuple[tuple[str, str] | None, dict | None]:
    """Validate one ``notify`` target: ``(None, canonical)`` or ``((field,
    reason), None)``. Canonical: every field present, defaults filled."""
    if not isinstance(t, dict):
        return ("", "must be a mapping {on: [...], type: webhook, url: ...}"), None
    t = _yaml_on(t)
    for k in t:
        if k not in _NOTIFY_FIELDS:
            hint = difflib.get_close_matches(str(k), _NOTIFY_FIELDS, n=1)
            return (str(k), "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")), None
    on = t.get("on")
    if isinstance(on, str):
        on = [on]
    if not isinstance(on, list) or not on or not all(e in NOTIFY_EVENTS for e in on):
        return ("on", "must list one or more of " + ", ".join(NOTIFY_EVENTS)), None
    kind = t.get("type", "webhook")
    if kind != "webhook":
        return ("type", "must be webhook"), None
    url = t.get("url")
    if not isinstance(url, str) or len(url) > 2048 or not re.fullmatch(r"https?://[^\s/@]+(/\S*)?", url):
        return ("url", "must be an http:// or https:// URL"), None
    headers = t.get("headers") or {}
    if not isinstance(headers, dict) or len(headers) > 32 or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9-]{1,64}", k) and isinstance(v, str)
            and "\n" not in v and "\r" not in v and len(v) <= 4096 for k, v in headers.items()):
        return ("headers", "must map header names to single-line strings"), None
    template = t.get("template")
    if template is not None and (not _is_plain(template) or len(repr(template)) > 16384):
        return ("template", "must be plain data (a mapping, list or string) of at most 16 KiB"), None
    try:
        timeout = parse_duration(t.get("timeout", 10))
    except (ScheduleError, OverflowError, ValueError):
        return ("timeout", "must be a duration"), None
    if not 0.1 <= timeout <= MAX_NOTIFY_TIMEOUT_S:
        return ("timeout", f"must be between 0.1s and {MAX_NOTIFY_TIMEOUT_S:g}s"), None
    retries = t.get("retries", 3)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_NOTIFY_RETRIES:
        return ("retries", f"must be an integer 0-{MAX_NOTIFY_RETRIES}"), None
    return None, {"on": sorted(set(on), key=NOTIFY_EVENTS.index), "type": "webhook", "url": url,
                  "headers": dict(sorted(headers.items())), "template": template,
                  "timeout": timeout, "retries": retries}


def after_cycle(afters: dict[str, str]) -> list[str] | None:
    """A cycle in ``task -> upstream`` links, as the path ``[a, b, ..., a]``,
    or None."""
    done: set[str] = set()
    for start in sorted(afters):
        path: list[str] = []
        seen: dict[str, int] = {}
        cur: str | None = start
        while cur is not None and cur not in done:
            if cur in seen:
                return path[seen[cur]:] + [cur]
            seen[cur] = len(path)
            path.append(cur)
            cur = afters.get(cur)
        done.update(path)
    return None


# ---------------------------------------------------------------- secrets

#: Largest secret file read into a run's environment.
MAX_SECRET_BYTES = 65536


class SecretError(ValueError):
    """A secret reference could not be resolved (names the variable)."""


def secret_label(value: Any) -> Any:
    """How the API shows an env value: secret references as
    ``<secret:file:/path>`` / ``<secret:env:NAME>``, plain strings as they are."""
    if isinstance(value, dict) and len(value) == 1:
        (kind, ref), = value.items()
        return f"<secret:{kind}:{ref}>"
    return value


def shown_env(env: dict) -> dict:
    return {k: secret_label(v) for k, v in env.items()}


def resolve_env(env: dict, environ: Any, read_file: Any) -> dict[str, str]:
    """A task's env with its secret references resolved on this node:
    ``{env: NAME}`` from ``environ``, ``{file: /path}`` through
    ``read_file(path) -> bytes`` (one trailing newline dropped, UTF-8).

    Raises:
        SecretError: naming the variable and the reason.
    """
    out = {}
    for k, v in env.items():
        if isinstance(v, str):
            out[k] = v
            continue
        if "env" in v:
            val = environ.get(v["env"])
            if val is None:
                raise SecretError(f"secret env.{k}: the node's environment has no {v['env']}")
            out[k] = val
            continue
        path = v["file"]
        try:
            data = read_file(path)
        except OSError as e:
            raise SecretError(f"secret env.{k}: cannot read {path}: {e.strerror or e}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretError(f"secret env.{k}: {path} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"secret env.{k}: {path} is not UTF-8 text") from None
        if "\x00" in text:
            raise SecretError(f"secret env.{k}: {path} contains a NUL byte")
        out[k] = text[:-1] if text.endswith("\n") else text
    return out


# ---------------------------------------------------------------- manual runs


def bind_run(task: Task, env: Any, args: Any) -> dict:
    """Check a manual run's parameters against the task: ``{"env": {...},
    "args": [...]}`` as the run will use them (defaults filled in).

    With a ``params`` schema, ``env`` may set only declared names and must
    set every required one; without one, any environment name is accepted.
    ``args`` are appended to an ``exec`` command's argv, to a ``python``
    command's args, or passed to a ``shell`` command as ``$1 ...``; an
    ``http`` command takes none.

    Raises:
        TaskError: naming the parameter and the reason.
    """
    errors: list[str] = []
    where = f"run of {task.id!r}"
    env = {} if env is None else env
    args = [] if args is None else args
    if not isinstance(env, dict):
        raise TaskError([f"{where}: env must be a mapping of strings"])
    if not isinstance(args, list):
        raise TaskError([f"{where}: args must be a list of strings"])
    out_env: dict[str, str] = {}
    if len(env) > MAX_PARAMS:
        errors.append(f"{where}: at most {MAX_PARAMS} env entries")
    for k in sorted(env, key=str):
        v = env[k]
        if not isinstance(k, str) or not _ENV_RE.match(k):
            errors.append(f"{where}: env {str(k)[:60]!r}: not an environment variable name")
        elif task.params and k not in task.params:
            known = ", ".join(sorted(task.params))
            errors.append(f"{where}: env {k}: not a parameter of this task (its params: {known})")
        elif not isinstance(v, str) or "\x00" in v or len(v) > MAX_PARAM_LEN:
            errors.append(f"{where}: env {k}: must be a string of at most {MAX_PARAM_LEN} characters")
        else:
            out_env[k] = v
    for name, spec in sorted(task.params.items()):
        if name in out_env:
            continue
        if spec.get("required"):
            errors.append(f"{where}: env {name}: required parameter not given"
                          + (f" ({spec['description']})" if spec.get("description") else ""))
        elif spec.get("default") is not None:
            out_env[name] = spec["default"]
    if len(args) > MAX_RUN_ARGS:
        errors.append(f"{where}: at most {MAX_RUN_ARGS} args")
    elif not all(isinstance(a, str) and "\x00" not in a and len(a) <= MAX_PARAM_LEN for a in args):
        errors.append(f"{where}: args must be strings of at most {MAX_PARAM_LEN} characters")
    elif args and isinstance(task.command, HttpCommand):
        errors.append(f"{where}: args: an http command takes no arguments")
    if errors:
        raise TaskError(errors)
    return {"env": out_env, "args": list(args)}
