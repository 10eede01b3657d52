"""Slot computation: which UTC instants a task's schedule names (pure, no I/O).

A **slot** is ``(task_id, instant)`` where the instant is an ``int`` of epoch
seconds in UTC. Every replica computes the same slots from the same task, so a
slot's identity is comparable across the cluster (sub-second slots are not
supported).

Schedule forms (validated by :func:`validate_schedule`):

- **cron**, 5 fields ``minute hour day-of-month month day-of-week`` or 6 fields
  with croniter's convention: the 6th field is **seconds, at the end**
  (``*/10 * * * * 30`` = every 10 minutes at second 30). Parsed and stepped by
  croniter with an explicit base time, never the wall clock.
- **aliases** ``@yearly @annually @monthly @weekly @daily @midnight @hourly``
  (expanded to their 5-field equivalents; ``@reboot`` is rejected).
- **@every <duration>** (``@every 30s``, ``@every 1h30m``): slots are the
  multiples of the period since the epoch (``k * period``), so they do not
  depend on when a node started. Whole seconds, at least 1 s. Time zones and
  DST do not apply.
- **once:<ISO 8601>** (canonical form ``once:2026-12-01T10:00:00Z``): one slot.
  ``now`` is not a slot: the daemon turns it into ``once:<apply time>`` with
  :func:`resolve_now` when the task is applied, so every replica sees the same
  instant.

Cron in a time zone, daylight-saving rules
------------------------------------------
Cron fields name *wall-clock* times. We step croniter over naive wall times
(no zone, so croniter applies no DST logic of its own), then map each wall
time to UTC instants with ``zoneinfo``:

- a wall time that exists once maps to its instant;
- a wall time in a **gap** (spring forward, e.g. 02:30 on 2026-03-29 in
  Europe/Berlin) does not exist: policy ``gap: shift`` runs it at the
  transition instant (the first instant after the gap, 03:00 CEST), ``gap:
  skip`` drops it;
- a wall time in an **overlap** (fall back, e.g. 02:30 on 2026-10-25 in
  Berlin) exists twice: ``overlap: once`` runs the first occurrence (CEST),
  ``overlap: twice`` runs both.

Several wall times mapping to one instant (all of a gap under ``shift``) give
one slot: slots are unique, strictly increasing instants.

Default (``dst`` not set) is peerd's **fixed-hour rule**, decided by the hour
field alone: a task whose hour field has no ``*``, ``?`` or ``/`` (a number,
list or range, e.g. ``30 2 * * *``, ``* 2 * * *``, ``0 0-23 * * *``) is
*fixed-time*: it runs once per wall-clock time and a missing time runs at the
transition (``shift`` + ``once``); any other task (hour ``*``, ``*/2``,
``1-23/2``, ``5,*/6``) is *wildcard*: it keeps its real-time cadence, neither
doubling up nor bunching, i.e. gap times are skipped and repeated times run
twice (``skip`` + ``twice``). For a zone whose shift is a whole hour,
``*/30 * * * *`` therefore fires every 30 real minutes straight through both
transitions. This is close to, but not, Vixie cron's rule: Vixie cron calls a
job wildcard when its minute *or* hour field starts with ``*`` (so ``* 2 * *
*`` is wildcard there and fixed-time here, and ``0 1-23/2 * * *`` is
fixed-time there and wildcard here). croniter alone applies "shift + twice"
to every task.

Cron day fields
---------------
Day-of-month and day-of-week combine as in Vixie cron (``crontab(5)``, what
Debian runs) and cronsim: if either field **starts with** ``*`` (``*``,
``*/2``; ``?`` counts as ``*``), a day must match **both** fields; otherwise a
day matching **either** field fires. ``0 0 1,15 * 1`` fires on the 1st, the
15th and every Monday; ``0 0 */2 * 1`` fires on Mondays that are odd days of
the month. The month field always applies. peerd's extensions are members of
their field's set of days and follow the same rule: ``L`` (day-of-month: the
last day), ``nW`` (day-of-month: the weekday nearest day n, within the
month), ``dow#n`` (the n-th such weekday of the month) and ``Ldow`` (the last
such weekday, e.g. ``L5``). So ``0 0 1 * 5#2`` fires on the 1st and on the
second Friday, and ``0 0 */10 * 5#3`` on a third Friday that falls on the
1st, 11th, 21st or 31st. The 6th (seconds) field does not take part.

croniter, which peerd used to follow, reads the day fields differently: it
ORs them whenever neither is exactly ``*`` (so ``0 0 */2 * 1`` is every odd
day or any Monday), and ANDs them when either uses ``#``, ``W`` or ``L``
weekdays. :func:`reading_notes` says when a task's expression is read
differently (naming the first date where the readings part);
:func:`upgrade_differences` says whether a task's next slots changed.

Offset changes up to :data:`MAX_DST_SHIFT_S` (3 h) are handled exactly; all
current IANA zones shift by 1 h or less (Antarctica/Troll by 2 h).

Jitter
------
``fire_time(slot) = slot + j`` with ``j = jitter_s * u`` where ``u`` in
``[0, 1)`` comes from ``sha256(task_id)``, so every replica agrees. ``j`` is
capped at 90 % of the gap to the next slot, so a fire never moves past the
next slot and fires stay in slot order.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = [
    "ALIASES",
    "MAX_DST_SHIFT_S",
    "DstPolicy",
    "Schedule",
    "ScheduleError",
    "compile_schedule",
    "day_fields_combine",
    "explain",
    "format_duration",
    "jitter_fraction",
    "load_zone",
    "parse_duration",
    "parse_once",
    "reading_notes",
    "resolve_now",
    "upgrade_differences",
    "validate_cron",
    "validate_schedule",
]

#: Largest DST offset change handled exactly (seconds).
MAX_DST_SHIFT_S = 3 * 3600

#: Cron aliases (as in Vixie cron / croniter), expanded to 5 fields.
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_UTC = timezone.utc
_EPOCH_NAIVE = datetime(1970, 1, 1)
# Walls past this year are not searched (croniter would search ~50 years).
_MAX_YEAR = 2200


class ScheduleError(ValueError):
    """A schedule, duration or zone is invalid; the message is the reason."""


@dataclass(frozen=True, slots=True)
class DstPolicy:
    """What a cron task does around DST transitions.

    Attributes:
        gap: ``shift`` (a missing wall time runs at the transition) or
            ``skip`` (it does not run).
        overlap: ``once`` (a repeated wall time runs at its first occurrence)
            or ``twice`` (at both).
    """

    gap: str = "shift"
    overlap: str = "once"

    def __post_init__(self) -> None:
        if self.gap not in ("shift", "skip"):
            raise ScheduleError(f"gap must be shift or skip, not {self.gap!r}")
        if self.overlap not in ("once", "twice"):
            raise ScheduleError(f"overlap must be once or twice, not {self.overlap!r}")

    def to_dict(self) -> dict:
        return {"gap": self.gap, "overlap": self.overlap}


# ---------------------------------------------------------------- durations

_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DUR_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"2d"`` or a number.

    Returns:
        Seconds as a float (>= 0).

    Raises:
        ScheduleError: not a duration, negative, or a unit given twice.
    """
    if isinstance(value, bool):
        raise ScheduleError("not a duration (use 30s, 5m, 1h30m, 500ms or seconds)")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ScheduleError("must be a finite number of seconds")
        if value < 0:
            raise ScheduleError("must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ScheduleError("not a duration (use 30s, 5m, 1h30m, 500ms or seconds)")
    text = value.strip().replace(" ", "")
    if not text:
        raise ScheduleError("empty duration")
    if text.startswith("-"):
        raise ScheduleError("must not be negative")
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return parse_duration(number)
    pos = 0
    total = 0.0
    seen: set[str] = set()
    for m in _DUR_PART.finditer(text):
        if m.start() != pos:
            break
        unit = m.group(2)
        if unit in seen:
            raise ScheduleError(f"unit {unit!r} given twice")
        seen.add(unit)
        total += float(m.group(1)) * _DUR_UNIT_S[unit]
        pos = m.end()
    if pos != len(text) or not seen:
        raise ScheduleError("not a duration (use 30s, 5m, 1h30m, 500ms or seconds)")
    return total


def format_duration(seconds: float) -> str:
    """Short human form: 5400 -> ``1h30m``, 0.5 -> ``500ms``."""
    if seconds < 1 and seconds != int(seconds):
        return f"{int(round(seconds * 1000))}ms"
    s = int(seconds)
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out) or "0s"


def load_zone(name: object) -> ZoneInfo:
    """Return the IANA zone ``name``.

    Raises:
        ScheduleError: not a string or unknown zone.
    """
    if not isinstance(name, str) or not name:
        raise ScheduleError("must be an IANA zone name such as Europe/Berlin")
    try:
        return _zone_cached(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError("unknown IANA time zone") from None


_ZONES: dict[str, ZoneInfo] = {}


def _zone_cached(name: str) -> ZoneInfo:
    z = _ZONES.get(name)
    if z is None:
        if len(name) > 64 or ".." in name or name.startswith("/"):
            raise ValueError(name)
        z = ZoneInfo(name)
        if len(_ZONES) < 1024:
            _ZONES[name] = z
    return z


# ---------------------------------------------------------------- cron validation

# (name, low, high, symbolic names allowed)
_FIELDS = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
    ("second", 0, 59),
]
_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_DAYS = "sun mon tue wed thu fri sat".split()
_INT = re.compile(r"^\d+$")


def _field_value(token: str, idx: int) -> int | None:
    """Integer value of a plain token, or None if symbolic / special."""
    t = token.lower()
    if _INT.match(t):
        return int(t)
    if idx == 3 and t in _MONTHS:
        return _MONTHS.index(t) + 1
    if idx == 4 and t in _DAYS:
        return _DAYS.index(t)
    return None


def validate_cron(expr: str) -> list[str]:
    """Validate a 5- or 6-field cron expression (aliases allowed).

    Returns:
        The fields (aliases expanded).

    Raises:
        ScheduleError: with a precise reason such as ``minute must be 0-59``.
    """
    return list(_validate_cron_cached(expr))


@functools.lru_cache(maxsize=4096)
def _validate_cron_cached(expr: str) -> tuple[str, ...]:
    return tuple(_validate_cron(expr))


def _validate_cron(expr: str) -> list[str]:
    """Validate a 5- or 6-field cron expression (aliases allowed).

    Returns:
        The fields (aliases expanded).

    Raises:
        ScheduleError: with a precise reason such as ``minute must be 0-59``.
    """
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise ScheduleError(
                "unknown alias (use @yearly, @annually, @monthly, @weekly, "
                "@daily, @midnight, @hourly or @every <duration>)"
            )
        text = ALIASES[text.lower()]
    fields = text.split(" ")
    if len(fields) not in (5, 6):
        raise ScheduleError(
            f"expected 5 or 6 fields (minute hour day-of-month month day-of-week "
            f"[second]), got {len(fields)}"
        )
    for idx, field in enumerate(fields):
        name, low, high = _FIELDS[idx]
        items = []
        for item in field.split(","):
            if item == "":
                raise ScheduleError(f"{name}: empty list item")
            base, slash, step = item.partition("/")
            if slash:
                if not _INT.match(step) or int(step) == 0:
                    raise ScheduleError(f"{name} step must be a positive integer")
            lo_s, dash, hi_s = base.partition("-")
            for part in (lo_s, hi_s) if dash else (lo_s,):
                v = _field_value(part, idx)
                if v is not None and not low <= v <= high:
                    raise ScheduleError(f"{name} must be {low}-{high}")
            if dash and lo_s.lower() == hi_s.lower():
                # a one-value range ('5-5', '5-5/2'): croniter reads it as the
                # whole range ('*'), crontab(5) as the one value
                item = lo_s
            items.append(item)
        fields[idx] = ",".join(items)
    text = " ".join(fields)
    try:
        it = croniter(text, datetime(2000, 1, 1), implement_cron_bug=True)
    except Exception as exc:  # croniter raises several types; reason is its text
        raise ScheduleError(f"invalid cron expression: {exc}") from None
    if day_fields_combine(fields[2], fields[4]) == "and":
        try:  # the iterator built above steps exactly as _walls would
            fires = it.get_next(datetime) is not None
        except Exception:  # CroniterBadDateError
            fires = False
    else:
        fires = next(_walls(tuple(fields), datetime(2000, 1, 1)), None) is not None
    if not fires:
        dom, dow = fields[2], fields[4]
        if day_fields_combine(dom, dow) == "and" and not (_is_star(dom) or _is_star(dow)):
            raise ScheduleError(
                f"never fires (no date matches both day-of-month {dom!r} and day-of-week "
                f"{dow!r}: a day field starting with '*' makes a day match both)"
            )
        raise ScheduleError("never fires (no matching date)")
    return fields


def _hour_is_fixed(fields: list[str]) -> bool:
    """peerd's fixed-hour rule: an hour field without ``*``, ``?`` or ``/`` is fixed-time."""
    hour = fields[1]
    return not (hour.startswith("*") or "?" in hour or "/" in hour)


# ---------------------------------------------------------------- day fields


def _is_star(field: str) -> bool:
    """The field is exactly ``*`` or ``?`` (every day)."""
    return field in ("*", "?")


def day_fields_combine(dom: str, dow: str) -> str:
    """How a cron expression's day fields combine, as in Vixie cron.

    Args:
        dom: the day-of-month field as written.
        dow: the day-of-week field as written.

    Returns:
        ``"and"`` when either field starts with ``*`` (or is ``?``): a day
        must match both; ``"or"`` otherwise: a day matching either fires.
    """
    if dom.startswith("*") or dow.startswith("*") or dom == "?" or dow == "?":
        return "and"
    return "or"


def _croniter_walls(expr: str, start: datetime, cron_bug: bool) -> Iterator[datetime]:
    """croniter's walls strictly after ``start``; ends where croniter finds none."""
    try:
        it = croniter(expr, start, implement_cron_bug=cron_bug)
    except Exception:
        return
    get_next = it.get_next
    while True:
        try:
            yield get_next(datetime)
        except Exception:  # CroniterBadDateError: no further match
            return


def _walls(fields: tuple[str, ...], start: datetime) -> Iterator[datetime]:
    """Naive wall times matching ``fields`` strictly after ``start``, increasing.

    Day fields combine by :func:`day_fields_combine`. An ``and`` expression is
    stepped by one croniter with ``implement_cron_bug`` (croniter's name for
    Vixie's rule; it intersects ``#``, ``W`` and ``L`` too). An ``or``
    expression is the union of two croniter streams, one with day-of-week
    ``*`` and one with day-of-month ``*``, so each extension reads as a plain
    set of days (croniter itself would intersect ``#``/``W`` with the other
    field).
    """
    if day_fields_combine(fields[2], fields[4]) == "and":
        yield from _croniter_walls(" ".join(fields), start, True)
        return
    by_dom = list(fields)
    by_dom[4] = "*"
    by_dow = list(fields)
    by_dow[2] = "*"
    last = None
    for wall in heapq.merge(_croniter_walls(" ".join(by_dom), start, True),
                            _croniter_walls(" ".join(by_dow), start, True)):
        if wall != last:
            last = wall
            yield wall


# ---------------------------------------------------------------- once / now

_NOW_FORMS = ("now",)


def parse_once(value: object, tz: ZoneInfo) -> int:
    """Parse a one-shot time; naive times are read in ``tz``.

    Accepts ISO 8601 strings (``Z`` suffix allowed), ``datetime`` objects
    (YAML and TOML produce them) and epoch numbers.

    Returns:
        Epoch seconds (floored).

    Raises:
        ScheduleError: unparseable.
    """
    if isinstance(value, bool):
        raise ScheduleError("once: not a time")
    if isinstance(value, (int, float)):
        return int(value // 1)
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ScheduleError("once: not an ISO 8601 time (e.g. 2026-12-01T10:00:00Z)") from None
    if not isinstance(value, datetime):
        raise ScheduleError("once: not a time")
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    ts = value.timestamp()
    return int(ts // 1)


def _iso_utc(instant: int) -> str:
    # Not strftime("%Y"): glibc does not zero-pad years below 1000, and
    # fromisoformat refuses "1-01-01"; the canonical form must parse back.
    d = datetime.fromtimestamp(instant, _UTC)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
            f"T{d.hour:02d}:{d.minute:02d}:{d.second:02d}Z")


#: The schedule of a task that fires only after another task's runs
#: (its ``after`` field): it has no slots of its own.
AFTER = "after"


def validate_schedule(spec: object, tz: ZoneInfo | None = None) -> str:
    """Validate a schedule as found in a task file and return its canonical form.

    Args:
        spec: a string (cron, alias, ``@every D``, ``now``, ``once:<ISO>``) or
            a mapping ``{"once": <time>}``.
        tz: zone for naive one-shot times (default UTC).

    Returns:
        Canonical string: whitespace-collapsed cron/alias, ``@every <D>``,
        ``now`` or ``once:<YYYY-MM-DDTHH:MM:SSZ>``.

    Raises:
        ScheduleError: with the reason.
    """
    tz = tz or ZoneInfo("UTC")
    if isinstance(spec, dict):
        if list(spec) != ["once"]:
            raise ScheduleError("a mapping schedule must be {once: <time>}")
        return "once:" + _iso_utc(parse_once(spec["once"], tz))
    if not isinstance(spec, str):
        raise ScheduleError("must be a string (cron, @every, now) or {once: <time>}")
    text = " ".join(spec.split())
    if not text:
        raise ScheduleError("empty schedule")
    low = text.lower()
    if low in _NOW_FORMS:
        return "now"
    if low == AFTER:
        return AFTER
    if low.startswith("once:") or low.startswith("once "):
        return "once:" + _iso_utc(parse_once(text[5:].strip(), tz))
    if low.startswith("@every"):
        rest = text[len("@every"):].strip()
        if not rest:
            raise ScheduleError("@every needs a duration, e.g. @every 30s")
        period = parse_duration(rest)
        if period < 1 or period != int(period):
            raise ScheduleError("@every period must be a whole number of seconds, at least 1s")
        return f"@every {rest}"
    validate_cron(text)
    return low if low.startswith("@") else text


def resolve_now(spec: str, now: float) -> str:
    """Turn ``now`` into ``once:<now>``; other schedules are returned unchanged."""
    if spec == "now":
        return "once:" + _iso_utc(int(now // 1))
    return spec


def jitter_fraction(task_id: str) -> float:
    """Deterministic value in [0, 1) from sha256(task_id)."""
    digest = hashlib.sha256(task_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ---------------------------------------------------------------- rules

_MISSING = object()
_MEMO_MAX = 4096


class _Rule:
    """Slot generator shared by every task with the same (spec, zone, policy)."""

    kind = "?"

    def __init__(self) -> None:
        self._memo: dict[int, int | None] = {}
        self._cont: Iterator[tuple[int, datetime | None, str]] | None = None
        self._cont_pos: int | None = None

    def iter_after(self, t: int) -> Iterator[tuple[int, datetime | None, str]]:
        """Yield ``(instant, wall, note)`` with instant > t, strictly increasing."""
        raise NotImplementedError

    def next_after(self, t: int) -> int | None:
        r = self._memo.get(t, _MISSING)
        if r is not _MISSING:
            return r  # type: ignore[return-value]
        if self._cont is not None and self._cont_pos == t:
            gen = self._cont
        else:
            gen = self.iter_after(t)
        item = next(gen, None)
        r = None if item is None else item[0]
        self._cont, self._cont_pos = (gen, r) if r is not None else (None, None)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[t] = r
        return r


class _EveryRule(_Rule):
    kind = "every"

    def __init__(self, period_s: int) -> None:
        super().__init__()
        self.period_s = period_s

    def next_after(self, t: int) -> int | None:
        return (t // self.period_s + 1) * self.period_s

    def iter_after(self, t: int) -> Iterator[tuple[int, datetime | None, str]]:
        s = self.next_after(t)
        while True:
            yield s, None, ""
            s += self.period_s


class _OnceRule(_Rule):
    kind = "once"

    def __init__(self, instant: int) -> None:
        super().__init__()
        self.instant = instant

    def next_after(self, t: int) -> int | None:
        return self.instant if self.instant > t else None

    def iter_after(self, t: int) -> Iterator[tuple[int, datetime | None, str]]:
        if self.instant > t:
            yield self.instant, None, ""


class _AfterRule(_Rule):
    """No slots: the task fires once per finished run of its upstream."""

    kind = "after"

    def next_after(self, t: int) -> int | None:
        return None

    def iter_after(self, t: int) -> Iterator[tuple[int, datetime | None, str]]:
        return iter(())


class _CronRule(_Rule):
    kind = "cron"

    def __init__(self, expr: str, tz: ZoneInfo, policy: DstPolicy) -> None:
        super().__init__()
        self.expr = expr
        self.fields = tuple(expr.split(" "))
        self.tz = tz
        self.policy = policy
        self._utc = tz.key == "UTC" if hasattr(tz, "key") else False
        self._gap_cache: dict[int, int] = {}

    def _offset_s(self, instant: int) -> int:
        off = datetime.fromtimestamp(instant, self.tz).utcoffset()
        return int(off.total_seconds()) if off is not None else 0

    def _local_wall(self, instant: int) -> datetime:
        return (_EPOCH_NAIVE + timedelta(seconds=instant + self._offset_s(instant)))

    def _transition_after(self, lo: int, hi: int) -> int:
        """First instant in (lo, hi] whose offset differs from lo's."""
        key = lo
        hit = self._gap_cache.get(key)
        if hit is not None:
            return hit
        off_lo = self._offset_s(lo)
        a, b = lo, hi
        while b - a > 1:
            mid = (a + b) // 2
            if self._offset_s(mid) == off_lo:
                a = mid
            else:
                b = mid
        if len(self._gap_cache) > 256:
            self._gap_cache.clear()
        self._gap_cache[key] = b
        return b

    def _map_wall(self, wall: datetime) -> tuple[int, list[tuple[int, str]]]:
        """Map a naive wall time to (lower bound instant, [(instant, note)])."""
        if self._utc:
            u = int((wall - _EPOCH_NAIVE).total_seconds())
            return u, [(u, "")]
        a = int(wall.replace(tzinfo=self.tz, fold=0).timestamp())
        b = int(wall.replace(tzinfo=self.tz, fold=1).timestamp())
        if a == b:
            return a, [(a, "")]
        hhmm = wall.strftime("%Y-%m-%d %H:%M:%S")
        if a < b:  # overlap: fold=0 is the first occurrence
            if self.policy.overlap == "twice":
                return a, [
                    (a, f"{hhmm} occurs twice (DST overlap): first occurrence"),
                    (b, f"{hhmm} occurs twice (DST overlap): second occurrence"),
                ]
            return a, [(a, f"{hhmm} occurs twice (DST overlap): runs once, first occurrence")]
        # gap: b (post-transition offset) < transition <= a
        t = self._transition_after(b, a)
        if self.policy.gap == "shift":
            return t, [(t, f"{hhmm} does not exist (DST gap): shifted to the transition")]
        return t, []

    def iter_after(self, t: int) -> Iterator[tuple[int, datetime | None, str]]:
        if self._utc or (
            self._offset_s(t) == self._offset_s(t + MAX_DST_SHIFT_S)
            and self._offset_s(t) == self._offset_s(t - MAX_DST_SHIFT_S)
        ):
            start = self._local_wall(t)
        else:
            start = self._local_wall(t) - timedelta(seconds=MAX_DST_SHIFT_S)
        pending: list[tuple[int, datetime, str]] = []
        last = t
        for wall in _walls(self.fields, start):
            if wall.year > _MAX_YEAR:
                break
            bound, items = self._map_wall(wall)
            for inst, note in items:
                if inst > last:
                    heapq.heappush(pending, (inst, wall, note))
            while pending and pending[0][0] < bound:
                inst, w, note = heapq.heappop(pending)
                if inst > last:
                    last = inst
                    yield inst, w, note
        while pending:
            inst, w, note = heapq.heappop(pending)
            if inst > last:
                last = inst
                yield inst, w, note


_RULES: dict[tuple, _Rule] = {}


def _rule_for(spec: str, tz: ZoneInfo, dst: DstPolicy | None) -> _Rule:
    key = (spec, getattr(tz, "key", str(tz)), dst)
    rule = _RULES.get(key)
    if rule is not None:
        return rule
    if spec == "now":
        raise ScheduleError("'now' must be resolved to once:<time> first (resolve_now)")
    if spec == AFTER:
        rule = _AfterRule()
    elif spec.startswith("once:"):
        rule = _OnceRule(parse_once(spec[5:], tz))
    elif spec.startswith("@every"):
        period = parse_duration(spec[len("@every"):].strip())
        if period < 1 or period != int(period):
            raise ScheduleError("@every period must be a whole number of seconds, at least 1s")
        rule = _EveryRule(int(period))
    else:
        fields = validate_cron(spec)
        if dst is None:
            policy = DstPolicy("shift", "once") if _hour_is_fixed(fields) else DstPolicy("skip", "twice")
        else:
            policy = dst
        rule = _CronRule(" ".join(fields), tz, policy)
    if len(_RULES) >= 65536:
        _RULES.clear()
    _RULES[key] = rule
    return rule


class Schedule:
    """The slots of one task: a shared rule plus the task's jitter.

    Compile with :meth:`from_task` or :func:`compile_schedule`.
    """

    __slots__ = ("spec", "tz", "dst", "task_id", "jitter_s", "_rule", "_jitter_offset_s")

    def __init__(self, spec: str, tz: ZoneInfo, dst: DstPolicy | None,
                 jitter_s: float, task_id: str) -> None:
        self.spec = spec
        self.tz = tz
        self.dst = dst
        self.task_id = task_id
        self.jitter_s = float(jitter_s)
        self._rule = _rule_for(spec, tz, dst)
        self._jitter_offset_s = self.jitter_s * jitter_fraction(task_id) if jitter_s else 0.0

    @classmethod
    def from_task(cls, task) -> "Schedule":
        """Compile a :class:`node.tasks.model.Task` (``now`` must be resolved)."""
        return cls(task.schedule, load_zone(task.timezone), task.dst, task.jitter_s, task.id)

    @property
    def kind(self) -> str:
        """``cron``, ``every`` or ``once``."""
        return self._rule.kind

    @property
    def policy(self) -> DstPolicy | None:
        """The DST policy in force (defaults resolved), None for non-cron."""
        return getattr(self._rule, "policy", None)

    def next_after(self, t: int) -> int | None:
        """First slot strictly after ``t`` (epoch seconds), None if none."""
        return self._rule.next_after(int(t // 1))

    def slots_between(self, start: int, end: int) -> Iterator[int]:
        """Slots ``s`` with ``start < s <= end`` (start exclusive, end inclusive)."""
        s = self.next_after(start)
        while s is not None and s <= end:
            yield s
            s = self.next_after(s)

    def fire_time(self, slot: int) -> float:
        """When ``slot`` fires: slot + deterministic jitter, before the next slot."""
        j = self._jitter_offset_s
        if not j:
            return float(slot)
        nxt = self.next_after(slot)
        if nxt is not None:
            j = min(j, (nxt - slot) * 0.9)
        return slot + j

    def describe(self, after: int, n: int) -> list[dict]:
        """The next ``n`` slots after ``after`` with UTC/local times and DST notes."""
        out = []
        for inst, _wall, note in self._rule.iter_after(int(after // 1)):
            if len(out) >= n:
                break
            local = datetime.fromtimestamp(inst, self.tz)
            out.append({
                "slot": inst,
                "utc": _iso_utc(inst),
                "local": local.isoformat(),
                "local_zone": local.tzname(),
                "fire_at": self.fire_time(inst),
                "dst_note": note,
            })
        return out


def compile_schedule(spec: str, tz: str | ZoneInfo = "UTC", dst: DstPolicy | None = None,
                     jitter_s: float = 0.0, task_id: str = "") -> Schedule:
    """Compile a canonical schedule string (see :func:`validate_schedule`).

    Raises:
        ScheduleError: invalid spec or zone, or unresolved ``now``.
    """
    zone = load_zone(tz) if isinstance(tz, str) else tz
    return Schedule(spec, zone, dst, jitter_s, task_id)


def explain(task, now: float, n: int = 5) -> dict:
    """Explain a task's schedule: kind, DST policy and the next ``n`` fires.

    Returns:
        ``{"schedule", "kind", "timezone", "dst", "jitter_s", "next": [...]}``
        where each entry has ``slot``, ``utc``, ``local``, ``local_zone``,
        ``fire_at`` and ``dst_note``.
    """
    sched = Schedule.from_task(task)
    pol = sched.policy
    return {
        "schedule": task.schedule,
        "kind": sched.kind,
        "timezone": task.timezone,
        "dst": pol.to_dict() if pol else None,
        "dst_default": task.dst is None,
        "jitter_s": task.jitter_s,
        "next": sched.describe(int(now // 1), n),
    }


# ---------------------------------------------------------------- readings

#: Where :func:`reading_notes` counts dates from when no ``now`` is given (a
#: fixed date, so every replica writes the same note).
READING_BASE = datetime(2026, 1, 1)
# The readings are compared day by day over at most this many matching days
# and years; two readings that differ at all part within the first months.
_READING_MAX_DAYS = 1500
_READING_MAX_YEARS = 28


def _croniter_combine(dom: str, mon: str, dow: str) -> str:
    """How croniter (default ``day_or=True``) combines the day fields."""
    try:
        expanded, nth = croniter.expand(f"0 0 {dom} {mon} {dow}")
    except Exception:
        return "and"
    if expanded[2] == ["*"] or expanded[4] == ["*"]:
        return "and"
    if nth or "w" in dom.lower():
        return "and"  # croniter intersects '#', 'L' weekdays and 'W' with the other field
    return "or"


@functools.lru_cache(maxsize=1024)
def _reading_difference(dom: str, mon: str, dow: str, base: datetime) -> tuple | None:
    """First day after ``base`` where peerd's and croniter's day readings differ.

    Returns:
        None if they agree, else ``(peerd_rule, croniter_rule, day, who)``:
        ``who`` is ``"peerd"`` or ``"croniter"`` (the reading that fires on
        ``day``) or ``"croniter-never"`` (croniter's reading never fires).
    """
    ours = day_fields_combine(dom, dow)
    theirs = _croniter_combine(dom, mon, dow)
    if ours == theirs:
        return None
    fields = ("0", "0", dom, mon, dow)
    start = base - timedelta(minutes=1)  # base's own day counts
    a_it = _walls(fields, start)
    c_it = _croniter_walls(" ".join(fields), start, False)
    a, c = next(a_it, None), next(c_it, None)
    if c is None:
        return (ours, theirs, a.date() if a else None, "croniter-never")
    for _ in range(_READING_MAX_DAYS):
        if a != c:
            if c is None or (a is not None and a < c):
                return (ours, theirs, a.date(), "peerd")
            return (ours, theirs, c.date(), "croniter")
        if a is None or a.year > base.year + _READING_MAX_YEARS:
            return None
        a, c = next(a_it, None), next(c_it, None)
    return None


def _describe_rule(rule: str) -> str:
    return ("a day must match both day fields" if rule == "and"
            else "a day matching either day field fires")


def _difference_sentence(spec: str, fields: list[str], diff: tuple) -> str:
    ours, theirs, day, who = diff
    dom, dow = fields[2], fields[4]
    if ours == "and":
        star = (f"day-of-month {dom!r}" if dom.startswith("*") or dom == "?"
                else f"day-of-week {dow!r}")
        why = (f"{star} starts with '*', so peerd (like Vixie cron and cronsim) fires only "
               f"on days matching both day-of-month {dom!r} and day-of-week {dow!r}")
    else:
        why = ("neither day field starts with '*', so peerd (like Vixie cron and cronsim) "
               f"fires on days matching day-of-month {dom!r} or day-of-week {dow!r}")
    if theirs == "or":
        other = "croniter ORs the fields whenever neither is exactly '*'"
    else:
        other = "croniter ANDs a '#', 'L' weekday or 'W' field with the other field"
    if who == "croniter-never":
        part = (f"under croniter's reading it never fires, while peerd first fires on "
                f"{day:%Y-%m-%d} ({day:%a})")
    elif who == "peerd":
        part = (f"the readings first part on {day:%Y-%m-%d} ({day:%a}): peerd fires that day, "
                "croniter's reading does not")
    else:
        part = (f"the readings first part on {day:%Y-%m-%d} ({day:%a}): croniter's reading "
                "fires that day, peerd does not")
    return f"Schedule {spec!r}: {why}; {other} ({_describe_rule(theirs)}); {part}."


def _cron_fields(task) -> list[str] | None:
    spec = getattr(task, "schedule", "")
    if not isinstance(spec, str) or spec in ("now", AFTER) or spec.startswith(("once:", "@every")):
        return None
    try:
        return validate_cron(spec)
    except ScheduleError:
        return None


def _base_day(now: float | None) -> datetime:
    if now is None:
        return READING_BASE
    return datetime(1970, 1, 1) + timedelta(days=int(now // 86400))


def reading_notes(task, now: float | None = None) -> list[str]:
    """Notes on a cron task whose day fields cron implementations read differently.

    peerd reads day-of-month/day-of-week as Vixie cron and cronsim do (see
    "Cron day fields" above); croniter reads some expressions differently.
    The readings are compared day by day from ``now`` (UTC date; without it,
    from :data:`READING_BASE`) for up to 28 years.

    Args:
        task: a :class:`node.tasks.model.Task` (or anything with ``schedule`` and
            ``cron_reading_ack``).
        now: epoch seconds the dates are counted from, or None.

    Returns:
        ``[]`` when the readings agree, the schedule is not cron, or the task
        sets ``cron_reading_ack``; otherwise one sentence naming what each
        reading does and the first date where they part.
    """
    if getattr(task, "cron_reading_ack", False):
        return []
    fields = _cron_fields(task)
    if fields is None:
        return []
    diff = _reading_difference(fields[2], fields[3], fields[4], _base_day(now))
    if diff is None:
        return []
    return [_difference_sentence(task.schedule, fields, diff)
            + " Set cron_reading_ack: true on the task to silence this note."]


def upgrade_differences(task, now: float) -> str | None:
    """Whether a cron task fires on other days than earlier peerd releases.

    Earlier releases read the day fields as croniter does; now they combine
    as in Vixie cron. This says, for ``explain``, whether the task's slots
    from ``now`` on changed with that upgrade (``cron_reading_ack`` does not
    hide it).

    Returns:
        None when the slots are the same, else a sentence naming the first
        date that differs.
    """
    fields = _cron_fields(task)
    if fields is None:
        return None
    diff = _reading_difference(fields[2], fields[3], fields[4], _base_day(now))
    if diff is None:
        return None
    ours, theirs, day, who = diff
    head = ("Fires differently than earlier peerd releases, which read the day fields as "
            "croniter does")
    if who == "croniter-never":
        return (f"{head}: they refused {task.schedule!r} as never firing; it now first fires "
                f"on {day:%Y-%m-%d} ({day:%a}).")
    verb = "now fires" if who == "peerd" else "no longer fires"
    before = "a day matching either day field fired" if theirs == "or" else \
        "a day had to match both day fields"
    return (f"{head}: {task.schedule!r} {verb} on {day:%Y-%m-%d} ({day:%a}), the first date "
            f"that differs ({_describe_rule(ours)} now; {before} before).")
