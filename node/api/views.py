"""The read model: the JSON the HTTP API answers with, built from a node
core and the membership view (pure; no I/O, no clock: ``now`` comes in).

Every function raises :class:`LookupError` for an unknown task (the API
turns it into 404).
"""
from __future__ import annotations

from typing import Any

from node.core import NodeCore
from node.tasks.model import after_cycle, shown_env
from node.schedule.explain import explain
from node.schedule.slots import reading_notes, upgrade_differences

__all__ = [
    "member_json", "ring_json", "tasks_json", "task_json", "owner_json", "runs_json",
    "explain_json", "RUN_KEYS", "CONFLICT_RULE",
]

#: Keys of a run in ``GET /v1/tasks/{id}/runs`` (``task_id`` to ``fencing_token``,
#: plus ``output``, read from the node's output store on demand, ``output_bytes``
#: and ``error``).
RUN_KEYS = ("task_id", "slot", "run_id", "node", "attempt", "status", "exit_code",
            "started", "finished", "fencing_token", "output", "output_bytes", "error")
#: Keys shown only when a run has them (manual run parameters, who
#: cancelled it, its notifications, its chained upstream run, its shard).
#: ``output_trimmed``: the record has an output this node no longer holds
#: (run_records_max_bytes dropped it, or it never arrived here).
RUN_OPTIONAL_KEYS = ("params", "cancelled_by", "notify", "upstream", "shard", "shards", "trace_id",
                     "output_trimmed")
CONFLICT_RULE = "greatest (updated_at, writer, content hash) wins; siblings kept until the next write"


def _task(core: NodeCore, task_id: str):
    t = core.tasks.get(task_id)
    if t is None:
        raise LookupError(f"unknown task {task_id!r}")
    return t


def member_json(m: Any, *, api: str | None, since_s: float, addr: str) -> dict:
    """One member (a ``gossip.swim.Member``-like object)."""
    return {
        "name": m.name,
        "addr": addr,
        "state": m.state.value,
        "incarnation": m.incarnation,
        "tags": dict(m.tags),
        "api": api,
        "since": f"{max(0.0, since_s):.0f}s ago",
    }


def ring_json(core: NodeCore, members: list[Any]) -> dict:
    load = core.ring.load()
    eligible = core._eligible()
    rows = []
    for m in members:
        off = core.skew.offset_s(m.name)
        rows.append({
            "name": m.name,
            "state": m.state.value,
            "eligible": m.name in eligible,
            "owned": load.get(m.name, 0),
            "replica_of": len(core.ring.tasks_of(m.name)),
            "skew_ms": None if off is None else round(off * 1000, 1),
        })
    return {"replicas": core.ring.replicas, "members": rows, "tasks": len(core.tasks)}


def tasks_json(core: NodeCore) -> list[dict]:
    out = []
    for tid in sorted(core.tasks):
        t = core.tasks[tid]
        ctl = core.store.control(tid)
        view = core.store.get_task(tid)
        out.append({
            "id": tid,
            "schedule": t.schedule,
            "type": t.command.to_dict().get("type"),
            "owner": core.ring.owner(tid),
            "paused": bool(ctl.paused),
            "last_fired": ctl.last_fired_slot,
            "conflict": bool(view and len(view.siblings) > 1),
        })
    return out


def task_json(core: NodeCore, task_id: str) -> dict:
    t = _task(core, task_id)
    view = core.store.get_task(task_id)
    ctl = core.store.control(task_id)
    d = t.to_dict()
    d["env"] = shown_env(d["env"])     # secret references, never values
    return {
        "task": d,
        "owner": core.ring.owner(task_id),
        "replicas": core.ring.owners(task_id),
        "paused": bool(ctl.paused),
        "last_fired": ctl.last_fired_slot,
        "conflict": bool(view and len(view.siblings) > 1),
        "siblings": list(view.siblings) if view and len(view.siblings) > 1 else [],
        "resolution": CONFLICT_RULE,
    }


def owner_json(core: NodeCore, task_id: str) -> dict:
    owners = core.ring.owners(task_id)
    return {"task_id": task_id, "owner": owners[0] if owners else None, "replicas": owners,
            "known": task_id in core.tasks}


def runs_json(core: NodeCore, task_id: str) -> list[dict]:
    runs = core.store.runs(task_id)
    if task_id not in core.tasks and not runs:
        raise LookupError(f"unknown task {task_id!r}")
    runs = [core.store.with_output(r) for r in runs]
    for r in runs:
        r.setdefault("output_bytes", len((r.get("output") or "").encode("utf-8", "replace")))
    return [{k: r.get(k) for k in RUN_KEYS} | {k: r[k] for k in RUN_OPTIONAL_KEYS if k in r} for r in runs]


def explain_json(core: NodeCore, task_id: str, n: int, now: float) -> dict:
    t = _task(core, task_id)
    e = dict(explain(core.scheduler, task_id, now, n))
    e.setdefault("task_id", task_id)
    e["owner"] = core.ring.owner(task_id)
    e["replicas"] = core.ring.owners(task_id)
    if task_id in core.handoff_pending:
        e["why"] = list(e.get("why", [])) + [
            f"held until a handoff exchange with a replica completes (at most "
            f"{core.knobs.handoff_timeout_s:g} s)"]
    if t.after:
        up, on = t.after["task"], t.after["on"]
        why = [f"fires once per run of {up!r} that ends {on} (after:)"]
        if up not in core.tasks:
            why.append(f"idle: upstream task {up!r} does not exist (deleted, or not yet replicated here)")
        cycle = _after_cycle_through(core, t.id)
        if cycle:
            why.append("idle: chained tasks form a cycle " + " -> ".join(cycle))
        e["why"] = list(e.get("why", [])) + why
        e["after"] = dict(t.after)
    e["notes"] = list(reading_notes(t))
    e["upgrade"] = upgrade_differences(t, now)
    return e


def _after_cycle_through(core: NodeCore, tid: str) -> list[str] | None:
    cyc = after_cycle({k: t.after["task"] for k, t in core.tasks.items() if t.after})
    return cyc if cyc and tid in cyc else None
