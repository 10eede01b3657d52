"""Fast constructors (core): ``Member``, ``MemberEvent`` and ``SendPacket``
built without ``__init__``, and the one shared msgpack packer.

The membership core builds these by the million in a simulation (every
snapshot, event and datagram). Interpreted, the frozen classes' ``__init__``
pass ``__setattr__`` for every field, so they are built with ``object.__new__``
and the slot setters; compiled by mypyc (sim/accel.py) ``Member`` is a
native class and its own constructor is the fast path (``_NATIVE``). The
fields are the core's, already valid. Same objects either way.
"""
from __future__ import annotations

from typing import Final

import msgpack

from .effects import Addr, EventKind, MemberEvent, SendPacket
from .members import _MEMBER_FIELDS, Member

_obj_new: Final = object.__new__
# Compiled by mypyc (sim/accel.py), ``Member`` is a native class whose
# fields are read-only getset descriptors: the slot-setter shortcut below
# does not apply, and the native ``Member(...)`` constructor is the fast
# path instead. Interpreted, the fields are slot member descriptors.
_NATIVE = type(vars(Member)["name"]).__name__ != "member_descriptor"
_M_SET: tuple = () if _NATIVE else tuple(vars(Member)[f].__set__ for f in _MEMBER_FIELDS)
_E_SET: Final = tuple(vars(MemberEvent)[f].__set__ for f in getattr(MemberEvent, "__slots__"))
assert getattr(MemberEvent, "__slots__") == ("kind", "member")
_P_SET: Final = tuple(vars(SendPacket)[f].__set__ for f in getattr(SendPacket, "__slots__"))
assert getattr(SendPacket, "__slots__") == ("addr", "data")


def _new_member(name, addr, state, incarnation, tags, meta, state_change) -> Member:
    """``Member(...)`` without ``__init__`` (interpreted, its stores pass
    ``__setattr__``); the fields are ours, already valid."""
    if _NATIVE:
        return Member(name, addr, state, incarnation, tags, meta, state_change)
    m = _obj_new(Member)
    a, b, c, d, e, f, g = _M_SET
    a(m, name)
    b(m, addr)
    c(m, state)
    d(m, incarnation)
    e(m, tags)
    f(m, meta)
    g(m, state_change)
    return m


def _new_event(kind: EventKind, member: Member) -> MemberEvent:
    ev = _obj_new(MemberEvent)
    _E_SET[0](ev, kind)
    _E_SET[1](ev, member)
    return ev


def _new_send(addr: Addr, data: bytes) -> SendPacket:
    sp = _obj_new(SendPacket)
    _P_SET[0](sp, addr)
    _P_SET[1](sp, data)
    return sp


# One reusable packer (msgpack.packb builds a Packer per call). Its output is
# byte-identical to packb(use_bin_type=True); pack() is one C call without
# Python callbacks (no default=), so it is atomic under the GIL, and it resets
# its buffer when it raises.
_pack: Final = msgpack.Packer(use_bin_type=True).pack
