"""Stateful test: writes, anti-entropy syncs, persists, crashes and restarts.

A write is acknowledged only after its node drained and "persisted" its
dirty rows (as the daemon must do); sync results are persisted lazily, so a
crash may lose them (peers still have them). Invariants:
- no acknowledged write is lost: every acknowledged task value is still a
  sibling somewhere in the cluster, unless a later acknowledged write's
  context covered it; every acknowledged fired slot is <= the writer's
  register;
- causality never regresses below what a node persisted (version vectors and
  max registers only grow);
teardown syncs everyone and asserts all replicas are byte-identical, run
outputs included (written to the node's disk as ``out/`` rows, read back
from it, reloaded with the records at a restart).
"""
from __future__ import annotations

import msgpack
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from node.state import versions as dv
from node.state.store import Store

NAMES = ["r0", "r1", "r2"]
KEYS = ["k0", "k1", "k2"]
STATUSES = ["pending", "running", "succeeded", "failed"]


def exchange(a: Store, b: Store, scope="catalogue", tasks=None) -> None:
    msg = a.start_exchange(scope, tasks)
    sides = [b, a]
    for i in range(10):
        res = sides[i % 2].handle_exchange(msg, tasks)
        if res.reply is None:
            return
        msg = res.reply
    raise AssertionError("exchange did not end")


def vv_of(store: Store, key: str) -> dict[str, int]:
    v = store.get_task(key)
    return {} if v is None else dict(dv.vv_from_wire(msgpack.unpackb(v.context)))


class Cluster(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.disk: dict[str, dict[str, bytes]] = {n: {} for n in NAMES}
        self.stores = {n: Store(n, output_reader=self.disk[n].get) for n in NAMES}
        self.acked: list[tuple[str, str, int, int, dict]] = []  # key, actor, counter, value id, ctx
        self.fired: dict[tuple[str, str], int] = {}
        self.persisted_vv: dict[tuple[str, str], dict[str, int]] = {}
        self.seq = 0
        self.clock = 0.0

    def persist(self, n: str) -> None:
        for k, v in self.stores[n].drain_dirty():
            if v is None:
                self.disk[n].pop(k, None)
            else:
                self.disk[n][k] = v
        for key in KEYS:
            self.persisted_vv[(n, key)] = vv_of(self.stores[n], key)

    @rule(n=st.sampled_from(NAMES), key=st.sampled_from(KEYS), blind=st.booleans())
    def write(self, n, key, blind):
        s = self.stores[n]
        self.seq += 1
        self.clock += 1.0
        cur = s.get_task(key)
        ctx = None if blind or cur is None else cur.context
        ctx_vv = {} if ctx is None else dict(dv.vv_from_wire(msgpack.unpackb(ctx)))
        s.put_task(key, {"id": self.seq}, ctx, self.clock)
        self.persist(n)  # acknowledge only after persisting
        counter = vv_of(s, key)[n]
        self.acked.append((key, n, counter, self.seq, ctx_vv))

    @rule(n=st.sampled_from(NAMES), key=st.sampled_from(KEYS), slot=st.integers(0, 50))
    def fire(self, n, key, slot):
        if self.stores[n].advance_fired(key, slot):
            self.persist(n)
            self.fired[(n, key)] = max(self.fired.get((n, key), 0), slot)

    @rule(n=st.sampled_from(NAMES), key=st.sampled_from(KEYS), run=st.integers(0, 3),
          status=st.sampled_from(STATUSES), output=st.sampled_from(["", "out-a", "out-b " * 50]))
    def run(self, n, key, run, status, output):
        self.stores[n].put_run({"task_id": key, "run_id": f"r{run}", "slot": run, "node": n, "attempt": 1,
                                "status": status, "exit_code": None, "started": float(run), "finished": None,
                                "fencing_token": None, "output": output})
        self.persist(n)

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def sync(self, a, b):
        if a != b:
            exchange(self.stores[a], self.stores[b])
            exchange(self.stores[a], self.stores[b], "runs", KEYS)

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES), key=st.sampled_from(KEYS))
    def push(self, a, b, key):
        self.stores[b].merge(self.stores[a].entries([f"task/{key}", f"ctl/{key}"]))

    @rule(n=st.sampled_from(NAMES))
    def persist_rule(self, n):
        self.persist(n)

    @rule(n=st.sampled_from(NAMES))
    def crash_restart(self, n):
        fresh = Store(n, output_reader=self.disk[n].get)
        fresh.load(sorted(self.disk[n].items()))
        assert fresh.drain_dirty() == []
        self.stores[n] = fresh

    @invariant()
    def no_acknowledged_write_lost(self):
        if not hasattr(self, "stores"):
            return
        for key in KEYS:
            clocks = [self.stores[n]._state.get(f"task/{key}", ((), ())) for n in NAMES]
            merged = dv.sync_all(clocks)
            present = {v["def"]["id"] for v in dv.values(merged) if v["def"]}
            for k, actor, counter, vid, _ in self.acked:
                if k != key:
                    continue
                # the writer itself still covers its own dot
                assert vv_of(self.stores[actor], key).get(actor, 0) >= counter
                superseded = any(
                    k2 == key and ctx.get(actor, 0) >= counter for k2, _, _, _, ctx in self.acked
                )
                assert vid in present or superseded, (key, vid)
        for (n, key), slot in self.fired.items():
            assert (self.stores[n].control(key).last_fired_slot or 0) >= slot

    @invariant()
    def causality_never_regresses(self):
        if not hasattr(self, "stores"):
            return
        for (n, key), pvv in self.persisted_vv.items():
            cur = vv_of(self.stores[n], key)
            for actor, c in pvv.items():
                assert cur.get(actor, 0) >= c, (n, key, actor)

    def teardown(self):
        if not hasattr(self, "stores"):
            return
        for _ in range(2):
            for a in NAMES:
                for b in NAMES:
                    if a != b:
                        exchange(self.stores[a], self.stores[b])
                        exchange(self.stores[a], self.stores[b], "runs", KEYS)
        ref = self.stores[NAMES[0]]
        for n in NAMES[1:]:
            assert self.stores[n].entries(self.stores[n].keys()) == ref.entries(ref.keys())
        for k in ref.keys():
            if k.startswith("run/"):
                _, tid, rid = k.split("/")
                outs = {self.stores[n].run_output(tid, rid) for n in NAMES}
                assert len(outs) == 1 and None not in outs, (k, outs)


Cluster.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestCluster = Cluster.TestCase
