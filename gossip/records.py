"""The membership core's own mutable records (core): ``_Node``, one per known
member, with its cached ``Member`` snapshot and packed push-pull row (and tag
freezing); ``_Probe``, the probe in flight.

One ``_Node`` per known member (us included) lives in ``Swim._nodes``; the
merge rules (:mod:`gossip.merge`) change its fields and clear the caches
(``snap``, ``row``) through ``_SwimState._set_state``. ``_Probe`` is kept
here, beside the state that holds it (``_SwimState._probe``), and driven by
:mod:`gossip.probe`.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .effects import Addr
from .fastnew import _new_member, _pack
from .members import Member, MemberState, _rank
from .suspicion import Suspicion

_EMPTY_TAGS: Mapping[str, str] = MappingProxyType({})
_NO_TAGS: dict[str, str] = {}  # packed as is (msgpack cannot pack a mappingproxy); never mutated

ROW_MEMO_MAX: Final = 1 << 16
"""Packed push-pull rows remembered per process (``_Node.packed_row``);
cleared when full."""
_ROWS: dict[tuple[str, Addr, int, int], bytes] = {}


class _Node:
    __slots__ = ("name", "addr", "state", "incarnation", "tags", "meta", "state_change",
                 "snap", "row", "susp")

    def __init__(self, name: str, addr: Addr, state: MemberState, incarnation: int,
                 tags: Mapping[str, str], meta: bytes, now: float) -> None:
        self.name = name
        self.addr = addr
        self.state = state
        self.incarnation = incarnation
        self.tags = tags
        self.meta = meta
        self.state_change = now
        self.snap: Member | None = None
        self.row: bytes | None = None       # packed push-pull record (cache)
        self.susp: Suspicion | None = None

    def packed_row(self) -> bytes:
        r = self.row
        if r is None:
            tags, meta, rank = self.tags, self.meta, _rank(self.state)
            # The common row (no tags, no meta) comes from a memo shared by
            # the cores of this process: the same state packs to the same
            # bytes, so a simulator's 1000 cores keep one copy of each row
            # instead of 1000 (10^6 packs and ~80 MB fewer).
            key = None if tags or meta else (self.name, self.addr, self.incarnation, rank)
            if key is not None:
                r = _ROWS.get(key)
            if r is None:
                r = _pack([self.name, self.addr[0], self.addr[1], self.incarnation,
                           dict(tags) if tags else _NO_TAGS, meta, rank])
                if key is not None:
                    if len(_ROWS) >= ROW_MEMO_MAX:
                        _ROWS.clear()
                    _ROWS[key] = r
            self.row = r
        return r

    def snapshot(self) -> Member:
        """The current ``Member``, cached until the next change."""
        s = self.snap
        if s is None:
            s = self.snap = self.new_snapshot()
        return s

    def new_snapshot(self) -> Member:
        """The current ``Member``, not cached (see ``_SwimState._event``)."""
        return _new_member(self.name, self.addr, self.state, self.incarnation, self.tags,
                           self.meta, self.state_change)


def _freeze_tags(tags) -> Mapping[str, str]:
    if not tags:
        return _EMPTY_TAGS
    if isinstance(tags, MappingProxyType):
        return tags
    return MappingProxyType(dict(tags))


class _Probe:
    __slots__ = ("seq", "name", "addr", "incarnation", "start", "timeout_at", "deadline_at",
                 "indirect_sent", "expected_nacks", "nacks")

    def __init__(self, seq, name, addr, incarnation, start, timeout_at, deadline_at):
        self.seq = seq
        self.name = name
        self.addr = addr
        self.incarnation = incarnation
        self.start = start
        self.timeout_at = timeout_at
        self.deadline_at = deadline_at
        self.indirect_sent = False
        self.expected_nacks = 0
        self.nacks = 0
