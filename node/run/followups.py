"""What follows a finished run (sans-IO): notifications and chained runs.

Decided by the node that finishes a run (the task's owner), once per run,
and carried by replicated run records so that a new owner finishes the job
of a dead one. Pure functions; ``node/core.py`` calls them and turns them
into records and effects, for the daemon and the simulator alike.

Notifications
-------------
A task's ``notify`` targets subscribe to events::

    success    the run succeeded
    failure    the run failed (failed, timeout or error), after its retries
    recovery   the first success after a failure (the previous run that
               ended, cancelled and skipped ones aside, had failed or was lost)
    lost       its node died before the run ended (sent by the new owner)
    missed     a slot was not run for a reason outside the task's policy
               (catch-up window passed, fencing unavailable, catch-up limit)

Rule 1 - one notification per run per target: of the run's events the
target gets the first it subscribes to, in the order recovery, success,
failure, lost. A failed attempt that is retried is not a failure of the run.
``missed`` is not tied to a run: the node that decided the skip sends it,
once, with the slot and the reason (not recorded).

Rule 2 - the record says whether it went out: the run's final attempt record
carries ``notify: {"<target index>:<event>": "pending" | "sent" | "failed"}``.
The node that wrote the record sends its pending notifications; when that
node is dead or has left, the task's owner sends them. A node that dies
after the webhook answered and before the record says ``sent`` leaves it
pending, and the next sender sends it again: delivery is at least once, and
the body's ``run_id`` (with ``event``) is the idempotency key.

Rule 3 - a notification never holds a run or the scheduler: the shell sends
it with the target's timeout and retries and reports the result.

Chained runs
------------
A task with ``after: {task: U, on: success|failure|always}`` fires once per
finished run of ``U`` whose status matches (``failure`` covers failed,
timeout, error and lost; ``always`` any of those and success; a cancelled
or skipped run chains nothing). ``on: failure`` and ``always`` on a lost run
apply only where the lost run is not rerun (``on_owner_loss: skip``).

Rule 4 - the trigger is a run record: the owner of ``U`` writes, in the same
commit as ``U``'s final record, a ``pending`` record of the downstream task
at ``U``'s slot, run id ``<slot>-after-<8 hex>`` (attempt 1) where the hex
digits are a hash of (U, slot, downstream): a second writer (U's new owner,
U rerun after a loss) writes the same record, so the downstream fires once
per upstream slot. The downstream's owner fires every pending trigger of a
task it owns as slot ``<slot>`` (reason ``chain``; fenced like any slot with
etcd), with ``PEERD_UPSTREAM_TASK_ID``, ``PEERD_UPSTREAM_RUN_ID`` and
``PEERD_UPSTREAM_STATUS`` in the run's environment; its attempt 1 record
replaces the trigger. A trigger the downstream does not run (paused, the
overlap policy, the task deleted) ends ``skipped`` with the reason.
"""
from __future__ import annotations

import hashlib
import json
import string
from typing import Any, Iterable

from node.state.runstatus import CANCELLED, ERROR, FAILED, LOST, PENDING, SKIPPED, SUCCEEDED, TIMEOUT, TERMINAL

__all__ = [
    "FAILURE", "run_events", "targets_for", "previous_status", "payload", "render_body",
    "chain_matches", "trigger_run_id", "is_trigger", "downstream_index", "notify_state",
    "OUTPUT_TAIL", "MISSED_REASONS",
]

#: Statuses that are a failure for ``failure`` and ``recovery``.
FAILURE = frozenset({FAILED, TIMEOUT, ERROR})
#: Bytes of output a notification carries.
OUTPUT_TAIL = 2048
_ORDER = ("recovery", "success", "failure", "lost", "missed")
#: Skip reasons that are ``missed`` (outside the task's own policy: not
#: ``misfire: skip``, ``coalesced`` or an overlap policy).
MISSED_REASONS = frozenset({"expired", "catchup_limit", "buffer_full", "claim_unavailable",
                            "pending_expired"})


def run_events(status: str, previous: str | None) -> list[str]:
    """The events of a run that ended ``status`` after a run that ended
    ``previous`` (None: no earlier run kept)."""
    if status == SUCCEEDED:
        return ["recovery", "success"] if previous in FAILURE or previous == LOST else ["success"]
    if status in FAILURE:
        return ["failure"]
    if status == LOST:
        return ["lost"]
    return []


def targets_for(notify: Iterable[dict], events: list[str]) -> list[tuple[int, str]]:
    """Rule 1: ``(target index, event)`` for each target that hears of the run."""
    out = []
    for i, t in enumerate(notify):
        subscribed = set(t.get("on") or ())
        for ev in _ORDER:
            if ev in events and ev in subscribed:
                out.append((i, ev))
                break
    return out


def previous_status(records: list[dict], claim_id: str) -> str | None:
    """Status of the run that ended before ``claim_id`` among a task's
    records (sorted as the store returns them): its last terminal record
    of another run, cancelled, skipped and chain triggers aside."""
    for r in reversed(records):
        rid = r.get("run_id")
        if not isinstance(rid, str) or rid.rsplit(".", 1)[0] == claim_id:
            continue
        st = r.get("status")
        if st in TERMINAL and st not in (CANCELLED, SKIPPED):
            return st
    return None


def chain_matches(on: str, status: str, *, rerun: bool = False) -> bool:
    """Does an upstream run that ended ``status`` fire a task ``after`` it?"""
    if status == LOST and rerun:
        return False
    if on == "success":
        return status == SUCCEEDED
    if on == "failure":
        return status in FAILURE or status == LOST
    return status == SUCCEEDED or status in FAILURE or status == LOST


def trigger_run_id(upstream: str, slot: int, downstream: str) -> str:
    """Rule 4: the downstream run's claim id for an upstream slot."""
    h = hashlib.blake2b(f"{upstream}\0{int(slot)}\0{downstream}".encode(), digest_size=4).hexdigest()
    return f"{int(slot)}-after-{h}"


def is_trigger(rec: dict) -> bool:
    """A chain trigger not yet taken up (Rule 4)."""
    return rec.get("status") == PENDING and isinstance(rec.get("upstream"), dict)


def downstream_index(afters: dict[str, dict]) -> dict[str, list[str]]:
    """upstream task id -> ids of the tasks ``after`` it (sorted)."""
    out: dict[str, list[str]] = {}
    for tid in sorted(afters):
        a = afters[tid]
        if a:
            out.setdefault(a["task"], []).append(tid)
    return out


def notify_state(pairs: list[tuple[int, str]]) -> dict[str, str]:
    """Rule 2: the record's initial ``notify`` map."""
    return {f"{i}:{ev}": "pending" for i, ev in pairs}


def payload(task_id: str, rec: dict, event: str) -> dict:
    """The webhook body's fields (the shell adds ``link``)."""
    started, finished = rec.get("started"), rec.get("finished")
    dur = None
    if isinstance(started, (int, float)) and isinstance(finished, (int, float)):
        dur = round(max(0.0, finished - started), 3)
    out = rec.get("output") or ""
    if not isinstance(out, str):
        out = str(out)
    return {
        "event": event, "task_id": task_id, "slot": rec.get("slot"), "run_id": rec.get("run_id"),
        "node": rec.get("node"), "attempt": rec.get("attempt"), "status": rec.get("status"),
        "exit_code": rec.get("exit_code"), "duration_s": dur, "error": rec.get("error"),
        "output_tail": out[-OUTPUT_TAIL:],
    }


def render_body(template: Any, fields: dict) -> bytes:
    """The request body: ``fields`` as JSON, or the target's ``template``
    with ``$name`` / ``${name}`` in its strings replaced by the fields
    (unknown names are left as they are), as JSON."""
    if template is None:
        return json.dumps(fields, sort_keys=True).encode()
    values = {k: "" if v is None else str(v) for k, v in fields.items()}

    def sub(x: Any) -> Any:
        if isinstance(x, str):
            return string.Template(x).safe_substitute(values)
        if isinstance(x, list):
            return [sub(v) for v in x]
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        return x

    return json.dumps(sub(template), sort_keys=True).encode()
