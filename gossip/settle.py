"""Simulator-only settle (core): forget queued membership news at once, for a
cluster that starts as if formed long ago.

``Swim.start_settle`` / ``Swim.settle`` (``peersim --bootstrap settled``,
sim/cluster.py) call :func:`drop_membership_news`. A real node never does:
news it drops is news nobody else may have.
"""
from __future__ import annotations

from .broadcast import TransmitLimitedQueue

__all__ = ["drop_membership_news"]


def drop_membership_news(q: TransmitLimitedQueue, held: set[str] | None) -> int:
    """Discard every queued membership item (key ``m:<name>``) of ``q``;
    user broadcasts stay. Returns how many were dropped, a member counting
    once: the items discarded plus the names in ``held`` (news never queued
    since ``start_settle``) that had no item queued."""
    dropped = 0
    for key, _transmits in q.pending():
        if key.startswith("m:"):
            q.discard(key)
            dropped += 1
            if held:
                held.discard(key[2:])
    return dropped + (len(held) if held else 0)
