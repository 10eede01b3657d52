"""Scheduling: parsing schedule strings, the slots a schedule names, the
scheduler tick that decides which slots fire, its effects and ``explain``.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.schedule.effects.<function>``):
    effects        Scheduler effects: what the scheduler core asks its shell to
    explain        Scheduler explanation: why a task fires (or not) on this nod
    parse          Schedule strings: parsing and validating what a task's sched
    scheduler      Scheduler core: which slots of which tasks fire now (sans-IO
    slots          Slot computation: which UTC instants a task's schedule names
"""
from node.schedule.effects import (
    Advance, Cancel, Effect, Fire, SlotSkipped,
)
from node.schedule.parse import (
    AFTER, ALIASES, ScheduleError,
)
from node.schedule.scheduler import (
    ON_REQUEST, Scheduler, SchedulerStatistics,
)
from node.schedule.slots import (
    MAX_DST_SHIFT_S, DstPolicy, Schedule,
)

__all__ = [
    'Advance', 'Cancel', 'Effect', 'Fire', 'SlotSkipped', 'AFTER', 'ALIASES',
    'ScheduleError', 'ON_REQUEST', 'Scheduler', 'SchedulerStatistics',
    'MAX_DST_SHIFT_S', 'DstPolicy', 'Schedule',
]
