"""Schedule strings: parsing and validating what a task's schedule says (pure, no I/O).

The forms a task file may give, their canonical strings, durations, time
zone names and one-shot times; the cron field grammar and how the day
fields combine, with the naive wall times a cron expression names (the
validation needs them to refuse an expression that never fires; slot
computation in node/schedule/slots.py steps them and maps them to instants).

Schedule forms
--------------
Validated by :func:`validate_schedule`:

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

How croniter reads the same fields differently, and the notes that say so:
node/schedule/slots.py (:func:`~node.schedule.slots.reading_notes`).
"""

from __future__ import annotations

import functools
import heapq
import re
from datetime import date, datetime, timezone
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = [
    "AFTER",
    "ALIASES",
    "ScheduleError",
    "day_fields_combine",
    "format_duration",
    "load_zone",
    "parse_duration",
    "parse_once",
    "resolve_now",
    "validate_cron",
    "validate_schedule",
]


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


class ScheduleError(ValueError):
    """A schedule, duration or zone is invalid; the message is the reason."""


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
