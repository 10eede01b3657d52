"""The node core on simulated nodes: an adapter, no rule of its own.

:class:`SchedulerApp` carries one ``node.core.NodeCore`` (the very core the
trio daemon drives) on a simulated node and carries out its effects against
the simulated world, as ``node/shell.py`` carries them out against the real
one:

- ``Request`` -> a modelled stream to the peer, whose core answers with
  ``NodeCore.serve`` (the same ``node.peerwire`` bytes the daemon sends);
  the reply or failure goes back to ``request_answered``/``request_failed``;
- ``StartRun`` -> a fake executor: the fire is written to the cluster-wide
  ledger, the attempt starts at once and succeeds after the task's run
  duration (drawn per task from the seed: ``run_duration_s * U(0.25, 1.75)``);
- ``CancelRun`` -> the run ends cancelled;
- ``Claim``/``Reclaim`` -> one attempt against the shared
  ``sim.etcd_model.EtcdModel``, as the daemon's fencer makes it: the same
  ``node.fencing.rules`` transactions (``claim_txn``, ``reclaim_txn`` planned by
  ``plan_reclaim``) through the model's gateway JSON, decided by the same
  ``decide_claim`` / ``decide_reclaim`` and ``fold_decision``; the answer
  goes to ``claim_answered``;
- ``Note`` -> counted (every skipped or abandoned slot is kept with its
  reason, so each missed slot of a run is reported with why);
- ``Notify`` -> a modelled webhook: delivered to the cluster's receiver
  ledger ``notify_latency_s / 2`` after it is sent and reported sent to
  ``notify_done`` at ``notify_latency_s``; a node that dies in between has
  delivered it and not recorded it (the at-least-once window of
  ``node/run/followups.py`` rule 2).

What the daemon's fencer shell does on its own is modelled here too: every
process refreshes its etcd alive key (``node.fencing.rules.alive_key``) every
``session_ttl_s / 3`` from boot (a paused node does not) and closes it when
it leaves; a leaving node stops firing, waits for its runs, then leaves (as
``Node.shutdown`` does). Durability: every store change is written through
to the node's disk (``AppCluster.disks``); a restarted node loads it.

Clocks: the core's ``now`` is the node's local, possibly skewed and drifting
clock shifted to epoch seconds: ``epoch = local + EPOCH_SHIFT`` (``EPOCH_BASE``
at the cluster's clock zero). Deadlines go back the same way.

Determinism: per node ``child_rng(seed, "app", name, boots)``; every set or
dict of str is sorted before it decides anything.

Building such a cluster, running it and checking what it did (fire
metrics, invariants, reports): ``sim/app_run.py``.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import deque
from dataclasses import dataclass
from typing import Any

from node.core import NodeCore
from node.core_effects import CancelRun, Claim, Note, Notify, Reclaim, Request, StartRun
from node.fencing.rules import (
    ClaimValue,
    alive_key,
    claim_txn,
    decide_claim,
    decide_reclaim,
    fire_key,
    fold_decision,
    plan_reclaim,
    reclaim_txn,
    start_txn,
    decide_start,
)
from node.knobs import NodeKnobs
from node.state.store import Store
from node.tasks.model import Task
from sim.cluster import INF, Cluster, ClusterOptions, SimNode
from sim.etcd_model import EtcdModel, EtcdModelUnavailable
from sim.kinds import K_FAULT
from sim.loop import child_rng

__all__ = ["AppOptions", "SchedulerApp", "AppCluster", "EPOCH_BASE"]

EPOCH_BASE = 1_800_000_000.0
# SimNode clocks read 1000 + offset at t=0 (sim/cluster.py).
EPOCH_SHIFT = EPOCH_BASE - 1000.0
ETCD_PREFIX = "/peerd"  # node/cli/settings.py default; alive keys are the real ones


@dataclass(frozen=True, slots=True)
class AppOptions:
    """Simulation knobs of the node layer.

    Args:
        knobs: the node core's knobs (``node.knobs.NodeKnobs``; default the
            ``local`` profile with anti-entropy every 2 s).
        run_duration_s: mean duration of a simulated run; each task's runs
            last ``run_duration_s * U(0.25, 1.75)`` (drawn from the seed).
        fencing: claim every fire in the shared etcd model.
        mark_latency_s: time from a claim won to its started mark (fencing
            Rule 9) and the run's start, as the fencer's second round trip;
            a node that crashes in between leaves a claim never started.
            0 marks in the claim's own instant.
    """

    knobs: NodeKnobs = NodeKnobs.local().replace(ae_interval_s=2.0)
    run_duration_s: float = 0.2
    fencing: bool = False
    notify_latency_s: float = 0.1
    mark_latency_s: float = 0.0


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


class SchedulerApp:
    """One simulated node's ``NodeCore`` and the effects it asks for."""

    def __init__(self, cluster: "AppCluster", node: SimNode) -> None:
        self.cluster = cluster
        self.node = node
        self.name = node.name
        self.opts = cluster.app_options
        store = Store(node.name)
        # run outputs are read back from the node's disk (out/ rows)
        store.set_output_reader(lambda key, disks=cluster.disks, name=node.name: disks.get(name, {}).get(key))
        rows = cluster.disks.get(self.name)
        if rows:
            store.load(sorted(rows.items()))
            store.drain_dirty()
        self.core = NodeCore(node.name, store, tags=dict(node.tags), knobs=self.opts.knobs,
                             rng=child_rng(cluster.seed, "app", node.name, node.boots),
                             fencing=cluster.etcd is not None)
        self.store = store
        self.boot_id = child_rng(cluster.seed, "boot", node.name, node.boots).getrandbits(64) or 1
        self.alive_key = alive_key(ETCD_PREFIX, node.name, self.boot_id).decode()
        self.high_water = 0   # the fencer's Rule 5 mark and epoch, per process
        self.fence_epoch = 0
        self.finish: dict[str, float] = {}          # run id -> epoch it ends
        self.timers: list[tuple[float, int, str, Any]] = []
        self._tseq = 0
        self.leaving_since: float | None = None
        self._requests: list = []
        now = self.epoch(node.local(cluster.loop.now_s))
        core = node.core
        joined = bool(core and any(m.name != self.name for m in core.alive_members()))
        self._carry(self.core.start(now, joined=joined), now)
        self._carry(self.core.members_changed(self._view(), now), now)
        if cluster.etcd is not None:
            self._session_tick(now)

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
    def _view(self) -> list[tuple[str, str, dict]]:
        core = self.node.core
        return [(m.name, m.state.value, dict(m.tags)) for m in core.members()] if core else []

    def _quiesce(self) -> None:
        # the run's quiet end: no new slots, so the final replica check sees
        # a settled catalogue (runs finish, replication goes on)
        if self.core.scheduling and self._t() >= self.cluster.quiesce_s:
            self.core.scheduling = False

    def next_deadline(self) -> float:
        self._quiesce()
        d = self.core.next_deadline()
        best = INF if d is None else d
        if self.timers and self.timers[0][0] < best:
            best = self.timers[0][0]
        return best - EPOCH_SHIFT

    def tick(self, local: float) -> list:
        now = self.epoch(local)
        self._quiesce()
        while self.timers and self.timers[0][0] <= now:
            _, _, kind, arg = heapq.heappop(self.timers)
            if kind == "finish" and arg in self.finish:
                del self.finish[arg]
                self._carry(self.core.attempt_finished(arg, 1, "succeeded", now, exit_code=0), now)
                self._carry(self.core.run_ended(arg, now), now)
            elif kind == "session":
                self._session_tick(now)
            elif kind == "deliver":
                self.cluster.record_notification(self.node, arg)
            elif kind == "mark":
                e, token, (value, rev) = arg
                outcome, token = self._mark_started(e.task_id, e.slot, value, rev, token)
                self._carry(self.core.claim_answered(e.task_id, e.slot, e.run_id, outcome, token, now), now)
            elif kind == "notified" and arg.run_id is not None:
                self._carry(self.core.notify_done(arg.task_id, arg.run_id, arg.key, True, now), now)
        self._carry(self.core.tick(now), now)
        return self._flush()

    def on_member_event(self, event, local: float) -> list:
        now = self.epoch(local)
        self._carry(self.core.members_changed(self._view(), now, kind=event.kind.value,
                                              member=event.member.name), now)
        if event.member.name == self.name and event.kind.value == "left":
            self._session_close()
        return self._flush()

    def handle_user(self, sender: str, data: bytes, local: float) -> list:
        now = self.epoch(local)
        _, effects = self.core.serve(sender, data, now)
        self._carry(effects, now)
        return self._flush()

    def serve(self, sender: str, data: bytes, local: float) -> tuple[bytes, list]:
        now = self.epoch(local)
        reply, effects = self.core.serve(sender, data, now)
        self._carry(effects, now)
        return reply, self._flush()

    def answered(self, xid: int, data: bytes | None, local: float) -> list:
        now = self.epoch(local)
        if data is None:
            self._carry(self.core.request_failed(xid, now, "stream failed"), now)
        else:
            self._carry(self.core.request_answered(xid, data, now), now)
        return self._flush()

    # ------------------------------------------------------------- effects
    def _flush(self) -> list:
        rows = self.core.store.drain_dirty()
        if rows:
            disk = self.cluster.disks.setdefault(self.name, {})
            for k, v in rows:
                if v is None:
                    disk.pop(k, None)
                else:
                    disk[k] = v
        out, self._requests = self._requests, []
        return out

    def _carry(self, effects, now: float) -> None:
        """Carry out effects; answers given at once queue their own effects
        (a loop, not recursion: a catch-up may chain a thousand claims)."""
        work = deque(effects)
        while work:
            e = work.popleft()
            tp = type(e)
            if tp is Note:
                self.cluster.note(self.node, e)
            elif tp is Request:
                self._requests.append(e)
            elif tp is StartRun:
                self.cluster.record_fire(self.node, e.unit or e.task.id, e.slot, e.token, e.reason, e.run_id)
                work.extend(self.core.attempt_started(e.run_id, 1, now))
                end = now + self.cluster.run_duration(e.task.id)
                self.finish[e.run_id] = end
                self._timer(end, "finish", e.run_id)
            elif tp is CancelRun:
                if self.finish.pop(e.run_id, None) is not None:
                    work.extend(self.core.run_ended(e.run_id, now, cancelled_attempt=1))
            elif tp is Notify:
                lat = self.opts.notify_latency_s
                self._timer(now + lat / 2, "deliver", e)
                self._timer(now + lat, "notified", e)
            elif tp is Claim:
                outcome, token, holder = self._claim(e)
                if outcome == "mark":
                    self._timer(now + self.opts.mark_latency_s, "mark", (e, token, holder))
                    continue
                work.extend(self.core.claim_answered(e.task_id, e.slot, e.run_id, outcome, token, now,
                                                     holder=holder))
            elif tp is Reclaim:
                outcome, token = self._reclaim(e)
                work.extend(self.core.claim_answered(e.task_id, e.slot, e.run_id, outcome, token, now))

    def _claim(self, e: Claim) -> tuple[str, int | None, tuple[str, str, bool] | None]:
        """One claim attempt: the fencer's transaction (``claim_txn``) through
        the model's gateway, decided by ``decide_claim``, and when won marked
        started (``start_txn``, fencing Rule 9) at the same instant."""
        value = ClaimValue(self.name, e.run_id, self.fence_epoch, session=self.boot_id)
        hw0 = self.high_water
        try:
            res = self.cluster.etcd.txn(*claim_txn(ETCD_PREFIX, e.task_id, e.slot, value, 0), self._t())
        except EtcdModelUnavailable:
            return "unavailable", None, None
        d = decide_claim(res, node=self.name, run_id=e.run_id, high_water_before=hw0,
                         high_water_now=self.high_water)
        self.high_water, self.fence_epoch = fold_decision(d, self.high_water, self.fence_epoch)
        holder = (d.holder.node, d.holder.run_id, d.holder.started) if d.holder and not d.won else None
        if d.reason == "won" and self.opts.mark_latency_s > 0:
            return "mark", d.token, (value, d.mod_revision)      # the mark goes out after a round trip
        if d.reason == "won":
            return (*self._mark_started(e.task_id, e.slot, value, d.mod_revision, d.token), holder)
        return d.reason, d.token, holder

    def _mark_started(self, task_id: str, slot: int, value: ClaimValue, mod_revision: int,
                      token: int | None) -> tuple[str, int | None]:
        """Fencing Rule 9 as the fencer runs it after a claim won."""
        try:
            res = self.cluster.etcd.txn(*start_txn(ETCD_PREFIX, task_id, slot, value, 0, mod_revision),
                                        self._t())
        except EtcdModelUnavailable:
            return "unavailable", None
        ok, _detail = decide_start(res, node=self.name, run_id=value.run_id)
        return ("won", token) if ok else ("lost", None)

    def _reclaim(self, e: Reclaim) -> tuple[str, int | None]:
        """One re-claim attempt as the fencer makes it: read the claim, plan by
        ``plan_reclaim`` (Rules 7 and 8), send ``reclaim_txn``, decide by
        ``decide_reclaim``."""
        etcd = self.cluster.etcd
        t_s = self._t()
        hw0 = self.high_water
        try:
            kv = etcd.range(fire_key(ETCD_PREFIX, e.task_id, e.slot), t_s)
            plan = plan_reclaim(kv, node=self.name, run_id=e.run_id, dead_node=e.dead,
                                epoch=self.fence_epoch, max_reclaims=self.opts.knobs.max_reclaims,
                                expected_run_id=e.expected_run_id, session=self.boot_id,
                                prefix=ETCD_PREFIX, unstarted_only=e.unstarted)
            if plan.value is None:
                return "lost", None
            res = etcd.txn(*reclaim_txn(ETCD_PREFIX, e.task_id, e.slot, plan.value, 0,
                                        plan.mod_revision, plan.dead_alive), t_s)
        except EtcdModelUnavailable:
            return "unavailable", None
        d = decide_reclaim(res, node=self.name, run_id=e.run_id, high_water_before=hw0,
                           high_water_now=self.high_water, mod_revision=plan.mod_revision)
        self.high_water, self.fence_epoch = fold_decision(d, self.high_water, self.fence_epoch)
        if d.claimer_alive:
            return "claimer_alive", None
        if d.reason == "won":
            return self._mark_started(e.task_id, e.slot, plan.value, d.mod_revision, d.token)
        return d.reason, d.token

    # ------------------------------------------------------------- sessions
    def _session_tick(self, now: float) -> None:
        """The fencer shell's session loop: refresh the alive key every TTL/3."""
        if self.core.stopping:
            return
        ttl = self.opts.knobs.session_ttl_s
        self._timer(now + ttl / 3, "session", None)
        try:
            self.cluster.etcd.session_refresh(self.alive_key, ttl, self._t())
        except EtcdModelUnavailable:
            pass  # next period (the real fencer logs and retries)

    def _session_close(self) -> None:
        if self.cluster.etcd is None:
            return
        try:
            self.cluster.etcd.session_close(self.alive_key, self._t())
        except EtcdModelUnavailable:
            pass  # expires by itself


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
        self.expect_no_missed = False
        self.disks: dict[str, dict[str, bytes]] = {}
        self.ledger: list[tuple] = []
        self.notifications: list[tuple] = []
        self.skipped: dict[tuple[str, int], str] = {}
        self.app_stats: dict[str, Any] = {"notes": {}, "skipped": {}, "streams": 0,
                                          "stream_failed": 0, "stream_bytes": 0}
        self._durations: dict[str, float] = {}
        super().__init__(config, options, schedule, app_factory=self._make_app, **kw)
        self.app_effect = self._on_app_effect

    def _make_app(self, node: SimNode) -> list:
        return [SchedulerApp(self, node)]

    def app(self, name: str) -> SchedulerApp | None:
        n = self.by_name[name]
        return n.apps[0] if n.up and n.apps else None

    def run_duration(self, task_id: str) -> float:
        d = self._durations.get(task_id)
        if d is None:
            u = child_rng(self.seed, "duration", task_id).random()
            d = self._durations[task_id] = self.app_options.run_duration_s * (0.25 + 1.5 * u)
        return d

    def note(self, node: SimNode, note: Note) -> None:
        notes = self.app_stats["notes"]
        notes[note.event] = notes.get(note.event, 0) + 1
        if note.event == "slot_skipped":
            f = note.fields
            sk = self.app_stats["skipped"]
            sk[f["reason"]] = sk.get(f["reason"], 0) + 1
            self.skipped.setdefault((f["task_id"], int(f["slot"])), f"{f['reason']} at {node.name}")

    # -- writes from outside -------------------------------------------------------
    def apply_tasks(self, name: str, defs: list[dict]) -> None:
        """Apply task definitions at node ``name`` now (a client's write)."""
        node = self.by_name[name]
        app = node.apps[0]
        t_s = self.loop.now_s
        now = app.epoch(node.local(t_s))
        _, effects = app.core.apply_tasks([Task.from_dict(d) for d in defs], now)
        app._carry(effects, now)
        self._app_effects(node, app._flush(), t_s)
        self._arm(node, t_s)

    # -- ledger --------------------------------------------------------------------
    def record_fire(self, node: SimNode, tid: str, slot: int, token, reason: str, run_id: str) -> None:
        t_s = self.loop.now_s
        rec = (tid, int(slot), node.name, node.boots, round(t_s, 6), token, reason)
        self.ledger.append(rec)
        self.trace.append((t_s, "fire", node.idx, tid, int(slot), token, reason))

    def record_notification(self, node: SimNode, e) -> None:
        """The webhook receiver got ``e`` (a ``Notify``)."""
        self.notifications.append((e.task_id, e.run_id, e.key, e.event, node.name, node.boots,
                                   round(self.loop.now_s, 6)))

    def ledger_hash(self) -> str:
        return hashlib.sha256(repr(self.ledger).encode()).hexdigest()

    # -- streams -------------------------------------------------------------------
    def _on_app_effect(self, node: SimNode, e, t_s: float) -> None:
        if type(e) is not Request:
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
            if f.kind == "leave" and node is not None and node.up and node.apps and not node.leaving:
                # Node.shutdown: stop firing, wait (up to the grace) for runs
                # and claims in flight, close runs, then leave.
                app = node.apps[0]
                now = app.epoch(node.local(t_s))
                if app.leaving_since is None:
                    app.leaving_since = t_s
                    app._carry(app.core.begin_shutdown(now), now)
                    self._app_effects(node, app._flush(), t_s)
                busy = app.core.running or app.core.claims_in_flight() or app.core.notifications_in_flight()
                if busy and t_s < app.leaving_since + 30.0:
                    self.loop.schedule(t_s + 0.05, K_FAULT, f)
                    return
                app._carry(app.core.close_runs(now), now)
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
                self._app_effects(node, node.apps[0].answered(f.xid, None, node.local(t_s)), t_s)
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
            reply, effects = node.apps[0].serve(initiator.name, f.data, node.local(t_s))
            self._app_effects(node, effects, t_s)
            if node.up:
                self._arm(node, t_s)
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
        self._app_effects(node, node.apps[0].answered(f.xid, f.data, node.local(t_s)), t_s)
        self._arm(node, t_s)
