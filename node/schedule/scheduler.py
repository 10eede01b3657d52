"""Scheduler core: which slots of which tasks fire now (sans-IO).

The daemon (or the simulator) feeds the core with tasks, ownership,
replicated control state and run lifecycle events, calls :meth:`Scheduler.tick`
at :meth:`Scheduler.next_deadline`, and carries out the returned effects. The
core never reads a clock, never does I/O and iterates in a deterministic
order (due tasks by ``(fire_at, task_id)``; other task sets sorted), so
one input sequence gives one output sequence.

Effects
-------
:class:`Fire`, :class:`SlotSkipped`, :class:`Cancel` and :class:`Advance`
(node/schedule/effects.py, which lists their reasons). Why a task fires
or not here: :func:`node.schedule.explain.explain`.

Contract with the shell
-----------------------
For every :class:`Fire` the shell calls :meth:`Scheduler.run_started` when the
run starts (with its run id) and :meth:`Scheduler.run_finished` when it ends
(after its last retry), or :meth:`Scheduler.fire_abandoned` if it never
starts (lost fencing claim, ownership moved). Until then the fire counts as
"running" for the overlap policy. Bound: a Fire neither started nor abandoned
stops counting after ``catchup_window + misfire_grace_s`` (counted in
``statistics().skipped["pending_expired"]``), so a shell that forgets to
report cannot block a ``forbid`` task for ever.

Rules
-----
1. Only tasks that this node owns *and* whose handoff is complete fire from
   ``tick``. ``run_now``, ``backfill`` and ``unfinished_run`` act on request
   (the daemon routes those requests to the owner).
2. A slot fires at most once per scheduler: the core keeps a cursor per task
   (max of its own decisions and the replicated ``last_fired_slot``) and never
   decides a slot ``<= cursor`` again. One-shot tasks (``once:``) have one
   slot, so ``last_fired_slot`` makes them fire once cluster-wide.
2a. What a node hands out as ``last_fired_slot`` stops before its oldest
   *open* slot: a Fire not started yet (a claim waiting for etcd), a slot in
   the waiting line or the overlap queue, or a Fire given up at shutdown.
   So when ownership moves (a takeover, a partition's heal, a restart)
   while slots wait, the next owner starts from the oldest of them and
   handles them by its misfire policy; the node that loses the task drops
   its lines and moves its own cursor back to the value it handed out.
3. A due slot is **on time** if ``now - fire_at <= misfire_grace_s`` (default
   2 s) and **missed** otherwise. Missed slots exist after downtime, a pause
   of the process, or a takeover; slots older than ``catchup_window`` (or
   the grace, if larger: on-time slots never expire) are ``expired`` and
   never run. Within the window, by ``misfire``:
   ``skip`` skips them all; ``run_once`` fires the latest once (``catchup``)
   and ``coalesced`` the rest; ``run_all`` fires each, oldest first, at most
   :attr:`max_catchup_slots` (default 1000, the latest ones).
4. A slot about to fire passes the **overlap** policy when a run of the task
   is *really running* (started, not finished): ``allow`` fires; ``forbid``
   skips; ``replace`` cancels the running run(s) and fires; ``buffer_one``
   queues it, replacing (coalescing) an older queued slot; ``buffer_all``
   queues it, at most :attr:`max_buffer` (default 100), beyond that
   ``buffer_full``. Queued slots fire one at a time when no run is going.
4a. A slot whose predecessor is only **pending** (a Fire not yet started: a
   fencing claim waiting for etcd, a catch-up slot waiting its turn), or is
   running *late* (a backlog run: a catch-up, a rerun, a slot released
   from the waiting line, or an ``@every`` slot fired more than half a
   period after its time, e.g. by a new owner just after a takeover; not a
   run started on its own time that overran its period), is not an overlap: unless the policy is ``allow`` it joins the task's *waiting
   line* (bounded by :attr:`max_catchup_slots`, beyond that
   ``catchup_limit``). When the task is idle again (nothing running or
   pending) the oldest waiting slot is released and goes by the misfire
   policy at that moment: older than the catch-up window -> ``expired``;
   late (past the grace) -> ``skip`` skips it, ``run_once`` fires only the
   latest late slot of the line (the others ``coalesced``), ``run_all``
   fires it; on time -> fires. So ``run_all`` runs every missed slot inside
   the window, oldest first, one at a time, and only a run really running
   when a new slot comes can make ``forbid`` skip that slot. A pending Fire
   the shell never reports stops blocking the line when it expires (below).

   The rules as a table (rows: the situation a slot meets; ``W`` = waits in
   the line, then goes by the misfire row of the moment it is released)::

     situation + overlap       allow   forbid   replace        buffer_one  buffer_all
     on time, task idle         fire    fire     fire           fire        fire
     previous run running       fire    skip     cancel + fire  queue (1)   queue (<=100)
     previous slot pending      fire    W        W              W           W
     (claim waiting for etcd,
      catch-up line, handoff)
     a late run running         fire    W        W              W           W
     (catch-up, rerun)

     misfire + situation       missed (restart, takeover)     released late from the line
     skip                       misfire_skip each              misfire_skip
     run_once                   latest fires, rest coalesced   latest late one fires
     run_all                    each fires, oldest first       fires
     (any)                      older than catchup_window: expired

   A task held for a handoff fires nothing; when the hold ends its missed
   slots are handled by the misfire row.
5. Paused tasks keep their slots ticking but each one is ``paused``-skipped,
   so resuming does not replay the paused period.
6. New task without a ``last_fired_slot``: a recurring task starts at the
   first slot after it was first seen (no history replay); a one-shot task
   counts its instant as due (so ``now`` resolved at apply time fires even
   when replication took a moment) within its catch-up window.
7. Backfill slots fire one at a time, when nothing else of the task runs, and
   do not move the cursor. Ownership loss drops queued and backfill slots.

Cost: a timer of buckets (fire time -> tasks due then) and a heap of the
bucket times. Tasks on the same schedule share a bucket, so ``tick`` pops one
heap item per distinct fire time and sorts the bucket by task id; each due
task costs a few attribute updates, two effects and an append to the bucket
of its next fire time (~3 us per fire on the dev box; the shell's
``run_started``/``run_finished`` ~2 us more). A task is queued in bucket
``t`` iff its ``due_at == t``; members that moved or were removed are
dropped lazily (compacted when they outnumber live tasks 4:1). ``@every``
tasks step by epoch arithmetic (``slot + period``); schedules with the same
spec share a memoised rule (see :mod:`node.schedule.slots`), so 10,000 tasks on one
cron cost one croniter step per slot. ``tick(now, limit=k)`` decides at most
``k`` due tasks per call, so a shell can start the first runs of a large
second before the last ones are decided and yield between batches; a
sequence of limited calls decides exactly what one unlimited call would.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from node.schedule.effects import Advance, Cancel, Effect, Fire, SlotSkipped
from node.schedule.slots import Schedule
if TYPE_CHECKING:  # annotations only: node.tasks sits on the floor above parse/slots and
    from node.tasks.model import Task  # imports them, so importing it here would be a cycle

__all__ = [
    "ON_REQUEST",
    "Scheduler",
    "SchedulerStatistics",
]


#: Fire reasons asked for by someone (an operator, an upstream run) rather
#: than due by the schedule: the misfire policy and the catch-up window do
#: not apply to them, and they do not hold back the last fired slot.
ON_REQUEST = ("run_now", "backfill", "chain")


@dataclass(frozen=True)
class SchedulerStatistics:
    tasks: int
    owned: int
    held: int
    paused: int
    heap_size: int
    running: int
    queued: int
    fired: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    cancelled: int = 0


_TID = attrgetter("tid")


class _Entry:
    __slots__ = (
        "task", "tid", "sched", "rule", "every_s", "every_off_s", "paused", "owned", "ready",
        "last_fired", "cursor", "next_slot", "due_at", "running", "pending", "pending_expire_at",
        "queue", "backfill", "waiting", "late", "backlog", "advanced", "unsettled",
    )

    def __init__(self, task: Task, sched: Schedule, paused: bool, cursor: int,
                 last_fired: int | None) -> None:
        self.task = task
        self.tid = task.id
        self.set_sched(sched)
        self.paused = paused
        self.owned = False
        self.ready = False
        self.last_fired = last_fired
        self.cursor = cursor
        self.next_slot = sched.next_after(cursor)
        # Fire time of the bucket this entry is queued in (None: not queued).
        self.due_at: float | None = None
        self.running: dict[str, int] = {}
        self.pending: dict[int, int] = {}
        self.pending_expire_at = 0.0
        self.queue: deque[tuple[int, str]] = deque()
        self.backfill: deque[int] = deque()
        # slots whose predecessor is pending: (slot, reason), oldest first
        self.waiting: deque[tuple[int, str]] = deque()
        # running run ids of backlog runs, and slots fired as backlog (not started yet)
        self.late: set[str] = set()
        self.backlog: set[int] = set()
        # the last value handed out as Advance (or merged from replicas): every
        # slot <= it is settled (started, skipped or expired), cluster-wide
        self.advanced = cursor if last_fired is None else max(cursor, last_fired)
        # slots whose Fire was given up without a decision (shutdown): the
        # next owner must still see them as open
        self.unsettled: set[int] = set()

    def set_sched(self, sched: Schedule) -> None:
        self.sched = sched
        self.rule = sched._rule
        # @every: the next slot is slot + period (slots are multiples of it)
        # and the jitter offset is a constant; 0 means "ask the rule".
        if sched.kind == "every":
            p = sched._rule.period_s  # type: ignore[attr-defined]
            j = sched._jitter_offset_s
            self.every_s = p
            self.every_off_s = min(j, p * 0.9) if j else 0.0
        else:
            self.every_s = 0
            self.every_off_s = 0.0

    def busy(self) -> bool:
        """Running, or a Fire not started yet: the next slot must not fire now."""
        return bool(self.running) or bool(self.pending)

    def idle(self) -> bool:
        """Nothing running, pending or waiting: a new slot may fire at once."""
        return not self.running and not self.pending and not self.waiting


class Scheduler:
    """Sans-IO scheduler for the tasks one node owns.

    Args:
        node: this node's name (reported by ``explain``).
        misfire_grace_s: lateness up to which a slot is still on time.
        max_catchup_slots: bound on slots handled per task per catch-up.
        max_buffer: bound on queued slots per task (``buffer_all``).
    """

    def __init__(self, node: str, *, misfire_grace_s: float = 2.0,
                 max_catchup_slots: int = 1000, max_buffer: int = 100) -> None:
        self.node = node
        self.misfire_grace_s = float(misfire_grace_s)
        self.max_catchup_slots = int(max_catchup_slots)
        self.max_buffer = int(max_buffer)
        self._entries: dict[str, _Entry] = {}
        # Timer: fire time -> entries due then (a bucket), plus a heap of the
        # bucket times. An entry is validly queued in bucket t iff
        # ``entry.due_at == t``; other members are stale and dropped lazily.
        self._buckets: dict[float, list[_Entry]] = {}
        self._times: list[float] = []
        self._queued = 0  # members of all buckets, stale included
        self._wake: dict[str, float] = {}
        self._seen_lost_runs: OrderedDict[str, None] = OrderedDict()
        self._fired: dict[str, int] = {}
        self._skipped: dict[str, int] = {}
        self._cancelled = 0

    # ------------------------------------------------------------ task state

    def set_task(self, task: Task, *, paused: bool | None = None,
                 last_fired_slot: int | None = None, now: float) -> None:
        """Add or update a task (its definition and merged control state).

        Args:
            task: validated task; ``schedule: now`` must be resolved first.
            paused: replicated pause flag (None: ``task.paused``).
            last_fired_slot: replicated max register (None: never fired).
            now: current time (epoch seconds).

        Raises:
            ValueError: unresolved ``now`` schedule.
        """
        if task.schedule == "now":
            raise ValueError(f"task {task.id!r}: resolve 'now' before scheduling (Task.resolve_now)")
        sched = Schedule.from_task(task)
        paused = task.paused if paused is None else bool(paused)
        e = self._entries.get(task.id)
        if e is None:
            if last_fired_slot is not None:
                cursor = int(last_fired_slot)
            elif sched.kind == "once":
                cursor = sched._rule.instant - 1  # type: ignore[attr-defined]
            else:
                cursor = math.ceil(now) - 1
            e = _Entry(task, sched, paused, cursor, last_fired_slot)
            self._entries[task.id] = e
            return
        e.task = task
        e.set_sched(sched)
        e.paused = paused
        self._merge_last_fired(e, last_fired_slot)
        e.next_slot = sched.next_after(e.cursor)
        self._push(e)

    def remove_task(self, task_id: str) -> None:
        """Forget a task (runs already started are the shell's business)."""
        e = self._entries.pop(task_id, None)
        if e is not None:
            e.due_at = None
        self._wake.pop(task_id, None)

    def set_owned(self, task_id: str, owned: bool, now: float, *,
                  handoff_ready: bool = True) -> None:
        """Ownership of a task changed (or its handoff completed).

        Taking over (owned and ready) resumes from max(local cursor,
        replicated ``last_fired_slot``); the next ``tick`` catches up missed
        slots by the misfire policy. Owned but not ready: held, no fires.
        Losing ownership drops queued and backfill slots.
        """
        e = self._entries.get(task_id)
        if e is None:
            raise KeyError(task_id)
        was_active = e.owned and e.ready
        e.owned = bool(owned)
        e.ready = bool(owned) and bool(handoff_ready)
        if not e.owned:
            e.queue.clear()
            e.backfill.clear()
            e.waiting.clear()
            self._wake.pop(task_id, None)
            # slots decided here but never started go back to whoever owns
            # the task next, and to us if we own it again
            if e.cursor > e.advanced:
                e.cursor = e.advanced
            e.unsettled.clear()
        if e.owned and e.ready and not was_active:
            e.next_slot = e.sched.next_after(e.cursor)
        self._push(e)

    def update_control(self, task_id: str, *, paused: bool | None = None,
                       last_fired_slot: int | None = None) -> None:
        """Merge replicated control state (pause flag, last fired slot)."""
        e = self._entries.get(task_id)
        if e is None:
            raise KeyError(task_id)
        if paused is not None:
            e.paused = bool(paused)
        if self._merge_last_fired(e, last_fired_slot):
            e.next_slot = e.sched.next_after(e.cursor)
            self._push(e)

    def _merge_last_fired(self, e: _Entry, slot: int | None) -> bool:
        if slot is None:
            return False
        slot = int(slot)
        if e.last_fired is None or slot > e.last_fired:
            e.last_fired = slot
        if slot > e.advanced:
            e.advanced = slot
        if slot > e.cursor:
            e.cursor = slot
            return True
        return False

    # ------------------------------------------------------------ runs

    def run_started(self, task_id: str, slot: int, run_id: str, now: float) -> list[Effect]:
        """The shell started the run of a Fire. Returns an ``Advance`` when
        the slot was the oldest open one (Rule 2a)."""
        e = self._entries.get(task_id)
        if e is None:
            return []
        n = e.pending.get(slot, 0)
        if n > 1:
            e.pending[slot] = n - 1
        else:
            e.pending.pop(slot, None)
        e.running[run_id] = slot
        if slot in e.backlog:
            e.backlog.discard(slot)
            e.late.add(run_id)
        out: list[Effect] = []
        self._advance(e, out)
        return out

    def run_finished(self, task_id: str, run_id: str, now: float) -> None:
        """A run ended (all attempts); queued slots may now be released."""
        e = self._entries.get(task_id)
        if e is None:
            return
        e.running.pop(run_id, None)
        e.late.discard(run_id)
        if (e.queue or e.backfill or e.waiting) and not e.running and not e.pending:
            self._maybe_wake(e, now)

    def fire_abandoned(self, task_id: str, slot: int, now: float, *,
                       settled: bool = True) -> list[Effect]:
        """A Fire was not started. ``settled``: the slot is decided anyway
        (its claim is another node's, or etcd stayed down past the window);
        False (shutting down) leaves it open for the next owner. Returns an
        ``Advance`` when that lets the handed-out value move (Rule 2a)."""
        e = self._entries.get(task_id)
        if e is None:
            return []
        n = e.pending.get(slot, 0)
        if n > 1:
            e.pending[slot] = n - 1
        else:
            e.pending.pop(slot, None)
            e.backlog.discard(slot)
        if not settled:
            e.unsettled.add(slot)
        self._maybe_wake(e, now)
        out: list[Effect] = []
        self._advance(e, out)
        return out

    def _maybe_wake(self, e: _Entry, now: float) -> None:
        if not e.busy() and (e.queue or e.backfill or e.waiting):
            t = self._wake.get(e.task.id)
            self._wake[e.task.id] = now if t is None else min(t, now)

    def unfinished_run(self, task_id: str, run_record: dict, now: float) -> list[Effect]:
        """The owner found a ``running`` record left by a dead node.

        Acts once per run id by ``on_owner_loss``: ``rerun`` offers the slot
        again (overlap policy applies; reason ``rerun_owner_loss``), ``skip``
        reports it as ``owner_lost``.

        Args:
            run_record: mapping with at least ``run_id`` and ``slot``.
        """
        e = self._entries.get(task_id)
        if e is None:
            return []
        run_id = str(run_record.get("run_id"))
        slot = run_record.get("slot")
        if not isinstance(slot, int) or isinstance(slot, bool):
            return []
        key = f"{task_id}\x00{run_id}"
        if key in self._seen_lost_runs:
            return []
        self._seen_lost_runs[key] = None
        while len(self._seen_lost_runs) > 4096:
            self._seen_lost_runs.popitem(last=False)
        effects: list[Effect] = []
        if e.task.on_owner_loss == "rerun":
            self._offer(e, slot, "rerun_owner_loss", now, effects)
        else:
            self._skip(e, slot, "owner_lost", effects)
        return effects

    def trigger(self, task_id: str, slot: int, now: float) -> list[Effect]:
        """Fire ``slot`` because an upstream run finished (``after``):
        reason ``chain``; overlap applies, the misfire policy does not (the
        slot is the upstream run's, already past).

        Raises:
            KeyError: unknown task.
        """
        e = self._entries[task_id]
        effects: list[Effect] = []
        if e.paused:
            self._skip(e, int(slot), "paused", effects)
        else:
            self._offer(e, int(slot), "chain", now, effects)
        return effects

    def run_now(self, task_id: str, now: float) -> list[Effect]:
        """Fire the task now (manual run); slot = floor(now); overlap applies.

        Does not move the cursor or ``last_fired_slot``.

        Raises:
            KeyError: unknown task.
        """
        e = self._entries[task_id]
        effects: list[Effect] = []
        self._offer(e, int(now // 1), "run_now", now, effects)
        return effects

    def backfill(self, task_id: str, start: int, end: int, now: float,
                 dry_run: bool = False) -> list[int]:
        """Slots ``start <= s <= end`` of a past window; queue them unless dry run.

        Queued slots fire one at a time (reason ``backfill``) from ``tick``.

        Raises:
            KeyError: unknown task.
            ValueError: end before start, end in the future, or more than
                ``max_catchup_slots`` slots (queued included).
        """
        e = self._entries[task_id]
        start, end = int(start), int(end)
        if end < start:
            raise ValueError("backfill: --to is before --from")
        if end > now:
            raise ValueError("backfill: window must be in the past")
        slots: list[int] = []
        for s in e.sched.slots_between(start - 1, end):
            slots.append(s)
            if len(slots) + len(e.backfill) > self.max_catchup_slots:
                raise ValueError(f"backfill: more than {self.max_catchup_slots} slots in window")
        if not dry_run and slots:
            e.backfill.extend(slots)
            t = self._wake.get(task_id)
            self._wake[task_id] = now if t is None else min(t, now)
        return slots

    # ------------------------------------------------------------ time

    def _push(self, e: _Entry, compact: bool = True) -> None:
        """(Re)queue ``e`` at the fire time of its next slot, if it is active.

        ``compact=False`` inside ``tick`` (which holds the bucket maps and
        compacts once at its end).
        """
        if e.owned and e.ready and e.next_slot is not None:
            t = e.sched.fire_time(e.next_slot)
            if e.due_at == t:
                return  # already queued there
            e.due_at = t
            b = self._buckets.get(t)
            if b is None:
                self._buckets[t] = [e]
                heapq.heappush(self._times, t)
            else:
                b.append(e)
            self._queued += 1
            if compact and self._queued > 4 * len(self._entries) + 64:
                self._compact()
        else:
            e.due_at = None

    def _compact(self) -> None:
        buckets: dict[float, list[_Entry]] = {}
        n = 0
        for e in self._entries.values():
            t = e.due_at
            if t is not None:
                b = buckets.get(t)
                if b is None:
                    buckets[t] = [e]
                else:
                    b.append(e)
                n += 1
        self._buckets = buckets
        self._times = list(buckets)
        heapq.heapify(self._times)
        self._queued = n

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do next (None: nothing scheduled).

        A time at or before ``now`` means due work is left (e.g. after a
        ``tick`` with ``limit``): call ``tick`` again.
        """
        times = self._times
        buckets = self._buckets
        while times:
            t = times[0]
            b = buckets.get(t)
            if b is not None:
                if b[0].due_at == t:
                    break
                live = [e for e in b if e.due_at == t]
                self._queued -= len(b) - len(live)
                if live:
                    buckets[t] = live
                    break
                del buckets[t]
            heapq.heappop(times)
        best = times[0] if times else None
        if self._wake:
            w = min(self._wake.values())
            best = w if best is None else min(best, w)
        return best

    def tick(self, now: float, limit: int | None = None) -> list[Effect]:
        """Decide the slots due at ``now``; return effects in deterministic order.

        Tasks are decided in ``(fire_at, task_id)`` order.

        Args:
            now: current time (epoch seconds).
            limit: decide at most this many due tasks (each gives one Fire in
                the common case; a catch-up may give more) and return; the
                rest stays due (``next_deadline() <= now``) for the next call.
                Lets a shell start the first runs of a large second early and
                yield between batches. None: everything due.

        Returns:
            The effects (Fire, SlotSkipped, Cancel, Advance).
        """
        effects: list[Effect] = []
        append = effects.append
        times = self._times
        buckets = self._buckets
        grace = self.misfire_grace_s
        heappop, heappush = heapq.heappop, heapq.heappush
        new = tuple.__new__
        budget = -1 if limit is None else max(1, int(limit))
        fired_due = 0
        requeued = 0
        # Bucket the fast path appends to (the next second, usually).
        last_t: float | None = None
        last_b: list[_Entry] = []
        stopped = False
        while times and times[0] <= now:
            t = heappop(times)
            b = buckets.pop(t, None)
            if b is None:
                continue
            self._queued -= len(b)
            if len(b) > 1:
                b.sort(key=_TID)
            for i, e in enumerate(b):
                if e.due_at != t:
                    continue  # stale (moved, removed, not owned any more)
                if budget == 0:
                    rest = b[i:]
                    old = buckets.get(t)
                    if old is None:
                        buckets[t] = rest
                        heappush(times, t)
                    else:
                        old.extend(rest)
                    self._queued += len(rest)
                    stopped = True
                    break
                budget -= 1
                e.due_at = None
                s = e.next_slot
                # Fast path (the common case): one due slot, on time, nothing
                # running, not paused. Same decisions as _process_due, inlined.
                if (not e.paused and not e.running and now - t <= grace and not e.waiting
                        and (not e.pending or self._expire_pending(e, now))
                        and s is not None and s > e.cursor):
                    p = e.every_s
                    if p:
                        nxt = s + p
                        nxt_at = nxt + e.every_off_s
                    else:
                        nxt = e.rule.next_after(s)
                        nxt_at = None if nxt is None else (
                            e.sched.fire_time(nxt) if e.sched._jitter_offset_s else float(nxt))
                    if nxt_at is None or nxt_at > now:
                        tid = e.tid
                        append(new(Fire, (tid, s, t, "due")))
                        e.pending[s] = 1
                        if p and (now - t) * 2 > p:
                            e.backlog.add(s)  # rule 4a: started over half a period late
                        e.pending_expire_at = now + e.task.catchup_window_s + grace
                        fired_due += 1
                        e.next_slot = nxt
                        e.cursor = s
                        # the slot is pending: Advance follows run_started
                        if nxt_at is not None:
                            e.due_at = nxt_at
                            if nxt_at != last_t:
                                last_b = buckets.get(nxt_at)  # type: ignore[assignment]
                                if last_b is None:
                                    last_b = buckets[nxt_at] = []
                                    heappush(times, nxt_at)
                                last_t = nxt_at
                            last_b.append(e)
                            requeued += 1
                        continue
                self._process_due(e, now, effects)
                self._push(e, compact=False)
            if stopped:
                break
        self._queued += requeued
        if fired_due:
            self._fired["due"] = self._fired.get("due", 0) + fired_due
        if self._queued > 4 * len(self._entries) + 64:
            self._compact()
        if self._wake and not stopped:
            for tid in sorted(t for t, w in self._wake.items() if w <= now):
                del self._wake[tid]
                e = self._entries.get(tid)
                if e is not None:
                    self._release(e, now, effects)
        return effects

    def _process_due(self, e: _Entry, now: float, effects: list[Effect]) -> None:
        task = e.task
        sched = e.sched
        tid = task.id
        s = e.next_slot
        decided = e.cursor
        # On-time slots never expire, even with a catchup_window below the grace.
        window_start = now - max(task.catchup_window_s, self.misfire_grace_s)
        if s is not None and s >= window_start and not e.paused:
            # Fast path: exactly one due slot, on time.
            nxt = sched.next_after(s)
            fire_at = sched.fire_time(s)
            if (nxt is None or sched.fire_time(nxt) > now) and now - fire_at <= self.misfire_grace_s:
                self._offer(e, s, "due", now, effects)
                e.next_slot = nxt
                if s > e.cursor:
                    e.cursor = s
                self._advance(e, effects)
                return
        if s is not None and s < window_start:
            self._skip(e, s, "expired", effects)
            decided = max(decided, math.ceil(window_start) - 1)
            s = sched.next_after(decided)
        due: deque[int] = deque()
        limit = self.max_catchup_slots
        scanned = 0
        dropped = 0
        while s is not None and scanned < 100 * limit and sched.fire_time(s) <= now:
            if len(due) == limit:
                # Report the first slot beyond the limit; count the others.
                old = due.popleft()
                if dropped == 0:
                    self._skip(e, old, "catchup_limit", effects)
                else:
                    self._skipped["catchup_limit"] += 1
                dropped += 1
            due.append(s)
            scanned += 1
            s = sched.next_after(s)
        e.next_slot = s
        if due:
            decided = max(decided, due[-1])
            if e.paused:
                for x in due:
                    self._skip(e, x, "paused", effects)
            else:
                grace = self.misfire_grace_s
                missed = []
                while due and now - sched.fire_time(due[0]) > grace:
                    missed.append(due.popleft())
                if missed:
                    policy = task.misfire
                    if policy == "skip":
                        for x in missed:
                            self._skip(e, x, "misfire_skip", effects)
                    elif policy == "run_once":
                        for x in missed[:-1]:
                            self._skip(e, x, "coalesced", effects)
                        self._offer(e, missed[-1], "catchup", now, effects)
                    else:
                        for x in missed:
                            self._offer(e, x, "catchup", now, effects)
                for x in due:
                    self._offer(e, x, "due", now, effects)
        if decided > e.cursor:
            e.cursor = decided
        self._advance(e, effects)

    def _advance(self, e: _Entry, effects: list[Effect]) -> None:
        """Rule 2a: hand out ``Advance`` up to the slot before the oldest
        open one. A slot is open while it is pending (a Fire not started),
        waiting in the line, queued by the overlap policy, or given up
        without a decision; slots at or below the value already handed out
        are settled by definition (a rerun of a lost run is one)."""
        adv = e.advanced
        floor = e.cursor + 1
        for slot, reason in e.waiting:
            if slot > adv and reason not in ON_REQUEST:
                if slot < floor:
                    floor = slot
                break
        for slot, _reason in e.queue:
            if adv < slot < floor:
                floor = slot
            break
        for slot in e.pending:
            if adv < slot < floor:
                floor = slot
        for slot in e.unsettled:
            if adv < slot < floor:
                floor = slot
        safe = floor - 1
        if safe > adv and floor <= e.cursor:
            safe = self._last_slot_below(e, adv, floor)
        if safe > adv:
            e.advanced = safe
            if e.last_fired is None or safe > e.last_fired:
                e.last_fired = safe
            effects.append(Advance(e.tid, safe))

    @staticmethod
    def _last_slot_below(e: _Entry, adv: int, floor: int) -> int:
        """The last slot in ``(adv, floor)``, or ``adv`` if there is none (so a
        handed-out value names a real slot). @every slots are multiples of
        the period; a cron rule is stepped, at most 2,000 slots, beyond which
        ``floor - 1`` itself is handed out."""
        if e.every_s:
            p = e.every_s
            last = ((floor - 1) // p) * p
            return last if last > adv else adv
        nxt = e.rule.next_after(adv)
        last = adv
        for _ in range(2000):
            if nxt is None or nxt >= floor:
                return last
            last = nxt
            nxt = e.rule.next_after(nxt)
        return floor - 1

    def _skip(self, e: _Entry, slot: int, reason: str, effects: list[Effect]) -> None:
        effects.append(SlotSkipped(e.task.id, slot, reason))
        self._skipped[reason] = self._skipped.get(reason, 0) + 1

    def _fire(self, e: _Entry, slot: int, reason: str, effects: list[Effect], now: float,
              backlog: bool = False) -> None:
        effects.append(Fire(e.task.id, slot, e.sched.fire_time(slot), reason))
        e.unsettled.discard(slot)
        late_due = (reason == "due" and e.every_s
                    and (now - e.sched.fire_time(slot)) * 2 > e.every_s)
        if backlog or late_due or reason in ("catchup", "rerun_owner_loss"):
            # its run will be a backlog run (rule 4a), not a run on its own time
            e.backlog.add(slot)
        e.pending[slot] = e.pending.get(slot, 0) + 1
        e.pending_expire_at = max(e.pending_expire_at,
                                  now + e.task.catchup_window_s + self.misfire_grace_s)
        self._fired[reason] = self._fired.get(reason, 0) + 1

    def _offer(self, e: _Entry, slot: int, reason: str, now: float, effects: list[Effect]) -> None:
        """Fire ``slot`` unless the overlap policy says otherwise."""
        policy = e.task.overlap
        if e.pending:
            self._expire_pending(e, now)
        if policy == "allow" or e.idle():
            self._fire(e, slot, reason, effects, now)
        elif e.pending or e.waiting or self._running_late(e, slot):
            # Rule 4a: the predecessor is not running yet (or is a late run:
            # catching up, not overrunning its period); wait for it.
            if len(e.waiting) >= self.max_catchup_slots:
                self._skip(e, slot, "catchup_limit", effects)
                return
            e.waiting.append((slot, reason))
            if e.pending:
                # a pending Fire the shell never reports must not hold the
                # line for ever: look again when it expires
                t = self._wake.get(e.tid)
                w = e.pending_expire_at + 1e-3
                self._wake[e.tid] = w if t is None else min(t, w)
            else:
                self._maybe_wake(e, now)
        elif policy == "forbid":
            self._skip(e, slot, "overlap_forbid", effects)
        elif policy == "replace":
            for run_id in sorted(e.running):
                effects.append(Cancel(e.task.id, run_id, "replace"))
                self._cancelled += 1
            self._fire(e, slot, reason, effects, now)
        elif policy == "buffer_one":
            while e.queue:
                old, _ = e.queue.popleft()
                self._skip(e, old, "coalesced", effects)
            e.queue.append((slot, reason))
        else:  # buffer_all
            if len(e.queue) >= self.max_buffer:
                self._skip(e, slot, "buffer_full", effects)
            else:
                e.queue.append((slot, reason))

    @staticmethod
    def _running_late(e: _Entry, slot: int) -> bool:
        """Every run going is a backlog run (a catch-up, a rerun, a slot
        released from the waiting line), not a run that overran its period."""
        return bool(e.running) and all(r in e.late for r in e.running)

    def _expire_pending(self, e: _Entry, now: float) -> bool:
        """Forget Fires the shell never reported as started or abandoned.

        Bound: a Fire may legitimately wait (e.g. for a fencing claim) up to
        the catch-up window; after that it no longer blocks the overlap
        policy. Returns True if nothing is pending any more.
        """
        if e.pending and now > e.pending_expire_at:
            n = sum(e.pending.values())
            e.pending.clear()
            e.backlog.clear()
            self._skipped["pending_expired"] = self._skipped.get("pending_expired", 0) + n
        return not e.pending

    def _release(self, e: _Entry, now: float, effects: list[Effect]) -> None:
        if e.pending:
            self._expire_pending(e, now)
        if e.busy():
            if e.pending and e.waiting:
                t = self._wake.get(e.tid)
                w = e.pending_expire_at + 1e-3
                self._wake[e.tid] = w if t is None else min(t, w)
            return
        if e.queue:
            slot, _reason = e.queue.popleft()
            self._fire(e, slot, "buffered", effects, now)
        elif e.waiting:
            self._release_waiting(e, now, effects)
        elif e.backfill:
            self._fire(e, e.backfill.popleft(), "backfill", effects, now)
        self._advance(e, effects)

    def _release_waiting(self, e: _Entry, now: float, effects: list[Effect]) -> None:
        """Rule 4a: the oldest waiting slot goes by the misfire policy now."""
        task = e.task
        grace = self.misfire_grace_s
        window_start = now - max(task.catchup_window_s, grace)
        fire_time = e.sched.fire_time
        while e.waiting:
            slot, reason = e.waiting.popleft()
            if e.paused:
                self._skip(e, slot, "paused", effects)
                continue
            if fire_time(slot) < window_start and reason not in ON_REQUEST:
                self._skip(e, slot, "expired", effects)
                continue
            late = now - fire_time(slot) > grace and reason not in ON_REQUEST
            if late and task.misfire == "skip":
                self._skip(e, slot, "misfire_skip", effects)
                continue
            if late and task.misfire == "run_once" and e.waiting \
                    and now - fire_time(e.waiting[0][0]) > grace:
                self._skip(e, slot, "coalesced", effects)
                continue
            self._fire(e, slot, "catchup" if late and reason == "due" else reason, effects, now,
                       backlog=True)
            return

    # ------------------------------------------------------------ introspection

    def last_fired_slot(self, task_id: str) -> int | None:
        return self._entries[task_id].last_fired

    def statistics(self) -> SchedulerStatistics:
        es = self._entries.values()
        return SchedulerStatistics(
            tasks=len(self._entries),
            owned=sum(1 for e in es if e.owned and e.ready),
            held=sum(1 for e in es if e.owned and not e.ready),
            paused=sum(1 for e in es if e.paused),
            heap_size=self._queued,
            running=sum(len(e.running) + sum(e.pending.values()) for e in es),
            queued=sum(len(e.queue) + len(e.backfill) + len(e.waiting) for e in es),
            fired=dict(sorted(self._fired.items())),
            skipped=dict(sorted(self._skipped.items())),
            cancelled=self._cancelled,
        )
