"""Slot computation: which UTC instants a task's schedule names (pure, no I/O).

A **slot** is ``(task_id, instant)`` where the instant is an ``int`` of epoch
seconds in UTC. Every replica computes the same slots from the same task, so a
slot's identity is comparable across the cluster (sub-second slots are not
supported).

The schedule forms (cron, aliases, ``@every``, ``once:``, ``now``) and how a
cron expression's day fields combine are read in node/schedule/parse.py;
this module turns a valid schedule into its instants.

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

Readings of the day fields
--------------------------
peerd combines the day fields as Vixie cron does (node/schedule/parse.py,
:func:`~node.schedule.parse.day_fields_combine`). croniter, which peerd used
to follow, reads them differently: it ORs them whenever neither is exactly
``*`` (so ``0 0 */2 * 1`` is every odd day or any Monday), and ANDs them when
either uses ``#``, ``W`` or ``L`` weekdays. :func:`reading_notes` says when a task's expression is read
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator
from zoneinfo import ZoneInfo

from croniter import croniter

from node.schedule.parse import (
    AFTER,
    ScheduleError,
    _croniter_walls,
    _hour_is_fixed,
    _iso_utc,
    _walls,
    day_fields_combine,
    load_zone,
    parse_duration,
    parse_once,
    validate_cron,
)

__all__ = [
    "MAX_DST_SHIFT_S",
    "DstPolicy",
    "Schedule",
    "compile_schedule",
    "explain",
    "jitter_fraction",
    "reading_notes",
    "upgrade_differences",
]

#: Largest DST offset change handled exactly (seconds).
MAX_DST_SHIFT_S = 3 * 3600

_EPOCH_NAIVE = datetime(1970, 1, 1)
# Walls past this year are not searched (croniter would search ~50 years).
_MAX_YEAR = 2200


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
