"""The node core's fires and claims (sans-IO core): scheduler effects, one
fencing claim in flight per task in slot order, re-claims of a dead or
unstarted claimer's slot, and the run started once a claim is won.
"""
from __future__ import annotations

from dataclasses import dataclass

from node.state.runstatus import LOST, TERMINAL
from node.schedule.effects import Advance, Cancel, Fire, SlotSkipped
from node.core_effects import CancelRun, Claim, Effect, Reclaim, StartRun, claim_run_id
from node.core_runs import _Run


@dataclass(slots=True)
class _ClaimTry:
    slot: int
    run_id: str
    reason: str
    fire_at: float
    deadline: float                 # give up (unavailable) after this epoch time
    reclaim: tuple[str, str | None] | None = None   # (dead claimer, its lost claim run id)
    since: float = 0.0              # first re-claim attempt
    unstarted: bool = False         # re-claim of a claim its holder never started (fencing Rule 9)
    waiting: bool = False           # a re-claim found the claimer's session alive (said once)


class ClaimsMixin:
    """Fires, claims and re-claims: a mixin of
    :class:`node.core.NodeCore`, whose constructor holds the state it uses."""

    # --------------------------------------------------------------- fencing

    def claim_answered(self, task_id: str, slot: int, run_id: str, outcome: str, token: int | None,
                       now: float, detail: str = "",
                       holder: tuple[str, str, bool] | None = None) -> list[Effect]:
        """The answer to a :class:`Claim` or :class:`Reclaim`.

        ``outcome``: ``won``; ``fire_without_token`` (fencing in fire mode
        with etcd down); ``unavailable`` (etcd did not answer this attempt);
        ``claimer_alive`` (re-claim: the dead claimer's session still
        holds); ``closed`` (the fencer is shutting down); anything else is a
        refusal (``lost``, ``stale_epoch``...: another node has the slot).
        ``holder``: for ``lost``, the claim found (node, run id, marked
        started); one never started is re-claimed (fencing Rule 9).
        """
        key = (task_id, slot)
        if key in self._reclaims_inflight:
            self._reclaims_inflight.discard(key)
            self._reclaim_answered(key, run_id, outcome, token, now, detail)
            return self._take()
        c = self._inflight.get(task_id)
        if c is None or c.slot != slot or c.run_id != run_id:
            return self._take()              # stale (task removed meanwhile)
        del self._inflight[task_id]
        self._note("claim", task_id=task_id, slot=slot, result=outcome, detail=detail)
        if outcome in ("won", "fire_without_token"):
            self._claimed(task_id, c, token, now)
        elif outcome == "unavailable" and not self.stopping and now < c.deadline:
            # etcd down: this slot keeps its turn; later slots wait behind it
            self._lines.setdefault(task_id, []).insert(0, c)
            self._backoff[task_id] = now + self.knobs.claim_retry_s
            self._timer(now + self.knobs.claim_retry_s, "claim", task_id)
        elif outcome == "lost" and holder is not None and not holder[2] and not self.stopping \
                and self._reclaim_unstarted(task_id, c, holder, now):
            pass
        else:
            self.stats["claims_unavailable" if outcome == "unavailable" else "claims_lost"] += 1
            self._abandon(task_id, slot, now, f"claim_{outcome}")
        self._pump(task_id, now)
        return self._take()

    def _reclaim_unstarted(self, unit: str, c: _ClaimTry, holder: tuple[str, str, bool], now: float) -> bool:
        """Fencing Rule 9: our claim was lost to one its holder never marked
        started. A holder still alive marks it or gives it up; one that died
        first (its etcd session gone), or an earlier boot of this node, never
        ran the slot: re-claim it and run it. Tasks with ``misfire: skip``
        wait no longer than their misfire window; the others up to the
        holder's session TTL (``1.5 * session_ttl_s + 2`` s). Returns False
        when the slot is left (task gone)."""
        task = self._task_of(unit)
        key = (unit, c.slot)
        if task is None or key in self._reclaims:
            return False
        dead, held_run = holder[0], holder[1]
        c.reclaim = (dead, held_run)
        c.unstarted = True
        c.since = now
        if task.misfire != "skip":
            c.deadline = max(c.deadline, now + 1.5 * self.knobs.session_ttl_s + 2.0)
        self._reclaims[key] = c
        self.stats["reclaims_unstarted"] += 1
        self._note("claim", task_id=unit, slot=c.slot, result="held_unstarted",
                   detail=f"{dead} holds run {held_run} and has not started it: re-claiming once "
                          f"its etcd session is gone")
        self._send_reclaim(key, now)
        return True

    # ------------------------------------------------------------ scheduling

    def _scheduler_effect(self, eff, now: float) -> None:
        kind = type(eff)
        if kind is Fire:
            self._fire(eff, now)
        elif kind is SlotSkipped:
            t = self._task_of(eff.task_id)
            self._note("slot_skipped", task_id=eff.task_id, slot=eff.slot, reason=eff.reason,
                       misfire=t.misfire if t else None)
            if (eff.task_id, eff.slot) in self._chain_ids:
                self._trigger_not_run(eff.task_id, eff.slot, eff.reason, now)
            else:
                self._missed(eff.task_id, eff.slot, eff.reason, now)
        elif kind is Cancel:
            if eff.run_id in self.running:
                why = "cancelled by the overlap policy (replace)" if eff.reason == "replace" else eff.reason
                self._cancels.setdefault(eff.run_id, (why, None))
                self._out.append(CancelRun(eff.run_id, eff.reason))
        elif kind is Advance:
            self._commit(self.store.advance_fired(eff.task_id, eff.slot), now)

    def _fire(self, fire: Fire, now: float) -> None:
        task = self._task_of(fire.task_id)
        if self.stopping or task is None:
            self._abandon(fire.task_id, fire.slot, now, "shutting_down" if self.stopping else "task_removed")
            return
        unit = fire.task_id
        if fire.reason == "catchup":
            self._note("misfire", task_id=task.id, slot=fire.slot, policy=task.misfire)
        chained = self._chain_ids.get((unit, fire.slot)) if fire.reason == "chain" else None
        run_id = chained or f"{fire.slot}-{self.name}-{self.rng.getrandbits(32):08x}"
        window = max(float(task.catchup_window_s or 0.0), self.scheduler.misfire_grace_s)
        c = _ClaimTry(fire.slot, run_id, fire.reason, fire.fire_at,
                      deadline=max(now, fire.slot + window))
        if not self.fencing:
            self._claimed(unit, c, None, now)
            return
        lost = self._lost_claimers.get((unit, fire.slot)) if fire.reason == "rerun_owner_loss" else None
        if lost is not None:
            # The dead claimer's claim stands in etcd: take it over once (no
            # turn: it may wait for the claimer's session and must not hold
            # the task's next slots back).
            c.reclaim = lost
            c.since = now
            c.deadline = max(c.deadline, now + 2.0)
            self._reclaims[(unit, fire.slot)] = c
            self._send_reclaim((unit, fire.slot), now)
            return
        line = self._lines.setdefault(unit, [])
        line.append(c)
        line.sort(key=lambda x: x.slot)
        self._pump(unit, now)

    def _pump(self, tid: str, now: float) -> None:
        """Send the task's oldest waiting claim if none is in flight:
        claims of one task go to etcd one at a time in slot order, so tokens
        grow with the slot."""
        if tid in self._inflight or tid in self._backoff:
            return
        line = self._lines.get(tid)
        if not line:
            self._lines.pop(tid, None)
            return
        c = line.pop(0)
        if not line:
            self._lines.pop(tid, None)
        if self.stopping:
            self._abandon(tid, c.slot, now, "shutting_down")
            return
        self._inflight[tid] = c
        self._out.append(Claim(tid, c.slot, c.run_id,
                               max(0.05, min(self.knobs.claim_attempt_s, c.deadline - now))))

    def _send_reclaim(self, key: tuple[str, int], now: float) -> None:
        c = self._reclaims.get(key)
        if c is None or key in self._reclaims_inflight:
            return
        if self._lost_run_finished(key, c, now):
            return
        if self.stopping:
            del self._reclaims[key]
            self._abandon(key[0], key[1], now, "shutting_down")
            return
        self._reclaims_inflight.add(key)
        assert c.reclaim is not None
        self._out.append(Reclaim(key[0], key[1], c.run_id, c.reclaim[0], c.reclaim[1],
                                 max(0.05, min(self.knobs.claim_attempt_s, c.deadline - now)),
                                 unstarted=c.unstarted))

    def _lost_run_finished(self, key: tuple[str, int], c: _ClaimTry, now: float) -> bool:
        """A rerun of a run seen lost waits for its claimer's etcd session;
        meanwhile the runner's own outcome may arrive (it finished, and its
        record came back with its restart): then the run was not lost and
        the rerun is dropped, the slot settled. True when dropped."""
        if c.reason != "rerun_owner_loss" or c.reclaim is None:
            return False
        task = self._task_of(key[0])
        if task is None:
            return False
        dead, lost_claim = c.reclaim
        for rec in self.store.runs(task.id):
            if rec.get("node") == dead and claim_run_id(rec) == lost_claim \
                    and rec.get("status") in TERMINAL and rec.get("status") != LOST:
                del self._reclaims[key]
                self._lost_claimers.pop(key, None)
                self.stats["reruns_dropped"] += 1
                self._note("rerun_dropped", task_id=key[0], slot=key[1], run_id=rec.get("run_id"),
                           status=rec.get("status"))
                for eff in self.scheduler.fire_abandoned(key[0], key[1], now, settled=True):
                    self._scheduler_effect(eff, now)
                return True
        return False

    def _reclaim_answered(self, key: tuple[str, int], run_id: str, outcome: str, token: int | None,
                          now: float, detail: str) -> None:
        c = self._reclaims.get(key)
        if c is None or c.run_id != run_id:
            return
        alive_wait = 1.5 * self.knobs.session_ttl_s + 2.0
        if c.unstarted:
            alive_wait = min(alive_wait, c.deadline - c.since)
        if outcome == "claimer_alive" and now < c.since + alive_wait and not self.stopping:
            if not c.waiting:
                c.waiting = True               # said once per re-claim; each attempt is the fencer's debug line
                self._note("claim", task_id=key[0], slot=key[1], result="reclaim_waits", detail=detail)
            self._timer(now + self.knobs.claim_retry_s, "reclaim", key)
            return
        if outcome == "unavailable" and now < c.deadline and not self.stopping:
            self._timer(now + self.knobs.claim_retry_s, "reclaim", key)
            return
        if outcome in ("won", "fire_without_token") and self._lost_run_finished(key, c, now):
            return                             # the claim is ours now; the slot ran already
        del self._reclaims[key]
        self._lost_claimers.pop(key, None)
        self._note("claim", task_id=key[0], slot=key[1], result="reclaim_" + outcome, detail=detail)
        if outcome in ("won", "fire_without_token"):
            self.stats["reclaims_won"] += 1
            self._claimed(key[0], c, token, now)
            return
        self.stats["reclaims_claimer_alive" if outcome == "claimer_alive" else "reclaims_refused"] += 1
        self._abandon(key[0], key[1], now, "reclaim_" + outcome)

    def _claimed(self, tid: str, c: _ClaimTry, token: int | None, now: float) -> None:
        task = self._task_of(tid)
        if task is None:
            self._abandon(tid, c.slot, now, "task_removed")
            return
        if self.runs_closed:
            # answered after the shutdown wait: running now would race the
            # peer that takes the slot over once our etcd session is gone
            self._note("claim_after_shutdown", task_id=tid, slot=c.slot)
            self._abandon(tid, c.slot, now, "claim_after_shutdown")
            return
        params = self._run_params.pop((tid, c.slot), None) if c.reason in ("run_now", "chain") else None
        upstream = None
        if c.reason == "chain":
            self._chain_ids.pop((tid, c.slot), None)
            upstream = (params or {}).get("upstream")
            params = {"env": (params or {}).get("env") or {}, "args": []}
        info = self._shard_info.get(tid)
        if info is not None:
            # Rule 2 of node/ownership/shards.py: the shard's index and count in its env
            env = dict((params or {}).get("env") or {})
            env.update({"PEERD_SHARD_INDEX": str(info[1]), "PEERD_SHARD_COUNT": str(info[2])})
            params = {"env": env, "args": list((params or {}).get("args") or [])}
        self.running[c.run_id] = _Run(task.id, c.slot, token, c.reason, now,
                                      params=params if c.reason == "run_now" else None, upstream=upstream,
                                      unit=tid if tid != task.id else None,
                                      shard=(info[1], info[2]) if info else None)
        for eff in self.scheduler.run_started(tid, c.slot, c.run_id, now):
            self._scheduler_effect(eff, now)
        self._note("slot_fired", task_id=tid, slot=c.slot, reason=c.reason,
                   late_s=max(0.0, now - c.fire_at), token=token)
        self._out.append(StartRun(task, c.slot, c.run_id, c.reason, c.fire_at, token,
                                  params if params and (params.get("env") or params.get("args")) else None,
                                  unit=tid if tid != task.id else None))

    def _abandon(self, tid: str, slot: int, now: float, why: str) -> None:
        self.stats["abandoned"] += 1
        if (tid, slot) in self._chain_ids:
            if why in ("task_removed", "claim_unavailable"):
                self._trigger_not_run(tid, slot, why, now)
            else:
                # another node holds its claim, or we stop: the trigger stays
                # for the run's records or the next owner
                self._chain_ids.pop((tid, slot), None)
        else:
            self._missed(tid, slot, why, now)
        self._run_params.pop((tid, slot), None)
        # a slot left because we stop stays open for the next owner
        settled = why not in ("shutting_down", "claim_after_shutdown")
        for eff in self.scheduler.fire_abandoned(tid, slot, now, settled=settled):
            self._scheduler_effect(eff, now)
        self._note("slot_skipped", task_id=tid, slot=slot, reason=why, misfire=None)
