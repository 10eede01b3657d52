"""Scheduler effects: what the scheduler core asks its shell to do (pure data, a core).

node/schedule/scheduler.py returns these from ``tick`` and its other calls;
node/core.py (driven by the daemon or the simulator) carries them out.
Immutable named tuples:

- :class:`Fire` ``(task_id, slot, fire_at, reason)``: start a run of ``slot``.
  ``reason`` is ``due`` (on time), ``catchup`` (missed, fired by the misfire
  policy), ``buffered`` (queued by the overlap policy, released when the
  previous run ended), ``run_now``, ``backfill`` or ``rerun_owner_loss``.
- :class:`SlotSkipped` ``(task_id, slot, reason)``: the slot is decided and
  will not run. Reasons: ``misfire_skip``, ``coalesced`` (folded into another
  run by ``run_once`` or ``buffer_one``), ``expired`` (older than
  ``catchup_window``; one effect names the first such slot, the rest are not
  enumerated), ``catchup_limit`` (beyond ``Scheduler.max_catchup_slots``),
  ``overlap_forbid``, ``buffer_full``, ``paused``, ``owner_lost``.
- :class:`Cancel` ``(task_id, run_id, reason)``: stop a running run
  (``replace``).
- :class:`Advance` ``(task_id, slot)``: persist and replicate the task's
  ``last_fired_slot``, a max register meaning "every slot <= this one is
  settled" (its run started, or it was skipped or expired; scheduler.py rule 2a). At most
  one per task per call; ``run_started`` and ``fire_abandoned`` return one
  too.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Advance", "Cancel", "Effect", "Fire", "SlotSkipped"]


# Effects are immutable named tuples rather than frozen dataclasses: the
# tick hot path builds two per fire, and a NamedTuple is ~3x cheaper to build.
# No two effect types can compare equal (field counts or field types differ).


class Fire(NamedTuple):
    """Start a run of ``slot`` (scheduled for ``fire_at``, epoch seconds)."""

    task_id: str
    slot: int
    fire_at: float
    reason: str


class SlotSkipped(NamedTuple):
    """``slot`` is decided and will not run, for ``reason``."""

    task_id: str
    slot: int
    reason: str


class Cancel(NamedTuple):
    """Stop the running run ``run_id`` (str)."""

    task_id: str
    run_id: str
    reason: str


class Advance(NamedTuple):
    """Persist/replicate ``last_fired_slot`` = max(current, slot)."""

    task_id: str
    slot: int


Effect = Fire | SlotSkipped | Cancel | Advance
