"""The scheduler's policy table (node/schedule/scheduler.py, rules 3, 4 and 4a), one
test per cell, and a property: with ``misfire: run_all`` a task whose fires
wait (for a claim) and run (for a while) loses no slot inside its window."""
import heapq
import random
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from node.schedule.effects import Cancel, Fire, SlotSkipped
from node.schedule.explain import explain
from node.schedule.scheduler import Scheduler
from node.tasks.model import Task

T0 = int(datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp())
POLICIES = ("allow", "forbid", "replace", "buffer_one", "buffer_all")


def task(overlap="forbid", misfire="run_all", window="10m", spec="@every 60s"):
    return Task.from_dict({"id": "t", "schedule": spec, "overlap": overlap, "misfire": misfire,
                           "catchup_window": window, "command": {"type": "shell", "run": "true"}})


def sched(t, now=T0 + 0.5, owned=True):
    s = Scheduler("n1")
    s.set_task(t, now=now)
    if owned:
        s.set_owned("t", True, now)
    return s


def fires(effects):
    return [(e.slot, e.reason) for e in effects if isinstance(e, Fire)]


def skips(effects):
    return [(e.slot, e.reason) for e in effects if isinstance(e, SlotSkipped)]


# ---------------------------------------------------------------- overlap rows

@pytest.mark.parametrize("policy", POLICIES)
def test_on_time_and_idle_fires_under_every_policy(policy):
    s = sched(task(policy))
    assert fires(s.tick(T0 + 60)) == [(T0 + 60, "due")]


@pytest.mark.parametrize("policy,expect", [
    ("allow", "fire"), ("forbid", "skip"), ("replace", "cancel+fire"),
    ("buffer_one", "queue"), ("buffer_all", "queue"),
])
def test_previous_run_really_running(policy, expect):
    s = sched(task(policy))
    s.tick(T0 + 60)
    s.run_started("t", T0 + 60, "r1", T0 + 60)
    out = s.tick(T0 + 120)
    if expect == "fire":
        assert fires(out) == [(T0 + 120, "due")]
    elif expect == "skip":
        assert skips(out) == [(T0 + 120, "overlap_forbid")] and not fires(out)
    elif expect == "cancel+fire":
        assert [e.run_id for e in out if isinstance(e, Cancel)] == ["r1"]
        assert fires(out) == [(T0 + 120, "due")]
    else:
        assert not fires(out) and not skips(out)
        assert explain(s, "t", T0 + 120)["queued"] == [T0 + 120]
        s.run_finished("t", "r1", T0 + 130)
        assert fires(s.tick(T0 + 130)) == [(T0 + 120, "buffered")]


@pytest.mark.parametrize("policy", POLICIES)
def test_previous_slot_only_pending_waits_its_turn(policy):
    """A claim waiting for etcd is not an overlap: the next slot waits, then
    fires when the task is idle (on time here, so by reason ``due``)."""
    s = sched(task(policy))
    s.tick(T0 + 60)                      # Fire pending (claim in flight)
    out = s.tick(T0 + 120)
    if policy == "allow":
        assert fires(out) == [(T0 + 120, "due")]
        return
    assert not fires(out) and not skips(out)
    assert explain(s, "t", T0 + 120)["waiting"] == [T0 + 120]
    s.run_started("t", T0 + 60, "r1", T0 + 120.5)  # claim won
    s.run_finished("t", "r1", T0 + 121)
    assert fires(s.tick(T0 + 121)) == [(T0 + 120, "due")]


@pytest.mark.parametrize("policy", ["forbid", "replace", "buffer_one", "buffer_all"])
def test_a_late_run_running_is_not_an_overlap(policy):
    """A catch-up run still going when the next slot comes (draining a
    backlog, not overrunning its own period): the slot waits its turn."""
    s = Scheduler("n2")
    s.set_task(task(policy, "run_all"), last_fired_slot=T0 + 60, now=T0 + 130)
    s.set_owned("t", True, T0 + 130)
    assert fires(s.tick(T0 + 130)) == [(T0 + 120, "catchup")]
    s.run_started("t", T0 + 120, "late", T0 + 130)
    out = s.tick(T0 + 180)                 # the catch-up run is still going
    assert not fires(out) and not skips(out) and not [e for e in out if isinstance(e, Cancel)]
    s.run_finished("t", "late", T0 + 181)
    assert fires(s.tick(T0 + 181)) == [(T0 + 180, "due")]


@pytest.mark.parametrize("misfire,expect", [
    ("run_all", [(T0 + 120, "catchup"), (T0 + 180, "catchup")]),
    ("run_once", [(T0 + 180, "catchup")]),
    ("skip", []),
])
def test_waiting_for_etcd_then_released_late_goes_by_misfire(misfire, expect):
    s = sched(task("forbid", misfire))
    s.tick(T0 + 60)
    s.tick(T0 + 120)
    s.tick(T0 + 180)                     # two slots wait behind the claim
    s.fire_abandoned("t", T0 + 60, T0 + 200)   # etcd back too late for slot 60
    got = []
    now = T0 + 200
    for i in range(4):
        out = s.tick(now)
        got += fires(out)
        for slot, _ in fires(out):
            s.run_started("t", slot, f"r{i}", now)
            s.run_finished("t", f"r{i}", now + 1)
        now += 2
    assert got == expect
    want_skips = {"skip": [(T0 + 120, "misfire_skip"), (T0 + 180, "misfire_skip")],
                  "run_once": [(T0 + 120, "coalesced")], "run_all": []}[misfire]
    assert skips(s.tick(now)) == [] and s.statistics().skipped.get(
        {"skip": "misfire_skip", "run_once": "coalesced", "run_all": "x"}[misfire], 0) == len(want_skips)


# ---------------------------------------------------------------- misfire rows

def takeover(misfire, overlap="forbid", window="10m"):
    """A new owner takes the task over at T0+250 with last fired T0+60."""
    s = Scheduler("n2")
    s.set_task(task(overlap, misfire, window), last_fired_slot=T0 + 60, now=T0 + 250)
    s.set_owned("t", True, T0 + 250)
    return s


def test_missed_at_takeover_run_all_fires_each_oldest_first_one_at_a_time():
    s = takeover("run_all")
    out = s.tick(T0 + 250)
    assert fires(out) == [(T0 + 120, "catchup")] and not skips(out)
    assert explain(s, "t", T0 + 250)["waiting"] == [T0 + 180, T0 + 240]
    got = [T0 + 120]
    now = T0 + 250
    for i in range(2):
        s.run_started("t", got[-1], f"r{i}", now)
        s.run_finished("t", f"r{i}", now + 0.5)
        now += 0.5
        got += [slot for slot, _ in fires(s.tick(now))]
    assert got == [T0 + 120, T0 + 180, T0 + 240]


def test_missed_at_takeover_run_all_allow_fires_all_at_once():
    assert fires(takeover("run_all", "allow").tick(T0 + 250)) == [
        (T0 + 120, "catchup"), (T0 + 180, "catchup"), (T0 + 240, "catchup")]


def test_missed_at_takeover_run_once_fires_latest():
    out = takeover("run_once").tick(T0 + 250)
    assert fires(out) == [(T0 + 240, "catchup")]
    assert skips(out) == [(T0 + 120, "coalesced"), (T0 + 180, "coalesced")]


def test_missed_at_takeover_skip_skips_each():
    out = takeover("skip").tick(T0 + 250)
    assert not fires(out)
    assert skips(out) == [(T0 + 120, "misfire_skip"), (T0 + 180, "misfire_skip"), (T0 + 240, "misfire_skip")]


def test_missed_older_than_window_expires():
    out = takeover("run_all", window="90s").tick(T0 + 250)
    assert (T0 + 120, "expired") in skips(out)
    assert fires(out) == [(T0 + 180, "catchup")]


def test_released_from_line_after_window_expires():
    s = sched(task("forbid", "run_all", window="2m"))
    s.tick(T0 + 60)
    s.tick(T0 + 120)                     # waits behind the pending claim
    s.fire_abandoned("t", T0 + 60, T0 + 300)
    out = s.tick(T0 + 300)
    assert (T0 + 120, "expired") in skips(out)


def test_waiting_line_is_bounded():
    s = Scheduler("n1", max_catchup_slots=3)
    s.set_task(task("forbid", "run_all", window="1h"), now=T0 + 0.5)
    s.set_owned("t", True, T0 + 0.5)
    s.tick(T0 + 60)
    reasons = []
    for m in range(2, 7):
        reasons += [r for _, r in skips(s.tick(T0 + 60 * m))]
    assert reasons == ["catchup_limit", "catchup_limit"]
    assert len(explain(s, "t", T0 + 400)["waiting"]) == 3


def test_held_for_handoff_fires_nothing_then_catches_up():
    s = Scheduler("n1")
    s.set_task(task("forbid", "run_all"), last_fired_slot=T0 + 60, now=T0 + 61)
    s.set_owned("t", True, T0 + 61, handoff_ready=False)
    assert s.tick(T0 + 200) == []
    s.set_owned("t", True, T0 + 200, handoff_ready=True)
    assert fires(s.tick(T0 + 200)) == [(T0 + 120, "catchup")]
    assert explain(s, "t", T0 + 200)["waiting"] == [T0 + 180]


# ---------------------------------------------------------------- property

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       claim_max_s=st.floats(0.0, 0.8), run_max_s=st.floats(0.01, 0.6),
       overlap=st.sampled_from(["forbid", "replace", "buffer_one", "buffer_all"]),
       outage=st.tuples(st.integers(0, 40), st.integers(0, 20)))
def test_run_all_loses_no_slot_to_a_pending_predecessor(seed, claim_max_s, run_max_s, overlap, outage):
    """``@every 1s`` with ``misfire: run_all``: each Fire waits up to
    ``claim_max_s`` for its claim (until it ends, across an etcd outage of up
    to 20 s), then runs up to ``run_max_s`` (a load the task keeps up with). Every slot fires exactly once, except a slot that
    came while a run was *really running* (the overlap policy's business:
    ``overlap_forbid``, or ``coalesced`` by ``buffer_one``); never two runs
    at once; nothing expires (the window is 60 s)."""
    rng = random.Random(seed)
    t = task(overlap, "run_all", window="60s", spec="@every 1s")
    s = sched(t, now=T0 + 0.5)
    out_start, out_len = T0 + outage[0], outage[1]
    events: list = []                     # (time, seq, kind, slot, run_id)
    seq = 0
    fired: list[int] = []
    skipped: dict[int, str] = {}
    running: dict[str, int] = {}
    now = float(T0)
    end = T0 + 80
    for _ in range(100_000):
        nd = s.next_deadline()
        cands = [x for x in (nd if nd is not None and nd <= end else None,
                             events[0][0] if events else None) if x is not None]
        if not cands:
            break
        now = max(now, min(cands))
        while events and events[0][0] <= now:
            _, _, kind, slot, rid = heapq.heappop(events)
            if kind == "claimed":
                assert not running, f"two runs at once (seed {seed})"
                s.run_started("t", slot, rid, now)
                running[rid] = slot
                seq += 1
                heapq.heappush(events, (now + rng.uniform(0.01, run_max_s), seq, "done", slot, rid))
            elif rid in running:
                del running[rid]
                s.run_finished("t", rid, now)
        for e in s.tick(now):
            if isinstance(e, SlotSkipped):
                allowed = {"forbid": "overlap_forbid", "buffer_one": "coalesced"}.get(overlap)
                assert e.reason == allowed and (running or e.reason == "coalesced"), f"{e} (seed {seed})"
                skipped[e.slot] = e.reason
            elif isinstance(e, Cancel):
                assert overlap == "replace"
                running.pop(e.run_id)
                s.run_finished("t", e.run_id, now)
            elif isinstance(e, Fire):
                fired.append(e.slot)
                seq += 1
                at = now + rng.uniform(0, claim_max_s)
                if out_start <= at < out_start + out_len:
                    at = out_start + out_len + rng.uniform(0, 0.5)   # etcd back
                heapq.heappush(events, (at, seq, "claimed", e.slot, f"r{seq}"))
    else:
        raise AssertionError(f"no quiescence (seed {seed})")
    due = set(range(T0 + 1, end - 10))
    assert len(fired) == len(set(fired)), f"a slot fired twice (seed {seed})"
    assert not set(fired) & set(skipped), f"fired and skipped (seed {seed})"
    missing = sorted(due - set(fired) - set(skipped))
    assert not missing, f"lost {missing[:5]} (seed {seed})"
    if claim_max_s + run_max_s < 1.0 and outage[1] == 0:
        assert not skipped, f"skipped {sorted(skipped.items())[:5]} with short claims and runs (seed {seed})"


# ------------------------------------------------------ rule 2a: open slots

def _advances(effects):
    from node.schedule.effects import Advance
    return [e.slot for e in effects if isinstance(e, Advance)]


@pytest.mark.parametrize("policy", ["forbid", "replace", "buffer_one", "buffer_all"])
def test_slots_waiting_behind_a_pending_claim_go_to_the_next_owner(policy):
    """A claim waits for etcd; the next slots wait behind it. Ownership moves:
    the new owner starts from the oldest open slot, and the node that lost
    the task hands out nothing past it."""
    t = task(policy, misfire="run_all")
    a = sched(t)
    a.tick(T0 + 60)
    handed = _advances(a.run_started("t", T0 + 60, "r0", T0 + 60))
    a.run_finished("t", "r0", T0 + 61)
    assert handed == [T0 + 60]
    handed += _advances(a.tick(T0 + 120))                    # Fire T0+120, claim in flight
    for m in (3, 4):
        handed += _advances(a.tick(T0 + 60 * m))            # T0+180, T0+240 wait
    a.set_owned("t", False, T0 + 250)
    handed += _advances(a.fire_abandoned("t", T0 + 120, T0 + 250, settled=False))
    assert max(handed) == T0 + 60
    b = Scheduler("n2")
    b.set_task(t, last_fired_slot=max(handed), now=T0 + 251)
    b.set_owned("t", True, T0 + 251)
    got = []
    now = T0 + 251
    for _ in range(10):
        for e in b.tick(now):
            if isinstance(e, Fire):
                got.append(e.slot)
                b.run_started("t", e.slot, f"r{e.slot}", now)
                b.run_finished("t", f"r{e.slot}", now + 1)
        now += 2
    assert got[:3] == [T0 + 120, T0 + 180, T0 + 240]


def test_a_node_that_gets_a_task_back_redecides_its_dropped_line():
    t = task("forbid", misfire="run_all")
    a = sched(t)
    a.tick(T0 + 60)
    a.run_started("t", T0 + 60, "r0", T0 + 60)
    a.run_finished("t", "r0", T0 + 61)
    a.tick(T0 + 120)                                        # pending
    a.tick(T0 + 180)                                        # waits
    a.set_owned("t", False, T0 + 190)                       # line dropped
    a.fire_abandoned("t", T0 + 120, T0 + 190, settled=False)
    a.set_owned("t", True, T0 + 200)
    fired = [e.slot for e in a.tick(T0 + 200) if isinstance(e, Fire)]
    assert fired[:1] == [T0 + 120]


def test_handed_out_value_names_a_real_slot_and_follows_starts():
    t = task("forbid", misfire="run_all", spec="*/5 * * * *")
    s = sched(t)
    out = s.tick(T0 + 300)
    assert _advances(out) == []
    assert _advances(s.run_started("t", T0 + 300, "r1", T0 + 300)) == [T0 + 300]
    s.run_finished("t", "r1", T0 + 301)
    s.tick(T0 + 600)
    s.tick(T0 + 900)   # T0+600 pending, T0+900 waits
    assert s.last_fired_slot("t") == T0 + 300


def test_a_due_slot_fired_over_half_a_period_late_is_a_backlog_run():
    """A new owner fires an @every 2s slot 1.5 s late (inside the 2 s grace,
    so reason 'due'); its run overruns into the next slot. Under forbid that
    next slot waits its turn instead of being skipped (found by the chaos
    harness after a takeover)."""
    t = task("forbid", misfire="run_all", spec="@every 2s", window="1m")
    s = sched(t, now=T0 + 0.5)
    out = s.tick(T0 + 3.5)                           # slot T0+2 fired 1.5 s late
    assert fires(out) == [(T0 + 2, "due")]
    s.run_started("t", T0 + 2, "r1", T0 + 3.5)
    out = s.tick(T0 + 4.0)                           # next slot while r1 runs
    assert not skips(out) and not fires(out)
    s.run_finished("t", "r1", T0 + 4.5)
    assert fires(s.tick(T0 + 4.5)) == [(T0 + 4, "due")]


def test_an_on_time_run_that_overruns_still_makes_forbid_skip():
    t = task("forbid", misfire="run_all", spec="@every 2s", window="1m")
    s = sched(t, now=T0 + 0.5)
    out = s.tick(T0 + 2.2)                           # 0.2 s late: its own time
    s.run_started("t", T0 + 2, "r1", T0 + 2.2)
    assert skips(s.tick(T0 + 4.0)) == [(T0 + 4, "overlap_forbid")]
