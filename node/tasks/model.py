"""Task model and task-file validation (pure, no I/O except reading a file).

A :class:`Task` is a frozen, validated value. It has one canonical dict form
(:meth:`Task.to_dict`, msgpack- and JSON-able) that is also the file format:
the keys of a task in a YAML/JSON/TOML file are the keys of ``to_dict``.
:meth:`Task.from_dict` validates everything, because a dict may come from the
network.

Rules
-----
1. Errors name the source, the task and the field with the reason::

       tasks.yaml: task 'backup': schedule '61 * * * *': minute must be 0-59

   All errors of a file are collected (:class:`TaskError` ``.errors``); a file
   with any error yields no tasks.
2. Unknown fields are errors (with a "did you mean" hint): a typo must not
   silently drop a setting.
3. Duplicate ids in one file are errors.
4. Durations accept ``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"2d"`` or
   numbers of seconds; they are stored as float seconds (``*_s`` attributes)
   and written back as numbers.

Schedules (see :mod:`node.schedule.slots`): a cron string (5 or 6 fields, the 6th
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
import math
import os
import re
import reprlib
import tomllib
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Union

from node.tasks.decoding import DecodeError, check_tree, format_path, loads_json, loads_yaml
from node.run.retry import MAX_RETRIES, RetryPolicy
from node.schedule.slots import (
    AFTER,
    DstPolicy,
    ScheduleError,
    load_zone,
    parse_duration,
    parse_once,
    resolve_now,
    validate_schedule,
)

__all__ = [
    "COMMAND_TYPES",
    "SecretError",
    "resolve_env",
    "secret_label",
    "shown_env",
    "CHAIN_ON",
    "NOTIFY_EVENTS",
    "after_cycle",
    "check_notify_target",
    "bind_run",
    "command_with_args",
    "ExecCommand",
    "HttpCommand",
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "OWNER_LOSS_POLICIES",
    "PythonCommand",
    "RetryPolicy",
    "ShellCommand",
    "Task",
    "TaskError",
    "decode_error_message",
    "load_task_file",
    "parse_tasks",
    "valid_id",
]

#: Task ids: 1-128 of these characters, not only dots (``.`` and ``..`` would
#: read as path segments in ``/v1/tasks/{id}``). Use :func:`valid_id`
#: (``fullmatch``: ``$`` alone would also match before a trailing newline).
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
OVERLAP_POLICIES = ("allow", "forbid", "replace", "buffer_one", "buffer_all")
MISFIRE_POLICIES = ("skip", "run_once", "run_all")
OWNER_LOSS_POLICIES = ("rerun", "skip")
COMMAND_TYPES = ("shell", "exec", "python", "http")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_TARGET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
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
#: Task files larger than this are refused before they are parsed.
MAX_TASK_FILE_BYTES = 64 << 20
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
#: python command args/kwargs integers: the msgpack range replication carries.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_UTC_ZONE = timezone.utc


def _iso(instant: int) -> str:
    return datetime.fromtimestamp(instant, timezone.utc).isoformat().replace("+00:00", "Z")


def valid_id(value: Any) -> bool:
    """True for a task id: 1-128 of ``A-Z a-z 0-9 . _ -``, not only dots."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None and value.strip(".") != ""


class TaskError(ValueError):
    """One or more validation errors; ``errors`` lists every message."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


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
        v = _Validator(source, index)
        task = v.task(d)
        if v.errors:
            raise TaskError(v.errors)
        assert task is not None
        return task


# ---------------------------------------------------------------- validation


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40


def _fmt_value(value: Any) -> str:
    # reprlib bounds the work: a huge or deeply shared value (YAML aliases)
    # is shown by its head, never walked whole.
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


class _Validator:
    def __init__(self, source: str | None, index: int | None) -> None:
        self.source = source
        self.index = index
        self.tid: str | None = None
        self.errors: list[str] = []

    def _prefix(self) -> str:
        who = f"task {self.tid!r}" if self.tid else (
            f"task #{self.index + 1}" if self.index is not None else "task")
        return f"{self.source}: {who}" if self.source else who

    def err(self, fld: str, reason: str, value: Any = None, show: bool = True) -> None:
        head = f"{fld} {_fmt_value(value)}" if show and value is not None else fld
        self.errors.append(f"{self._prefix()}: {head}: {reason}")

    def _unknown(self, d: dict, allowed: tuple[str, ...], where: str) -> None:
        for k in sorted((k for k in d if k not in allowed), key=str):
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.err(f"{where}{k}" if isinstance(k, str) else f"{where}{k!r}",
                     f"unknown field{tip}", show=False)

    def _choice(self, d: dict, key: str, choices: tuple[str, ...], default: str) -> str:
        value = d.get(key, default)
        if value not in choices:
            self.err(key, "must be one of " + ", ".join(choices), value)
            return default
        return value

    def _duration(self, d: dict, key: str, default: float, *, low: float, high: float,
                  name: str | None = None) -> float:
        name = name or key
        if key not in d or d[key] is None:
            return default
        value = d[key]
        try:
            secs = parse_duration(value)
        except ScheduleError as exc:
            self.err(name, str(exc), value)
            return default
        except (OverflowError, ValueError):  # an integer too large for a float
            self.err(name, f"must be between {low:g}s and {high:g}s", value)
            return default
        if not low <= secs <= high:
            self.err(name, f"must be between {low:g}s and {high:g}s", value)
            return default
        return secs

    def _int(self, d: dict, key: str, default: int, low: int, high: int, name: str | None = None) -> int:
        name = name or key
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(name, "must be an integer", value)
            return default
        if not low <= value <= high:
            self.err(name, f"must be between {low} and {high}", value)
            return default
        return value

    def _str_map(self, d: dict, key: str, max_items: int, key_re: re.Pattern | None = None) -> dict:
        value = d.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(key, "must be a mapping of strings", value)
            return {}
        if len(value) > max_items:
            self.err(key, f"at most {max_items} entries")
            return {}
        out = {}
        for k in sorted(value, key=str):
            x = value[k]
            if not isinstance(k, str) or not k or (key_re is not None and not key_re.match(k)):
                self.err(f"{key}.{k}", "invalid key", show=False)
                continue
            if not isinstance(x, str):
                self.err(f"{key}.{k}", "must be a string (quote it in YAML)", x)
                continue
            if "\x00" in x:
                self.err(f"{key}.{k}", "must not contain NUL", show=False)
                continue
            out[k] = x
        return out

    def task(self, d: Any) -> Task | None:
        if not isinstance(d, dict):
            self.errors.append(f"{self._prefix()}: not a mapping")
            return None
        # id first, so later messages name the task.
        tid = d.get("id")
        if tid is None:
            self.err("id", "required", show=False)
        elif not valid_id(tid):
            self.err("id", "must be 1-128 characters of A-Z a-z 0-9 . _ - (not only dots)", tid)
        else:
            self.tid = tid
        self._unknown(d, Task.FIELDS, "")

        name = d.get("name", tid if isinstance(tid, str) else "")
        if not isinstance(name, str) or len(name) > MAX_NAME_LEN:
            self.err("name", f"must be a string of at most {MAX_NAME_LEN} characters", name)
            name = ""

        tz_name = d.get("timezone", "UTC")
        zone = None
        try:
            zone = load_zone(tz_name)
        except ScheduleError as exc:
            self.err("timezone", str(exc), tz_name)
            tz_name = "UTC"

        dst = None
        if d.get("dst") is not None:
            raw = d["dst"]
            if not isinstance(raw, dict):
                self.err("dst", "must be a mapping {gap: shift|skip, overlap: once|twice}", raw)
            else:
                self._unknown(raw, ("gap", "overlap"), "dst.")
                gap = raw.get("gap", "shift")
                ovl = raw.get("overlap", "once")
                ok = True
                if gap not in ("shift", "skip"):
                    self.err("dst.gap", "must be one of shift, skip", gap)
                    ok = False
                if ovl not in ("once", "twice"):
                    self.err("dst.overlap", "must be one of once, twice", ovl)
                    ok = False
                if ok:
                    dst = DstPolicy(gap, ovl)

        after = self.after(d.get("after"))
        schedule = "now"
        if "schedule" not in d or d["schedule"] is None:
            if after is not None or "after" in d:
                schedule = AFTER
            else:
                self.err("schedule", "required (or an after: {task: ID} field)", show=False)
        else:
            raw = d["schedule"]
            schedule = self.schedule(raw, zone) or schedule
            if schedule == AFTER and after is None and "after" not in d:
                self.err("schedule", "'after' needs an after: {task: ID, on: success|failure|always} field",
                         show=False)

        jitter_s = self._duration(d, "jitter", 0.0, low=0.0, high=MAX_JITTER_S)
        command = self.command(d.get("command"))
        timeout_s = self._duration(d, "timeout", 3600.0, low=0.001, high=MAX_TIMEOUT_S)
        retries = self.retries(d.get("retries"))
        overlap = self._choice(d, "overlap", OVERLAP_POLICIES, "forbid")
        misfire = self._choice(d, "misfire", MISFIRE_POLICIES, "run_once")
        window_s = self._duration(d, "catchup_window", 3600.0, low=0.0, high=MAX_CATCHUP_WINDOW_S)
        owner_loss = self._choice(d, "on_owner_loss", OWNER_LOSS_POLICIES, "rerun")
        tags = self._str_map(d, "tags", MAX_TAGS)
        env = self._env(d)
        cwd = d.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd or "\x00" in cwd):
            self.err("cwd", "must be a non-empty path string", cwd)
            cwd = None
        paused = d.get("paused", False)
        if not isinstance(paused, bool):
            self.err("paused", "must be true or false", paused)
            paused = False
        history = self._int(d, "history", 100, 1, MAX_HISTORY)
        ack = d.get("cron_reading_ack", False)
        if not isinstance(ack, bool):
            self.err("cron_reading_ack", "must be true or false", ack)
            ack = False

        params = self.params(d.get("params"))
        notify = self.notify(d.get("notify"))
        output = self.output(d.get("output"))
        target = self.target(d.get("target"))

        if self.errors or command is None:
            return None
        return Task(
            id=tid, name=name or tid, schedule=schedule, timezone=tz_name, dst=dst,
            jitter_s=jitter_s, command=command, timeout_s=timeout_s, retries=retries,
            overlap=overlap, misfire=misfire, catchup_window_s=window_s,
            on_owner_loss=owner_loss, tags=tags, env=env, cwd=cwd, paused=paused,
            history=history, cron_reading_ack=ack, params=params, after=after, notify=notify,
            output=output, target=target,
        )

    def target(self, raw: Any) -> dict | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = {"mode": raw}
        if not isinstance(raw, dict):
            self.err("target", "must be a mapping {mode: one|all|count, count: N}", raw)
            return None
        self._unknown(raw, ("mode", "count"), "target.")
        mode = raw.get("mode", "one")
        if mode not in ("one", "all", "count"):
            self.err("target.mode", "must be one of one, all, count", mode)
            return None
        if mode == "count":
            n = raw.get("count")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
                self.err("target.count", f"must be an integer 1-{MAX_SHARDS} with mode count", n)
                return None
            return {"mode": "count", "count": n}
        if "count" in raw:
            self.err("target.count", "only with mode count", raw["count"])
            return None
        return None if mode == "one" else {"mode": "all"}

    def output(self, raw: Any) -> dict | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            self.err("output", "must be a mapping {keep: tail|file, max_bytes: N}", raw)
            return None
        self._unknown(raw, ("keep", "max_bytes"), "output.")
        keep = raw.get("keep", "tail")
        if keep not in ("tail", "file"):
            self.err("output.keep", "must be one of tail, file", keep)
            return None
        mb = raw.get("max_bytes", DEFAULT_OUTPUT_FILE_BYTES)
        if isinstance(mb, bool) or not isinstance(mb, int) or not 1024 <= mb <= MAX_OUTPUT_FILE_BYTES:
            self.err("output.max_bytes", f"must be an integer between 1024 and {MAX_OUTPUT_FILE_BYTES}", mb)
            return None
        if keep == "tail" and "max_bytes" not in raw:
            return None                      # the default, written as nothing
        return {"keep": keep, "max_bytes": mb}

    def after(self, raw: Any) -> dict | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = {"task": raw}
        if not isinstance(raw, dict):
            self.err("after", "must be a mapping {task: ID, on: success|failure|always}", raw)
            return None
        raw = _yaml_on(raw)
        self._unknown(raw, ("task", "on"), "after.")
        up = raw.get("task")
        if not valid_id(up):
            self.err("after.task", "must be a task id", up)
            return None
        if up == self.tid:
            self.err("after.task", "a task cannot run after itself", up)
            return None
        on = raw.get("on", "success")
        if on not in CHAIN_ON:
            self.err("after.on", "must be one of " + ", ".join(CHAIN_ON), on)
            return None
        return {"task": up, "on": on}

    def notify(self, raw: Any) -> tuple:
        if raw is None:
            return ()
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list):
            self.err("notify", "must be a list of targets {on: [...], type: webhook, url: ...}", raw)
            return ()
        if len(raw) > MAX_NOTIFY:
            self.err("notify", f"at most {MAX_NOTIFY} targets")
            return ()
        out = []
        for i, t in enumerate(raw):
            where = f"notify[{i}]"
            err, target = check_notify_target(t)
            if err:
                fld, reason = err
                self.err(f"{where}.{fld}" if fld else where, reason, show=False)
                continue
            out.append(target)
        return tuple(out)

    def _env(self, d: dict) -> dict:
        """``env``: NAME -> a string, or a secret reference ``{file: /path}``
        / ``{env: NAME}`` resolved on the running node (see :func:`resolve_env`)."""
        raw = d.get("env")
        if not isinstance(raw, dict):
            return self._str_map(d, "env", MAX_ENV, _ENV_RE)
        plain = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        out = self._str_map({"env": plain}, "env", MAX_ENV, _ENV_RE) if plain else {}
        for k in sorted((k for k, v in raw.items() if isinstance(v, dict)), key=str):
            v = raw[k]
            where = f"env.{k}"
            if not isinstance(k, str) or not _ENV_RE.match(k):
                self.err(where, "invalid key", show=False)
                continue
            if list(v) == ["file"] and isinstance(v["file"], str) and v["file"].startswith("/") \
                    and "\x00" not in v["file"] and len(v["file"]) <= 4096:
                out[k] = {"file": v["file"]}
            elif list(v) == ["env"] and isinstance(v["env"], str) and _ENV_RE.match(v["env"]):
                out[k] = {"env": v["env"]}
            else:
                self.err(where, "a secret reference is {file: /absolute/path} or {env: NAME}", show=False)
        if len(raw) > MAX_ENV:
            self.err("env", f"at most {MAX_ENV} entries")
            return {}
        return dict(sorted(out.items()))

    def params(self, raw: Any) -> dict:
        """``params: {NAME: {required, default, description}}`` (a list of
        names is short for optional parameters without default)."""
        if raw is None:
            return {}
        if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
            raw = {n: {} for n in raw}
        elif isinstance(raw, list) and all(isinstance(n, dict) and isinstance(n.get("name"), str) for n in raw):
            # the list form: [{name, required, default, description}]
            raw = {n["name"]: {k: v for k, v in n.items() if k != "name"} for n in raw}
        if not isinstance(raw, dict):
            self.err("params", "must be a mapping NAME: {required, default, description}", raw)
            return {}
        if len(raw) > MAX_PARAMS:
            self.err("params", f"at most {MAX_PARAMS} parameters")
            return {}
        out: dict = {}
        for name in sorted(raw, key=str):
            spec = raw[name]
            where = f"params.{name}"
            if not isinstance(name, str) or not _ENV_RE.match(name):
                self.err(where, "a parameter name is an environment variable name "
                                "([A-Za-z_][A-Za-z0-9_]*)", show=False)
                continue
            if spec is None:
                spec = {}
            if not isinstance(spec, dict):
                self.err(where, "must be a mapping {required, default, description}", spec)
                continue
            self._unknown(spec, ("required", "default", "description"), where + ".")
            req = spec.get("required", False)
            default = spec.get("default")
            desc = spec.get("description", "")
            if not isinstance(req, bool):
                self.err(where + ".required", "must be true or false", req)
                continue
            if default is not None and (not isinstance(default, str) or "\x00" in default
                                        or len(default) > MAX_PARAM_LEN):
                self.err(where + ".default", f"must be a string of at most {MAX_PARAM_LEN} characters "
                                             "(quote it in YAML)", default)
                continue
            if not isinstance(desc, str) or len(desc) > MAX_NAME_LEN:
                self.err(where + ".description", f"must be a string of at most {MAX_NAME_LEN} characters",
                         desc)
                continue
            if req and default is not None:
                self.err(where, "a required parameter has no default", show=False)
                continue
            entry: dict = {"required": req}
            if default is not None:
                entry["default"] = default
            if desc:
                entry["description"] = desc
            out[name] = entry
        return out

    def schedule(self, raw: Any, zone: Any) -> str | None:
        """Validate and canonicalise a schedule; None (and an error) if bad."""
        if isinstance(raw, str) and len(raw) > MAX_SCHEDULE_LEN:
            self.err("schedule", f"longer than {MAX_SCHEDULE_LEN} characters", raw)
            return None
        span = f"{_iso(MIN_INSTANT)} to {_iso(MAX_INSTANT)}"
        try:
            spec = validate_schedule(raw, zone)
        except ScheduleError as exc:
            self.err("schedule", str(exc), raw)
            return None
        except (OverflowError, ValueError, OSError):
            # the platform's time functions cannot represent the instant or period
            self.err("schedule", f"outside what peerd can represent (one-shot instants {span}, "
                                 f"@every up to {MAX_EVERY_S // 86400}d)", raw)
            return None
        if spec.startswith("@every"):
            period = parse_duration(spec[len("@every"):].strip())
            if period > MAX_EVERY_S:
                self.err("schedule", f"@every period longer than {MAX_EVERY_S // 86400}d "
                                     f"(use a cron schedule for calendar dates)", raw)
                return None
        elif spec.startswith("once:"):
            try:
                instant = parse_once(spec[5:], _UTC_ZONE)
                ok = MIN_INSTANT <= instant <= MAX_INSTANT
                if ok and zone is not None:
                    datetime.fromtimestamp(instant, zone)  # must exist in the task's zone too
            except (ScheduleError, OverflowError, ValueError, OSError):
                ok = False
            if not ok:
                self.err("schedule", f"once: instant outside {span} "
                                     f"or not representable in the task's timezone", raw)
                return None
        return spec

    def retries(self, raw: Any) -> RetryPolicy:
        if raw is None:
            return RetryPolicy()
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = {"max": raw}
        if not isinstance(raw, dict):
            self.err("retries", "must be a mapping {max, backoff, max_backoff, multiplier}", raw)
            return RetryPolicy()
        self._unknown(raw, ("max", "backoff", "max_backoff", "multiplier"), "retries.")
        mx = self._int(raw, "max", 0, 0, MAX_RETRIES, name="retries.max")
        backoff = self._duration(raw, "backoff", 1.0, low=0.0, high=86400.0, name="retries.backoff")
        max_backoff = self._duration(raw, "max_backoff", 60.0, low=0.0, high=86400.0,
                                     name="retries.max_backoff")
        mult = raw.get("multiplier", 2.0)
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not 1.0 <= mult <= 10.0:
            self.err("retries.multiplier", "must be a number between 1 and 10", mult)
            mult = 2.0
        if max_backoff < backoff:
            self.err("retries.max_backoff", "must be at least retries.backoff", raw.get("max_backoff"))
        return RetryPolicy(mx, backoff, max_backoff, float(mult))

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


# ---------------------------------------------------------------- files


def parse_tasks(data: Any, source: str) -> list[Task]:
    """Validate already-decoded task-file data.

    Args:
        data: a list of task mappings, or ``{"tasks": [...]}``.
        source: name used in error messages (usually the file name).

    Returns:
        The tasks, in file order.

    Raises:
        TaskError: every error in the file; no tasks are returned then.
    """
    if isinstance(data, dict):
        extra = sorted(str(k) for k in data if k != "tasks")
        if extra or "tasks" not in data:
            raise TaskError([f"{source}: expected a list of tasks or a mapping with only 'tasks'"
                             + (f" (unknown keys: {', '.join(extra)})" if extra else "")])
        data = data["tasks"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise TaskError([f"{source}: expected a list of tasks or a mapping with 'tasks'"])
    if len(data) > MAX_TASKS_PER_FILE:
        raise TaskError([f"{source}: more than {MAX_TASKS_PER_FILE} tasks"])
    errors: list[str] = []
    tasks: list[Task] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(data):
        try:
            task = Task.from_dict(item, source=source, index=i)
        except TaskError as exc:
            errors.extend(exc.errors)
            task = None
        tid = item.get("id") if isinstance(item, dict) else None
        if isinstance(tid, str):
            if tid in first_index:
                errors.append(f"{source}: task {tid!r}: id: duplicate (also task #{first_index[tid] + 1})")
            else:
                first_index[tid] = i
        if task is not None:
            tasks.append(task)
    if errors:
        raise TaskError(errors)
    return tasks


def decode_error_message(data: Any, exc: DecodeError, source: str) -> str:
    """Name the file, the task and the field of a decoding error.

    Args:
        data: the decoded document (None if it could not be decoded at all).
        exc: the error, whose ``path`` starts at the document's root.
        source: the file name (or ``request``).
    """
    path = exc.path
    items = data
    if isinstance(data, dict) and path[:1] == ("tasks",):
        items, path = data.get("tasks"), path[1:]
    if isinstance(items, list) and path and isinstance(path[0], int) and path[0] < len(items):
        item = items[path[0]]
        tid = item.get("id") if isinstance(item, dict) else None
        named = valid_id(tid) and path[1:2] != ("id",)  # a doubled id names the task by position
        who = f"task {tid!r}" if named else f"task #{path[0] + 1}"
        field = format_path(path[1:])
        return f"{source}: {who}: {field + ': ' if field else ''}{exc.reason}"
    where = format_path(exc.path)
    return f"{source}: {where + ': ' if where else ''}{exc.reason}"


def load_task_file(path: str | os.PathLike) -> list[Task]:
    """Load and validate a YAML (.yaml/.yml), JSON (.json) or TOML (.toml) file.

    TOML files hold a top-level array of tables ``[[tasks]]``; YAML and JSON
    hold a list or ``{tasks: [...]}``.

    Raises:
        TaskError: unreadable, undecodable or invalid; messages start with the
            file name.
    """
    p = Path(path)
    source = str(path)
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".toml"):
        raise TaskError([f"{source}: unknown file type (use .yaml, .yml, .json or .toml)"])
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_TASK_FILE_BYTES + 1)
        if len(raw) > MAX_TASK_FILE_BYTES:
            raise TaskError([f"{source}: larger than {MAX_TASK_FILE_BYTES >> 20} MiB"])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError([f"{source}: cannot read: {exc}"]) from None
    kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
    data = None
    try:
        if suffix == ".json":
            data = loads_json(text, check=False)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = loads_yaml(text, check=False)
        check_tree(data)
    except DecodeError as exc:
        raise TaskError([decode_error_message(data, exc, source)]) from None
    except Exception as exc:  # tomllib's errors, or its recursion on deep nesting
        msg = " ".join(str(exc).split())
        raise TaskError([f"{source}: not valid {kind}: {msg}"]) from None
    return parse_tasks(data, source)


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
