"""The node core's follow-ups (sans-IO core): notifications and chained runs
decided with a run's final record and handed on to the owner of the next
task (node/run/followups.py has the rules).
"""
from __future__ import annotations

from typing import Iterable

from node.run import followups
from node import peerwire
from node.state.runstatus import PENDING, SKIPPED
from node.tasks.model import Task
from node.core_effects import Notify, Request
from node.core_replication import PUSH_TIMEOUT_S


class FollowupsMixin:
    """Notifications and chained runs: a mixin of
    :class:`node.core.NodeCore`, whose constructor holds the state it uses."""

    # ------------------------------------------------------------ follow-ups
    # Notifications and chained runs: node/run/followups.py has the rules.

    def _targets(self, task: Task) -> tuple:
        """A task's notify targets, or the node's defaults when it has none."""
        return task.notify or self.default_notify

    def _index_after(self, tid: str, upstream: str | None) -> None:
        old = self._after_of.pop(tid, None)
        if old is not None:
            ds = self._downstream.get(old)
            if ds is not None:
                ds.discard(tid)
                if not ds:
                    del self._downstream[old]
        if upstream is not None:
            self._after_of[tid] = upstream
            self._downstream.setdefault(upstream, set()).add(tid)

    def _decide_followups(self, tid: str, rec: dict, now: float, *, rerun: bool) -> dict:
        """A run of ``tid`` ended and ``rec`` is its final record, about to
        be written: returns it with its notifications (rules 1-2) and
        writes the chain triggers (rule 4)."""
        task = self.tasks.get(tid)
        status = rec.get("status")
        rid = rec.get("run_id")
        if task is None or not isinstance(rid, str):
            return rec
        targets = self._targets(task)
        if targets and "notify" not in rec:
            prev = followups.previous_status(self.store.runs(tid), rid.rsplit(".", 1)[0])
            pairs = followups.targets_for(targets, followups.run_events(status, prev))
            if pairs:
                rec = dict(rec, notify=followups.notify_state(pairs))
        slot = rec.get("slot")
        if not isinstance(slot, int):
            return rec
        for d in sorted(self._downstream.get(tid, ())):
            dt = self.tasks.get(d)
            if dt is None or not dt.after or not followups.chain_matches(dt.after["on"], status, rerun=rerun):
                continue
            if self._reaches(tid, d):
                # a cycle (two definitions merged after a partition): idle,
                # explain says why
                continue
            trig = followups.trigger_run_id(tid, slot, d) + ".1"
            if self.store.run_record(d, trig) is not None:
                continue
            self._note("chain_triggered", task_id=d, upstream=tid, run_id=trig, slot=slot)
            self._commit(self.store.put_run({
                "task_id": d, "run_id": trig, "slot": slot, "node": self.name, "attempt": 1,
                "status": PENDING, "exit_code": None, "started": None, "finished": None,
                "fencing_token": None, "output": "",
                "upstream": {"task_id": tid, "run_id": rid, "status": status},
            }), now, run_task=d)
        return rec

    def _reaches(self, start: str, goal: str) -> bool:
        """Does following ``after`` links up from ``start`` reach ``goal``?"""
        cur: str | None = start
        for _ in range(len(self._after_of) + 1):
            if cur == goal:
                return True
            cur = self._after_of.get(cur) if cur is not None else None
            if cur is None:
                return False
        return False

    def _followups_of(self, tids: Iterable[str], now: float) -> None:
        """Look for follow-ups left to do in the records of ``tids``."""
        for tid in tids:
            for rec in self.store.runs(tid):
                self._followup(tid, rec, now)

    def _followup(self, tid: str, rec: dict, now: float) -> None:
        """One record: a pending notification this node must send (rule 2),
        a chain trigger of a task this node owns (rule 4)."""
        if isinstance(rec.get("notify"), dict) and "pending" in rec["notify"].values():
            node = rec.get("node")
            if node == self.name or (self.ring.owner(tid) == self.name
                                     and self._view.get(node, ("dead", {}))[0] in ("dead", "left")):
                self._send_pending(tid, rec, now)
        if followups.is_trigger(rec):
            if tid in self.owned and tid not in self.handoff_pending and not self.stopping:
                self._take_trigger(tid, rec, now)
            self._held_triggers.add((tid, rec["run_id"]))
        else:
            self._held_triggers.discard((tid, rec.get("run_id")))

    def _hand_on_triggers(self, now: float) -> None:
        """Pending chain triggers of tasks this node does not own any more
        (written while a partition or churn made it an owner or a replica)
        go to the task's owner, as Dynamo's hinted handoff hands on writes
        held for another replica; dropped here once the owner has them."""
        for key in sorted(self._held_triggers):
            tid, rid = key
            rec = self.store.run_record(tid, rid)
            if rec is None or not followups.is_trigger(rec):
                self._held_triggers.discard(key)
                continue
            owner = self.ring.owner(tid)
            if owner is None or owner == self.name or key in self._hand_on_xids.values():
                continue
            data = peerwire.encode({"t": "push", "entries": [list(e) for e in self.store.entries(
                [f"run/{tid}/{rid}"])]})
            self._xid += 1
            self._pushes.add(self._xid)
            self._hand_on_xids[self._xid] = key
            self._out.append(Request(owner, self._xid, data, PUSH_TIMEOUT_S, "push"))

    def _send_pending(self, tid: str, rec: dict, now: float) -> None:
        task = self.tasks.get(tid)
        rid = rec["run_id"]
        for key, state in sorted(rec["notify"].items()):
            if state != "pending" or (tid, rid, key) in self._notifying:
                continue
            idx, _, event = key.partition(":")
            targets = self._targets(task) if task is not None else ()
            if task is None or not idx.isdigit() or int(idx) >= len(targets):
                # the definition changed since: nowhere to send it
                self._notify_done(tid, rid, key, False, now, "target no longer in the task's notify")
                continue
            self._notifying.add((tid, rid, key))
            self._out.append(Notify(tid, rid, key, event, targets[int(idx)],
                                    followups.payload(tid, self.store.with_output(rec), event)))

    def _take_trigger(self, tid: str, rec: dict, now: float) -> None:
        slot = rec.get("slot")
        claim = rec["run_id"].rsplit(".", 1)[0]
        if not isinstance(slot, int) or self._chain_ids.get((tid, slot)) == claim \
                or tid not in self.tasks:
            return
        up = rec["upstream"]
        self._chain_ids[(tid, slot)] = claim
        self._run_params[(tid, slot)] = {"env": {
            "PEERD_UPSTREAM_TASK_ID": str(up.get("task_id", "")),
            "PEERD_UPSTREAM_RUN_ID": str(up.get("run_id", "")),
            "PEERD_UPSTREAM_STATUS": str(up.get("status", "")),
        }, "args": [], "upstream": dict(up)}
        try:
            effects = self.scheduler.trigger(tid, slot, now)
        except KeyError:
            self._chain_ids.pop((tid, slot), None)
            self._run_params.pop((tid, slot), None)
            return
        for eff in effects:
            self._scheduler_effect(eff, now)

    def _trigger_not_run(self, tid: str, slot: int, why: str, now: float) -> None:
        """A chained slot this node decided not to run: its trigger ends skipped."""
        claim = self._chain_ids.pop((tid, slot), None)
        self._run_params.pop((tid, slot), None)
        if claim is None:
            return
        rec = self.store.run_record(tid, claim + ".1")
        if rec is not None and rec.get("status") == PENDING:
            self._commit(self.store.put_run(dict(rec, status=SKIPPED, finished=now, node=self.name,
                                                 error=f"chained run not run: {why}")), now, run_task=tid)

    def _missed(self, tid: str, slot: int, reason: str, now: float) -> None:
        task = self._task_of(tid)
        if task is None or not self._targets(task) or reason not in followups.MISSED_REASONS:
            return
        fields = {"event": "missed", "task_id": task.id, "slot": slot, "reason": reason, "node": self.name}
        info = self._shard_info.get(tid)
        if info is not None:
            fields["shard"] = info[1]
        targets = self._targets(task)
        for idx, event in followups.targets_for(targets, ["missed"]):
            self._out.append(Notify(task.id, None, f"{idx}:{event}", event, targets[idx], fields))
