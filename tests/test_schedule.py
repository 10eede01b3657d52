"""Slot computation: durations, cron validation, @every, once, jitter, croniter parity."""
from datetime import datetime, timezone

import pytest
from croniter import croniter
from hypothesis import given, strategies as st

from node.schedule.parse import (
    ScheduleError,
    format_duration,
    parse_duration,
    resolve_now,
    validate_cron,
    validate_schedule,
)
from node.schedule.slots import compile_schedule, jitter_fraction

UTC = timezone.utc


def Z(text: str) -> int:
    return int(datetime.fromisoformat(text + "+00:00").timestamp())


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("2d", 172800),
    ("1h 30m", 5400), ("1.5h", 5400), (90, 90), (0.25, 0.25), ("45", 45), ("0s", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5x", "m5", "1h1h", "-5s", -1, True, None, [], "1h-", "nan", float("inf")])
def test_parse_duration_rejects(bad):
    with pytest.raises(ScheduleError):
        parse_duration(bad)


def test_format_duration():
    assert format_duration(5400) == "1h30m"
    assert format_duration(0.5) == "500ms"
    assert format_duration(0) == "0s"


@pytest.mark.parametrize("expr,reason", [
    ("61 * * * *", "minute must be 0-59"),
    ("* 24 * * *", "hour must be 0-23"),
    ("* * 0 * *", "day of month must be 1-31"),
    ("* * 32 * *", "day of month must be 1-31"),
    ("* * * 13 *", "month must be 1-12"),
    ("* * * * 8", "day of week must be 0-7"),
    ("* * * * * 60", "second must be 0-59"),
    ("0-70 * * * *", "minute must be 0-59"),
    ("*/0 * * * *", "minute step must be a positive integer"),
    ("*/x * * * *", "minute step must be a positive integer"),
    ("* * * *", "expected 5 or 6 fields"),
    ("* * * * * * *", "expected 5 or 6 fields"),
    ("1,,2 * * * *", "minute: empty list item"),
    ("@reboot", "unknown alias"),
    ("0 0 30 2 *", "never fires"),
    ("foo * * * *", "invalid cron expression"),
])
def test_validate_cron_reasons(expr, reason):
    with pytest.raises(ScheduleError) as info:
        validate_cron(expr)
    assert reason in str(info.value)


@pytest.mark.parametrize("expr", [
    "* * * * *", "0 0 * * mon-fri", "0 0 1 jan *", "0 0 L * *", "0 0 * * 5#3", "0 0 * * 7",
    "*/15 9-17 * * 1-5", "0 0 ? * *", "* * * * * */10", "@hourly", "@daily", "@MIDNIGHT",
])
def test_validate_cron_accepts(expr):
    validate_cron(expr)


@pytest.mark.parametrize("spec,canonical", [
    ("  */5   *  * * * ", "*/5 * * * *"),
    ("@Hourly", "@hourly"),
    ("@every 30s", "@every 30s"),
    ("@every 1h30m", "@every 1h30m"),
    ("now", "now"),
    ("once:2026-12-01T10:00:00Z", "once:2026-12-01T10:00:00Z"),
    ("once: 2026-12-01T11:00:00+01:00", "once:2026-12-01T10:00:00Z"),
    ({"once": "2026-12-01T10:00:00Z"}, "once:2026-12-01T10:00:00Z"),
    ({"once": datetime(2026, 12, 1, 10, tzinfo=UTC)}, "once:2026-12-01T10:00:00Z"),
])
def test_validate_schedule_canonical(spec, canonical):
    assert validate_schedule(spec) == canonical


def test_once_naive_time_uses_task_zone():
    from zoneinfo import ZoneInfo

    assert validate_schedule({"once": "2026-12-01T11:00:00"}, ZoneInfo("Europe/Berlin")) == \
        "once:2026-12-01T10:00:00Z"


@pytest.mark.parametrize("spec,reason", [
    ("@every 0s", "at least 1s"), ("@every 1500ms", "whole number"), ("@every", "needs a duration"),
    ("@every soon", "not a duration"), ("once:tomorrow", "ISO 8601"), ({"at": "x"}, "{once: <time>}"),
    (5, "must be a string"), ("", "empty"),
])
def test_validate_schedule_rejects(spec, reason):
    with pytest.raises(ScheduleError) as info:
        validate_schedule(spec)
    assert reason in str(info.value)


def test_every_is_epoch_aligned():
    s = compile_schedule("@every 1h30m")
    assert s.next_after(0) == 5400
    assert s.next_after(5399) == 5400 and s.next_after(5400) == 10800
    assert list(s.slots_between(5400, 16200)) == [10800, 16200]  # start exclusive, end inclusive
    s7 = compile_schedule("@every 7s", "Europe/Berlin")
    assert all(x % 7 == 0 for x in s7.slots_between(Z("2026-03-29T00:59"), Z("2026-03-29T01:01")))


def test_once_and_resolve_now():
    s = compile_schedule("once:2026-12-01T10:00:00Z")
    t = Z("2026-12-01T10:00")
    assert s.next_after(t - 1) == t and s.next_after(t) is None
    assert list(s.slots_between(0, 2**40)) == [t]
    assert resolve_now("now", t + 0.7) == "once:2026-12-01T10:00:00Z"
    assert resolve_now("@hourly", t) == "@hourly"
    with pytest.raises(ScheduleError):
        compile_schedule("now")


def test_six_fields_seconds_at_the_end():
    s = compile_schedule("*/10 * * * * 30")
    t = Z("2026-01-01T00:00")
    assert list(s.slots_between(t, t + 1200)) == [t + 30, t + 600 + 30]


def test_jitter_deterministic_and_capped():
    a = compile_schedule("@every 60s", jitter_s=30, task_id="backup")
    b = compile_schedule("@every 60s", jitter_s=30, task_id="backup")
    assert a.fire_time(600) == b.fire_time(600)
    assert 600 <= a.fire_time(600) < 630
    assert a.fire_time(600) - 600 == pytest.approx(30 * jitter_fraction("backup"))
    # Jitter larger than the period never moves the fire past the next slot.
    big = compile_schedule("@every 10s", jitter_s=3600, task_id="x")
    for slot in range(0, 100, 10):
        assert slot <= big.fire_time(slot) < slot + 10
    assert compile_schedule("@every 10s", task_id="x").fire_time(10) == 10.0
    fr = {jitter_fraction(f"t{i}") for i in range(200)}
    assert len(fr) == 200 and all(0 <= f < 1 for f in fr)


# A strategy of valid 5-field cron expressions.
def _field(lo, hi):
    num = st.integers(lo, hi).map(str)
    # no one-value ranges ('5-5'): croniter reads them as '*', peerd as crontab(5)
    # does (the one value; tests/test_cron_days.py checks it)
    rng = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).filter(lambda p: p[0] != p[1]).map(
        lambda p: f"{min(p)}-{max(p)}")
    step = st.tuples(st.sampled_from(["*", None]), st.integers(1, max(1, (hi - lo) // 2))).map(
        lambda p: f"{p[0] or lo}/{p[1]}" if p[0] is None else f"*/{p[1]}")
    item = st.one_of(num, rng, step)
    return st.one_of(st.just("*"), item, st.lists(num, min_size=1, max_size=3, unique=True).map(",".join))


CRON = st.tuples(_field(0, 59), _field(0, 23), st.one_of(st.just("*"), _field(1, 28)),
                 st.one_of(st.just("*"), _field(1, 12)), st.one_of(st.just("*"), _field(0, 6))
                 ).map(" ".join)


@given(expr=CRON, start=st.integers(Z("2020-01-01T00:00"), Z("2030-01-01T00:00")),
       n=st.integers(1, 30))
def test_cron_utc_matches_croniter(expr, start, n):
    sched = compile_schedule(expr, "UTC")
    # implement_cron_bug: croniter's name for Vixie cron's day-field rule, which
    # peerd follows (for these plain fields it is exactly crontab(5)'s rule)
    it = croniter(expr, datetime.fromtimestamp(start, UTC), implement_cron_bug=True)
    expected = [int(it.get_next(float)) for _ in range(n)]
    got = []
    t = start
    for _ in range(n):
        t = sched.next_after(t)
        got.append(t)
    assert got == expected


@given(expr=CRON, start=st.integers(Z("2026-01-01T00:00"), Z("2027-01-01T00:00")),
       tz=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]))
def test_cron_zone_slots_increase_and_next_after_consistent(expr, start, tz):
    sched = compile_schedule(expr, tz)
    seq = []
    t = start
    for _ in range(10):
        t = sched.next_after(t)
        if t is None:
            break
        seq.append(t)
    assert seq == sorted(set(seq))
    # Fresh look-ups from arbitrary points agree with the sequential ones.
    for i, s in enumerate(seq[:5]):
        if i + 1 >= len(seq):
            break
        mid = (s + seq[i + 1]) // 2
        if mid > s:
            assert compile_schedule(expr, tz).next_after(mid) == seq[i + 1]
