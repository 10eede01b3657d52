"""The node core's ownership (sans-IO core): eligible members -> ring ->
ownership changes, handoffs of newly owned tasks, owner loss, and the
shards of broadcast tasks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from node.ownership import shards
from node.state.runstatus import LOST, RUNNING
from node.tasks.model import Task
from node.core_effects import claim_run_id


#: Handoff exchanges in flight at once (each covers every held task its peer
#: replicates): a node that rejoins owning thousands of tasks asks its peers
#: a few times, not once per task.
HANDOFF_PARALLEL = 4


class OwnershipMixin:
    """Ownership, handoffs, owner loss and shards: a mixin of
    :class:`node.core.NodeCore`, whose constructor holds the state it uses."""

    # ------------------------------------------------------------ ownership

    def _eligible(self) -> dict[str, dict[str, str]]:
        if not self.joined:
            # Until we hear from the cluster (or the boot grace passes), own
            # nothing: a restarted node alone would own every task and fire
            # catch-ups the real owners are already firing.
            return {}
        out = {}
        alive = [n for n in sorted(self._view) if n != self.name and self._view[n][0] in ("alive", "suspect")]
        measured = [n for n in alive if self.skew.best(n) is not None]
        off = [n for n in measured if n in self._skewed]
        if len(measured) >= 2 and 2 * len(off) > len(measured):
            # Clock quorum: most peers we measured look off by more than
            # max_skew_s, so the clock that is off is ours (a node restarted
            # with a wrong clock): own nothing and leave the slots to them.
            for name in alive:
                out[name] = self._view[name][1]
            self.clock_suspect = True
            return out
        self.clock_suspect = False
        for name in alive:
            if name not in self._skewed:
                out[name] = self._view[name][1]
        out.setdefault(self.name, dict(self.tags))
        return out

    def _recompute(self, now: float) -> None:
        self._shared_cache.clear()
        was = self.clock_suspect
        changed = self.ring.set_members(self._eligible())
        if self.clock_suspect != was:
            self._note("clock", suspect=self.clock_suspect, skewed=sorted(self._skewed))
        self._apply_ownership(sorted(changed), now)
        for tid in sorted(self._broadcast):
            self._reshard(tid, now)

    def _apply_ownership(self, task_ids: Iterable[str], now: float) -> None:
        start_handoffs = False
        for tid in task_ids:
            if tid not in self.tasks:
                continue
            if tid in self._broadcast:
                # each slot runs once per shard, as units <task>#<i> (node/ownership/shards.py)
                self.owned.discard(tid)
                self.scheduler.set_owned(tid, False, now)
                self._reshard(tid, now)
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
            if owned and others and tid not in self.handoff_pending and not self.stopping:
                self.handoff_pending[tid] = now + self.knobs.handoff_timeout_s
                self._handoff_asked[tid] = []
                self.scheduler.set_owned(tid, True, now, handoff_ready=False)
                self._timer(now + self.knobs.handoff_timeout_s, "handoff", None)
                start_handoffs = True
            else:
                self.scheduler.set_owned(tid, owned, now, handoff_ready=True)
                if not owned:
                    self.handoff_pending.pop(tid, None)
                    self._handoff_asked.pop(tid, None)
                else:
                    self._followups_of([tid], now)
        if start_handoffs:
            self._start_handoffs(now)

    def _start_handoffs(self, now: float) -> None:
        """One exchange per peer covers every held task it replicates."""
        if self.stopping:
            return
        for tid in sorted(self.handoff_pending):
            if len(self._handoff_by_peer) >= HANDOFF_PARALLEL:
                return
            others = [o for o in self.ring.owners(tid) if o != self.name]
            if any(o in self._handoff_by_peer for o in others):
                continue                     # an exchange in flight covers it
            asked = self._handoff_asked.setdefault(tid, [])
            fresh = [o for o in others if o not in asked] or others
            if not fresh:
                continue
            peer = fresh[self.rng.randrange(len(fresh))]
            xid = self._start_exchange(peer, "handoff", now)
            self._handoff_by_peer[peer] = xid

    def _handoff_done(self, tid: str, now: float, *, why: str | None) -> None:
        self.handoff_pending.pop(tid, None)
        asked = self._handoff_asked.pop(tid, [])
        if why is None:
            self.stats["handoffs"] += 1
        else:
            self.stats["handoff_timeouts"] += 1
            self._note("handoff_timeout", task_id=tid, why=why, asked=list(asked))
        if tid in self.tasks and self.ring.owner(tid) == self.name and not self.stopping:
            ctl = self.store.control(tid)
            self.scheduler.update_control(tid, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot)
            self.scheduler.set_owned(tid, True, now, handoff_ready=True)
            self._followups_of([tid], now)

    def _handoff_deadlines(self, now: float) -> None:
        for tid in sorted(self.handoff_pending):
            if self.handoff_pending[tid] <= now:
                self._handoff_done(tid, now, why=f"timed out after {self.knobs.handoff_timeout_s:g} s")

    def _owner_loss(self, dead: str, now: float) -> None:
        """Unfinished runs of a dead member, of tasks we now own (of a
        broadcast task: of the shards we now hold, node/ownership/shards.py Rule 3)."""
        for tid in self.ring.tasks_of(self.name):
            if self.ring.owner(tid) != self.name or tid not in self.tasks or tid in self._broadcast:
                continue
            for rec in self.store.runs(tid):
                if rec.get("node") == dead and rec.get("status") == RUNNING:
                    self._lose(tid, rec, dead, now, rerun=True)
        for tid in sorted(self._broadcast):
            for rec in self.store.runs(tid):
                if rec.get("node") == dead and rec.get("status") == RUNNING \
                        and self._unit_of(tid, rec) in self._shard_info:
                    self._lose(tid, rec, dead, now, rerun=True)

    def _recover_own_runs(self, now: float) -> None:
        """Our ``running`` records from a previous life of this node."""
        for tid in sorted(self.tasks):
            for rec in self.store.runs(tid):
                if rec.get("node") == self.name and rec.get("status") == RUNNING \
                        and claim_run_id(rec) not in self.running:
                    self._lose(tid, rec, self.name, now, rerun=self.ring.owner(tid) == self.name)

    def _lose(self, tid: str, rec: dict, dead: str, now: float, *, rerun: bool) -> None:
        self.stats["runs_lost"] += 1
        t = self.tasks.get(tid)
        lost = self._decide_followups(tid, dict(rec, status=LOST, finished=now), now,
                                      rerun=rerun and t is not None and t.on_owner_loss == "rerun")
        self._commit(self.store.put_run(lost), now, run_task=tid)
        self._note("run_lost", task_id=tid, run_id=rec.get("run_id"), node=dead)
        if isinstance(lost.get("notify"), dict):
            self._send_pending(tid, lost, now)
        unit = self._unit_of(tid, rec)
        if isinstance(rec.get("slot"), int):
            self._lost_claimers[(unit, rec["slot"])] = (dead, claim_run_id(rec))
            while len(self._lost_claimers) > self.knobs.lost_runs_max:
                self._lost_claimers.pop(next(iter(self._lost_claimers)))
        if rerun and (unit == tid or unit in self._shard_info):
            for eff in self.scheduler.unfinished_run(unit, rec, now):
                self._scheduler_effect(eff, now)

    # ------------------------------------------------------------ shards
    # Broadcast and sharded tasks: node/ownership/shards.py has the rules.

    def shard_list(self, tid: str) -> list[str]:
        task = self.tasks.get(tid)
        if task is None:
            return []
        members = self.ring.members()
        req = dict(task.tags or {})
        eligible = [m for m, tags in members.items() if all(tags.get(k) == v for k, v in req.items())]
        return shards.shard_members(tid, task.target, self.ring.owners(tid), eligible)

    def _reshard(self, tid: str, now: float) -> None:
        """Rule 2: schedule the shard of ``tid`` this node holds, drop others."""
        task = self.tasks.get(tid)
        if task is None or tid not in self._broadcast:
            return
        members = self.shard_list(tid)
        n = len(members)
        mine = {shards.shard_id(tid, i): (tid, i, n) for i, m in enumerate(members) if m == self.name}
        for unit in [u for u, info in self._shard_info.items() if info[0] == tid]:
            if unit not in mine:
                del self._shard_info[unit]
                self.scheduler.set_owned(unit, False, now)
                self.scheduler.remove_task(unit)
        for unit, info in sorted(mine.items()):
            fresh = unit not in self._shard_info
            self._shard_info[unit] = info
            if fresh:
                ctl = self.store.control(unit)
                self.scheduler.set_task(replace(task, id=unit, target=None),
                                        paused=bool(self.store.control(tid).paused),
                                        last_fired_slot=ctl.last_fired_slot, now=now)
                self.scheduler.set_owned(unit, not self.stopping, now, handoff_ready=True)

    def _drop_shards(self, tid: str) -> None:
        for unit in [u for u, info in self._shard_info.items() if info[0] == tid]:
            del self._shard_info[unit]
            try:
                self.scheduler.remove_task(unit)
            except KeyError:
                pass

    def _task_of(self, unit: str) -> Task | None:
        """The task a scheduling unit fires (itself, or a shard's task)."""
        t = self.tasks.get(unit)
        if t is not None:
            return t
        info = self._shard_info.get(unit)
        return self.tasks.get(info[0]) if info else None

    def _unit_of(self, tid: str, rec: dict) -> str:
        sh = rec.get("shard")
        if tid in self._broadcast and isinstance(sh, int):
            return shards.shard_id(tid, sh)
        return tid
