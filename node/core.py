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
outputs are effects (below), returned as lists. The core never reads a
clock, never does I/O, and takes its randomness from the ``rng`` it is
given, so the simulator replays it from a seed. Shells drain
``core.store.drain_dirty()`` to persist after each call.

Effects
-------
:class:`Request` send ``data`` (a ``node.peerwire`` message) to a peer over a
stream and answer :meth:`NodeCore.request_answered` or
:meth:`NodeCore.request_failed` with ``xid``. :class:`StartRun` run a task's
command (with retries) and report :meth:`attempt_started`,
:meth:`attempt_finished`, :meth:`run_ended`. :class:`CancelRun` stop one.
:class:`Claim` / :class:`Reclaim` one fencing attempt of at most
``attempt_s`` seconds, answered by :meth:`claim_answered`. :class:`Note`
something to log and count (``event`` names are listed in :data:`NOTES`).
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from node.run import followups
from node import peerwire
from node.ownership import shards
from node.knobs import NodeKnobs
from node.ownership.ring import Ring
from node.state.runstatus import CANCELLED, LOST, PENDING, RETRYABLE, RUNNING, SKIPPED, TERMINAL
from node.schedule.effects import Advance, Cancel, Fire, SlotSkipped
from node.schedule.explain import explain
from node.schedule.scheduler import Scheduler
from node.ownership.skew import SkewEstimator
from node.run.traceids import trace_id_for
from node.state.store import Store
from node.tasks.model import Task, TaskError

__all__ = [
    "NodeCore", "Request", "StartRun", "CancelRun", "Claim", "Reclaim", "Note", "Notify", "NOTES",
    "HANDOFF_PARALLEL", "claim_run_id",
]

#: Handoff exchanges in flight at once (each covers every held task its peer
#: replicates): a node that rejoins owning thousands of tasks asks its peers
#: a few times, not once per task.
HANDOFF_PARALLEL = 4
#: An anti-entropy exchange that moved at least this many bytes (a page of
#: node/state/exchange.py is 1 MiB of entries) is followed at once by another with
#: the same peer, so a refill goes page after page rather than a page per
#: round.
PAGE_FOLLOW_BYTES = 512 * 1024
#: Stream timeouts (seconds) of the requests the core sends.
PUSH_TIMEOUT_S = 5.0
EXCHANGE_TIMEOUT_S = 10.0

#: Note events: what a shell logs and counts.
NOTES = (
    "joined", "boot_alone", "member", "slot_skipped", "slot_fired", "misfire", "claim",
    "claim_after_shutdown", "run_started", "run_finished", "run_lost", "handoff",
    "handoff_timeout", "ae_round", "replication_in", "replication_out", "bad_message",
    "task_invalid", "rejected_entries", "run_cancel", "notification", "chain_triggered", "clock",
)


@dataclass(frozen=True, slots=True)
class Request:
    peer: str
    xid: int
    data: bytes
    timeout_s: float
    kind: str          # "push" | "ae" | "handoff"


@dataclass(frozen=True, slots=True)
class StartRun:
    task: Task
    slot: int
    run_id: str        # claim run id; attempt n records run_id + "." + n
    reason: str
    fire_at: float
    token: int | None
    #: a manual run's parameters: {"env": {...}, "args": [...]} (tasks.bind_run)
    params: dict | None = None
    #: the scheduling unit when it is not the task: a shard ``<task>#<i>``
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class CancelRun:
    run_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Send one notification (node/run/followups.py) and, when ``run_id`` is
    set, report :meth:`NodeCore.notify_done` with ``key``."""
    task_id: str
    run_id: str | None     # the run record it belongs to; None for ``missed``
    key: str               # "<target index>:<event>"
    event: str
    target: dict
    fields: dict


@dataclass(frozen=True, slots=True)
class Claim:
    task_id: str
    slot: int
    run_id: str
    attempt_s: float


@dataclass(frozen=True, slots=True)
class Reclaim:
    task_id: str
    slot: int
    run_id: str
    dead: str
    expected_run_id: str | None
    attempt_s: float
    unstarted: bool = False         # only a claim its holder never marked started (fencing Rule 9)


@dataclass(frozen=True, slots=True)
class Note:
    event: str
    fields: dict = field(default_factory=dict)


Effect = Request | StartRun | CancelRun | Claim | Reclaim | Note | Notify


def claim_run_id(rec: dict) -> str | None:
    """Run records carry ``<claim run id>.<attempt>``; claims carry the former."""
    rid = rec.get("run_id")
    return rid.rsplit(".", 1)[0] if isinstance(rid, str) and "." in rid else None


@dataclass(slots=True)
class _Run:
    task_id: str
    slot: int
    token: int | None
    reason: str
    started: float
    attempt: int = 0
    attempt_started: float = 0.0
    params: dict | None = None
    upstream: dict | None = None
    unit: str | None = None          # the scheduling unit when not the task (a shard)
    shard: tuple[int, int] | None = None


@dataclass(slots=True)
class _Exchange:
    peer: str
    kind: str                       # "ae" | "handoff"
    scopes: list[str]
    scope: str | None = None
    shared: list[str] | None = None
    rounds: int = 0
    sent_at: float = 0.0
    nbytes: int = 0


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


class NodeCore:
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

    # --------------------------------------------------------- peer messages

    def serve(self, sender: str, data: bytes, now: float) -> tuple[bytes, list[Effect]]:
        """Answer a peer's stream request (``push`` or ``ae``) or a gossip
        broadcast (its reply is then dropped). Other message types are the
        shell's (API forwarding); they get an error reply here."""
        try:
            msg = peerwire.decode(data)
        except peerwire.PeerProtocolError as e:
            self._note("bad_message", peer=sender, error=str(e))
            return peerwire.reply(False, now, error=str(e)), self._take()
        t = msg["t"]
        if t == "push":
            self._merge(msg["entries"], sender, now)
            return peerwire.reply(True, now), self._take()
        if t == "ae":
            shared = self._shared_tasks(sender)
            try:
                res = self.store.handle_exchange(msg["msg"], tasks=shared)
            except ValueError as e:
                self._note("bad_message", peer=sender, error=str(e))
                return peerwire.reply(False, now, error=str(e)), self._take()
            if res.changed:
                self._note("replication_in", n=len(res.changed))
                self._after_change(res.changed, now)
            self._note("ae_round", result="served", peer=sender, bytes=len(data) + len(res.reply or b""))
            return peerwire.reply(True, now, body=res.reply), self._take()
        return peerwire.reply(False, now, error=f"unexpected message type {t}"), self._take()

    def request_answered(self, xid: int, raw: bytes, now: float) -> list[Effect]:
        """A :class:`Request`'s reply arrived."""
        if xid in self._pushes:
            self._pushes.discard(xid)
            held = self._hand_on_xids.pop(xid, None)
            if held is not None:
                self._held_triggers.discard(held)
            return self._take()
        ex = self._exchanges.get(xid)
        if ex is None:
            return self._take()
        try:
            rep = peerwire.decode(raw)
            if rep["t"] != "reply":
                raise peerwire.PeerProtocolError(f"answered with {rep['t']}")
            if not rep["ok"]:
                raise peerwire.PeerProtocolError(str(rep.get("error")))
            body = rep.get("body")
            if body is not None and not isinstance(body, bytes):
                raise peerwire.PeerProtocolError("reply body must be bytes")
        except peerwire.PeerProtocolError as e:
            self._exchange_over(xid, now, ok=False, why=f"{ex.peer} answered badly: {e}")
            return self._take()
        self.skew.observe(ex.peer, ex.sent_at, float(rep["wall"]), now)
        ex.nbytes += len(raw)
        msg = None
        if body is not None:
            try:
                res = self.store.handle_exchange(body, tasks=ex.shared)
            except ValueError as e:
                self._exchange_over(xid, now, ok=False, why=f"{ex.peer}: {e}")
                return self._take()
            if res.changed:
                self._note("replication_in", n=len(res.changed))
                self._after_change(res.changed, now)
            msg = res.reply
        if msg is not None and ex.rounds < self.knobs.ae_rounds_max:
            self._exchange_send(xid, ex, msg, now)
        else:
            self._next_scope(xid, ex, now)
        return self._take()

    def request_failed(self, xid: int, now: float, why: str = "") -> list[Effect]:
        """A :class:`Request` got no answer (peer down, stream cut, timeout)."""
        if xid in self._pushes:
            self._pushes.discard(xid)
            self._hand_on_xids.pop(xid, None)
            return self._take()
        if xid in self._exchanges:
            self._exchange_over(xid, now, ok=False, why=why or "no answer")
        return self._take()

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

    # ----------------------------------------------------------- run reports

    def attempt_started(self, run_id: str, attempt: int, now: float) -> list[Effect]:
        r = self.running.get(run_id)
        if r is None:
            return self._take()
        r.attempt = attempt
        r.attempt_started = now
        self._put_run(r, run_id, attempt, {"status": RUNNING, "exit_code": None, "started": now,
                                            "finished": None, "output": ""})
        self._note("run_started", task_id=r.task_id, run_id=f"{run_id}.{attempt}", attempt=attempt)
        return self._take()

    def attempt_finished(self, run_id: str, attempt: int, status: str, now: float, *,
                         exit_code: int | None = None, started: float | None = None,
                         finished: float | None = None, output: str = "",
                         error: str | None = None) -> list[Effect]:
        r = self.running.get(run_id)
        if r is None:
            return self._take()
        rec = {"status": status, "exit_code": exit_code, "started": now if started is None else started,
               "finished": now if finished is None else finished, "output": output or ""}
        if error:
            rec["error"] = error
        task = self.tasks.get(r.task_id)
        final = task is None or status not in RETRYABLE or attempt >= 1 + task.retries.max
        if final:
            # followups rule 2/4: decided with the final record, written with it
            full = self._record_of(r, run_id, attempt, rec)
            rec = self._decide_followups(r.task_id, full, now, rerun=False)
            self._commit(self.store.put_run(rec), float(rec.get("finished") or now), run_task=r.task_id)
            if isinstance(rec.get("notify"), dict):
                self._send_pending(r.task_id, rec, now)
        else:
            self._put_run(r, run_id, attempt, rec)
        self._note("run_finished", task_id=r.task_id, run_id=f"{run_id}.{attempt}", attempt=attempt,
                   status=status, exit_code=exit_code, error=error,
                   duration_s=max(0.0, rec["finished"] - rec["started"]))
        return self._take()

    def run_ended(self, run_id: str, now: float, *, cancelled_attempt: int | None = None,
                  why: str = "cancelled (shutdown)") -> list[Effect]:
        """The run is over (after its last attempt), or was cancelled during
        attempt ``cancelled_attempt`` (the reason is the one given to the
        ``CancelRun`` this core asked for, else ``why``)."""
        r = self.running.pop(run_id, None)
        asked = self._cancels.pop(run_id, None)
        if r is None:
            return self._take()
        if cancelled_attempt is not None:
            by = None
            if asked is not None:
                why, by = asked
            fields = {"status": CANCELLED, "exit_code": None,
                      "started": r.attempt_started if r.attempt == cancelled_attempt else now,
                      "finished": now, "output": "", "error": why}
            if by is not None:
                fields["cancelled_by"] = by
            self._put_run(r, run_id, cancelled_attempt, fields)
            self._note("run_finished", task_id=r.task_id, run_id=f"{run_id}.{cancelled_attempt}",
                       attempt=cancelled_attempt, status=CANCELLED, exit_code=None, error=why,
                       duration_s=0.0)
        self.scheduler.run_finished(r.unit or r.task_id, run_id, now)
        return self._take()

    def notify_done(self, task_id: str, run_id: str, key: str, ok: bool, now: float,
                    detail: str = "") -> list[Effect]:
        """A :class:`Notify` of a run went out (``ok``) or gave up."""
        self._notify_done(task_id, run_id, key, ok, now, detail)
        return self._take()

    def _notify_done(self, task_id: str, run_id: str, key: str, ok: bool, now: float, detail: str) -> None:
        self._notifying.discard((task_id, run_id, key))
        rec = self.store.run_record(task_id, run_id)
        result = "sent" if ok else "failed"
        if rec is not None and isinstance(rec.get("notify"), dict) and rec["notify"].get(key) == "pending":
            state = dict(rec["notify"])
            state[key] = result
            self._commit(self.store.put_run(dict(rec, notify=state)), now, run_task=task_id)
        self._note("notification", task_id=task_id, run_id=run_id, key=key, result=result, detail=detail)

    def cancel_run(self, run_id: str, by: str, now: float) -> tuple[dict | None, list[Effect]]:
        """Cancel one of our runs (``run_id`` with or without its ``.attempt``)
        on behalf of ``by``: the shell ends its process group and reports
        :meth:`run_ended`, which records ``cancelled`` with ``cancelled_by``.

        Returns ``({"task_id", "run_id", "attempt"}, effects)``, or ``(None,
        effects)`` when no such run is running here.
        """
        claim = run_id
        head, dot, tail = run_id.rpartition(".")
        if dot and tail.isdigit():
            claim = head
        r = self.running.get(claim)
        if r is None:
            return None, self._take()
        if claim not in self._cancels:
            self._cancels[claim] = (f"cancelled by {by}", by)
            self._out.append(CancelRun(claim, f"cancelled by {by}"))
            self._note("run_cancel", task_id=r.task_id, run_id=claim, by=by)
        return {"task_id": r.task_id, "run_id": claim, "attempt": r.attempt}, self._take()

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

    # ---------------------------------------------------------- replication

    def _merge(self, entries: list, sender: str, now: float) -> None:
        try:
            changed = self.store.merge(entries)
        except ValueError as e:
            self._note("rejected_entries", peer=sender, error=str(e))
            return
        self._note("replication_in", n=len(entries))
        if changed:
            self._after_change(changed, now)

    def _commit(self, entries: list, now: float, *, run_task: str | None = None) -> None:
        """A local change: react, then push the entries to the peers that
        keep them (run records: the task's preference list)."""
        if not entries:
            return
        self._after_change([e[0] for e in entries], now)
        if run_task is not None:
            owners = self.ring.owners(run_task)
            if run_task in self._broadcast:
                owners = owners + [m for m in self.shard_list(run_task) if m not in owners]
            targets = [o for o in owners if o != self.name]
        else:
            targets = [n for n in sorted(self._view) if n != self.name
                       and self._view[n][0] in ("alive", "suspect")]
        if not targets:
            return
        data = peerwire.encode({"t": "push", "entries": [list(e) for e in entries]})
        self._note("replication_out", n=len(entries) * len(targets))
        for peer in targets:
            self._xid += 1
            self._pushes.add(self._xid)
            self.stats["pushes"] += 1
            self._out.append(Request(peer, self._xid, data, PUSH_TIMEOUT_S, "push"))

    def _after_change(self, keys: Iterable[str], now: float) -> None:
        touched = set()
        runs = []
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind in ("task", "ctl"):
                touched.add(rest)
            elif kind == "run":
                runs.append(rest)
        for rest in runs:
            tid, _, rid = rest.rpartition("/")
            rec = self.store.run_record(tid, rid)
            if rec is not None:
                self._followup(tid, rec, now)
        moved: set[str] = set()
        for tid in sorted(touched):
            view = self.store.get_task(tid)
            if view is None or view.deleted or view.value is None:
                if tid in self.tasks:
                    del self.tasks[tid]
                    self._defs.pop(tid, None)
                    self.owned.discard(tid)
                    self.handoff_pending.pop(tid, None)
                    self._shared_cache.clear()
                    moved |= self.ring.remove_task(tid)
                    self.scheduler.remove_task(tid)
                    self._index_after(tid, None)
                    self._broadcast.discard(tid)
                    self._drop_shards(tid)
                    for c in self._lines.pop(tid, []):
                        self.stats["abandoned"] += 1
                continue
            moved |= self._install(view, now)
            moved.add(tid)
        self._apply_ownership(sorted(moved), now)

    def _install(self, view, now: float) -> set[str]:
        """Install or refresh a task; returns the task ids whose preference
        list changed (the task itself, and others the load cap moved)."""
        tid = view.task_id
        task = self.tasks.get(tid)
        ctl = self.store.control(tid)
        if task is not None and self._defs.get(tid) == view.value:
            self.scheduler.update_control(tid, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot)
            return set()
        try:
            task = Task.from_dict(view.value)
        except (TaskError, ValueError, TypeError) as e:
            self._note("task_invalid", task_id=tid, error=str(e))
            return set()
        if task.id != tid:  # a peer's entry whose definition names another task
            self._note("task_invalid", task_id=tid, error=f"definition of task {task.id!r} stored as {tid!r}")
            return set()
        self.tasks[tid] = task
        self._defs[tid] = view.value
        self._index_after(tid, task.after["task"] if task.after else None)
        if task.target:
            self._broadcast.add(tid)
        elif tid in self._broadcast:
            self._broadcast.discard(tid)
            self._drop_shards(tid)
        self._shared_cache.clear()
        moved = self.ring.set_tasks({tid: dict(task.tags) if task.tags else None})
        self.scheduler.set_task(task, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot, now=now)
        return set(moved)

    def _shared_tasks(self, peer: str) -> list[str]:
        """Tasks whose run records both we and ``peer`` replicate (cached
        until the ring changes)."""
        shared = self._shared_cache.get(peer)
        if shared is None:
            shared = [t for t in self.ring.tasks_of(self.name) if peer in self.ring.owners(t)]
            self._shared_cache[peer] = shared
        return shared

    # --------------------------------------------------------- anti-entropy

    def _ae_round(self, now: float) -> None:
        if self.stopping:
            return
        gc = self.store.gc_tombstones(now, self.knobs.tombstone_horizon_s)
        if gc:
            self._after_change(gc, now)
        if self._ae_xid is not None:
            return
        if self.handoff_pending:
            self._start_handoffs(now)
        peers = [n for n in sorted(self._view) if n != self.name and self._view[n][0] == "alive"]
        if peers:
            self._ae_xid = self._start_exchange(peers[self.rng.randrange(len(peers))], "ae", now)

    def _start_exchange(self, peer: str, kind: str, now: float) -> int:
        self._xid += 1
        xid = self._xid
        ex = _Exchange(peer, kind, ["catalogue", "runs"])
        self._exchanges[xid] = ex
        self._next_scope(xid, ex, now)
        return xid

    def _next_scope(self, xid: int, ex: _Exchange, now: float) -> None:
        while ex.scopes:
            ex.scope = ex.scopes.pop(0)
            ex.shared = self._shared_tasks(ex.peer) if ex.scope == "runs" else None
            if ex.scope == "runs" and not ex.shared:
                continue
            ex.rounds = 0
            self._exchange_send(xid, ex, self.store.start_exchange(ex.scope, ex.shared), now)
            return
        self._exchange_over(xid, now, ok=True)

    def _exchange_send(self, xid: int, ex: _Exchange, msg: bytes, now: float) -> None:
        ex.rounds += 1
        ex.sent_at = now
        data = peerwire.encode({"t": "ae", "wall": now, "msg": msg})
        ex.nbytes += len(data)
        self._out.append(Request(ex.peer, xid, data, EXCHANGE_TIMEOUT_S, ex.kind))

    def _exchange_over(self, xid: int, now: float, *, ok: bool, why: str = "") -> None:
        ex = self._exchanges.pop(xid)
        if self._ae_xid == xid:
            self._ae_xid = None
        if self._handoff_by_peer.get(ex.peer) == xid:
            del self._handoff_by_peer[ex.peer]
        self.stats["ae_ok" if ok else "ae_failed"] += 1
        self._note("ae_round", result="ok" if ok else "failed", peer=ex.peer, kind=ex.kind,
                   bytes=ex.nbytes, why=why)
        if ok:
            skewed = frozenset(self.skew.skewed(self.knobs.max_skew_s))
            if skewed != self._skewed:
                self._skewed = skewed
                self._recompute(now)
            for tid in sorted(self.handoff_pending):
                if ex.peer in self.ring.owners(tid):
                    self._handoff_done(tid, now, why=None)
            if ex.kind == "ae" and ex.nbytes >= PAGE_FOLLOW_BYTES and self._ae_xid is None \
                    and not self.stopping and self._view.get(ex.peer, ("dead", {}))[0] == "alive":
                # a full page went by: more is likely to differ (a refill):
                # the next page now, not a whole round later
                self._ae_xid = self._start_exchange(ex.peer, "ae", now)
        else:
            for tid in sorted(self.handoff_pending):
                if ex.peer in self.ring.owners(tid):
                    self._handoff_asked.setdefault(tid, []).append(ex.peer)
                    others = [o for o in self.ring.owners(tid) if o != self.name]
                    if set(others) <= set(self._handoff_asked[tid]):
                        self._handoff_done(tid, now, why="failed: no replica answered")
        if self.handoff_pending:
            self._start_handoffs(now)

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

    def _record_of(self, r: _Run, run_id: str, attempt: int, fields: dict) -> dict:
        rec = {"task_id": r.task_id, "slot": int(r.slot), "run_id": f"{run_id}.{attempt}",
               "node": self.name, "attempt": int(attempt), "fencing_token": r.token}
        if r.params:
            rec["params"] = r.params
        if r.upstream:
            rec["upstream"] = r.upstream
        if r.shard is not None:
            rec["shard"], rec["shards"] = r.shard
        rec["trace_id"] = trace_id_for(run_id)
        rec.update(fields)
        return rec

    def _put_run(self, r: _Run, run_id: str, attempt: int, fields: dict) -> None:
        rec = self._record_of(r, run_id, attempt, fields)
        self._commit(self.store.put_run(rec), float(rec.get("finished") or rec.get("started") or 0.0),
                     run_task=r.task_id)
