"""Run statuses: the one list every layer uses (executor, store, node core,
API, simulator).

A run record moves ``pending -> running -> <terminal>``; a record that never
ran may go straight to a terminal status.

========== ===================================================================
status     meaning
========== ===================================================================
pending    decided, not started yet (waiting for a fencing claim or a turn)
running    an attempt is in progress on ``node``
succeeded  the attempt ended well (exit 0, HTTP 2xx)
failed     the attempt ended badly (non-zero exit, HTTP error, exception)
timeout    the attempt ran past the task's timeout and was stopped
error      the attempt could not start (no such executable, bad command,
           bad working directory); the reason is in the record's ``error``
cancelled  stopped on purpose (overlap ``replace``, shutdown, an operator)
lost       its node died or restarted before the attempt ended
skipped    the slot was decided and not run (the reason is in ``error``)
========== ===================================================================

``failed`` and ``timeout`` are retried (``RETRYABLE``); ``error`` is not: a
missing binary does not appear by retrying.
"""
from __future__ import annotations

__all__ = [
    "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "TIMEOUT", "ERROR", "CANCELLED", "LOST",
    "SKIPPED", "RUN_STATUSES", "TERMINAL", "RETRYABLE", "is_terminal",
]

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMEOUT = "timeout"
ERROR = "error"
CANCELLED = "cancelled"
LOST = "lost"
SKIPPED = "skipped"

#: Every status, in lifecycle order.
RUN_STATUSES = (PENDING, RUNNING, SUCCEEDED, FAILED, TIMEOUT, ERROR, CANCELLED, LOST, SKIPPED)
#: Statuses a run ends in.
TERMINAL = frozenset({SUCCEEDED, FAILED, TIMEOUT, ERROR, CANCELLED, LOST, SKIPPED})
#: Terminal statuses worth another attempt.
RETRYABLE = frozenset({FAILED, TIMEOUT})


def is_terminal(status: object) -> bool:
    return status in TERMINAL
