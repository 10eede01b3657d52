"""The node core: every decision a peerd node makes between its cores (sans-IO).

The SWIM core decides membership, the ring decides owners, the store merges
state, the scheduler decides slots, the fencing module decides claims. What
a node does *between* them is decided here, once, for the trio daemon
(``node/shell.py``) and for the simulator (``sim/app.py``) alike:

- membership view -> eligible members -> ring -> ownership changes; a task
  newly owned with other replicas is *held* until a handoff exchange with one
  of them completes (or ``handoff_timeout_s``); handoffs are batched: one
  exchange with a peer releases every held task that peer replicates, and at
  most ``HANDOFF_PARALLEL`` run at once;
- a member declared dead or left -> its unfinished runs of tasks we now own
  become ``lost`` and go to the scheduler's ``on_owner_loss`` rule; the dead
  member is remembered as the claimer of that slot (for a fencing re-claim);
- our own ``running`` records from a previous life become ``lost`` at start;
- a local write -> entries pushed at once (catalogue and control to every
  alive or suspect member, run records to the task's preference list);
  anti-entropy with one random alive member every
  ``ae_interval_s * U(0.5, 1.5)`` repairs the rest and measures clock skew;
- scheduler Fire -> (fencing) a claim, one claim in flight per task in slot
  order, retried every ``claim_retry_s`` while etcd is unavailable until the
  slot's catch-up window closes; a ``rerun_owner_loss`` fire of a slot whose
  claimer died re-claims instead, takes no turn, and waits for the dead
  claimer's etcd session at most ``1.5 * session_ttl_s + 2`` s -> run;
- run lifecycle (attempt started, attempt finished, run ended) -> run
  records (``node.state.runstatus``) and the scheduler's overlap bookkeeping;
- shutdown: no Fire after ``begin_shutdown``; a claim answered after
  ``close_runs`` does not run.

Inputs are method calls with ``now`` (epoch seconds of this node's clock);
outputs are effects (``node/core_effects.py``), returned as lists. The core never reads a
clock, never does I/O, and takes its randomness from the ``rng`` it is
given, so the simulator replays it from a seed. Shells drain
``core.store.drain_dirty()`` to persist after each call.

The rules live in mixins, one module per concern: ``node/core_ownership.py``
(ring, handoffs, owner loss, shards), ``node/core_replication.py`` (peer
messages, pushes, anti-entropy), ``node/core_followups.py`` (notifications,
chained runs), ``node/core_claims.py`` (fires, claims, re-claims) and
``node/core_runs.py`` (run reports and records). This module holds the state,
the constructor and the entry points; the effects are in
``node/core_effects.py``.
"""
from __future__ import annotations

import heapq
import random
from typing import Any, Iterable

from node.knobs import NodeKnobs
from node.ownership.ring import Ring
from node.schedule.effects import Fire, SlotSkipped
from node.schedule.explain import explain
from node.schedule.scheduler import Scheduler
from node.ownership.skew import SkewEstimator
from node.state.store import Store
from node.tasks.model import Task
from node.core_effects import Effect, Note
from node.core_claims import ClaimsMixin, _ClaimTry
from node.core_followups import FollowupsMixin
from node.core_ownership import OwnershipMixin
from node.core_replication import ReplicationMixin, _Exchange
from node.core_runs import RunsMixin, _Run

__all__ = ["NodeCore"]


class NodeCore(OwnershipMixin, ReplicationMixin, FollowupsMixin, ClaimsMixin, RunsMixin):
    """One node's wiring between its cores. See the module docstring.

    Args:
        name: this node's member name.
        store: the replicated store (loaded from disk by the shell).
        tags: this node's tags (task placement).
        knobs: :class:`node.knobs.NodeKnobs`.
        rng: randomness (run ids, anti-entropy peers and intervals).
        fencing: claim every fire in etcd first.
        default_notify: notify targets for tasks without their own.
    """

    def __init__(self, name: str, store: Store, *, tags: dict[str, str] | None = None,
                 knobs: NodeKnobs | None = None, rng: random.Random | None = None,
                 fencing: bool = False, default_notify: tuple = ()) -> None:
        self.name = name
        self.store = store
        self.tags = dict(tags or {})
        self.knobs = knobs or NodeKnobs()
        self.rng = rng or random.Random(0)
        self.fencing = fencing
        #: notify targets of tasks without their own (the node config's ``notify``)
        self.default_notify = tuple(default_notify)
        self.ring = Ring(replicas=3)
        self.scheduler = Scheduler(name)
        self.skew = SkewEstimator()
        self.tasks: dict[str, Task] = {}
        self._defs: dict[str, dict] = {}
        self.owned: set[str] = set()
        self.handoff_pending: dict[str, float] = {}        # task -> deadline
        self.joined = False
        self.started = False
        self._view: dict[str, tuple[str, dict]] = {}       # member -> (state, tags)
        self._skewed: frozenset[str] = frozenset()
        #: most measured peers disagree with this node's clock: it owns nothing
        self.clock_suspect = False
        self._shared_cache: dict[str, list[str]] = {}
        self._timers: list[tuple[float, int, str, Any]] = []
        self._tseq = 0
        self._xid = 0
        self._exchanges: dict[int, _Exchange] = {}
        self._ae_xid: int | None = None
        self._handoff_by_peer: dict[str, int] = {}
        self._handoff_asked: dict[str, list[str]] = {}    # task -> peers asked
        self._pushes: set[int] = set()
        self._lines: dict[str, list[_ClaimTry]] = {}      # task -> claims waiting (slot order)
        self._inflight: dict[str, _ClaimTry] = {}         # task -> the claim sent
        self._backoff: dict[str, float] = {}              # task -> next claim attempt at
        self._reclaims: dict[tuple[str, int], _ClaimTry] = {}
        self._reclaims_inflight: set[tuple[str, int]] = set()
        self._lost_claimers: dict[tuple[str, int], tuple[str, str | None]] = {}
        self.running: dict[str, _Run] = {}
        self._cancels: dict[str, tuple[str, str | None]] = {}   # claim run id -> (why, by)
        self._run_params: dict[tuple[str, int], dict] = {}       # (task, slot) -> manual run params
        self._after_of: dict[str, str] = {}                      # task -> its upstream (after.task)
        self._downstream: dict[str, set[str]] = {}               # upstream -> tasks after it
        self._chain_ids: dict[tuple[str, int], str] = {}         # (task, slot) -> trigger claim id
        self._notifying: set[tuple[str, str, str]] = set()       # (task, run id, key) in flight
        self._held_triggers: set[tuple[str, str]] = set()        # pending chain triggers we hold
        self._broadcast: set[str] = set()                        # tasks with target all|count
        self._shard_info: dict[str, tuple[str, int, int]] = {}   # unit "<task>#<i>" we run -> (task, i, n)
        self._hand_on_xids: dict[int, tuple[str, str]] = {}      # push xid -> trigger handed on
        self.stopping = False
        self.runs_closed = False
        #: False: the scheduler decides nothing (the simulator's quiet end of
        #: a run); everything else goes on.
        self.scheduling = True
        self.stats: dict[str, int] = {
            "handoffs": 0, "handoff_timeouts": 0, "ae_ok": 0, "ae_failed": 0, "pushes": 0,
            "claims_lost": 0, "claims_unavailable": 0, "reclaims_won": 0, "reclaims_refused": 0,
            "reclaims_claimer_alive": 0, "reclaims_unstarted": 0, "abandoned": 0, "runs_lost": 0,
            "reruns_dropped": 0,
        }
        self._out: list[Effect] = []

    # ================================================================ inputs

    def start(self, now: float, *, joined: bool) -> list[Effect]:
        """Install the tasks the store holds, take ownership, recover our own
        unfinished runs from a previous life, arm the timers."""
        self.started = True
        self.joined = joined
        for view in self.store.tasks():
            self._install(view, now)
        if not joined:
            self._timer(now + self.knobs.boot_grace_s, "boot_grace", None)
        self._recompute(now)
        self._recover_own_runs(now)
        self._followups_of(sorted(self.store.run_tasks()), now)
        self._timer(now + self._ae_wait(), "ae", None)
        return self._take()

    def members_changed(self, view: Iterable[tuple[str, str, dict]], now: float, *,
                        kind: str | None = None, member: str | None = None) -> list[Effect]:
        """The membership view changed.

        Args:
            view: every known member as ``(name, state, tags)``, ``state`` one
                of ``alive|suspect|dead|left``.
            kind: the event (``join``, ``update``, ``suspect``, ``alive``,
                ``dead``, ``left``) and ``member`` its subject, if any.
        """
        self._view = {n: (s, dict(t)) for n, s, t in view}
        if member is not None and member != self.name:
            if kind == "join" and not self.joined:
                self.joined = True
                self._note("joined", member=member)
        if member == self.name and kind == "left":
            return self.begin_shutdown(now)     # its effects (slots left to the next owner) go out
        self._recompute(now)
        if kind in ("dead", "left", "join") and member is not None and member != self.name:
            # a restarted member's clock is measured afresh
            self.skew.forget(member)
        if kind in ("dead", "left") and member is not None and member != self.name:
            self._owner_loss(member, now)
            self._followups_of(sorted(self.owned), now)
        self._hand_on_triggers(now)
        return self._take()

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do (None: nothing scheduled)."""
        best = None if self.stopping or not self.scheduling else self.scheduler.next_deadline()
        if self._timers:
            t = self._timers[0][0]
            best = t if best is None else min(best, t)
        return best

    def tick(self, now: float, limit: int | None = None) -> list[Effect]:
        """Timers due at ``now``, then the scheduler's due slots."""
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, arg = heapq.heappop(self._timers)
            if kind == "ae":
                self._timer(now + self._ae_wait(), "ae", None)
                self._ae_round(now)
                if self._held_triggers:
                    self._hand_on_triggers(now)
            elif kind == "handoff":
                self._handoff_deadlines(now)
            elif kind == "claim":
                self._backoff.pop(arg, None)
                self._pump(arg, now)
            elif kind == "reclaim":
                self._send_reclaim(arg, now)
            elif kind == "boot_grace" and not self.joined:
                self.joined = True
                self._note("boot_alone", grace_s=self.knobs.boot_grace_s)
                self._recompute(now)
        if not self.stopping and self.scheduling:
            for eff in self.scheduler.tick(now, limit=limit or self.knobs.tick_limit):
                self._scheduler_effect(eff, now)
        return self._take()

    # ------------------------------------------------------------ API writes

    def apply_tasks(self, tasks: list[Task], now: float) -> tuple[list[str], list[Effect]]:
        """Write validated tasks (``now`` schedules resolved by the caller);
        unchanged ones make no new version."""
        entries = []
        for t in tasks:
            d = t.to_dict()
            view = self.store.get_task(t.id)
            ctx = view.context if view is not None else None
            if view is not None and not view.deleted and view.value == d and len(view.siblings) <= 1:
                continue
            entries.extend(self.store.put_task(t.id, d, ctx, now))
            if bool(self.store.control(t.id).paused) != bool(t.paused):
                entries.extend(self.store.set_paused(t.id, bool(t.paused), now))
        self._commit(entries, now)
        return [t.id for t in tasks], self._take()

    def delete_task(self, task_id: str, now: float) -> list[Effect]:
        view = self.store.get_task(task_id)
        self._commit(self.store.delete_task(task_id, view.context if view else None, now), now)
        return self._take()

    def set_paused(self, task_id: str, paused: bool, now: float) -> list[Effect]:
        self._commit(self.store.set_paused(task_id, paused, now), now)
        return self._take()

    def run_now(self, task_id: str, now: float, params: dict | None = None
                ) -> tuple[int | None, list[str], list[Effect]]:
        """Fire ``task_id`` now if we own it: ``(slot or None, skip reasons, effects)``.
        ``params`` (checked by ``tasks.bind_run``) go with that run only."""
        if task_id in self._broadcast:
            # every shard this node holds runs now (the API asks each holder)
            fired, why, effects = None, [], []
            for unit in sorted(u for u, info in self._shard_info.items() if info[0] == task_id):
                slot, reasons, effs = self.run_now(unit, now, params)
                fired = slot if slot is not None else fired
                why += reasons
                effects += effs
            return fired, why, effects + self._take()
        if params and (params.get("env") or params.get("args")):
            self._run_params[(task_id, int(now // 1))] = params
        effects = self.scheduler.run_now(task_id, now)
        slot = None
        reasons = []
        for eff in effects:
            if type(eff) is Fire:
                slot = eff.slot
            elif type(eff) is SlotSkipped:
                reasons.append(eff.reason)
            self._scheduler_effect(eff, now)
        if slot is None and not reasons:
            # waits its turn behind a pending or running run (rule 4a)
            waiting = explain(self.scheduler, task_id, now, 0).get("waiting") or []
            if int(now // 1) in waiting:
                slot = int(now // 1)
        if slot is None:
            self._run_params.pop((task_id, int(now // 1)), None)
        return slot, reasons, self._take()

    def backfill(self, task_id: str, start: int, end: int, now: float, dry_run: bool) -> list[int]:
        """Queue (or list) a past window's slots. Raises ValueError."""
        return list(self.scheduler.backfill(task_id, int(start), int(end), now, dry_run=dry_run))

    # -------------------------------------------------------------- shutdown

    def begin_shutdown(self, now: float) -> list[Effect]:
        """No new Fire, claim or exchange from now on (running runs go on)."""
        self.stopping = True
        for tid in sorted(self._lines):
            for c in self._lines[tid]:
                self._abandon(tid, c.slot, now, "shutting_down")
        self._lines.clear()
        for key in sorted(self._reclaims):
            self._abandon(key[0], key[1], now, "shutting_down")
        self._reclaims.clear()
        return self._take()

    def close_runs(self, now: float) -> list[Effect]:
        """From now on a claim answered does not start a run."""
        self.runs_closed = True
        return self._take()

    def notifications_in_flight(self) -> int:
        """Notifications of runs sent and not yet reported (a leaving node
        waits for them, so the next owner does not send them again)."""
        return len(self._notifying)

    def claims_in_flight(self) -> int:
        return len(self._inflight) + len(self._reclaims_inflight)

    # ================================================================ rules

    def _take(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    def _note(self, event: str, **fields: Any) -> None:
        self._out.append(Note(event, fields))

    def _timer(self, at: float, kind: str, arg: Any) -> None:
        self._tseq += 1
        heapq.heappush(self._timers, (at, self._tseq, kind, arg))

    def _ae_wait(self) -> float:
        return self.knobs.ae_interval_s * (0.5 + self.rng.random())
