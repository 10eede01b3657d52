"""DST behaviour of cron schedules, pinned for real zones in 2026.

Europe/Berlin: gap 2026-03-29 01:00Z (02:00 CET -> 03:00 CEST),
               overlap 2026-10-25 01:00Z (03:00 CEST -> 02:00 CET).
America/New_York: gap 2026-03-08 07:00Z (02:00 EST -> 03:00 EDT),
                  overlap 2026-11-01 06:00Z (02:00 EDT -> 01:00 EST).
"""
from datetime import datetime, timezone

import pytest

from node.schedule.slots import DstPolicy, compile_schedule

SHIFT_ONCE = DstPolicy("shift", "once")
SKIP_TWICE = DstPolicy("skip", "twice")
SHIFT_TWICE = DstPolicy("shift", "twice")
SKIP_ONCE = DstPolicy("skip", "once")


def Z(text: str) -> int:
    return int(datetime.fromisoformat(text + "+00:00").timestamp())


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%m-%dT%H:%M")


def slots(spec, tz, dst, start, end):
    return [iso(s) for s in compile_schedule(spec, tz, dst).slots_between(Z(start), Z(end))]


BERLIN_DAILY = [
    # (dst policy, window, expected UTC slots)
    (None, ("2026-03-27T12:00", "2026-03-30T12:00"), ["03-28T01:30", "03-29T01:00", "03-30T00:30"]),
    (SHIFT_ONCE, ("2026-03-27T12:00", "2026-03-30T12:00"), ["03-28T01:30", "03-29T01:00", "03-30T00:30"]),
    (SKIP_TWICE, ("2026-03-27T12:00", "2026-03-30T12:00"), ["03-28T01:30", "03-30T00:30"]),
    (SKIP_ONCE, ("2026-03-27T12:00", "2026-03-30T12:00"), ["03-28T01:30", "03-30T00:30"]),
    (None, ("2026-10-23T12:00", "2026-10-26T12:00"), ["10-24T00:30", "10-25T00:30", "10-26T01:30"]),
    (SHIFT_ONCE, ("2026-10-23T12:00", "2026-10-26T12:00"), ["10-24T00:30", "10-25T00:30", "10-26T01:30"]),
    (SHIFT_TWICE, ("2026-10-23T12:00", "2026-10-26T12:00"),
     ["10-24T00:30", "10-25T00:30", "10-25T01:30", "10-26T01:30"]),
    (SKIP_TWICE, ("2026-10-23T12:00", "2026-10-26T12:00"),
     ["10-24T00:30", "10-25T00:30", "10-25T01:30", "10-26T01:30"]),
]


@pytest.mark.parametrize("dst,window,expected", BERLIN_DAILY)
def test_berlin_fixed_hour(dst, window, expected):
    assert slots("30 2 * * *", "Europe/Berlin", dst, *window) == expected


def _every(start, end, step_min=30):
    return [iso(t) for t in range(Z(start) + step_min * 60, Z(end) + 1, step_min * 60)]


@pytest.mark.parametrize("dst", [None, SKIP_TWICE, SHIFT_TWICE])
def test_berlin_every_30_min_keeps_real_cadence(dst):
    # Default (wildcard hour) and any twice-policy: every 30 real minutes
    # straight through both transitions, never doubled, never bunched.
    assert slots("*/30 * * * *", "Europe/Berlin", dst, "2026-03-28T22:00", "2026-03-29T04:00") == \
        _every("2026-03-28T22:00", "2026-03-29T04:00")
    assert slots("*/30 * * * *", "Europe/Berlin", dst, "2026-10-24T22:00", "2026-10-25T04:00") == \
        _every("2026-10-24T22:00", "2026-10-25T04:00")


@pytest.mark.parametrize("dst", [SHIFT_ONCE, SKIP_ONCE])
def test_berlin_every_30_min_overlap_once(dst):
    # 02:00 and 02:30 (CET, second pass) are not run again.
    got = slots("*/30 * * * *", "Europe/Berlin", dst, "2026-10-24T23:00", "2026-10-25T02:30")
    assert got == ["10-24T23:30", "10-25T00:00", "10-25T00:30", "10-25T02:00", "10-25T02:30"]
    # Gap: 02:00 and 02:30 do not exist; shift maps them onto 03:00 CEST = 01:00Z,
    # which is a slot anyway, so both policies give the real-time sequence.
    got = slots("*/30 * * * *", "Europe/Berlin", dst, "2026-03-29T00:00", "2026-03-29T02:00")
    assert got == ["03-29T00:30", "03-29T01:00", "03-29T01:30", "03-29T02:00"]


def test_berlin_gap_shift_collapses_gap_minutes_to_one_slot():
    # Every minute of the 02:xx hour, fixed hour: all 60 missing minutes run once at 03:00 CEST.
    got = slots("* 2 * * *", "Europe/Berlin", None, "2026-03-29T00:00", "2026-03-29T03:00")
    assert got == ["03-29T01:00"]
    got = slots("* 2 * * *", "Europe/Berlin", SKIP_ONCE, "2026-03-29T00:00", "2026-03-29T03:00")
    assert got == []


NY = [
    ("30 2 * * *", None, ("2026-03-06T12:00", "2026-03-09T12:00"), ["03-07T07:30", "03-08T07:00", "03-09T06:30"]),
    ("30 2 * * *", SKIP_ONCE, ("2026-03-06T12:00", "2026-03-09T12:00"), ["03-07T07:30", "03-09T06:30"]),
    # 02:30 exists once on 2026-11-01 (the repeated hour is 01:00-02:00).
    ("30 2 * * *", None, ("2026-10-31T12:00", "2026-11-02T12:00"), ["11-01T07:30", "11-02T07:30"]),
    ("30 1 * * *", None, ("2026-10-31T12:00", "2026-11-02T12:00"), ["11-01T05:30", "11-02T06:30"]),
    ("30 1 * * *", SHIFT_TWICE, ("2026-10-31T12:00", "2026-11-02T12:00"),
     ["11-01T05:30", "11-01T06:30", "11-02T06:30"]),
    ("0 * * * *", None, ("2026-11-01T03:00", "2026-11-01T08:00"),
     ["11-01T04:00", "11-01T05:00", "11-01T06:00", "11-01T07:00", "11-01T08:00"]),
    ("0 * * * *", None, ("2026-03-08T05:00", "2026-03-08T09:00"),
     ["03-08T06:00", "03-08T07:00", "03-08T08:00", "03-08T09:00"]),
    ("0 * * * *", SHIFT_ONCE, ("2026-11-01T03:00", "2026-11-01T08:00"),
     ["11-01T04:00", "11-01T05:00", "11-01T07:00", "11-01T08:00"]),
]


@pytest.mark.parametrize("spec,dst,window,expected", NY)
def test_new_york(spec, dst, window, expected):
    assert slots(spec, "America/New_York", dst, *window) == expected


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("dst", [None, SHIFT_ONCE, SKIP_TWICE, SHIFT_TWICE, SKIP_ONCE])
@pytest.mark.parametrize("spec", ["*/30 * * * *", "30 2 * * *", "0 1 * * *", "15 */2 * * *"])
def test_next_after_agrees_with_enumeration_near_transitions(tz, dst, spec):
    # next_after(t) from any t (inside the gap, first pass, second pass of the
    # overlap) must be the first enumerated slot after t.
    sched = compile_schedule(spec, tz, dst)
    windows = {
        "Europe/Berlin": (("2026-03-28T12:00", "2026-03-30T12:00"), ("2026-10-24T12:00", "2026-10-26T12:00")),
        "America/New_York": (("2026-03-07T12:00", "2026-03-09T12:00"), ("2026-10-31T12:00", "2026-11-02T12:00")),
    }[tz]
    for start, end in windows:
        all_slots = list(sched.slots_between(Z(start), Z(end)))
        assert all_slots == sorted(set(all_slots))
        for t in range(Z(start) + 7, Z(end) - 86400, 1200):
            assert sched.next_after(t) == next((s for s in all_slots if s > t), None)


def test_overlap_twice_next_after_from_first_pass():
    sched = compile_schedule("0 2 * * *", "Europe/Berlin", SKIP_TWICE)
    t = Z("2026-10-25T00:10")  # 02:10 CEST, first pass
    assert iso(sched.next_after(t)) == "10-25T01:00"  # 02:00 CET, second pass


def test_describe_has_dst_notes():
    sched = compile_schedule("30 2 * * *", "Europe/Berlin", None)
    gap = sched.describe(Z("2026-03-28T12:00"), 1)[0]
    assert gap["utc"] == "2026-03-29T01:00:00Z" and "DST gap" in gap["dst_note"]
    assert gap["local"] == "2026-03-29T03:00:00+02:00"
    ovl = sched.describe(Z("2026-10-24T12:00"), 1)[0]
    assert "DST overlap" in ovl["dst_note"] and ovl["local_zone"] == "CEST"
    plain = sched.describe(Z("2026-06-01T00:00"), 1)[0]
    assert plain["dst_note"] == "" and plain["local"] == "2026-06-01T02:30:00+02:00"


def test_default_policy_resolution():
    assert compile_schedule("30 2 * * *", "Europe/Berlin").policy == SHIFT_ONCE
    assert compile_schedule("0 1,2 * * *", "Europe/Berlin").policy == SHIFT_ONCE
    assert compile_schedule("*/30 * * * *", "Europe/Berlin").policy == SKIP_TWICE
    assert compile_schedule("0 */2 * * *", "Europe/Berlin").policy == SKIP_TWICE
    assert compile_schedule("0 1-23/2 * * *", "Europe/Berlin").policy == SKIP_TWICE
    assert compile_schedule("0 2 * * *", "Europe/Berlin", SKIP_ONCE).policy == SKIP_ONCE
