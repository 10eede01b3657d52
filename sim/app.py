"""The scheduler, store and ring cores on simulated nodes (fires, fencing, replication).

:class:`SchedulerApp` is one node's application layer as ``node/node.py``
wires it, without trio: a ``node.ring.Ring``, a ``node.store.Store`` and a
``node.scheduler.Scheduler`` fed by the node's SWIM core (membership events,
user messages) and its own timers; a fake executor that records every fire in
a cluster-wide ledger and "runs" for ``run_duration_s`` virtual seconds.
:class:`AppCluster` is a ``sim.cluster.Cluster`` whose nodes carry one
``SchedulerApp`` each, plus the things that live outside a node: modelled
anti-entropy streams, per-node "disks" and an optional shared
``sim.etcd_model.EtcdModel``.

Rules mirrored from ``node/node.py`` (no decision is made here that the real
shell does not make):

1. Eligible members = alive and suspect members of the node's SWIM view (the
   real node also drops members with skewed clocks; not modelled). A node
   that boots without knowing another member owns nothing until it hears a
   JOIN of one, or ``boot_grace_s`` passes (then it owns alone), as
   ``Node._eligible``/``_boot_hold`` do.
2. A task newly owned with other replicas is held (``handoff_ready=False``)
   until an exchange with one of those replicas completes, or
   ``handoff_timeout_s`` passes.
3. Every local change is pushed at once: catalogue/control entries to every
   alive or suspect member, run records to the task's preference list. Pushes
   are gossip user messages (``Swim.send_user``: sealed, size-limited, lossy),
   one entry per datagram. Anti-entropy every ``ae_interval_s * U(0.5, 1.5)``
   with one random alive member repairs the rest: the store's exchange
   protocol (catalogue, then shared run records) over a modelled stream.
4. ``Advance`` -> ``store.advance_fired``. A member's DEAD/LEFT event: the
   unfinished (``running``) run records of tasks we now own that the dead
   member wrote become ``lost`` and go to ``scheduler.unfinished_run``; the
   dead member is remembered as the claimer of that slot.
5. Fencing (optional): before a fire, claim ``fire/<task>/<slot>``
   (create-if-absent) in the shared model; only the winner fires. A fire
   with reason ``rerun_owner_loss`` and a remembered dead claimer re-claims
   instead, planned by ``node.fencing.plan_reclaim`` (compare on mod
   revision; only if the holder is that dead node and its run id is the lost
   run's; at most ``MAX_RECLAIMS``; and only once
   the dead claimer's session is gone: while it holds, retry every
   ``claim_retry_s`` for ``1.5 * session_ttl_s + 2`` s, then give up).
   Sessions: every process refreshes its real alive key
   (``node.fencing.alive_key``: ``/peerd/alive/<node>/<boot>``) every
   ``session_ttl_s / 3`` (from boot; a paused node does not), and closes it
   when it leaves. etcd unavailable: retry every ``claim_retry_s`` until the
   slot's catch-up window closes (``skip`` mode).
6. Durability: every store change is written through to the node's disk
   (``AppCluster.disks``, rows of ``store.drain_dirty``); a restarted node
   loads them (``store.load``), then marks its own ``running`` records lost
   (``_recover_own_runs``).

Clocks: the scheduler's ``now`` is the node's local, possibly skewed and
drifting clock shifted to epoch seconds: ``epoch = local + EPOCH_SHIFT``
(``EPOCH_BASE`` at the cluster's clock zero). Deadlines go back the same way.

Streams (anti-entropy): a request reaches the peer one delay later; it fails
one round trip later if the peer is not running, after the stream timeout if
the link is cut either way (checked at send and at each hop) or the peer
stays paused past the timeout; as ``Cluster._start_push_pull``. Events ride
the cluster's loop as ``K_FAULT`` entries carrying an :class:`_AppEvent`
(``_apply_fault`` is overridden to dispatch them).

Determinism: per node ``child_rng(seed, "app", name, boots)``; every set or
dict of str is sorted before it decides anything.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from gossip.effects import EventKind
from node.fencing import ClaimValue, KeyValue, alive_key, encode_claim, plan_reclaim
from node.ring import Ring
from node.scheduler import Scheduler
from node.store import Store
from node.tasks import Task, TaskError
from sim.cluster import INF, K_FAULT, Cluster, ClusterOptions, SimNode, node_names
from sim.etcd_model import EtcdModel, EtcdModelUnavailable
from sim.loop import child_rng
from sim.network import NetworkOptions

__all__ = ["AppOptions", "SchedulerApp", "AppCluster", "simulate_app", "build_app_cluster",
           "app_report", "default_tasks",
           "fire_metrics", "check_app_invariants", "EPOCH_BASE"]

EPOCH_BASE = 1_800_000_000.0
# SimNode clocks read 1000 + offset at t=0 (sim/cluster.py).
EPOCH_SHIFT = EPOCH_BASE - 1000.0
MAX_RECLAIMS = 3  # node/fencer.py default
ETCD_PREFIX = "/peerd"  # node/config.py default; alive keys are the real ones


def _claim_record(key: str, kv) -> KeyValue | None:
    """The model's claim ``(node, run_id, reclaims, dead, session)`` as the
    etcd record a real fencer reads (JSON claim value, same revisions)."""
    if kv is None:
        return None
    node, run_id, reclaims, dead, session = kv.value
    value = encode_claim(ClaimValue(node, run_id, 0, reclaims, tuple(dead), session))
    return KeyValue(key.encode(), value, kv.create_revision, kv.mod_revision, kv.version, 0)


_WAIT = object()  # a reclaim that must wait: the dead claimer's session holds
TERMINAL = ("succeeded", "failed", "timeout", "cancelled", "lost")


@dataclass(frozen=True, slots=True)
class AppOptions:
    """Application-layer knobs (defaults close to the ``local`` profile)."""

    ae_interval_s: float = 2.0
    handoff_timeout_s: float = 3.0
    run_duration_s: float = 0.2
    claim_retry_s: float = 0.5
    ae_rounds_max: int = 8
    fencing: bool = False
    session_ttl_s: float = 10.0  # node/config.py fencing_session_ttl_s
    boot_grace_s: float = 3.0    # node/node.py, local profile
    # node/node.py (as of this writing) calls Ring.set_task and ignores the
    # other tasks the load cap moved; True reproduces that (a moved task is
    # then owned by nobody until the next membership change).
    ignore_cap_moves: bool = False


@dataclass(slots=True)
class _AppEvent:
    """A stream segment in flight (rides the loop as a K_FAULT entry)."""

    kind: str           # "req" | "reply" | "fail"
    dst: int            # node index it is delivered to
    src: int            # node index it came from
    boots: int          # initiator's boots (stale replies are dropped)
    xid: int
    data: bytes | None
    started_s: float
    at_s: float = 0.0  # Fault-like sort key (never compared: seq decides)


@dataclass(frozen=True, slots=True)
class AeSend:
    """App effect: send exchange message ``data`` to ``peer`` (stream request)."""

    peer: str
    xid: int
    data: bytes


class _Session:
    __slots__ = ("peer", "xid", "scopes", "scope", "rounds", "shared")

    def __init__(self, peer: str, xid: int, scopes: list[str]) -> None:
        self.peer = peer
        self.xid = xid
        self.scopes = scopes
        self.scope = None
        self.rounds = 0
        self.shared = None


class SchedulerApp:
    """One simulated node's ring + store + scheduler + fake executor."""

    def __init__(self, cluster: "AppCluster", node: SimNode) -> None:
        self.cluster = cluster
        self.node = node
        self.name = node.name
        self.opts = cluster.app_options
        self.rng = child_rng(cluster.seed, "app", node.name, node.boots)
        self.ring = Ring(replicas=3)
        self.store = Store(node.name)
        self.scheduler = Scheduler(node.name)
        self.tasks: dict[str, Task] = {}
        self._task_defs: dict[str, dict] = {}
        self.owned: set[str] = set()
        self.handoff_pending: dict[str, float] = {}   # tid -> epoch deadline
        # (task, slot) -> (dead claimer, run id seen lost)
        self.lost_claimers: dict[tuple[str, int], tuple[str, str | None]] = {}
        self.reclaim_since: dict[tuple[str, int], float] = {}  # first try, cluster time
        self.boot_id = child_rng(cluster.seed, "boot", node.name, node.boots).getrandbits(64) or 1
        self.alive_key = alive_key(ETCD_PREFIX, node.name, self.boot_id).decode()
        self.running: dict[str, tuple[str, int, Any, float]] = {}  # run_id -> (tid, slot, token, started)
        self.timers: list[tuple[float, int, str, Any]] = []  # (epoch, seq, kind, arg)
        self._tseq = 0
        self.deferred: list = []        # scheduler effects to carry out at the next tick
        self.claim_queue: list[tuple[str, int, Any]] = []  # fires waiting for etcd
        self.session: _Session | None = None
        self.stopping = False
        self._xid = 0
        self.out: list = []             # gossip effects collected during one call
        self.stats = {"handoff_timeouts": 0, "handoffs": 0, "ae_ok": 0, "ae_failed": 0,
                      "pushes": 0, "claims_lost": 0, "claims_unavailable": 0,
                      "reclaims_won": 0, "reclaims_refused": 0, "reclaims_claimer_alive": 0,
                      "abandoned": 0}
        now = self.epoch(node.local(cluster.loop.now_s))
        core = node.core
        self.joined = bool(core and any(m.name != self.name for m in core.alive_members()))
        if not self.joined:
            self._timer(now + self.opts.boot_grace_s, "boot_grace", None)
        rows = cluster.disks.get(self.name)
        if rows:
            self.store.load(sorted(rows.items()))
            self.store.drain_dirty()
        for view in self.store.tasks():
            self._install(view, now)
        self._recompute_ownership(now)
        if cluster.etcd is not None:
            self._session_tick(now)
        self._recover_own_runs(now)
        self._timer(now + self.opts.ae_interval_s * (0.5 + self.rng.random()), "ae", None)

    # ------------------------------------------------------------- clocks
    @staticmethod
    def epoch(local: float) -> float:
        return local + EPOCH_SHIFT

    def _t(self) -> float:
        return self.cluster.loop.now_s

    def _timer(self, at: float, kind: str, arg) -> None:
        self._tseq += 1
        heapq.heappush(self.timers, (at, self._tseq, kind, arg))

    # ------------------------------------------------------------- NodeApp
    def _quiet(self) -> bool:
        # stopping: Node.shutdown ends the scheduler loop (no tick, no Advance)
        return self.stopping or self.cluster.loop.now_s >= self.cluster.quiesce_s

    def next_deadline(self) -> float:
        d = None if self._quiet() else self.scheduler.next_deadline()
        best = INF if d is None else d
        if self.timers and self.timers[0][0] < best:
            best = self.timers[0][0]
        if self.deferred:
            best = -INF
        return best - EPOCH_SHIFT

    def tick(self, local: float) -> list:
        now = self.epoch(local)
        while self.timers and self.timers[0][0] <= now:
            _, _, kind, arg = heapq.heappop(self.timers)
            if kind == "finish":
                self._finish(arg, "succeeded", now)
            elif kind == "ae":
                self._timer(now + self.opts.ae_interval_s * (0.5 + self.rng.random()), "ae", None)
                self._ae_tick(now)
            elif kind == "claims":
                self._retry_claims(now)
            elif kind == "handoff":
                self._handoff_check(now)
            elif kind == "session":
                self._session_tick(now)
            elif kind == "boot_grace" and not self.joined:
                self.joined = True  # no seed answered: own alone until one does
                self._recompute_ownership(now)
        deferred, self.deferred = self.deferred, []
        for eff in deferred:
            self._carry_out(eff, now)
        if not self._quiet():
            for eff in self.scheduler.tick(now):
                self._carry_out(eff, now)
        return self._flush()

    def on_member_event(self, event, local: float) -> list:
        now = self.epoch(local)
        if event.member.name == self.name:
            if event.kind == EventKind.LEFT:
                # our own leave: the real node drains runs first and fires
                # nothing after (Node.shutdown); stop firing here.
                self.stopping = True
                self._session_close()
            return self._flush()
        if event.kind == EventKind.JOIN:
            self.joined = True
        self._recompute_ownership(now)
        if event.kind in (EventKind.DEAD, EventKind.LEFT):
            self._owner_loss(event.member.name, now)
        return self._flush()

    def handle_user(self, sender: str, data: bytes, local: float) -> list:
        now = self.epoch(local)
        try:
            entries = msgpack.unpackb(data, raw=False)
            changed = self.store.merge(entries)
        except Exception:  # bad input never crashes; counted
            self.cluster.app_stats["bad_push"] += 1
            return self._flush()
        if changed:
            self._after_change(changed, now)
        return self._flush()

    # ------------------------------------------------------------- output
    def _flush(self) -> list:
        rows = self.store.drain_dirty()
        if rows:
            disk = self.cluster.disks.setdefault(self.name, {})
            for k, v in rows:
                if v is None:
                    disk.pop(k, None)
                else:
                    disk[k] = v
        out, self.out = self.out, []
        return out

    def _push(self, entries, targets: list[str]) -> None:
        core = self.node.core
        if core is None:
            return
        for name in targets:
            m = core.member(name)
            if m is None:
                continue
            for e in entries:
                data = msgpack.packb([[e[0], e[1]]], use_bin_type=True)
                try:
                    self.out.extend(core.send_user(m.addr, data))
                    self.stats["pushes"] += 1
                except ValueError:
                    self.cluster.app_stats["push_too_big"] += 1

    def _live_others(self) -> list[str]:
        core = self.node.core
        return [m.name for m in core.alive_members() if m.name != self.name] if core else []

    def _commit(self, entries, now: float, *, run_task: str | None = None) -> None:
        if not entries:
            return
        self._after_change([e[0] for e in entries], now)
        if run_task is not None:
            targets = [o for o in self.ring.owners(run_task) if o != self.name]
        else:
            targets = self._live_others()
        self._push(entries, targets)

    # ------------------------------------------------------------- store -> cores
    def _install(self, view, now: float) -> None:
        tid = view.task_id
        task = self.tasks.get(tid)
        if task is None or self._task_defs.get(tid) != view.value:
            try:
                task = Task.from_dict(view.value)
            except (TaskError, ValueError, TypeError):
                self.cluster.app_stats["bad_task"] += 1
                return
            self.tasks[tid] = task
            self._task_defs[tid] = view.value
            moved = self.ring.set_tasks({tid: dict(task.tags) if task.tags else None})
            ctl = self.store.control(tid)
            self.scheduler.set_task(task, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot, now=now)
            if not self.opts.ignore_cap_moves:
                # the load cap may move other tasks too: apply their ownership
                self._apply_ownership(sorted(t for t in moved if t != tid and t in self.tasks), now)
            return
        ctl = self.store.control(tid)
        self.scheduler.set_task(task, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot, now=now)

    def _after_change(self, keys, now: float) -> None:
        touched = set()
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind in ("task", "ctl"):
                touched.add(rest)
        for tid in sorted(touched):
            view = self.store.get_task(tid)
            if view is None or view.deleted or view.value is None:
                if tid in self.tasks:
                    del self.tasks[tid]
                    self._task_defs.pop(tid, None)
                    self.owned.discard(tid)
                    moved = self.ring.remove_task(tid)
                    self.scheduler.remove_task(tid)
                    if not self.opts.ignore_cap_moves:
                        self._apply_ownership(sorted(t for t in moved if t in self.tasks), now)
                continue
            self._install(view, now)
            self._apply_ownership([tid], now)

    # ------------------------------------------------------------- ownership
    def _eligible(self) -> dict[str, dict[str, str]]:
        if not self.joined:
            return {}
        out = {}
        core = self.node.core
        if core is not None:
            for m in core.alive_members():
                out[m.name] = dict(m.tags)
        out.setdefault(self.name, dict(self.node.tags))
        return out

    def _recompute_ownership(self, now: float) -> None:
        changed = self.ring.set_members(self._eligible())
        self._apply_ownership(sorted(changed), now)

    def _apply_ownership(self, task_ids, now: float) -> None:
        for tid in task_ids:
            if tid not in self.tasks:
                continue
            owners = self.ring.owners(tid)
            owned = bool(owners) and owners[0] == self.name
            others = [o for o in owners if o != self.name]
            was = tid in self.owned
            if owned:
                self.owned.add(tid)
            else:
                self.owned.discard(tid)
            if was and owned:
                continue
            if owned and others and tid not in self.handoff_pending:
                self.handoff_pending[tid] = now + self.opts.handoff_timeout_s
                self.scheduler.set_owned(tid, True, now, handoff_ready=False)
                self._timer(now + self.opts.handoff_timeout_s, "handoff", None)
                self._maybe_start_session(now)
            else:
                self.scheduler.set_owned(tid, owned, now, handoff_ready=True)
                if not owned:
                    self.handoff_pending.pop(tid, None)

    def _handoff_done(self, tid: str, now: float, *, timed_out: bool) -> None:
        self.handoff_pending.pop(tid, None)
        self.stats["handoff_timeouts" if timed_out else "handoffs"] += 1
        if tid in self.tasks and self.ring.owner(tid) == self.name:
            ctl = self.store.control(tid)
            self.scheduler.update_control(tid, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot)
            self.scheduler.set_owned(tid, True, now, handoff_ready=True)

    def _handoff_check(self, now: float) -> None:
        for tid in sorted(self.handoff_pending):
            if self.handoff_pending[tid] <= now:
                self._handoff_done(tid, now, timed_out=True)

    def _owner_loss(self, dead: str, now: float) -> None:
        for tid in self.ring.tasks_of(self.name):
            if self.ring.owner(tid) != self.name or tid not in self.tasks:
                continue
            for rec in self.store.runs(tid):
                if rec.get("node") == dead and rec.get("status") == "running":
                    self._commit(self.store.put_run(dict(rec, status="lost", finished=now)), now, run_task=tid)
                    if isinstance(rec.get("slot"), int):
                        self.lost_claimers[(tid, rec["slot"])] = (dead, rec.get("run_id"))
                    for eff in self.scheduler.unfinished_run(tid, rec, now):
                        self._carry_out(eff, now)

    def _recover_own_runs(self, now: float) -> None:
        for tid in sorted(self.tasks):
            for rec in self.store.runs(tid):
                if rec.get("node") == self.name and rec.get("status") == "running" \
                        and rec.get("run_id") not in self.running:
                    self._commit(self.store.put_run(dict(rec, status="lost", finished=now)), now, run_task=tid)
                    if isinstance(rec.get("slot"), int):
                        self.lost_claimers[(tid, rec["slot"])] = (self.name, rec.get("run_id"))
                    if self.ring.owner(tid) == self.name:
                        self.deferred.extend(self.scheduler.unfinished_run(tid, rec, now))

    # ------------------------------------------------------------- effects
    def _carry_out(self, eff, now: float) -> None:
        kind = type(eff).__name__
        if kind == "Fire":
            if self.stopping:
                self.scheduler.fire_abandoned(eff.task_id, eff.slot, now)
                return
            if self.cluster.etcd is None:
                self._start_run(eff, None, now)
            else:
                self.claim_queue.append((eff.task_id, eff.slot, eff))
                self._retry_claims(now)
        elif kind == "SlotSkipped":
            sk = self.cluster.app_stats["skipped"]
            sk[eff.reason] = sk.get(eff.reason, 0) + 1
        elif kind == "Cancel":
            if eff.run_id in self.running:
                self._finish(eff.run_id, "cancelled", now)
        elif kind == "Advance":
            self._commit(self.store.advance_fired(eff.task_id, eff.slot), now)

    def _retry_claims(self, now: float) -> None:
        """Claims in (task, slot) order; a task's later slots wait for its
        earlier ones while etcd is unavailable, not for a re-claim that waits
        for a dead claimer's session (node/node.py takes no claim turn for
        those)."""
        etcd = self.cluster.etcd
        t_s = self._t()
        queue = sorted(self.claim_queue, key=lambda c: (c[0], c[1]))
        blocked: set[str] = set()
        keep = []
        for tid, slot, fire in queue:
            task = self.tasks.get(tid)
            if task is None:
                self.scheduler.fire_abandoned(tid, slot, now)
                continue
            if tid in blocked:
                keep.append((tid, slot, fire))
                continue
            window_end = slot + max(float(task.catchup_window_s or 3600.0), self.scheduler.misfire_grace_s)
            key = f"fire/{tid}/{slot}"
            run_id = f"{slot}-{self.name}-{self.rng.getrandbits(32):08x}"
            try:
                lost = self.lost_claimers.get((tid, slot))
                if fire.reason == "rerun_owner_loss" and lost:
                    token = self._reclaim(etcd, key, run_id, lost, (tid, slot), t_s)
                else:
                    res = etcd.claim(key, (self.name, run_id, 0, (), self.boot_id), t_s)
                    token = res.token if res.won else None
            except EtcdModelUnavailable:
                if now >= window_end:
                    self.stats["claims_unavailable"] += 1
                    self.scheduler.fire_abandoned(tid, slot, now)
                else:
                    keep.append((tid, slot, fire))
                    blocked.add(tid)
                continue
            if token is _WAIT:  # the dead claimer's session holds: try again later
                keep.append((tid, slot, fire))  # (without holding back later slots)
                continue
            self.lost_claimers.pop((tid, slot), None)
            self.reclaim_since.pop((tid, slot), None)
            if token is None:
                self.stats["claims_lost"] += 1
                self.scheduler.fire_abandoned(tid, slot, now)
                continue
            self._start_run(fire, token, now, run_id=run_id)
        self.claim_queue = keep
        if keep:
            self._timer(now + self.opts.claim_retry_s, "claims", None)

    def _reclaim(self, etcd: EtcdModel, key: str, run_id: str, lost: tuple, ts_key, t_s: float):
        """A re-claim under the real Rules 7 and 8: the model's claim tuple is
        turned into the claim record a real fencer reads and handed to
        ``node.fencing.plan_reclaim``; its plan (new value, dead claimer's
        alive key) is written with the model's compare-and-put. The wait
        while the claimer's session holds mirrors node/fencer.py ``reclaim``.
        Returns a token, None (refused) or _WAIT."""
        dead, expected = lost
        kv = etcd.get(key, t_s)
        plan = plan_reclaim(_claim_record(key, kv), node=self.name, run_id=run_id,
                            dead_node=dead, epoch=0, max_reclaims=MAX_RECLAIMS,
                            expected_run_id=expected, session=self.boot_id, prefix=ETCD_PREFIX)
        if plan.value is None:
            self.stats["reclaims_refused"] += 1
            return None
        v = plan.value
        dead_alive = None if plan.dead_alive is None else plan.dead_alive.decode()
        token = etcd.reclaim(key, plan.mod_revision, (v.node, v.run_id, v.reclaims, v.dead, v.session),
                             t_s, dead_alive=dead_alive)
        if token is None and dead_alive is not None and etcd.session_alive(dead_alive, t_s) \
                and etcd.peek(key).mod_revision == plan.mod_revision:
            since = self.reclaim_since.setdefault(ts_key, t_s)
            if t_s < since + 1.5 * self.opts.session_ttl_s + 2.0:
                return _WAIT
            self.stats["reclaims_claimer_alive"] += 1
        self.stats["reclaims_won" if token is not None else "reclaims_refused"] += 1
        return token

    # ------------------------------------------------------------- sessions
    def _session_tick(self, now: float) -> None:
        """Refresh the alive key every TTL/3 (node/fencer.py _session_loop)."""
        if self.stopping:
            return
        self._timer(now + self.opts.session_ttl_s / 3, "session", None)
        try:
            self.cluster.etcd.session_refresh(self.alive_key, self.opts.session_ttl_s, self._t())
        except EtcdModelUnavailable:
            pass  # next period (the real fencer logs and retries)

    def _session_close(self) -> None:
        if self.cluster.etcd is None:
            return
        try:
            self.cluster.etcd.session_close(self.alive_key, self._t())
        except EtcdModelUnavailable:
            pass  # expires by itself

    def _start_run(self, fire, token, now: float, *, run_id: str | None = None) -> None:
        tid = fire.task_id
        if tid not in self.tasks:
            self.scheduler.fire_abandoned(tid, fire.slot, now)
            return
        if run_id is None:
            run_id = f"{fire.slot}-{self.name}-{self.rng.getrandbits(32):08x}"
        self.cluster.record_fire(self.node, tid, fire.slot, token, fire.reason, run_id)
        self.running[run_id] = (tid, fire.slot, token, now)
        self.scheduler.run_started(tid, fire.slot, run_id, now)
        self._commit(self.store.put_run(self._record(tid, fire.slot, run_id, "running", now, None, token)),
                     now, run_task=tid)
        self._timer(now + self.opts.run_duration_s, "finish", run_id)

    def _finish(self, run_id: str, status: str, now: float) -> None:
        r = self.running.pop(run_id, None)
        if r is None:
            return
        tid, slot, token, started = r
        self._commit(self.store.put_run(self._record(tid, slot, run_id, status, started, now, token)),
                     now, run_task=tid)
        self.scheduler.run_finished(tid, run_id, now)

    def _record(self, tid, slot, run_id, status, started, finished, token) -> dict:
        return {"task_id": tid, "slot": int(slot), "run_id": run_id, "node": self.name, "attempt": 1,
                "status": status, "exit_code": 0 if status == "succeeded" else None,
                "started": started, "finished": finished, "fencing_token": token, "output": ""}

    # ------------------------------------------------------------- anti-entropy
    def _shared_tasks(self, peer: str) -> list[str]:
        return [t for t in self.ring.tasks_of(self.name) if peer in self.ring.owners(t)]

    def _ae_tick(self, now: float) -> None:
        if self.session is not None:
            return
        core = self.node.core
        peers = [m.name for m in core.alive_members() if m.name != self.name
                 and getattr(m.state, "value", "") == "alive"] if core else []
        if self.handoff_pending:
            self._maybe_start_session(now)
            return
        if peers:
            self._start_session(peers[self.rng.randrange(len(peers))], now)

    def _maybe_start_session(self, now: float) -> None:
        if self.session is not None or not self.handoff_pending:
            return
        for tid in sorted(self.handoff_pending):
            others = [o for o in self.ring.owners(tid) if o != self.name]
            if others:
                # rotate through the other replicas across attempts
                self._start_session(others[self.rng.randrange(len(others))], now)
                return

    def _start_session(self, peer: str, now: float) -> None:
        self._xid += 1
        self.session = _Session(peer, self._xid, ["catalogue", "runs"])
        self._next_scope(now)

    def _next_scope(self, now: float) -> None:
        s = self.session
        while s.scopes:
            s.scope = s.scopes.pop(0)
            s.shared = self._shared_tasks(s.peer) if s.scope == "runs" else None
            if s.scope == "runs" and not s.shared:
                continue
            s.rounds = 1
            self.out.append(AeSend(s.peer, s.xid, self.store.start_exchange(s.scope, s.shared)))
            return
        self._session_done(True, now)

    def _session_done(self, ok: bool, now: float) -> None:
        s, self.session = self.session, None
        self.stats["ae_ok" if ok else "ae_failed"] += 1
        if ok:
            for tid in sorted(self.handoff_pending):
                if s.peer in self.ring.owners(tid):
                    self._handoff_done(tid, now, timed_out=False)
        self._maybe_start_session(now)

    def serve_exchange(self, sender: str, data: bytes, local: float) -> tuple[bytes | None, list]:
        """Responder side of one exchange message. Returns (reply, effects)."""
        now = self.epoch(local)
        try:
            scope = msgpack.unpackb(data, raw=False)[1]
            tasks = self._shared_tasks(sender) if scope == 1 else None
            res = self.store.handle_exchange(data, tasks=tasks)
        except Exception:
            self.cluster.app_stats["bad_exchange"] += 1
            return None, self._flush()
        if res.changed:
            self._after_change(res.changed, now)
        return res.reply, self._flush()

    def exchange_reply(self, xid: int, body: bytes | None, local: float) -> list:
        now = self.epoch(local)
        s = self.session
        if s is None or s.xid != xid:
            return self._flush()
        if body is None:
            self._next_scope(now)
            return self._flush()
        try:
            res = self.store.handle_exchange(body, tasks=s.shared)
        except Exception:
            self.cluster.app_stats["bad_exchange"] += 1
            self._session_done(False, now)
            return self._flush()
        if res.changed:
            self._after_change(res.changed, now)
        if res.reply is not None and s.rounds < self.opts.ae_rounds_max and self.session is s:
            s.rounds += 1
            self.out.append(AeSend(s.peer, s.xid, res.reply))
        elif self.session is s:
            self._next_scope(now)
        return self._flush()

    def exchange_failed(self, xid: int, local: float) -> list:
        now = self.epoch(local)
        if self.session is not None and self.session.xid == xid:
            self._session_done(False, now)
        return self._flush()


class AppCluster(Cluster):
    """A cluster whose nodes each carry a :class:`SchedulerApp`.

    Args:
        config, options, schedule: as ``Cluster``.
        app_options: :class:`AppOptions`.
        etcd: shared ``EtcdModel`` when fencing (None: fire on ownership).
    """

    def __init__(self, config, options: ClusterOptions, schedule=(), *,
                 app_options: AppOptions = AppOptions(), etcd: EtcdModel | None = None, **kw) -> None:
        self.app_options = app_options
        self.etcd = etcd
        # From this virtual time on no scheduler ticks (runs finish, replication
        # goes on), so the end-of-run replica check sees a quiet catalogue.
        self.quiesce_s = INF
        self.disks: dict[str, dict[str, bytes]] = {}
        self.ledger: list[tuple] = []
        self.app_stats: dict[str, Any] = {"bad_push": 0, "bad_task": 0, "bad_exchange": 0,
                                          "push_too_big": 0, "skipped": {}, "streams": 0,
                                          "stream_failed": 0, "stream_bytes": 0}
        self._fired_by: dict[tuple[str, int], list[tuple]] = {}
        super().__init__(config, options, schedule, app_factory=self._make_app, **kw)
        self.app_effect = self._on_app_effect

    def _make_app(self, node: SimNode) -> list:
        return [SchedulerApp(self, node)]

    def app(self, name: str) -> SchedulerApp | None:
        n = self.by_name[name]
        return n.apps[0] if n.up and n.apps else None

    # -- writes from outside -------------------------------------------------------
    def apply_tasks(self, name: str, defs: list[dict]) -> None:
        """Apply task definitions at node ``name`` now (a client's write)."""
        node = self.by_name[name]
        app = node.apps[0]
        t_s = self.loop.now_s
        now = app.epoch(node.local(t_s))
        entries = []
        for d in defs:
            t = Task.from_dict(d)
            view = app.store.get_task(t.id)
            entries.extend(app.store.put_task(t.id, t.to_dict(), view.context if view else None, now))
        app._commit(entries, now)
        self._app_effects(node, app._flush(), t_s)
        self._arm(node, t_s)

    # -- ledger --------------------------------------------------------------------
    def record_fire(self, node: SimNode, tid: str, slot: int, token, reason: str, run_id: str) -> None:
        t_s = self.loop.now_s
        rec = (tid, int(slot), node.name, node.boots, round(t_s, 6), token, reason)
        self.ledger.append(rec)
        self.trace.append((t_s, "fire", node.idx, tid, int(slot), token, reason))

    def ledger_hash(self) -> str:
        return hashlib.sha256(repr(self.ledger).encode()).hexdigest()

    # -- streams -------------------------------------------------------------------
    def _on_app_effect(self, node: SimNode, e, t_s: float) -> None:
        if type(e) is not AeSend:
            self.stats["unknown_effects"] += 1
            return
        self.app_stats["streams"] += 1
        self.app_stats["stream_bytes"] += len(e.data)
        self.net.count_stream(node.idx, len(e.data) + 4)
        peer = self.by_name.get(e.peer)
        timeout_s = self.net.options.stream_timeout_s
        if peer is None or not self.net.stream_open(node.idx, peer.idx):
            self._sched(t_s + timeout_s, _AppEvent("fail", node.idx, -1, node.boots, e.xid, None, t_s))
            return
        if not peer.up:
            self._sched(t_s + 2 * self.net.delay_s(), _AppEvent("fail", node.idx, peer.idx, node.boots, e.xid, None, t_s))
            return
        self._sched(t_s + self.net.delay_s(), _AppEvent("req", peer.idx, node.idx, node.boots, e.xid, e.data, t_s))

    def _sched(self, at_s: float, ev: _AppEvent) -> None:
        ev.at_s = at_s
        self.loop.schedule(at_s, K_FAULT, ev)

    def _apply_fault(self, f, t_s: float) -> None:
        if type(f) is not _AppEvent:
            node = self.by_name.get(f.node) if f.node is not None else None
            if (f.kind == "leave" and node is not None and node.up and node.apps
                    and node.apps[0].running and not node.leaving):
                # Node.shutdown: stop firing, let running runs end, then leave.
                node.apps[0].stopping = True
                self.loop.schedule(t_s + self.app_options.run_duration_s + 0.01, K_FAULT, f)
                return
            super()._apply_fault(f, t_s)
            return
        node = self.nodes[f.dst]
        timeout_s = self.net.options.stream_timeout_s
        if f.kind == "fail":
            if node.up and node.boots == f.boots and node.apps:
                if node.paused_until > t_s:
                    self._sched(node.paused_until, f)
                    return
                self.app_stats["stream_failed"] += 1
                self._app_effects(node, node.apps[0].exchange_failed(f.xid, node.local(t_s)), t_s)
                self._arm(node, t_s)
            return
        initiator = self.nodes[f.src] if f.kind == "req" else node
        if f.kind == "req":
            if not node.up or not node.apps:
                self._sched(t_s + self.net.delay_s(), _AppEvent("fail", f.src, f.dst, f.boots, f.xid, None, f.started_s))
                return
            if node.paused_until > t_s:
                if node.paused_until - f.started_s > timeout_s:
                    self._sched(max(t_s, f.started_s + timeout_s),
                                _AppEvent("fail", f.src, f.dst, f.boots, f.xid, None, f.started_s))
                else:
                    self._sched(node.paused_until, f)
                return
            if not self.net.stream_open(f.src, f.dst) or t_s - f.started_s > timeout_s:
                self._sched(max(t_s, f.started_s + timeout_s),
                            _AppEvent("fail", f.src, f.dst, f.boots, f.xid, None, f.started_s))
                return
            reply, effects = node.apps[0].serve_exchange(initiator.name, f.data, node.local(t_s))
            self._app_effects(node, effects, t_s)
            if node.up:
                self._arm(node, t_s)
            if reply is not None:
                self.net.count_stream(node.idx, len(reply) + 4)
                self.app_stats["stream_bytes"] += len(reply)
            self._sched(t_s + self.net.delay_s(), _AppEvent("reply", f.src, f.dst, f.boots, f.xid, reply, t_s))
            return
        # reply at the initiator
        if not node.up or node.boots != f.boots or not node.apps:
            return
        if node.paused_until > t_s:
            self._sched(node.paused_until, f)
            return
        if not self.net.stream_open(f.dst, f.src):
            self._sched(t_s + timeout_s, _AppEvent("fail", f.dst, f.src, f.boots, f.xid, None, t_s))
            return
        self._app_effects(node, node.apps[0].exchange_reply(f.xid, f.data, node.local(t_s)), t_s)
        self._arm(node, t_s)


# ---------------------------------------------------------------------- tasks, metrics

def default_tasks(n: int = 5, *, every_s: tuple[int, ...] = (1, 5), catchup_window_s: float = 30.0,
                  misfire: str = "run_all", overlap: str = "allow",
                  on_owner_loss: str = "rerun") -> list[dict]:
    """``n`` exec tasks cycling over ``@every {every_s}s`` schedules."""
    out = []
    for i in range(n):
        out.append({"id": f"t{i:02d}", "schedule": f"@every {every_s[i % len(every_s)]}s",
                    "command": {"type": "exec", "argv": ["true"]}, "misfire": misfire,
                    "overlap": overlap, "catchup_window": f"{int(catchup_window_s)}s",
                    "on_owner_loss": on_owner_loss})
    return out


def _every_s(schedule: str) -> float | None:
    if not schedule.startswith("@every "):
        return None
    spec = schedule[len("@every "):].strip()
    units = {"s": 1, "m": 60, "h": 3600}
    if spec and spec[-1] in units and spec[:-1].isdigit():
        return float(int(spec[:-1]) * units[spec[-1]])
    return None


def fire_metrics(ledger: list[tuple], tasks: list[dict], start_epoch: float, end_epoch: float,
                 crashed_at: dict[tuple[str, int], float] | None = None) -> dict:
    """Count due, fired, duplicate and missed slots.

    A slot is due when it lies in ``[start_epoch, end_epoch]``. A fire of an
    already fired slot is a duplicate, unless it is a ``rerun_owner_loss``
    fire after every earlier firer of that slot had crashed or left
    (``crashed_at[(node, boots)]`` before this fire): that is the documented
    rerun of a lost run, counted as ``owner_loss_reruns``. Duplicates that are
    ``rerun_owner_loss`` fires (a run re-claimed from a claimer declared dead
    that was in fact alive: partition, loss) are also counted apart as
    ``reclaim_duplicates`` (included in ``duplicate_fires``). Slots before
    ``start_epoch`` count only in ``duplicate_fires_warmup``.
    """
    crashed_at = crashed_at or {}
    due = set()
    for d in tasks:
        step = _every_s(d["schedule"])
        if step is None:
            continue
        s = math.ceil(start_epoch / step) * step
        while s <= end_epoch:
            due.add((d["id"], int(s)))
            s += step
    by_slot: dict[tuple[str, int], list[tuple]] = {}
    for rec in ledger:
        by_slot.setdefault((rec[0], rec[1]), []).append(rec)
    dup = reruns = warm = false_death = 0
    dup_max = 0
    examples = []
    for key in sorted(by_slot):
        if key[1] < start_epoch:
            warm += len(by_slot[key]) - 1
            continue
        fires = by_slot[key]
        extra = 0
        for i, rec in enumerate(fires[1:], 1):
            earlier = fires[:i]
            if rec[6] == "rerun_owner_loss" and all(
                    crashed_at.get((e[2], e[3]), math.inf) <= rec[4] for e in earlier):
                reruns += 1
            else:
                extra += 1
                if rec[6] == "rerun_owner_loss":
                    false_death += 1
                if len(examples) < 5:
                    examples.append([list(e) for e in fires])
        dup += extra
        dup_max = max(dup_max, extra)
    fired = set(by_slot)
    return {
        "slots_due": len(due),
        "slots_fired": len(fired & due),
        "slots_fired_total": len(fired),
        "duplicate_fires": dup,
        "duplicate_fires_max_per_slot": dup_max,
        "owner_loss_reruns": reruns,
        "reclaim_duplicates": false_death,
        "duplicate_fires_warmup": warm,
        "missed_slots": len(due - fired),
        "duplicate_examples": examples,
    }


class _DownTracker:
    """Records when each (node, boots) incarnation of a process went down."""

    def __init__(self, cluster: AppCluster) -> None:
        self.down: dict[tuple[str, int], float] = {}
        orig = cluster._kill

        def kill(node, t_s, *, crashed):
            if node.up:
                self.down[(node.name, node.boots)] = t_s
            orig(node, t_s, crashed=crashed)
        cluster._kill = kill


def check_app_invariants(rep: dict, *, fencing: bool) -> list[str]:
    """Fenced: no duplicate fire (reclaim duplicates reported on their own
    line). Always: replicas equal, no acknowledged write lost."""
    out = []
    if fencing and rep.get("duplicate_fires_warmup"):
        out.append(f"{rep['duplicate_fires_warmup']} duplicate fire(s) with fencing before the window")
    if fencing and rep.get("duplicate_fires"):
        out.append(f"{rep['duplicate_fires']} duplicate fire(s) with fencing: {rep.get('duplicate_examples')}")
    if not rep.get("replicas_equal"):
        out.append(f"catalogue digests differ after heal: {rep.get('digests')}")
    if rep.get("lost_tasks"):
        out.append(f"acknowledged tasks missing on live nodes: {rep['lost_tasks']}")
    return out


def build_app_cluster(config, options: ClusterOptions, schedule, *, duration_s: float,
                      tasks: list[dict] | int = 5, fencing: bool = False,
                      etcd_outages: list[tuple[float, float]] = (), app_options: AppOptions | None = None,
                      catchup_margin_s: float = 10.0, start_s: float = 10.0,
                      clock_offset_max_s: float | None = 0.05) -> AppCluster:
    """An :class:`AppCluster` ready to ``run(duration_s)``; then call
    ``cluster.app_report(report)``.

    Tasks are applied at ``n000`` at t=0 and acknowledged once written on the
    first three nodes (the seeds; modelled by writing them to their disks
    before start). Slots are due in ``[start_s, duration_s - catchup_margin_s]``
    of virtual time (epoch ``EPOCH_BASE`` + t). Scheduler ticks stop at
    ``duration_s - 0.6 * catchup_margin_s`` so the final replica check sees
    a quiet catalogue.

    Args:
        clock_offset_max_s: overrides ``options.clock_offset_max_s`` (node
            wall clocks within 50 ms, as NTP keeps them; None keeps it).
    """
    if isinstance(tasks, int):
        tasks = default_tasks(tasks)
    if clock_offset_max_s is not None:
        options = replace(options, clock_offset_max_s=clock_offset_max_s)
    ao = replace(app_options or AppOptions(), fencing=fencing)
    etcd = EtcdModel(list(etcd_outages)) if fencing else None
    cluster = AppCluster(config, options, schedule, app_options=ao, etcd=etcd)
    cluster.downs = _DownTracker(cluster)
    cluster.tasks_applied = list(tasks)
    cluster.window_s = (start_s, duration_s - catchup_margin_s)
    cluster.quiesce_s = duration_s - 0.6 * catchup_margin_s
    names = node_names(options.nodes)
    writer = Store(names[0])
    for d in tasks:
        t = Task.from_dict(d)
        writer.put_task(t.id, t.to_dict(), None, EPOCH_BASE)
    rows = dict(writer.drain_dirty())
    for name in names[:min(3, options.nodes)]:
        cluster.disks[name] = dict(rows)
    return cluster


def app_report(cluster: AppCluster, report: dict) -> dict:
    """Fill ``report`` (from ``cluster.run``) with the fire metrics and checks."""
    tasks = cluster.tasks_applied
    start_s, end_s = cluster.window_s
    report.update(fire_metrics(cluster.ledger, tasks, EPOCH_BASE + start_s, EPOCH_BASE + end_s,
                               cluster.downs.down))
    fencing = cluster.etcd is not None
    report["fencing"] = fencing
    report["ledger_hash"] = cluster.ledger_hash()
    report["fires"] = len(cluster.ledger)
    live = [n for n in cluster.nodes if n.up and n.apps]
    digests = {n.name: n.apps[0].store.digest_root("catalogue").hex() for n in live}
    report["digests"] = digests
    report["replicas_equal"] = len(set(digests.values())) <= 1
    want = sorted(d["id"] for d in tasks)
    lost = {}
    for n in live:
        have = {v.task_id for v in n.apps[0].store.tasks()}
        miss = [t for t in want if t not in have]
        if miss:
            lost[n.name] = miss
    report["lost_tasks"] = lost
    agg: dict[str, int] = {}
    for n in live:
        for k, v in sorted(n.apps[0].stats.items()):
            agg[k] = agg.get(k, 0) + v
    report["app"] = {**cluster.app_stats, "live_nodes": agg}
    if cluster.etcd is not None:
        report["etcd"] = {"writes": cluster.etcd.writes, "rejected_unavailable": cluster.etcd.rejected_unavailable}
    report["violations"] = check_app_invariants(report, fencing=fencing)
    return report


def simulate_app(*, nodes: int, duration_s: float, seed: int, scenario: str = "steady",
                 tasks: list[dict] | int = 5, fencing: bool = False, loss: float | None = None,
                 etcd_outages: list[tuple[float, float]] = (), app_options: AppOptions | None = None,
                 profile: str = "lan", start_s: float = 10.0, catchup_margin_s: float = 10.0,
                 schedule=None, **cluster_kw) -> tuple[dict, AppCluster]:
    """Run ``scenario`` with the scheduler app on every node (see
    :func:`build_app_cluster` for the task write and the due window).

    Args:
        tasks: task dicts, or a count for :func:`default_tasks`.
        fencing: use a shared ``EtcdModel`` (with ``etcd_outages``).
        schedule: explicit faults instead of ``scenario``.
        cluster_kw: other ``ClusterOptions`` fields.
    Returns:
        ``(report, cluster)``: the cluster's report with ``slots_due``,
        ``slots_fired``, ``duplicate_fires``, ``missed_slots`` filled, plus
        ``fencing``, ``ledger_hash``, ``replicas_equal``, ``lost_tasks``,
        ``app`` counters and ``violations`` (invariant failures).
    """
    from gossip.config import Config
    from sim import scenarios as _sc
    config = Config.lan() if profile == "lan" else Config.local()
    net = cluster_kw.pop("network", None) or NetworkOptions()
    offset = cluster_kw.pop("clock_offset_max_s", 0.05)
    opts = ClusterOptions(nodes=nodes, seed=seed, network=net, **cluster_kw)
    if schedule is None:
        schedule = _sc.build(scenario, node_names(nodes), duration_s, child_rng(seed, "scenario"), loss=loss)
    cluster = build_app_cluster(config, opts, schedule, duration_s=duration_s, tasks=tasks, fencing=fencing,
                                etcd_outages=etcd_outages, app_options=app_options,
                                catchup_margin_s=catchup_margin_s, start_s=start_s,
                                clock_offset_max_s=offset)
    report = cluster.run(duration_s)
    report["scenario"] = scenario
    return app_report(cluster, report), cluster
