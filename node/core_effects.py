"""The node core's effects (sans-IO core): what :class:`node.core.NodeCore`
asks its shell (the trio daemon or the simulator) to do, and the events it
notes.

:class:`Request` send ``data`` (a ``node.peerwire`` message) to a peer over a
stream and answer ``NodeCore.request_answered`` or ``NodeCore.request_failed``
with ``xid``. :class:`StartRun` run a task's command (with retries) and report
``attempt_started``, ``attempt_finished``, ``run_ended``. :class:`CancelRun`
stop one. :class:`Claim` / :class:`Reclaim` one fencing attempt of at most
``attempt_s`` seconds, answered by ``claim_answered``. :class:`Notify` send one
notification. :class:`Note` something to log and count (``event`` names are
listed in :data:`NOTES`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from node.tasks.model import Task

__all__ = [
    "Request", "StartRun", "CancelRun", "Claim", "Reclaim", "Note", "Notify", "Effect", "NOTES",
    "claim_run_id",
]

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
    set, report :meth:`node.core.NodeCore.notify_done` with ``key``."""
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
