"""Property tests of the scheduler core against croniter.

- stepping tick() through time fires exactly croniter's slots: none missed,
  none twice, in order (random 5-field crons, random windows, UTC);
- misfire policies are exact after a simulated downtime / takeover from the
  replicated last fired slot.
"""
import math
from datetime import datetime, timezone

from croniter import croniter
from hypothesis import given, strategies as st

from node.schedule.effects import Advance, Fire, SlotSkipped
from node.schedule.scheduler import Scheduler
from node.tasks.model import Task

UTC = timezone.utc
T2020 = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp())
T2030 = int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())


def _field(lo, hi):
    num = st.integers(lo, hi).map(str)
    # no one-value ranges ('5-5'): croniter reads them as '*', peerd as crontab(5)
    # does (the one value; tests/test_cron_days.py checks it)
    rng = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).filter(lambda p: p[0] != p[1]).map(
        lambda p: f"{min(p)}-{max(p)}")
    step = st.integers(1, max(1, (hi - lo) // 2)).map(lambda n: f"*/{n}")
    return st.one_of(st.just("*"), num, rng, step,
                     st.lists(num, min_size=1, max_size=3, unique=True).map(",".join))


CRON = st.tuples(_field(0, 59), _field(0, 23), st.one_of(st.just("*"), _field(1, 28)),
                 st.one_of(st.just("*"), _field(1, 12)), st.one_of(st.just("*"), _field(0, 6))
                 ).map(" ".join)
EVERY = st.integers(1, 7200).map(lambda n: f"@every {n}s")


def task(spec, **kw):
    d = {"id": kw.pop("id", "t"), "schedule": spec, "command": {"type": "shell", "run": "true"},
         "overlap": "allow"}
    d.update(kw)
    return Task.from_dict(d)


# implement_cron_bug is croniter's name for Vixie cron's day-field rule (AND when
# a day field starts with '*'), which peerd follows.
def croniter_slots(spec, after, end):
    if spec.startswith("@every"):
        p = int(spec.split()[1][:-1])
        return list(range((after // p + 1) * p, end + 1, p))
    it = croniter(spec, float(after), implement_cron_bug=True)
    out = []
    while True:
        s = int(it.get_next(float))
        if s > end:
            return out
        out.append(s)


def drive(s, start, end, rng_delays, record, limit=5000):
    """Tick at each deadline plus a small random lateness (< grace)."""
    now = start
    for _ in range(limit):
        dl = s.next_deadline()
        if dl is None or dl > end:
            return now
        now = min(max(now, dl + next(rng_delays)), end)
        for eff in s.tick(now):
            record.append((now, eff))
            if isinstance(eff, Fire):  # run starts and ends at once
                for more in s.run_started(eff.task_id, eff.slot, f"r{eff.slot}", now):
                    record.append((now, more))
                s.run_finished(eff.task_id, f"r{eff.slot}", now)
    raise AssertionError("too many ticks")


@given(spec=st.one_of(CRON, EVERY.filter(lambda x: x != "@every 1s")), start=st.integers(T2020, T2030),
       span=st.integers(60, 3 * 86400), delays=st.lists(st.floats(0, 1.9), min_size=1, max_size=20),
       overlap=st.sampled_from(["allow", "forbid", "buffer_one"]))
def test_fires_exactly_the_croniter_slots(spec, start, span, delays, overlap):
    s = Scheduler("n1")
    s.set_task(task(spec, overlap=overlap), now=start)
    s.set_owned("t", True, start)
    expected = croniter_slots(spec, start - 1, start + span)
    if len(expected) > 300:
        expected = expected[:300]
        span = expected[-1] - start
    record = []
    it = iter(delays * (len(expected) // len(delays) + 2))
    drive(s, start, start + span, it, record)
    fired = [e.slot for _, e in record if isinstance(e, Fire)]
    assert fired == expected
    assert all(e.reason == "due" for _, e in record if isinstance(e, Fire))
    assert not [e for _, e in record if isinstance(e, SlotSkipped)]
    adv = [e.slot for _, e in record if isinstance(e, Advance)]
    assert adv == sorted(set(adv)) and (not expected or adv[-1] == expected[-1])
    for now, e in record:
        if isinstance(e, Fire):
            assert 0 <= now - e.fire_at < 2.0


@given(spec=st.one_of(CRON, EVERY), start=st.integers(T2020, T2030),
       up_s=st.integers(0, 1800), down_s=st.integers(1, 86400),
       window_s=st.integers(0, 6 * 3600), policy=st.sampled_from(["skip", "run_once", "run_all"]),
       same_node=st.booleans())
def test_misfire_policies_exact_after_downtime(spec, start, up_s, down_s, window_s, policy, same_node):
    t = task(spec, misfire=policy, catchup_window=window_s)
    a = Scheduler("a")
    a.set_task(t, now=start)
    a.set_owned("t", True, start)
    record = []
    zero = iter(lambda: 0.0, None)
    drive(a, start, start + up_s, zero, record, limit=10**6)
    replicated = max([e.slot for _, e in record if isinstance(e, Advance)], default=None)
    a.set_owned("t", False, start + up_s)

    back = start + up_s + down_s
    if same_node:
        b = a
        if replicated is not None:
            b.update_control("t", last_fired_slot=replicated)
    else:
        b = Scheduler("b")
        b.set_task(t, last_fired_slot=replicated, now=start)
    b.set_owned("t", True, back)
    effects = b.tick(back)

    cursor = replicated if replicated is not None else start - 1
    horizon = back - max(window_s, 2.0)  # on-time slots never expire
    first = croniter_slots(spec, cursor, back)[:1] if spec.startswith("@every") else \
        [s for s in [int(croniter(spec, float(cursor), implement_cron_bug=True).get_next(float))] if s <= back]
    expired = [x for x in first if x < horizon]
    due = croniter_slots(spec, max(cursor, math.ceil(horizon) - 1), back)
    on_time = [x for x in due if back - x <= 2.0]
    missed = [x for x in due if back - x > 2.0]
    if len(missed) > b.max_catchup_slots:
        return
    fires = [(e.slot, e.reason) for e in effects if isinstance(e, Fire)]
    skips = [(e.slot, e.reason) for e in effects if isinstance(e, SlotSkipped)]
    want_fires = []
    want_skips = [(expired[0], "expired")] if expired else []
    if policy == "skip":
        want_skips += [(x, "misfire_skip") for x in missed]
    elif policy == "run_once":
        want_skips += [(x, "coalesced") for x in missed[:-1]]
        want_fires += [(x, "catchup") for x in missed[-1:]]
    else:
        want_fires += [(x, "catchup") for x in missed]
    want_fires += [(x, "due") for x in on_time]
    assert fires == want_fires
    assert skips == want_skips
    # Then it carries on: the next slot fires on time and nothing is repeated.
    if spec.startswith("@every"):
        nxt = croniter_slots(spec, back, back + 7200)[:1]
    else:
        nxt = [int(croniter(spec, float(back), implement_cron_bug=True).get_next(float))]
    if nxt:
        later = b.tick(nxt[0])
        assert [(e.slot, e.reason) for e in later if isinstance(e, Fire)] == [(nxt[0], "due")]


@given(specs=st.lists(st.one_of(CRON, EVERY, st.sampled_from(["@every 1s", "@every 2s"])), min_size=1, max_size=6),
       jitters=st.lists(st.sampled_from([0, 1, 30, 600]), min_size=1, max_size=6),
       overlaps=st.lists(st.sampled_from(["allow", "forbid", "buffer_one", "replace"]), min_size=1, max_size=6),
       start=st.integers(T2020, T2030),
       steps=st.lists(st.tuples(st.floats(0, 200), st.integers(0, 5), st.booleans()), min_size=1, max_size=25),
       limit=st.integers(1, 4))
def test_tick_in_batches_decides_exactly_as_one_tick(specs, jitters, overlaps, start, steps, limit):
    """tick(now, limit=k) called until next_deadline() > now == one tick(now)."""
    a, b = Scheduler("n1"), Scheduler("n1")
    ids = [f"t{i}" for i in range(len(specs))]
    for i, spec in enumerate(specs):
        t = task(spec, id=ids[i], jitter=jitters[i % len(jitters)], overlap=overlaps[i % len(overlaps)])
        for s in (a, b):
            s.set_task(t, now=start)
            s.set_owned(t.id, True, start)
    now = float(start)
    for n_step, (dt, who, finish) in enumerate(steps):
        now += dt
        one = a.tick(now)
        batched = []
        for _ in range(10_000):
            batched += b.tick(now, limit=limit)
            dl = b.next_deadline()
            if dl is None or dl > now:
                break
        assert batched == one, (n_step, now)
        assert a.next_deadline() == b.next_deadline()
        for s in (a, b):
            for e in one:
                if isinstance(e, Fire):
                    s.run_started(e.task_id, e.slot, f"r{e.slot}", now)
                    if finish:
                        s.run_finished(e.task_id, f"r{e.slot}", now)
            tid = ids[who % len(ids)]
            s.set_owned(tid, not finish or who % 2 == 0, now)
