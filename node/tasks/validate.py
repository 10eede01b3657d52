"""Task validation (core): one task mapping into a :class:`~node.tasks.model.Task`, every problem named.

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

The checks of the ``command`` field are in node/tasks/commands.py
(:class:`~node.tasks.commands.CommandChecks`); a whole task file (a list of
mappings, or its text) is node/tasks/parse.py.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from datetime import datetime, timezone
from typing import Any

from node.run.retry import MAX_RETRIES, RetryPolicy
from node.schedule.parse import (
    AFTER,
    ScheduleError,
    load_zone,
    parse_duration,
    parse_once,
    validate_schedule,
)
from node.schedule.slots import DstPolicy
from node.tasks.commands import CommandChecks
from node.tasks.model import (
    _ENV_RE,
    CHAIN_ON,
    DEFAULT_OUTPUT_FILE_BYTES,
    MAX_CATCHUP_WINDOW_S,
    MAX_ENV,
    MAX_EVERY_S,
    MAX_HISTORY,
    MAX_INSTANT,
    MAX_JITTER_S,
    MAX_NAME_LEN,
    MAX_NOTIFY,
    MAX_OUTPUT_FILE_BYTES,
    MAX_PARAM_LEN,
    MAX_PARAMS,
    MAX_SCHEDULE_LEN,
    MAX_SHARDS,
    MAX_TAGS,
    MAX_TIMEOUT_S,
    MIN_INSTANT,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    OWNER_LOSS_POLICIES,
    Task,
    _yaml_on,
    check_notify_target,
    valid_id,
)

_UTC_ZONE = timezone.utc


def _iso(instant: int) -> str:
    return datetime.fromtimestamp(instant, timezone.utc).isoformat().replace("+00:00", "Z")



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


class _Validator(CommandChecks):
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
