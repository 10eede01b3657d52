"""Scheduler core: ownership, handoff, overlap, pause, one-shot, run now,
backfill, owner loss, explain, determinism and cost."""
import time
from datetime import datetime, timezone

import pytest

from node.schedule.effects import Advance, Cancel, Fire, SlotSkipped
from node.schedule.explain import explain
from node.schedule.scheduler import Scheduler
from node.tasks.model import Task

T0 = int(datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp())  # a Monday 00:00Z


def task(spec="* * * * *", **kw):
    d = {"id": kw.pop("id", "t"), "schedule": spec, "command": {"type": "shell", "run": "true"}}
    d.update(kw)
    return Task.from_dict(d)


def owned(t, now=T0, **kw):
    s = Scheduler("n1")
    s.set_task(t, now=now, **kw)
    s.set_owned(t.id, True, now)
    return s


def kinds(effects):
    out = []
    for e in effects:
        if isinstance(e, Fire):
            out.append(("fire", e.slot, e.reason))
        elif isinstance(e, SlotSkipped):
            out.append(("skip", e.slot, e.reason))
        elif isinstance(e, Cancel):
            out.append(("cancel", e.run_id, e.reason))
        else:
            out.append(("advance", e.slot))
    return out


def test_not_owned_never_fires_and_held_until_handoff():
    s = Scheduler("n1")
    s.set_task(task(), now=T0)
    assert s.next_deadline() is None and s.tick(T0 + 600) == []
    s.set_owned("t", True, T0 + 600, handoff_ready=False)
    assert s.next_deadline() is None and s.tick(T0 + 700) == []
    assert s.statistics().held == 1
    s.update_control("t", last_fired_slot=T0 + 660)  # handoff brought the state
    s.set_owned("t", True, T0 + 700, handoff_ready=True)
    assert kinds(s.tick(T0 + 720)) == [("fire", T0 + 720, "due")]
    # last_fired_slot moves once the run has started (rule 2a)
    assert kinds(s.run_started("t", T0 + 720, "r", T0 + 720)) == [("advance", T0 + 720)]


def test_first_slot_after_creation_and_exact_boundary():
    s = owned(task(), now=T0)  # T0 is itself a slot: due now
    assert s.next_deadline() == T0
    assert kinds(s.tick(T0)) == [("fire", T0, "due")]
    assert kinds(s.run_started("t", T0, "r", T0)) == [("advance", T0)]
    s2 = owned(task(), now=T0 + 0.5)
    assert s2.next_deadline() == T0 + 60


def test_never_fires_a_slot_twice_or_at_or_below_replicated():
    s = owned(task(overlap="allow"), now=T0)
    s.tick(T0)
    assert s.tick(T0) == [] and s.tick(T0 + 30) == []
    s.update_control("t", last_fired_slot=T0 + 120)  # another owner got further (split brain)
    assert kinds(s.tick(T0 + 120)) == []
    assert [e.slot for e in s.tick(T0 + 180) if isinstance(e, Fire)] == [T0 + 180]
    assert s.last_fired_slot("t") == T0 + 120   # T0+180 is not started yet
    s.run_started("t", T0 + 180, "r", T0 + 180)
    s.update_control("t", last_fired_slot=T0)  # max register: older value ignored
    assert s.last_fired_slot("t") == T0 + 180


def start(s, effects, now):
    """Start every fired run; the effects run_started returned."""
    out = []
    for e in effects:
        if isinstance(e, Fire):
            out += s.run_started(e.task_id, e.slot, f"run-{e.slot}", now)
    return out


def test_overlap_forbid():
    s = owned(task(overlap="forbid"))
    start(s, s.tick(T0), T0)
    assert kinds(s.tick(T0 + 60)) == [("skip", T0 + 60, "overlap_forbid"), ("advance", T0 + 60)]
    s.run_finished("t", f"run-{T0}", T0 + 70)
    assert kinds(s.tick(T0 + 120))[0] == ("fire", T0 + 120, "due")


def test_overlap_allow():
    s = owned(task(overlap="allow"))
    start(s, s.tick(T0), T0)
    assert kinds(s.tick(T0 + 60))[0] == ("fire", T0 + 60, "due")


def test_overlap_replace():
    s = owned(task(overlap="replace"))
    start(s, s.tick(T0), T0)
    eff = s.tick(T0 + 60)
    assert kinds(eff) == [("cancel", f"run-{T0}", "replace"), ("fire", T0 + 60, "due")]
    assert kinds(start(s, eff, T0 + 60)) == [("advance", T0 + 60)]
    assert s.statistics().cancelled == 1


def test_overlap_buffer_one_coalesces_to_newest():
    s = owned(task(overlap="buffer_one"))
    start(s, s.tick(T0), T0)
    assert kinds(s.tick(T0 + 60)) == []   # queued: still open, nothing handed out
    assert kinds(s.tick(T0 + 120)) == [("skip", T0 + 60, "coalesced"), ("advance", T0 + 60)]
    assert explain(s, "t", T0 + 125)["queued"] == [T0 + 120]
    s.run_finished("t", f"run-{T0}", T0 + 130)
    assert s.next_deadline() == T0 + 130
    assert kinds(s.tick(T0 + 130)) == [("fire", T0 + 120, "buffered")]
    assert s.tick(T0 + 131) == []


def test_overlap_buffer_all_serialises_and_bounds():
    s = Scheduler("n1", max_buffer=2)
    s.set_task(task(overlap="buffer_all"), now=T0)
    s.set_owned("t", True, T0)
    start(s, s.tick(T0), T0)
    s.tick(T0 + 60)
    s.tick(T0 + 120)
    assert kinds(s.tick(T0 + 180)) == [("skip", T0 + 180, "buffer_full")]  # T0+60 still queued
    s.run_finished("t", f"run-{T0}", T0 + 181)
    eff = s.tick(T0 + 181)
    assert kinds(eff) == [("fire", T0 + 60, "buffered")]
    assert s.tick(T0 + 182) == []  # one at a time
    start(s, eff, T0 + 181)
    s.run_finished("t", f"run-{T0 + 60}", T0 + 185)
    assert kinds(s.tick(T0 + 185)) == [("fire", T0 + 120, "buffered")]


def test_fire_abandoned_releases_forbid():
    s = owned(task(overlap="forbid"))
    s.tick(T0)  # fire pending, never started
    s.fire_abandoned("t", T0, T0 + 1)
    assert kinds(s.tick(T0 + 60))[0] == ("fire", T0 + 60, "due")


def test_paused_slots_are_skipped_and_not_replayed():
    s = owned(task(overlap="allow"), paused=True)
    assert kinds(s.tick(T0)) == [("skip", T0, "paused"), ("advance", T0)]
    s.tick(T0 + 120)
    s.update_control("t", paused=False)
    assert kinds(s.tick(T0 + 180)) == [("fire", T0 + 180, "due")]   # paused slots were handed out
    assert s.last_fired_slot("t") == T0 + 120
    assert s.statistics().skipped["paused"] == 3


def test_once_fires_once_cluster_wide():
    t = task("now").resolve_now(T0 + 0.3)
    a = owned(t, now=T0 + 1.0)  # replicated a moment after apply: still fires
    eff = a.tick(T0 + 1.0)
    assert kinds(eff) == [("fire", T0, "due")]
    assert kinds(start(a, eff, T0 + 1.0)) == [("advance", T0)]
    assert a.next_deadline() is None
    # Owner dies; the next owner has the replicated last fired slot: no second fire.
    b = Scheduler("b")
    b.set_task(t, last_fired_slot=T0, now=T0 + 5)
    b.set_owned(t.id, True, T0 + 5)
    assert b.tick(T0 + 5) == [] and b.next_deadline() is None
    # Without it (owner died before replicating), b catches it up once.
    c = owned(t, now=T0 + 30)
    assert kinds(c.tick(T0 + 30)) == [("fire", T0, "catchup")]
    with pytest.raises(ValueError):
        Scheduler("x").set_task(task("now"), now=T0)


def test_once_past_catchup_window_expires():
    t = task("once:2026-06-01T00:00:00Z", catchup_window="1m")
    s = owned(t, now=T0 + 3600)
    assert kinds(s.tick(T0 + 3600)) == [("skip", T0, "expired"), ("advance", T0 + 3600 - 60 - 1)]


def test_run_now_respects_overlap_and_keeps_cursor():
    s = owned(task(overlap="forbid"), now=T0 + 0.5)
    assert kinds(s.run_now("t", T0 + 10.5)) == [("fire", T0 + 10, "run_now")]
    # the first is only pending: the second waits its turn (rule 4a)
    assert kinds(s.run_now("t", T0 + 10.7)) == []
    assert explain(s, "t", T0 + 10.7)["waiting"] == [T0 + 10]
    s.run_started("t", T0 + 10, "r1", T0 + 10.8)
    s.run_finished("t", "r1", T0 + 10.9)
    assert kinds(s.tick(T0 + 10.9)) == [("fire", T0 + 10, "run_now")]  # its turn
    s.run_started("t", T0 + 10, "r2", T0 + 10.95)
    s.run_finished("t", "r2", T0 + 10.97)
    assert kinds(s.run_now("t", T0 + 10.98)) == [("fire", T0 + 10, "run_now")]
    s.run_started("t", T0 + 10, "r3", T0 + 10.99)
    # a run on its own time really running, nothing waiting: forbid skips
    assert kinds(s.run_now("t", T0 + 11)) == [("skip", T0 + 11, "overlap_forbid")]
    assert s.last_fired_slot("t") is None


def test_backfill_lists_then_runs_serially():
    n = T0 + 10 * 3600 + 10
    s = owned(task("0 * * * *", overlap="allow"), now=n)
    assert s.backfill("t", T0, T0 + 3 * 3600, n, dry_run=True) == [T0, T0 + 3600, T0 + 7200, T0 + 3 * 3600]
    assert s.tick(n) == []  # dry run queues nothing
    assert s.backfill("t", T0, T0 + 3600, n) == [T0, T0 + 3600]
    assert s.next_deadline() == n
    eff = s.tick(n)
    assert kinds(eff) == [("fire", T0, "backfill")]
    start(s, eff, n)
    assert s.tick(n + 1) == []  # one at a time
    s.run_finished("t", f"run-{T0}", n + 2)
    assert kinds(s.tick(n + 2)) == [("fire", T0 + 3600, "backfill")]
    assert s.last_fired_slot("t") is None  # backfill does not move the cursor
    with pytest.raises(ValueError, match="past"):
        s.backfill("t", T0, n + 3600, n)
    with pytest.raises(ValueError, match="before"):
        s.backfill("t", T0 + 5, T0, n)
    small = Scheduler("n", max_catchup_slots=3)
    small.set_task(task(), now=T0)
    with pytest.raises(ValueError, match="more than 3"):
        small.backfill("t", T0, T0 + 600, T0 + 600)


def test_unfinished_run_rerun_or_skip_once_per_run():
    s = owned(task(overlap="allow"))
    rec = {"run_id": "dead-1", "slot": T0 - 60, "node": "n9", "status": "running"}
    assert kinds(s.unfinished_run("t", rec, T0)) == [("fire", T0 - 60, "rerun_owner_loss")]
    assert s.unfinished_run("t", rec, T0 + 1) == []
    k = owned(task(on_owner_loss="skip"))
    assert kinds(k.unfinished_run("t", rec, T0)) == [("skip", T0 - 60, "owner_lost")]
    assert s.unfinished_run("t", {"run_id": "x", "slot": "bad"}, T0) == []


def test_remove_task_and_stale_heap_entries():
    s = owned(task())
    s.remove_task("t")
    assert s.tick(T0 + 600) == [] and s.next_deadline() is None


def test_changing_schedule_recomputes_next():
    s = owned(task("0 * * * *"), now=T0 + 1)
    assert s.next_deadline() == T0 + 3600
    s.set_task(task("*/5 * * * *"), now=T0 + 1)
    assert s.next_deadline() == T0 + 300


def test_jitter_moves_fire_not_slot():
    s = owned(task("@every 60s", jitter="30s", id="jit"), now=T0 + 1)
    dl = s.next_deadline()
    assert T0 + 60 < dl < T0 + 90
    assert s.tick(dl - 0.001) == []
    f = s.tick(dl)[0]
    assert f.slot == T0 + 60 and f.fire_at == dl


def test_dst_through_the_scheduler():
    # Europe/Berlin 02:30 on the gap day fires once, at the transition.
    t = task("30 2 * * *", timezone="Europe/Berlin", overlap="allow")
    start_ = int(datetime(2026, 3, 28, 12, tzinfo=timezone.utc).timestamp())
    s = owned(t, now=start_)
    fired = []
    for _ in range(3):
        dl = s.next_deadline()
        fired += [datetime.fromtimestamp(e.slot, timezone.utc).strftime("%m-%dT%H:%M")
                  for e in s.tick(dl) if isinstance(e, Fire)]
    assert fired == ["03-29T01:00", "03-30T00:30", "03-31T00:30"]


def test_explain_reports_why():
    s = Scheduler("n1")
    s.set_task(task("*/30 * * * *", timezone="Europe/Berlin"), last_fired_slot=T0, now=T0)
    x = explain(s, "t", T0 + 7200, n=3)
    assert x["owned"] is False and "not owned" in x["why"][0]
    assert x["last_fired_utc"] == "2026-06-01T00:00:00Z" and len(x["next"]) == 3
    assert x["missed_now"] == 2 and "misfire=run_once will fire the latest once" in x["why"][-1]
    assert x["next"][0]["local"].endswith("+02:00")
    s.set_owned("t", True, T0 + 7200)
    s.update_control("t", paused=True)
    x = explain(s, "t", T0 + 7200)
    assert x["owned"] and any("paused" in w for w in x["why"])


def test_deterministic_effect_order():
    def run():
        s = Scheduler("n1")
        for i in reversed(range(50)):
            s.set_task(task("* * * * *", id=f"t{i:02d}"), now=T0)
            s.set_owned(f"t{i:02d}", True, T0)
        return s.tick(T0 + 60)
    a, b = run(), run()
    assert a == b
    fires = [e.task_id for e in a if isinstance(e, Fire)]
    assert fires == sorted(fires) and len(fires) == 50


def test_ten_thousand_tasks_are_cheap():
    s = Scheduler("n1")
    for i in range(10_000):
        tid = f"task-{i}"
        s.set_task(task("* * * * *" if i % 2 else "@every 60s", id=tid, overlap="allow"), now=T0 + 1)
        s.set_owned(tid, True, T0 + 1)
    t0 = time.perf_counter()
    n = 0
    for minute in range(1, 4):
        eff = s.tick(T0 + 60 * minute)
        n += sum(isinstance(e, Fire) for e in eff)
        assert s.tick(T0 + 60 * minute + 30) == []  # nothing due: O(1)
    elapsed = time.perf_counter() - t0
    assert n == 30_000
    assert elapsed < 3.0, elapsed  # ~0.1 s on the dev machine
    st = s.statistics()
    assert st.owned == 10_000 and st.heap_size <= 4 * 10_000 + 64


def test_unreported_fire_stops_blocking_after_the_catchup_window():
    s = owned(task(overlap="forbid", catchup_window="5m", misfire="skip"))
    s.tick(T0)  # Fire never started nor abandoned (a buggy shell)
    for m in range(1, 6):
        # pending, not running: later slots wait their turn (rule 4a), and
        # stay open (rule 2a: nothing handed out past the pending slot)
        assert kinds(s.tick(T0 + 60 * m)) == []
        assert s.last_fired_slot("t") is None
    # the pending Fire expires at T0 + 300 + grace: the line is released by
    # the misfire policy (skip: every waiting slot is late), without a tick
    # of a new slot
    wake = s.next_deadline()
    assert T0 + 300 < wake < T0 + 303
    out = kinds(s.tick(wake))
    assert [k for k in out if k[0] == "skip"] == [("skip", T0 + 60 * m, "misfire_skip") for m in range(1, 6)]
    assert kinds(s.tick(T0 + 360))[0] == ("fire", T0 + 360, "due")
    assert s.statistics().skipped["pending_expired"] == 1


def test_removed_then_readded_task_does_not_fire_unowned():
    # Regression: a stale timer entry of the removed task must not make the
    # re-added (not owned) task fire.
    s = owned(task())
    s.remove_task("t")
    s.set_task(task(), now=T0 + 120)
    s.set_owned("t", False, T0 + 120)
    assert s.tick(T0 + 120) == [] and s.next_deadline() is None
    s.set_owned("t", True, T0 + 120)
    assert kinds(s.tick(T0 + 120)) == [("fire", T0 + 120, "due")]


def test_tick_limit_hands_out_due_tasks_in_batches():
    s = Scheduler("n1")
    for i in range(10):
        s.set_task(task("@every 1s", id=f"t{i}", overlap="allow"), now=T0 + 0.5)
        s.set_owned(f"t{i}", True, T0 + 0.5)
    now = T0 + 1.01
    first = s.tick(now, limit=4)
    assert [e.task_id for e in first if isinstance(e, Fire)] == ["t0", "t1", "t2", "t3"]
    assert s.next_deadline() == T0 + 1 <= now  # work left: call again
    rest = s.tick(now, limit=4) + s.tick(now, limit=4)
    assert [e.task_id for e in rest if isinstance(e, Fire)] == [f"t{i}" for i in range(4, 10)]
    assert s.next_deadline() == T0 + 2 and s.tick(now, limit=4) == []
    # A task that lost ownership between batches is not decided.
    s.tick(T0 + 2, limit=3)
    s.set_owned("t5", False, T0 + 2)
    later = s.tick(T0 + 2)
    assert [e.task_id for e in later if isinstance(e, Fire)] == ["t3", "t4", "t6", "t7", "t8", "t9"]


def test_every_fast_path_matches_schedule_with_jitter():
    s = owned(task("@every 10s", jitter="7s", id="j", overlap="allow"), now=T0)
    sched = s._entries["j"].sched
    fires = []
    for _ in range(5):
        dl = s.next_deadline()
        fires += [e for e in s.tick(dl) if isinstance(e, Fire)]
    assert [f.slot for f in fires] == [T0 + 10 * k for k in range(5)]
    assert [f.fire_at for f in fires] == [sched.fire_time(f.slot) for f in fires]
    assert all(0 < f.fire_at - f.slot < 7 for f in fires)
