"""Cron day fields as crontab(5) reads them, peerd's extensions, and the notes
on expressions croniter reads differently.

crontab(5) (Vixie cron, Debian): "If both fields are restricted (i.e., do not
start with *), the command will be run when either field matches the current
time"; if one starts with ``*``, a day must match both. The month field
always applies. peerd's extensions (``L``, ``nW``, ``dow#n``, ``Ldow``) are
members of their field's set of days and follow the same rule.

The table below was written from those rules with a calendar of June-August
2026 (June 1 is a Monday, July 1 a Wednesday, August 1 a Saturday). The
properties compare peerd with an evaluator written here from the same rules,
and with cronsim (an independent implementation of Debian cron's reading)
where it is installed.
"""
import calendar
import random
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from node.cli import peerctl
from node.schedule.parse import ScheduleError, day_fields_combine, validate_cron
from node.schedule.slots import compile_schedule, reading_notes, upgrade_differences
from node.tasks.model import Task, TaskError

UTC = timezone.utc


def Z(s):
    return int(datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp())


JUN1 = Z("2026-06-01T00:00")
SEP1 = Z("2026-09-01T00:00")


def fire_days(expr, start=JUN1 - 1, end=SEP1 - 1):
    """peerd's slots in (start, end] as 'MM-DD' (one slot per day here)."""
    sched = compile_schedule(expr, "UTC")
    out = []
    t = sched.next_after(start)
    while t is not None and t <= end:
        out.append(datetime.fromtimestamp(t, UTC).strftime("%m-%d"))
        t = sched.next_after(t)
    return out


def days(month, *ds):
    return [f"{month:02d}-{d:02d}" for d in ds]


MONDAYS = days(6, 1, 8, 15, 22, 29) + days(7, 6, 13, 20, 27) + days(8, 3, 10, 17, 24, 31)

# (expression, how crontab(5) combines its day fields, the days it fires in June-August 2026)
DAY_TABLE = [
    # a field starting with '*' makes both apply
    ("0 0 * * 1", MONDAYS),
    ("0 0 ? * 1", MONDAYS),
    ("0 0 */2 * 1", days(6, 1, 15, 29) + days(7, 13, 27) + days(8, 3, 17, 31)),
    ("0 0 */10 * 1-5", days(6, 1, 11) + days(7, 1, 21, 31) + days(8, 11, 21, 31)),
    ("0 0 1 * */3", days(7, 1) + days(8, 1)),
    ("0 0 */15 * sun", days(8, 16)),
    ("0 0 * 7 1", days(7, 6, 13, 20, 27)),
    # both restricted: either fires
    ("0 0 1,15 * 5", days(6, 1, 5, 12, 15, 19, 26) + days(7, 1, 3, 10, 15, 17, 24, 31)
     + days(8, 1, 7, 14, 15, 21, 28)),
    ("0 0 13 * 5", days(6, 5, 12, 13, 19, 26) + days(7, 3, 10, 13, 17, 24, 31)
     + days(8, 7, 13, 14, 21, 28)),
    ("0 0 1-7 * 1", days(6, 1, 2, 3, 4, 5, 6, 7, 8, 15, 22, 29) + days(7, 1, 2, 3, 4, 5, 6, 7, 13, 20, 27)
     + days(8, 1, 2, 3, 4, 5, 6, 7, 10, 17, 24, 31)),
    ("0 0 1 * 0,7", days(6, 1, 7, 14, 21, 28) + days(7, 1, 5, 12, 19, 26) + days(8, 1, 2, 9, 16, 23, 30)),
    ("0 0 1 7 1", days(7, 1, 6, 13, 20, 27)),  # the month applies to both fields
    # "starts with": a '*' later in a list does not count
    ("0 0 1,*/14 * 1", days(6, 1, 8, 15, 22, 29) + days(7, 1, 6, 13, 15, 20, 27, 29)
     + days(8, 1, 3, 10, 15, 17, 24, 29, 31)),
    # extensions: plain sets of days under the same rule
    ("0 0 L * *", days(6, 30) + days(7, 31) + days(8, 31)),
    ("0 0 L * 1", days(6, 1, 8, 15, 22, 29, 30) + days(7, 6, 13, 20, 27, 31) + days(8, 3, 10, 17, 24, 31)),
    ("0 0 15W * *", days(6, 15) + days(7, 15) + days(8, 14)),  # Aug 15 is a Saturday
    ("0 0 15W * 0", days(6, 7, 14, 15, 21, 28) + days(7, 5, 12, 15, 19, 26) + days(8, 2, 9, 14, 16, 23, 30)),
    ("0 0 * * L5", days(6, 26) + days(7, 31) + days(8, 28)),
    ("0 0 1 * L5", days(6, 1, 26) + days(7, 1, 31) + days(8, 1, 28)),
    ("0 0 * * 5#2", days(6, 12) + days(7, 10) + days(8, 14)),
    ("0 0 1 * 5#2", days(6, 1, 12) + days(7, 1, 10) + days(8, 1, 14)),
    ("0 0 */10 * 5#3", days(8, 21)),  # third Fridays: Jun 19, Jul 17, Aug 21
]


@pytest.mark.parametrize("expr,expected", DAY_TABLE, ids=[e for e, _ in DAY_TABLE])
def test_day_fields_fire_on_the_crontab5_days(expr, expected):
    assert fire_days(expr) == expected


def test_one_value_range_is_that_value():
    # croniter reads '5-5' as the whole range ('*'); crontab(5) as 5
    sched = compile_schedule("30 5-5 * * *", "UTC")
    t1 = sched.next_after(JUN1)
    assert [t1, sched.next_after(t1)] == [Z("2026-06-01T05:30"), Z("2026-06-02T05:30")]
    assert fire_days("0 0 * 7 3-3") == days(7, 1, 8, 15, 22, 29)
    assert fire_days("0 0 5-5/3 6 *") == days(6, 5)


def test_combine_rule_reads_the_first_character():
    assert day_fields_combine("*/2", "1") == "and"
    assert day_fields_combine("1", "*") == "and"
    assert day_fields_combine("?", "1") == "and"
    assert day_fields_combine("1,*/2", "1") == "or"
    assert day_fields_combine("L", "5#2") == "or"


def test_seconds_field_takes_no_part_in_the_day_rule():
    sched = compile_schedule("0 0 */2 * 1 30", "UTC")
    got = []
    t = JUN1
    for _ in range(3):
        t = sched.next_after(t)
        got.append(datetime.fromtimestamp(t, UTC).isoformat())
    # Jun 1 (an odd Monday) at 00:00:30 is after JUN1 (00:00:00)
    assert got == ["2026-06-01T00:00:30+00:00", "2026-06-15T00:00:30+00:00",
                   "2026-06-29T00:00:30+00:00"]


def test_day_rule_in_a_zone_with_dst():
    # New York; 2026-11-01 (Sunday) is the fall-back day and the 1st: under OR
    # the 1st fires, once, at 01:30 EDT (the first occurrence)
    sched = compile_schedule("30 1 1 * 0", "America/New_York")
    t = sched.next_after(Z("2026-10-31T12:00"))
    assert datetime.fromtimestamp(t, UTC).isoformat() == "2026-11-01T05:30:00+00:00"
    assert datetime.fromtimestamp(sched.next_after(t), UTC).isoformat() == "2026-11-08T06:30:00+00:00"


def test_or_expression_croniter_refused_now_fires():
    assert validate_cron("0 0 1 * 5#2") == ["0", "0", "1", "*", "5#2"]


def test_and_expression_that_never_fires_is_refused_naming_both_fields():
    with pytest.raises(ScheduleError) as e:
        validate_cron("0 0 */31 * 5#2")
    assert "'*/31'" in str(e.value) and "'5#2'" in str(e.value) and "never fires" in str(e.value)
    with pytest.raises(ScheduleError, match="never fires"):
        validate_cron("0 0 30 2 *")


# ------------------------------------------------------------ independent evaluator

_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


def _expand(field, lo, hi):
    """Numbers named by a plain field (numbers, names, ranges, steps, lists)."""
    out = set()
    for item in field.split(","):
        base, _, step = item.partition("/")
        step = int(step) if step else 1
        if base in ("*", "?"):
            a, b = lo, hi
        elif "-" in base:
            a, b = (int(_NAMES.get(x, x)) for x in base.split("-"))
        else:
            a = b = int(_NAMES.get(base, base))
        out.update(range(a, b + 1, step))
    return out


def _dom_matches(field, d):
    last = calendar.monthrange(d.year, d.month)[1]
    if field == "L":
        return d.day == last
    if field.endswith("W"):
        n = int(field[:-1])
        wd = date(d.year, d.month, n).weekday()  # Monday = 0
        if wd == 5:
            n = n - 1 if n > 1 else n + 2
        elif wd == 6:
            n = n + 1 if n < last else n - 2
        return d.day == n
    return d.day in _expand(field, 1, 31)


def _dow_matches(field, d):
    cron_dow = (d.weekday() + 1) % 7  # Sunday = 0
    if "#" in field:
        wd, n = field.split("#")
        return cron_dow == int(wd) % 7 and (d.day - 1) // 7 + 1 == int(n)
    if field.startswith("L") and len(field) > 1:
        last = calendar.monthrange(d.year, d.month)[1]
        return cron_dow == int(field[1:]) % 7 and d.day + 7 > last
    return cron_dow in {x % 7 for x in _expand(field, 0, 7)}


def day_matches(fields, d):
    """crontab(5): month always; day fields ANDed if either starts with '*', else ORed."""
    dom, mon, dow = fields[2], fields[3], fields[4]
    if d.month not in _expand(mon, 1, 12):
        return False
    a, b = _dom_matches(dom, d), _dow_matches(dow, d)
    if dom.startswith("*") or dow.startswith("*") or "?" in (dom, dow):
        return a and b
    return a or b


def reference_slots(expr, after, n, horizon_days=3 * 366 + 2):
    """The first n slots after ``after`` (UTC), day by day, then the time fields."""
    fields = expr.split()
    times = sorted((h, m, s) for h in _expand(fields[1], 0, 23) for m in _expand(fields[0], 0, 59)
                   for s in (_expand(fields[5], 0, 59) if len(fields) == 6 else [0]))
    out = []
    d0 = datetime.fromtimestamp(after, UTC).date()
    for i in range(horizon_days):
        d = d0 + timedelta(days=i)
        if not day_matches(fields, d):
            continue
        for h, m, s in times:
            t = calendar.timegm((d.year, d.month, d.day, h, m, s))
            if t > after:
                out.append(t)
                if len(out) == n:
                    return out
    return out


def _plain(lo, hi):
    num = st.integers(lo, hi).map(str)
    rng = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(lambda p: f"{min(p)}-{max(p)}")
    step = st.integers(2, max(2, (hi - lo) // 2)).map(lambda k: f"*/{k}")
    rstep = st.tuples(st.integers(lo, hi), st.integers(lo, hi), st.integers(2, 9)).map(
        lambda p: f"{min(p[:2])}-{max(p[:2])}/{p[2]}")
    lst = st.lists(st.one_of(num, rng), min_size=2, max_size=3).map(",".join)
    return st.one_of(st.just("*"), num, rng, step, rstep, lst)


DOM = st.one_of(_plain(1, 31), st.just("?"), st.just("L"), st.integers(1, 28).map(lambda n: f"{n}W"))
DOW = st.one_of(_plain(0, 7), st.just("?"), st.sampled_from(list(_NAMES)),
                st.tuples(st.integers(0, 6), st.integers(1, 5)).map(lambda p: f"{p[0]}#{p[1]}"),
                st.integers(0, 6).map(lambda d: f"L{d}"))
CRON = st.tuples(st.sampled_from(["0", "15", "*/20", "5,50"]), st.sampled_from(["0", "3", "*/8", "9-10"]),
                 DOM, st.one_of(st.just("*"), _plain(1, 12)), DOW,
                 st.sampled_from([None, "0", "30"])).map(
    lambda f: " ".join(x for x in f if x is not None)).filter(
    lambda e: not ("?" in e.split()[2] and "?" in e.split()[4]))


def _peerd_slots(expr, after, n):
    try:
        sched = compile_schedule(expr, "UTC")
    except ScheduleError as exc:
        return str(exc)
    out, t = [], after
    while len(out) < n:
        t = sched.next_after(t)
        if t is None or t > after + 3 * 366 * 86400:
            break
        out.append(t)
    return out


@given(expr=CRON, after=st.integers(Z("2020-01-01T00:00"), Z("2032-01-01T00:00")), n=st.integers(1, 12))
def test_slots_match_an_evaluator_written_from_crontab5(expr, after, n):
    got = _peerd_slots(expr, after, n)
    expected = reference_slots(expr, after, n)
    if isinstance(got, str):  # refused as never firing: nothing within the horizon either
        assert "never fires" in got and expected == []
    else:
        assert got == expected[:len(got)] and (len(got) == n or len(got) == len(expected))


def _to_cronsim(expr):
    f = expr.split()
    if len(f) == 6 or "W" in f[2] or "?" in f:
        return None  # cronsim: no seconds field at the end, no W, no '?'
    if f[4].startswith("L"):
        f[4] = f[4][1:] + "L"  # cronsim writes the last Friday as 5L
    return " ".join(f)


@given(expr=CRON.map(_to_cronsim).filter(lambda e: e is not None),
       after=st.integers(Z("2020-01-01T00:00"), Z("2032-01-01T00:00")))
def test_slots_match_cronsim(expr, after):
    cronsim = pytest.importorskip("cronsim", reason="cronsim not installed (pip install cronsim)")
    ours = expr.split()
    if ours[4].endswith("L") and len(ours[4]) > 1:
        ours[4] = "L" + ours[4][:-1]
    got = _peerd_slots(" ".join(ours), after, 8)
    if isinstance(got, str):
        return  # peerd refuses it; cronsim would search forever
    it = cronsim.CronSim(expr, datetime.fromtimestamp(after, UTC).replace(tzinfo=None))
    expected = [calendar.timegm(next(it).timetuple()) for _ in range(len(got))]
    assert got == expected


def test_seeded_sample_of_mondays_and_odd_days():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    after = Z("2024-01-01T00:00") + rng.randrange(0, 4 * 365) * 86400
    for t in _peerd_slots("0 12 */2 * mon", after, 20):
        d = datetime.fromtimestamp(t, UTC)
        assert d.weekday() == 0 and d.day % 2 == 1 and d.hour == 12


# ------------------------------------------------------------ readings and notes


def task(spec, **kw):
    d = {"id": "t", "schedule": spec, "command": {"type": "shell", "run": "true"}}
    d.update(kw)
    return Task.from_dict(d)


def test_note_names_the_first_date_the_readings_part():
    notes = reading_notes(task("0 0 */2 * 1"), JUN1)
    assert len(notes) == 1
    # Jun 1 is an odd Monday (both fire); Jun 3 is odd, not a Monday: croniter only
    assert "2026-06-03" in notes[0] and "croniter" in notes[0] and "both" in notes[0]
    assert "cron_reading_ack" in notes[0]


def test_note_when_croniter_reads_it_as_never_firing():
    (note,) = reading_notes(task("0 0 1 * 5#2"), JUN1)
    assert "never fires" in note and "2026-06-01" in note


def test_note_when_croniter_intersects_a_w_field():
    (note,) = reading_notes(task("0 0 15W * 0"), JUN1)
    assert "2026-06-07" in note  # first Sunday: peerd fires, croniter's reading does not


def test_note_is_deterministic_without_now():
    assert reading_notes(task("0 0 */2 * 1")) == reading_notes(task("0 0 */2 * 1"))
    assert reading_notes(task("0 0 */2 * 1"))


@pytest.mark.parametrize("spec", ["0 0 * * 1", "*/5 * * * *", "0 0 1,15 * 1", "0 0 L * 5",
                                  "0 0 1-31 * 0-6", "@every 5s", "@daily", "once:2026-12-01T10:00:00Z"])
def test_no_note_where_the_readings_agree(spec):
    assert reading_notes(task(spec), JUN1) == []
    assert upgrade_differences(task(spec), JUN1) is None


def test_ack_silences_the_note_but_not_the_upgrade_difference():
    t = task("0 0 */2 * 1", cron_reading_ack=True)
    assert t.cron_reading_ack is True
    assert reading_notes(t, JUN1) == []
    diff = upgrade_differences(t, JUN1)
    assert diff is not None and "no longer fires on 2026-06-03" in diff


def test_upgrade_difference_for_an_expression_that_was_refused():
    diff = upgrade_differences(task("0 0 1 * 5#2"), JUN1)
    assert "never firing" in diff and "2026-06-01" in diff


def test_ack_field_round_trips_and_is_validated():
    t = task("0 0 */2 * 1", cron_reading_ack=True)
    assert Task.from_dict(t.to_dict()) == t
    assert task("0 0 * * *").to_dict()["cron_reading_ack"] is False
    with pytest.raises(TaskError) as e:
        task("0 0 */2 * 1", cron_reading_ack="yes")
    assert "cron_reading_ack" in str(e.value) and "true or false" in str(e.value)


# ------------------------------------------------------------ peerctl


class _FakeClient:
    def __init__(self, *a, **kw):
        pass

    def call(self, method, path, body=None):
        if method == "PUT":
            return {"applied": ["t"], "warnings": [{"task_id": "t", "message": "read differently"}]}
        return {"task_id": "t", "schedule": "0 0 */2 * 1", "timezone": "UTC", "why": ["owned by a"],
                "notes": ["first parts on 2026-06-03"], "next": []}


def test_peerctl_prints_warnings_to_stderr_and_explain_notes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(peerctl, "Client", _FakeClient)
    f = tmp_path / "t.yaml"
    f.write_text("- {id: t, schedule: '0 0 */2 * 1', command: {type: shell, run: 'true'}}\n")
    assert peerctl.main(["tasks", "apply", "-f", str(f)]) == 0
    out, err = capsys.readouterr()
    assert "applied 1 task(s)" in out and "read differently" not in out
    assert "warning: task 't': read differently" in err
    assert peerctl.main(["tasks", "explain", "t"]) == 0
    out, _ = capsys.readouterr()
    assert "note: first parts on 2026-06-03" in out
    assert peerctl.main(["--json", "tasks", "apply", "-f", str(f)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and '"warnings"' in out
