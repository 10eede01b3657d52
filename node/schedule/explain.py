"""Scheduler explanation: why a task fires (or not) on this node, and its next fires (a core).

Reads a :class:`~node.schedule.scheduler.Scheduler`'s state for one task and
says it in data and sentences, for ``peerctl explain`` and the HTTP API
(node/api/views.py). It decides nothing: the rules are in
node/schedule/scheduler.py.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.schedule.scheduler import Scheduler

__all__ = ["explain"]


def _iso(slot: int | None) -> str | None:
    if slot is None:
        return None
    return datetime.fromtimestamp(slot, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def explain(scheduler: Scheduler, task_id: str, now: float, n: int = 5) -> dict:
    """Why a task fires (or not) here, and its next ``n`` fires.

    Returns:
        dict with ``task_id``, ``node``, ``owned``, ``handoff_ready``,
        ``paused``, ``last_fired_slot`` (+ ``_utc``), ``cursor``,
        ``next`` (list of ``slot``, ``utc``, ``local``, ``local_zone``,
        ``fire_at``, ``dst_note``), ``overlap``, ``misfire``,
        ``catchup_window_s``, ``running`` (run ids), ``pending``,
        ``queued``, ``backfill_queued``, ``missed_now`` and ``why``
        (sentences).

    Raises:
        KeyError: unknown task.
    """
    e = scheduler._entries[task_id]
    task = e.task
    nxt = e.sched.describe(max(e.cursor, int(now // 1) - 1) if e.owned else int(now // 1), n)
    why: list[str] = []
    if not e.owned:
        why.append(f"not owned by {scheduler.node}: another node fires it")
    elif not e.ready:
        why.append("owned, waiting for handoff of the latest task state before firing")
    else:
        why.append(f"owned by {scheduler.node}")
    if e.paused:
        why.append("paused: each slot is skipped until resumed")
    if e.running:
        why.append(f"a run is in progress; overlap={task.overlap} decides the next slot")
    elif e.pending:
        why.append("a fire is waiting to start (fencing claim or turn); later slots wait for it")
    if e.waiting:
        why.append(f"{len(e.waiting)} slot(s) wait their turn; each goes by misfire={task.misfire} "
                   "when released")
    missed = 0
    window_start = now - max(task.catchup_window_s, scheduler.misfire_grace_s)
    for s in e.sched.slots_between(max(e.cursor, math.ceil(window_start) - 1), int(now // 1)):
        if now - e.sched.fire_time(s) > scheduler.misfire_grace_s:
            missed += 1
        if missed >= scheduler.max_catchup_slots:
            break
    if missed:
        action = {"skip": "skip them", "run_once": "fire the latest once",
                  "run_all": "fire each"}[task.misfire]
        why.append(f"{missed} slot(s) missed since last fired within catchup_window "
                   f"{task.catchup_window_s:g}s: misfire={task.misfire} will {action}")
    if not nxt:
        why.append("no future slots (one-shot task already fired or past)")
    pol = e.sched.policy
    return {
        "task_id": task_id,
        "node": scheduler.node,
        "owned": e.owned,
        "handoff_ready": e.ready,
        "paused": e.paused,
        "schedule": task.schedule,
        "timezone": task.timezone,
        "dst": pol.to_dict() if pol else None,
        "last_fired_slot": e.last_fired,
        "last_fired_utc": _iso(e.last_fired),
        "cursor": e.cursor,
        "next": nxt,
        "overlap": task.overlap,
        "misfire": task.misfire,
        "catchup_window_s": task.catchup_window_s,
        "running": sorted(e.running),
        "pending": sum(e.pending.values()),
        "queued": [s for s, _ in e.queue],
        "waiting": [s for s, _ in e.waiting],
        "backfill_queued": len(e.backfill),
        "missed_now": missed,
        "why": why,
    }
