"""Member snapshots and states (core): ``MemberState``, its rank order, and
``Member``, the frozen snapshot the membership core hands out.

A member's state is one of ALIVE < SUSPECT < DEAD < LEFT (``_rank``); the
merge rules that order claims by ``(incarnation, rank)`` are in
:mod:`gossip.merge`. ``Member`` objects are built by the core
(:mod:`gossip.records`, with the fast constructor of :mod:`gossip.fastnew`)
and never change.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import FrozenInstanceError
from typing import Final

from .effects import Addr
from .wire import WireState

__all__ = ["MemberState", "Member", "ALIVE", "SUSPECT", "DEAD", "LEFT"]


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


# Final: compiled by mypyc, module constants are C statics, not globals-dict lookups
ALIVE: Final = MemberState.ALIVE
SUSPECT: Final = MemberState.SUSPECT
DEAD: Final = MemberState.DEAD
LEFT: Final = MemberState.LEFT


def _rank(st: MemberState) -> int:
    """ALIVE 0 < SUSPECT 1 < DEAD 2 < LEFT 3 (identity tests: enum hashing is slow)."""
    return 0 if st is ALIVE else 1 if st is SUSPECT else 2 if st is DEAD else 3


_LIVE: Final = (ALIVE, SUSPECT)
_GONE: Final = (DEAD, LEFT)
_TO_WIRE = {ALIVE: WireState.ALIVE, SUSPECT: WireState.SUSPECT, DEAD: WireState.DEAD,
            LEFT: WireState.LEFT}


_MEMBER_FIELDS = ("name", "addr", "state", "incarnation", "tags", "meta", "state_change")


class Member:
    """Snapshot of one member as this core sees it. Immutable: assigning or
    deleting a field raises ``dataclasses.FrozenInstanceError``; equal when
    every field is equal.

    Written out rather than ``@dataclass(frozen=True, slots=True)``: compiled
    by mypyc (sim/accel.py) a frozen dataclass is built by its interpreted
    generated ``__init__`` (~1.1 us, measured), this class natively (~60
    ns), and a 1000-member simulation builds ~10^6 of them.
    """

    __slots__ = _MEMBER_FIELDS

    def __init__(self, name: str, addr: Addr, state: MemberState, incarnation: int,
                 tags: Mapping[str, str], meta: bytes, state_change: float) -> None:
        # Final: compiled, these are native stores that bypass __setattr__;
        # interpreted, each first store passes __setattr__'s "not set yet"
        self.name: Final = name
        self.addr: Final = addr
        self.state: Final = state
        self.incarnation: Final = incarnation
        self.tags: Final = tags
        self.meta: Final = meta
        self.state_change: Final = state_change

    def __setattr__(self, key: str, value: object) -> None:
        if key in _MEMBER_FIELDS and not hasattr(self, key):
            object.__setattr__(self, key, value)
            return
        raise FrozenInstanceError(f"cannot assign to field {key!r}")

    def __delattr__(self, key: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {key!r}")

    def _fields(self) -> tuple:
        return (self.name, self.addr, self.state, self.incarnation, self.tags, self.meta,
                self.state_change)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Member:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        # as the frozen dataclass: all fields (tags are a mapping, so this raises)
        return hash(self._fields())

    def __repr__(self) -> str:
        return ("Member(" + ", ".join(f"{k}={v!r}" for k, v in zip(_MEMBER_FIELDS, self._fields()))
                + ")")
