"""The node core (node/core.py) driven by a small in-memory harness: N cores,
a synchronous network, a fake executor, a claim table with outages, virtual
time. The simulator drives the same core at scale (tests/test_sim_app.py);
these tests pin single rules: takeover catch-up, claims waiting for etcd,
handoff batching, owner loss, run records, shutdown."""
from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from node.core import NodeCore
from node.core_effects import CancelRun, Claim, Note, Reclaim, Request, StartRun
from node.knobs import NodeKnobs
from node.schedule.explain import explain
from node.state.store import Store
from node.tasks.model import Task

T0 = 1_800_000_000.0


def tick_task(tid="tick", **kw):
    d = {"id": tid, "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "60s",
         "command": {"type": "shell", "run": "true"}}
    d.update(kw)
    return d


class Harness:
    """Cores on a synchronous network; ``run(until)`` advances virtual time."""

    def __init__(self, names, *, fencing=False, seed=0, run_s=0.05, knobs=None):
        self.names = list(names)
        self.now = T0
        self.knobs = knobs or NodeKnobs.local()
        self.fencing = fencing
        self.rng = random.Random(seed)
        self.run_s = run_s
        self.cores: dict[str, NodeCore] = {}
        self.up: set[str] = set()
        self.ledger: list[tuple] = []          # (task, slot, node, token, reason)
        self.notes: list[tuple[str, Note]] = []
        self.requests: list[tuple[str, Request]] = []
        self.timers: list = []
        self.seq = 0
        self.claims: dict[tuple, tuple] = {}   # (task, slot) -> (node, run_id, token)
        self.revision = 0
        self.etcd_down_until = 0.0
        self.cut: set[frozenset] = set()       # links that drop requests
        self.disks: dict[str, list] = {}
        self.runs: dict[tuple[str, str], float] = {}
        self.fail_status: dict[str, tuple[str, str]] = {}   # task -> (status, error)
        self.sessions: set[str] = set()        # etcd sessions still held by processes gone
        for n in self.names:
            self.boot(n)

    # -- world ---------------------------------------------------------------------
    def view(self):
        return [(n, "alive" if n in self.up else "dead", {}) for n in self.names]

    def boot(self, n):
        store = Store(n)
        if self.disks.get(n):
            store.load(self.disks[n])
        core = NodeCore(n, store, knobs=self.knobs, rng=random.Random(f"{n}-{self.seq}"), fencing=self.fencing)
        self.cores[n] = core
        self.up.add(n)
        self.carry(n, core.start(self.now, joined=len(self.up) > 1 or len(self.names) == 1))
        for m in sorted(self.up):
            self.carry(m, self.cores[m].members_changed(self.view(), self.now, kind="join", member=n))

    def kill(self, n):
        self.up.discard(n)
        self.disks[n] = [(k, v) for k, v in self.cores[n].store.drain_dirty()] + self.disks.get(n, [])
        self.runs = {k: v for k, v in self.runs.items() if k[0] != n}

    def declare_dead(self, n):
        for m in sorted(self.up):
            self.carry(m, self.cores[m].members_changed(self.view(), self.now, kind="dead", member=n))

    def apply(self, n, defs):
        _, effs = self.cores[n].apply_tasks([Task.from_dict(d) for d in defs], self.now)
        self.carry(n, effs)

    def timer(self, at, *what):
        self.seq += 1
        heapq.heappush(self.timers, (at, self.seq) + what)

    # -- effects -------------------------------------------------------------------
    def carry(self, n, effects):
        work = deque((n, e) for e in effects)
        while work:
            n, e = work.popleft()
            if n not in self.up:
                continue
            core = self.cores[n]
            tp = type(e)
            if tp is Note:
                self.notes.append((n, e))
            elif tp is Request:
                self.requests.append((n, e))
                if e.peer in self.up and frozenset((n, e.peer)) not in self.cut:
                    reply, effs = self.cores[e.peer].serve(n, e.data, self.now)
                    work.extend((e.peer, x) for x in effs)
                    work.extend((n, x) for x in core.request_answered(e.xid, reply, self.now))
                else:
                    work.extend((n, x) for x in core.request_failed(e.xid, self.now, "down"))
            elif tp is StartRun:
                have = self.claims.get((e.task.id, e.slot))
                if have is not None and have[:2] == (n, e.run_id):
                    self.claims[(e.task.id, e.slot)] = have[:3] + (True,)   # fencing Rule 9's mark
                self.ledger.append((e.task.id, e.slot, n, e.token, e.reason))
                work.extend((n, x) for x in core.attempt_started(e.run_id, 1, self.now))
                self.runs[(n, e.run_id)] = self.now + self.run_s
                self.timer(self.now + self.run_s, "finish", n, e.run_id, e.task.id)
            elif tp is CancelRun:
                if self.runs.pop((n, e.run_id), None) is not None:
                    work.extend((n, x) for x in core.run_ended(e.run_id, self.now, cancelled_attempt=1))
            elif tp in (Claim, Reclaim):
                outcome, token = self.claim(n, e)
                have = self.claims.get((e.task_id, e.slot))
                holder = (have[0], have[1], have[3]) if outcome == "lost" and have else None
                work.extend((n, x) for x in core.claim_answered(e.task_id, e.slot, e.run_id, outcome,
                                                                 token, self.now, holder=holder))

    def claim(self, n, e):
        if self.now < self.etcd_down_until:
            return "unavailable", None
        key = (e.task_id, e.slot)
        have = self.claims.get(key)
        if type(e) is Reclaim:
            if have is None or have[0] != e.dead or (e.unstarted and have[3]):
                return "lost", None
            if e.dead != n and (e.dead in self.up or e.dead in self.sessions):
                return "claimer_alive", None       # its etcd session holds while it is up
        elif have is not None:
            return ("won", have[2]) if have[:2] == (n, e.run_id) else ("lost", None)
        self.revision += 1
        self.claims[key] = (n, e.run_id, self.revision, False)   # (node, run id, token, started)
        return "won", self.revision

    # -- time ----------------------------------------------------------------------
    def run(self, until):
        for _ in range(1_000_000):
            cands = [(self.cores[n].next_deadline(), n) for n in sorted(self.up)]
            cands = [(d, n) for d, n in cands if d is not None]
            best = min(cands) if cands else (None, None)
            t_timer = self.timers[0][0] if self.timers else None
            nxt = min(x for x in (best[0], t_timer, until) if x is not None)
            if nxt >= until and (t_timer is None or t_timer >= until):
                self.now = max(self.now, until)
                return
            self.now = max(self.now, nxt)
            if t_timer is not None and t_timer <= self.now:
                _, _, kind, n, run_id, tid = heapq.heappop(self.timers)
                if kind == "finish" and self.runs.pop((n, run_id), None) is not None and n in self.up:
                    status, error = self.fail_status.get(tid, ("succeeded", None))
                    self.carry(n, self.cores[n].attempt_finished(run_id, 1, status, self.now, error=error))
                    self.carry(n, self.cores[n].run_ended(run_id, self.now))
                continue
            self.carry(best[1], self.cores[best[1]].tick(self.now))
        raise AssertionError("no progress")

    # -- checks --------------------------------------------------------------------
    def owner(self, tid):
        return self.cores[sorted(self.up)[0]].ring.owner(tid)

    def slots(self, tid):
        return [s for t, s, *_ in self.ledger if t == tid]

    def note_events(self, event):
        return [(n, e.fields) for n, e in self.notes if e.event == event]


def assert_every_slot_once(h, tid, start, end):
    got = h.slots(tid)
    dup = sorted({s for s in got if got.count(s) > 1})
    missing = [s for s in range(int(start), int(end)) if s not in got]
    assert not dup, f"slots fired twice: {dup[:10]}"
    assert not missing, f"slots missed: {missing[:10]} (skips: {h.note_events('slot_skipped')[:5]})"


# ------------------------------------------------------------------- the two runs

def test_takeover_with_run_all_fires_every_missed_slot_once():
    """SIGKILL the owner; the new owner declares it dead 4 s later and runs
    every missed slot (run_all, window 60 s), oldest first, one at a time."""
    h = Harness(["n1", "n2", "n3"], seed=1)
    h.apply("n1", [tick_task()])
    h.run(T0 + 12.5)
    victim = h.owner("tick")
    h.kill(victim)
    h.run(T0 + 16.5)
    h.declare_dead(victim)
    h.run(T0 + 40)
    assert h.owner("tick") != victim
    assert_every_slot_once(h, "tick", T0 + 2, T0 + 39)
    assert not [f for _, f in h.note_events("slot_skipped") if f["reason"] == "overlap_forbid"]


def test_claims_wait_for_etcd_and_no_slot_is_lost():
    """With fencing, etcd down for 6 s: the slot waiting for its claim keeps
    its turn, later slots wait behind it, all run once etcd is back; tokens
    grow with the slot."""
    h = Harness(["n1", "n2", "n3"], fencing=True, seed=2)
    h.apply("n1", [tick_task()])
    h.run(T0 + 10.2)
    h.etcd_down_until = T0 + 16.2
    h.run(T0 + 30)
    assert_every_slot_once(h, "tick", T0 + 2, T0 + 29)
    fired = sorted((s, tok) for t, s, _, tok, _ in h.ledger if t == "tick")
    tokens = [tok for _, tok in fired]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_takeover_and_etcd_outage_together():
    h = Harness(["n1", "n2", "n3"], fencing=True, seed=3)
    h.apply("n1", [tick_task()])
    h.run(T0 + 12.5)
    victim = h.owner("tick")
    h.kill(victim)
    h.etcd_down_until = T0 + 19
    h.run(T0 + 16.5)
    h.declare_dead(victim)
    h.run(T0 + 50)
    assert_every_slot_once(h, "tick", T0 + 2, T0 + 49)


@pytest.mark.parametrize("misfire", ["skip", "run_once", "run_all"])
def test_etcd_outage_goes_by_misfire_policy(misfire):
    """While etcd is down the first slot's claim waits and the next 5 slots
    wait behind it (pending is not an overlap); once it is released late,
    the waiting slots go by misfire: skip none, run_once the latest, run_all all."""
    h = Harness(["n1"], fencing=True, seed=4)
    h.apply("n1", [tick_task(misfire=misfire, catchup_window="30s")])
    h.run(T0 + 5.5)
    h.etcd_down_until = T0 + 12.0
    before = len(h.slots("tick"))
    h.run(T0 + 12.9)
    after = sorted(h.slots("tick"))[before:]
    # slot T0+6 keeps its turn (claimed when etcd is back at T0+12), then the
    # line 7..11: 7-10 are late past the 2 s grace by then, 11 is on time
    assert T0 + 6 in after
    late = [s for s in after if T0 + 7 <= s <= T0 + 10]
    assert len(late) == {"skip": 0, "run_once": 1, "run_all": 4}[misfire], after
    if misfire == "run_once":
        assert late == [T0 + 10]            # the latest late slot
    assert T0 + 11 in after                 # on time when released: fires
    assert not [f for _, f in h.note_events("slot_skipped") if f["reason"] == "overlap_forbid"]


# ------------------------------------------------------------------- rules

def test_handoffs_are_batched_per_peer():
    """A node that takes over 60 tasks asks each replica once, not once per task."""
    h = Harness(["n1", "n2", "n3", "n4"], seed=5)
    h.apply("n1", [tick_task(f"t{i:02d}", schedule="@every 1h") for i in range(60)])
    h.run(T0 + 3)
    h.requests.clear()
    h.kill("n2")
    h.declare_dead("n2")
    handoffs = [(n, r.peer) for n, r in h.requests if r.kind == "handoff"]
    per_node = {}
    for n, peer in handoffs:
        per_node.setdefault(n, set()).add(peer)
    assert handoffs, "nobody took anything over"
    for n, peers in per_node.items():
        exchanges = [1 for m, r in h.requests if m == n and r.kind == "handoff" and r.data]
        # an exchange is a few round trips (catalogue, runs); a handful per peer
        assert len(exchanges) <= 12 * len(peers), (n, len(exchanges), peers)
    h.run(T0 + 4)
    for n in ("n1", "n3", "n4"):
        assert not h.cores[n].handoff_pending


def test_handoff_with_no_replica_answering_takes_over_and_says_why():
    h = Harness(["n1", "n2", "n3"], seed=6)
    h.apply("n1", [tick_task(schedule="@every 1h")])
    h.run(T0 + 2)
    owner = h.owner("tick")
    new = h.cores[owner].ring.owners("tick")[1]     # the next in the preference list
    # the new owner can reach nobody: every handoff exchange fails at once
    for n in h.names:
        if n != new:
            h.cut.add(frozenset((new, n)))
    h.kill(owner)
    h.declare_dead(owner)
    notes = [f for n, f in h.note_events("handoff_timeout") if n == new]
    assert notes and notes[0]["why"] == "failed: no replica answered"
    assert notes[0]["asked"]
    assert not h.cores[new].handoff_pending
    assert explain(h.cores[new].scheduler, "tick", h.now)["handoff_ready"]


def test_a_node_shutting_down_takes_nothing_over():
    h = Harness(["n1", "n2", "n3"], seed=7)
    h.apply("n1", [tick_task(schedule="@every 1h")])
    h.run(T0 + 2)
    owner = h.owner("tick")
    for n in h.names:
        if n != owner:
            h.carry(n, h.cores[n].begin_shutdown(h.now))
    h.kill(owner)
    h.declare_dead(owner)
    h.run(T0 + 10)
    for n in h.names:
        if n != owner:
            assert not h.cores[n].handoff_pending
            assert not h.note_events("handoff_timeout")


def test_dead_owners_running_run_is_marked_lost_and_rerun():
    h = Harness(["n1", "n2", "n3"], seed=8, run_s=30.0)
    h.apply("n1", [tick_task(schedule="@every 1h", overlap="allow")])
    h.run(T0 + 2)
    owner = h.owner("tick")
    h.carry(owner, h.cores[owner].run_now("tick", h.now)[2])
    slot = h.ledger[-1][1]
    h.run(h.now + 1)
    h.kill(owner)
    h.declare_dead(owner)
    new = h.owner("tick")
    recs = h.cores[new].store.runs("tick")
    assert any(r["status"] == "lost" and r["node"] == owner for r in recs)
    assert h.ledger[-1][:3] == ("tick", slot, new) and h.ledger[-1][4] == "rerun_owner_loss"


def test_a_run_that_cannot_start_ends_as_error_with_its_reason():
    h = Harness(["n1"], seed=9)
    h.fail_status["tick"] = ("error", "exec: /nonexistent/binary: No such file or directory")
    h.apply("n1", [tick_task()])
    h.run(T0 + 4)
    recs = h.cores["n1"].store.runs("tick")
    assert recs and all(r["status"] == "error" for r in recs), recs
    assert "No such file" in recs[-1]["error"]
    notes = [f for _, f in h.note_events("run_finished")]
    assert notes[-1]["status"] == "error" and "No such file" in notes[-1]["error"]


def test_claim_answered_after_close_runs_does_not_start():
    h = Harness(["n1"], fencing=True, seed=10)
    h.apply("n1", [tick_task()])
    core = h.cores["n1"]
    h.etcd_down_until = T0 + 100
    h.run(T0 + 1.5)
    assert core.claims_in_flight() == 0 and core._lines.get("tick") or core._backoff
    n_before = len(h.ledger)
    h.carry("n1", core.begin_shutdown(h.now))
    h.carry("n1", core.close_runs(h.now))
    h.etcd_down_until = 0
    h.run(T0 + 5)
    assert len(h.ledger) == n_before


def test_same_seed_same_ledger():
    def go():
        h = Harness(["n1", "n2", "n3"], fencing=True, seed=11)
        h.apply("n1", [tick_task(), tick_task("other", schedule="@every 2s")])
        h.run(T0 + 12.5)
        v = h.owner("tick")
        h.kill(v)
        h.run(T0 + 15)
        h.declare_dead(v)
        h.run(T0 + 30)
        return h.ledger
    assert go() == go()


def test_a_node_whose_clock_most_peers_disagree_with_owns_nothing():
    """Clock quorum: a node restarted with its clock 30 s ahead measures every
    peer 30 s behind; it is the one off, so it owns nothing (the peers, which
    measure it off, leave it out too) instead of owning everything."""
    from node.state.store import Store
    from node.tasks.model import Task

    now = 1_800_000_000.0
    view = [("a", "alive", {}), ("b", "alive", {}), ("c", "alive", {})]
    tasks = [Task.from_dict({"id": f"t{i}", "schedule": "@every 1s", "command": {"type": "exec", "argv": ["true"]}})
             for i in range(30)]
    core = NodeCore("a", Store("a"))
    core.start(now, joined=True)
    core.members_changed(view, now)
    core.apply_tasks(tasks, now)
    assert core.ring.tasks_of("a")
    for peer in ("b", "c"):                       # both peers 30 s behind our clock
        core.skew.observe(peer, now, now - 30.0, now + 0.01)
    core._skewed = frozenset(core.skew.skewed(core.knobs.max_skew_s))
    core.members_changed(view, now)
    assert core.clock_suspect is True
    assert all(core.ring.owner(t.id) != "a" for t in tasks)
    # one peer off out of two measured is not a quorum: that peer is left out
    core2 = NodeCore("a", Store("a"))
    core2.start(now, joined=True)
    core2.members_changed(view, now)
    core2.apply_tasks(tasks, now)
    core2.skew.observe("b", now, now - 30.0, now + 0.01)
    core2.skew.observe("c", now, now, now + 0.01)
    core2._skewed = frozenset(core2.skew.skewed(core2.knobs.max_skew_s))
    core2.members_changed(view, now)
    assert core2.clock_suspect is False
    assert all(core2.ring.owner(t.id) != "b" for t in tasks)


def test_a_refill_goes_page_after_page_not_a_page_per_round():
    """A replica missing 30 MB of run history gets it within the first
    anti-entropy round: an exchange that moved a full page is followed at
    once by the next (node/state/exchange.py pages of 1 MiB). A page per round took
    several seconds of rounds here."""
    h = Harness(["a", "b"])
    h.apply("a", [tick_task(f"r{i}", schedule="once:2099-01-01T00:00:00Z") for i in range(6)])
    h.run(T0 + 3)
    a, b = h.cores["a"], h.cores["b"]
    pad = "x" * 20_000
    for i in range(6):
        for r in range(250):
            a.store.put_run({"task_id": f"r{i}", "run_id": f"{r}-a-{r:08x}.1", "slot": r, "status": "succeeded",
                             "attempt": 1, "output": pad})
    tids = [f"r{i}" for i in range(6)]
    assert a.store.digest_root("runs", tids) != b.store.digest_root("runs", tids)
    # the first round comes within ae_interval_s x 1.5 (1.5 s in the local profile)
    h.run(T0 + 3 + 1.6 * h.knobs.ae_interval_s)
    assert a.store.digest_root("runs", tids) == b.store.digest_root("runs", tids)


# ------------------------------------------------- fencing Rule 9 (started mark)

def _held_unstarted(h, tid, slot, holder):
    """``holder`` won the claim of ``slot`` and stopped before marking it
    started (as a process SIGKILLed between its claim and its run)."""
    h.revision += 1
    h.claims[(tid, slot)] = (holder, f"{slot}-{holder}-dead", h.revision, False)


def test_a_claim_whose_holder_died_before_starting_is_reclaimed_and_run():
    h = Harness(["n1", "n2", "n3"], fencing=True, seed=11)
    h.apply("n1", [tick_task()])
    h.run(T0 + 3)
    owner = h.owner("tick")
    slot = int(h.now) + 1
    _held_unstarted(h, "tick", slot, owner)
    h.kill(owner)
    h.run(slot + 2)            # the slot comes while the owner is not yet declared dead
    h.declare_dead(owner)
    h.run(slot + 30)
    new = h.owner("tick")
    assert [x for x in h.ledger if x[1] == slot] and h.ledger[-1][2] == new
    assert_every_slot_once(h, "tick", T0 + 1, slot + 29)
    held = [f for _, f in h.note_events("claim") if f.get("result") == "held_unstarted"]
    assert held and held[0]["slot"] == slot and owner in held[0]["detail"]
    assert h.cores[new].stats["reclaims_unstarted"] >= 1


def test_an_earlier_boots_unstarted_claim_is_retaken_at_once():
    h = Harness(["n1"], fencing=True, seed=12)
    h.apply("n1", [tick_task()])
    h.run(T0 + 3)
    slot = int(h.now) + 1
    _held_unstarted(h, "tick", slot, "n1")
    h.kill("n1")
    h.now = slot + 5
    h.boot("n1")
    h.run(slot + 10)
    assert_every_slot_once(h, "tick", T0 + 1, slot + 9)


@pytest.mark.parametrize("misfire", ["run_all", "skip"])
def test_a_live_holders_unstarted_claim_is_not_taken(misfire):
    """The holder is alive (its session holds): the next owner waits, then
    leaves the slot: the holder runs it or gives it up. ``skip`` waits no
    longer than its misfire window."""
    h = Harness(["n1", "n2", "n3"], fencing=True, seed=13)
    window = "60s" if misfire == "run_all" else "0s"
    h.apply("n1", [tick_task(misfire=misfire, catchup_window=window, overlap="allow")])
    h.run(T0 + 3)
    owner = h.owner("tick")
    other = next(n for n in sorted(h.up) if n != owner)
    slot = int(h.now) + 1
    _held_unstarted(h, "tick", slot, other)
    h.run(slot + 40)
    assert not [x for x in h.ledger if x[1] == slot]
    skipped = [f for _, f in h.note_events("slot_skipped") if f["slot"] == slot]
    assert skipped and skipped[0]["reason"] == "reclaim_claimer_alive"
    given_up = [t for t, (n, e) in enumerate(h.notes) if e.event == "slot_skipped"
                and e.fields["slot"] == slot]
    assert given_up
    if misfire == "skip":
        # waited no longer than its misfire window (the next slots were not held)
        assert [x for x in h.ledger if x[1] == slot + 1]
    assert_every_slot_once(h, "tick", slot + 1, slot + 39)


def test_leaving_reports_the_slots_it_leaves_to_the_next_owner():
    """Our own ``left`` event stops claiming; the slots waiting for etcd
    come out as skipped (``shutting_down``), not silently dropped."""
    h = Harness(["n1"], fencing=True, seed=14)
    h.apply("n1", [tick_task()])
    h.etcd_down_until = T0 + 100
    h.run(T0 + 3.5)
    core = h.cores["n1"]
    assert core._lines.get("tick") or core._inflight
    effs = core.members_changed([("n1", "left", {})], h.now, kind="left", member="n1")
    left = [e.fields for e in effs if type(e) is Note and e.event == "slot_skipped"]
    assert left and all(f["reason"] == "shutting_down" for f in left)
    assert core.stopping


def test_a_rerun_is_dropped_when_the_lost_runs_own_end_arrives():
    """The owner marks a dead node's run lost and waits for its etcd session
    before rerunning; the runner's own record (it had finished) arrives
    first: ``succeeded`` wins over ``lost`` and the slot is not run again."""
    h = Harness(["n1", "n2", "n3"], fencing=True, seed=15, run_s=30.0)
    h.apply("n1", [tick_task(schedule="@every 1h", overlap="allow")])
    h.run(T0 + 2)
    owner = h.owner("tick")
    h.carry(owner, h.cores[owner].run_now("tick", h.now)[2])
    slot = h.ledger[-1][1]
    h.run(h.now + 1)
    core = h.cores[owner]
    run_id = next(r for r, run in core.running.items() if run.slot == slot)
    done = core._record_of(core.running[run_id], run_id, 1, {
        "status": "succeeded", "exit_code": 0, "started": h.now - 1, "finished": h.now, "output": ""})
    h.kill(owner)
    h.sessions.add(owner)                  # its etcd session outlives it for a while
    h.declare_dead(owner)
    new = h.owner("tick")
    h.run(h.now + 2)
    assert any(r["status"] == "lost" for r in h.cores[new].store.runs("tick"))
    # its finished record comes back (a restart with its disk, anti-entropy)
    h.cores[new].store.merge(core.store.put_run(done))
    h.sessions.discard(owner)
    h.run(h.now + 30)
    assert len([x for x in h.ledger if x[1] == slot]) == 1, h.ledger
    recs = [r for r in h.cores[new].store.runs("tick") if r["slot"] == slot]
    assert [r["status"] for r in recs] == ["succeeded"]
    assert h.cores[new].stats["reruns_dropped"] == 1
