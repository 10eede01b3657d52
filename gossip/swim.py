"""SWIM + Lifeguard membership core (sans-IO).

Bytes and time go in (``handle_*``, ``tick``, ``now``), effects come out
(:mod:`gossip.effects`). No sockets, no clock, no logging; randomness only
from the ``random.Random`` handed to the constructor. One (config, seed,
inputs) gives one output, byte for byte.

Theory of operation (hashicorp/memberlist ``state.go`` semantics)
-----------------------------------------------------------------
Probing. Every ``probe_interval_s * (awareness + 1)`` we ping the next member
of a shuffled round-robin order (reshuffled with the rng each round; a new
member is inserted at a random position of the remaining round). No ack
after ``probe_timeout_s * (awareness + 1)``: ask ``indirect_checks`` random
alive members to ping it for us (INDIRECT_PING, they relay the ACK, or a NACK
when the target stays silent for their own ``probe_timeout_s``). No ack by
the end of the (scaled) probe interval: we SUSPECT it, at the incarnation it
had when the probe started, and tell it directly. A ping to a suspect member
carries the SUSPECT too (Lifeguard: the accused learns at once).

While some members are suspect, a share ``probe_suspect_share`` of probes
goes to a random suspect member out of turn: its ping carries the SUSPECT
(it refutes at once if it is alive; a partition that just healed does not
wait for the round-robin to reach it), and a failure is an independent
confirmation that shortens the suspicion of a member that is really down.
memberlist probes strictly in turn.

Awareness (Lifeguard local health), 0 .. ``awareness_max_multiplier - 1``:
+1 per failed probe when no NACK was expected, else +1 per missing NACK;
+1 each time we refute; -1 per ack received before the probe timeout.

Suspicion. A suspicion ends in DEAD at ``Suspicion.deadline()``:
``max`` at first, shrinking toward ``min`` as distinct members confirm
(:mod:`gossip.suspicion`). Each new confirmation is re-gossiped.

State merge (one total order). A claim about a member is a pair
``(incarnation, rank)`` with rank ALIVE 0 < SUSPECT 1 < DEAD 2 < LEFT 3:

1. A claim with a lower incarnation than ours is stale: dropped, counted as
   ``rejected["stale_incarnation"]``.
2. A claim wins iff its pair is greater than ours; equal pairs are
   duplicates (a SUSPECT duplicate from a new member is a confirmation).
   So: higher incarnation wins; at equal incarnation suspect beats alive,
   dead beats suspect, left beats dead; nothing at the same or a lower
   incarnation resurrects a dead or left member. Because it is a max over a
   total order, the final state does not depend on arrival order.
3. ALIVE with a new address is accepted only for a dead/left member
   (``dead_reclaim``); for a live member it is ``rejected["addr_conflict"]``.
4. Claims about ourselves: any SUSPECT/DEAD (not while leaving) at
   incarnation >= ours, or an ALIVE that is newer or differs from us, is
   refuted: ``incarnation = max(ours, claimed) + 1`` and ALIVE is broadcast.
5. Every accepted claim from a datagram is re-broadcast (infection style).
   Push-pull records are merged with the same rules; a remote DEAD becomes a
   SUSPECT here (memberlist: prefer suspicion to instant death). What we learn
   from the reply to our own *join* push-pull is mostly news to us only, so it
   is re-broadcast "weakly": twice, after fresher news (memberlist sends it
   the full retransmit count; we still cover simultaneous joins).

Events (``MemberEvent``) come out in decision order: JOIN when a member
becomes alive or suspect from unknown/dead/left, SUSPECT, DEAD, LEFT,
UPDATE when a live member changes address, tags or meta, or a suspect
member is cleared (refuted), REAPED when a dead/left member is forgotten
after ``reap_interval_s``. Self: UPDATE on ``update_local``, LEFT on
``leave``; no JOIN is emitted for ourselves (we are in ``members()`` from
construction).

Dissemination. Membership news and user broadcasts wait in a
:class:`~gossip.broadcast.TransmitLimitedQueue` and ride in the leftover
space of every datagram we send (pings, acks, ...), plus gossip rounds every
``gossip_interval_s`` to ``gossip_nodes`` random members (alive, suspect,
or dead for less than ``gossip_to_the_dead_s``) while the queue is not empty.
While some news has been sent fewer than half its retransmit limit, rounds
may run every ``gossip_fresh_interval_s`` instead (news crosses the cluster
in network hops, not gossip intervals; same transmission count), at most
``gossip_fresh_burst`` rounds back to back, refilled one per
``gossip_interval_s`` (so sustained news runs at the memberlist rate and the
datagrams a member sends per second do not grow with N). Every
datagram is ``<= packet_budget_bytes - seal_overhead_bytes``.

Performance. Per datagram the work is O(messages): an ALIVE we already
know at that incarnation (most gossip) is screened after checking two
fields; push-pull rows that cannot change anything are skipped the same
way, and our own rows are cached packed. ``members()`` is O(N log N).

Push-pull. Every ``Config.push_pull_interval_for(N)`` with one random live
member, every ``reconnect_interval_s`` with one random dead member (serf's
reconnect; heals partitions), and to every seed on ``join``. Join keeps retrying the seeds with
exponential backoff (``join_retry_initial_s`` doubling to
``join_retry_max_s``) until one push-pull succeeds, and again whenever we find
ourselves without any live peer.

Shell contract. After every call, re-read :meth:`next_deadline` (it may
move earlier) and call :meth:`tick` when it is due. ``handle_packet`` never
raises; bad input is counted in ``statistics().rejected`` by reason.
"""
from __future__ import annotations

import enum
import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass
from types import MappingProxyType
from typing import Final

import msgpack

from . import wire
from .broadcast import TransmitLimitedQueue
from .config import Config
from .effects import Addr, Effect, EventKind, MemberEvent, SendPacket, StartPushPull, UserMessage
from .suspicion import Suspicion
from .wire import (
    COMPOUND_HEADER_MAX_BYTES, Alive, LocalProtocolError, MsgType, RemoteProtocolError, User,
    WireState,
)

__all__ = ["MemberState", "Member", "SwimStats", "Swim"]


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
_WIRE_RANK: Final = (0, 1, 1, 3)   # wire state code -> rank it is merged at (DEAD as SUSPECT)
_TO_WIRE = {ALIVE: WireState.ALIVE, SUSPECT: WireState.SUSPECT, DEAD: WireState.DEAD,
            LEFT: WireState.LEFT}
_EMPTY_TAGS: Mapping[str, str] = MappingProxyType({})
_NO_TAGS: dict[str, str] = {}  # packed as is (msgpack cannot pack a mappingproxy); never mutated

ROW_MEMO_MAX: Final = 1 << 16
"""Packed push-pull rows remembered per process (``_Node.packed_row``);
cleared when full."""
_ROWS: dict[tuple[str, Addr, int, int], bytes] = {}
_SEQ_MASK = 2**64 - 1
_UINT64_MAX = wire.UINT64_MAX

_T_SUSP: Final = 0
_T_REAP: Final = 1
_T_RELAY: Final = 2
_T_JOIN: Final = 3
_FIXARRAY: Final = tuple(bytes((0x90 | i,)) for i in range(16))


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


@dataclass(frozen=True, slots=True)
class SwimStats:
    """Counters since construction (``statistics()``)."""

    probes_sent: int
    acks_received: int
    indirect_probes: int
    nacks: int
    suspicions_raised: int
    refutes: int
    deaths_declared: int
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    push_pulls: int
    reconnects: int
    rejected: dict[str, int]
    awareness: int
    members_by_state: dict[str, int]
    broadcast_queue: int = 0
    broadcasts_dropped: int = 0
    incarnation: int = 0
    stale_corrections: int = 0


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
        """The current ``Member``, not cached (see ``Swim._event``)."""
        return _new_member(self.name, self.addr, self.state, self.incarnation, self.tags,
                           self.meta, self.state_change)


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


# retransmit limits by (config, live N), shared by the cores of one config
# (a pure function of both; bounded)
_RT_MEMOS: dict = {}


def _rt_memo(config: Config) -> dict:
    try:
        memo = _RT_MEMOS.get(config)
    except TypeError:  # an unhashable config: private memo
        return {}
    if memo is None:
        if len(_RT_MEMOS) >= 64:
            _RT_MEMOS.clear()
        memo = _RT_MEMOS[config] = {}
    return memo


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


def _freeze_tags(tags) -> Mapping[str, str]:
    if not tags:
        return _EMPTY_TAGS
    if isinstance(tags, MappingProxyType):
        return tags
    return MappingProxyType(dict(tags))


# One reusable packer (msgpack.packb builds a Packer per call). Its output is
# byte-identical to packb(use_bin_type=True); pack() is one C call without
# Python callbacks (no default=), so it is atomic under the GIL, and it resets
# its buffer when it raises.
_pack: Final = msgpack.Packer(use_bin_type=True).pack


class Swim:
    """The membership state machine of one member.

    Args:
        config: knobs (:class:`gossip.config.Config`).
        name: unique member name (1..128 bytes UTF-8).
        addr: the address others reach us at (advertise address).
        rng: the only source of randomness.
        now: current time (any monotonic origin).
        tags, meta: our metadata (meta <= ``config.meta_max_bytes``).
        incarnation: starting incarnation (0 for a fresh start).
    Raises:
        ValueError: invalid name, address, tags or meta.
    """

    def __init__(self, config: Config, name: str, addr: Addr, *, rng: random.Random, now: float,
                 tags: Mapping[str, str] | None = None, meta: bytes = b"",
                 incarnation: int = 0) -> None:
        self.config = config
        self._rng = rng
        self._name = name
        addr = (addr[0], int(addr[1]))
        self._addr = addr
        tags_f = _freeze_tags(tags)
        meta = bytes(meta)
        self._check_alive(name, addr, tags_f, meta, incarnation)
        self._payload = config.payload_budget_bytes - COMPOUND_HEADER_MAX_BYTES
        self._budget = config.payload_budget_bytes
        self._me = _Node(name, addr, ALIVE, incarnation, tags_f, meta, now)
        self._nodes: dict[str, _Node] = {name: self._me}
        self._peers: list[str] = []          # every member but us, for O(1) random picks
        self._peer_pos: dict[str, int] = {}
        self._counts = [1, 0, 0, 0]          # by rank: alive, suspect, dead, left
        self._suspects: dict[str, None] = {}  # suspect members, in suspicion order
        self._queue = TransmitLimitedQueue(config.broadcast_queue_max)
        self._rt_limit: dict[int, int] = _rt_memo(config)  # live N -> retransmit_limit(N)
        self._seq = rng.getrandbits(32)
        self._awareness = 0
        self._probe_order: list[str] = []
        self._probe_idx = 0
        self._probe: _Probe | None = None
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._relays: dict[int, tuple[Addr, int, bool]] = {}
        self._timers: list[tuple] = []       # (at, seq, kind, key, token)
        self._timer_seq = 0
        self._next_gossip_at = now
        self._last_gossip_at = -math.inf
        self._gossip_tokens = float(config.gossip_fresh_burst)  # round budget
        self._gossip_tokens_at = now
        pp = config.push_pull_interval_s
        self._next_push_pull_at = now + rng.uniform(0.5, 1.0) * pp if pp > 0 else math.inf
        rc = config.reconnect_interval_s
        self._next_reconnect_at = now + rng.uniform(0.5, 1.0) * rc if rc > 0 else math.inf
        self._seeds: list[Addr] = []
        self._join_pending: dict[Addr, float] = {}
        self._join_ok = False
        self._join_backoff_s = config.join_retry_initial_s
        self._join_retry_at: float | None = None
        self._leaving = False
        self._weak = False                   # re-broadcast weakly (join reply merge)
        # between start_settle() and settle(): names whose membership news
        # was not queued (it would be dropped unsent); None otherwise
        self._settling: set[str] | None = None
        self._now = now                      # latest time seen (for next_deadline only)
        # counters
        self._c = dict.fromkeys(
            ("probes_sent", "acks_received", "indirect_probes", "nacks", "suspicions_raised",
             "refutes", "deaths_declared", "push_pulls", "reconnects"), 0)
        self._corrected: dict[Addr, float] = {}  # addr -> last stale-accusation answer
        self._stale_corrections = 0
        # the per-packet counters are attributes: compiled by mypyc, native
        # int adds instead of a dict update and a new int object each
        self._packets_in = 0
        self._packets_out = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._rejected: dict[str, int] = {}

    # -- properties ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def addr(self) -> Addr:
        return self._addr

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def awareness(self) -> int:
        return self._awareness

    @property
    def leaving(self) -> bool:
        return self._leaving

    # -- validation ------------------------------------------------------------
    def _check_alive(self, name, addr, tags, meta, incarnation) -> None:
        if len(meta) > self.config.meta_max_bytes:
            raise ValueError(f"meta is {len(meta)} bytes, more than meta_max_bytes="
                             f"{self.config.meta_max_bytes}")
        try:
            msg = Alive(incarnation, name, addr[0], addr[1], tags, meta)
        except LocalProtocolError as exc:
            raise ValueError(f"invalid member identity: {exc}") from None
        size = len(wire.encode_msg(msg))
        if size > self.config.payload_budget_bytes - COMPOUND_HEADER_MAX_BYTES - 32:
            raise ValueError(f"our alive message would be {size} bytes; tags and meta "
                             "must fit one datagram")

    # -- helpers ---------------------------------------------------------------
    def _reject(self, reason: str, n: int = 1) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + n

    def note_rejected(self, reason: str, n: int = 1) -> None:
        """Count a rejection decided outside the core (e.g. by the sealer)."""
        self._reject(reason, n)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _push_timer(self, at: float, kind: int, key, token) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, key, token))

    def _live_n(self) -> int:
        """Members alive or suspect, us included (N in every formula)."""
        c = self._counts
        return max(1, c[0] + c[1])

    def _retransmit_limit(self) -> int:
        """``config.retransmit_limit(_live_n())``, memoized (Config is frozen)."""
        c = self._counts
        n = c[0] + c[1]
        r = self._rt_limit.get(n)
        if r is None:
            r = self.config.retransmit_limit(n if n > 1 else 1)
            if len(self._rt_limit) < 100_000:
                self._rt_limit[n] = r
        return r

    def _live_peers(self) -> int:
        c = self._counts
        n = c[0] + c[1]
        if self._me.state in _LIVE:
            n -= 1
        return n

    def _set_state(self, n: _Node, state: MemberState, now: float) -> None:
        if n.state is not state:
            self._counts[_rank(n.state)] -= 1
            self._counts[_rank(state)] += 1
            if n.state is SUSPECT:
                del self._suspects[n.name]
            elif state is SUSPECT:
                self._suspects[n.name] = None
            n.state = state
            n.state_change = now
        n.snap = n.row = None

    def _event(self, out: list, kind: EventKind, n: _Node) -> None:
        s = n.snap
        if s is None:
            # not cached in n.snap: a 1000-core simulation would keep 10^6
            # snapshots nobody reads again (~110 MB); member() caches its own
            s = n.new_snapshot()
        out.append(_new_event(kind, s))

    def _alive_fields(self, n: _Node) -> list:
        # 5 = MsgType.ALIVE (msgpack packs an IntEnum as its int: same bytes)
        tags = n.tags
        return [5, n.incarnation, n.name, n.addr[0], n.addr[1], dict(tags) if tags else {},
                n.meta]

    def _broadcast_alive(self, n: _Node, weak: bool = False) -> None:
        """Queue ``n``'s ALIVE; while settling, not even packed (settle()
        would drop it unsent)."""
        if self._settling is not None:
            self._settling.add(n.name)
            return
        self._broadcast(n.name, _pack(self._alive_fields(n)), weak)

    def _broadcast(self, name: str, data: bytes, weak: bool = False) -> None:
        if self._settling is not None:
            self._settling.add(name)
            return
        if weak:
            # probably not news to the cluster: queue as already sent so it
            # goes out twice, after fresher news
            limit = self._retransmit_limit()
            self._queue.queue("m:" + name, data, max(0, limit - 2))
        else:
            self._queue.queue("m:" + name, data)

    def _send(self, out: list, addr: Addr, msgs: list[bytes]) -> None:
        """Emit one datagram with ``msgs`` and as many broadcasts as fit."""
        used = 0
        for m in msgs:
            used += len(m)
        space = self._payload - used
        if space > 0 and self._queue:
            extra = self._queue.take(space, self._retransmit_limit())
            if extra:
                msgs = msgs + extra
        k = len(msgs)
        # wire.join_compound, inlined: fixarray header for < 16 messages
        data = (_FIXARRAY[k] if k < 16 else wire._array_header(k)) + b"".join(msgs)
        size = len(data)
        # invariant: never over the budget (each msg fits; take() respects space)
        if size > self._budget:  # pragma: no cover - bug guard
            raise LocalProtocolError("oversized", f"datagram of {size} bytes")
        self._packets_out += 1
        self._bytes_out += size
        out.append(_new_send(addr, data))

    def _add_peer(self, name: str) -> None:
        self._peer_pos[name] = len(self._peers)
        self._peers.append(name)
        # memberlist: a new member goes to a random spot of the current round
        order = self._probe_order
        lo = min(self._probe_idx, len(order))
        order.insert(lo + int(self._rng.random() * (len(order) - lo + 1)), name)

    def _remove_peer(self, name: str) -> None:
        pos = self._peer_pos.pop(name)
        last = self._peers.pop()
        if last != name:
            self._peers[pos] = last
            self._peer_pos[last] = pos

    def _k_random(self, k: int, accept) -> list[_Node]:
        """Up to ``k`` distinct peers satisfying ``accept`` (random)."""
        peers = self._peers
        n = len(peers)
        if n == 0 or k <= 0:
            return []
        nodes = self._nodes
        chosen: list[_Node] = []
        seen: set[str] = set()
        rnd = self._rng.random
        for _ in range(min(3 * n, 8 * k + 16)):
            name = peers[int(rnd() * n)]
            if name in seen:
                continue
            seen.add(name)
            node = nodes[name]
            if accept(node):
                chosen.append(node)
                if len(chosen) >= k:
                    return chosen
        if len(seen) < n:
            # few eligible members: finish with a scan from a random offset
            start = int(rnd() * n)
            for i in range(n):
                name = peers[(start + i) % n]
                if name in seen:
                    continue
                node = nodes[name]
                if accept(node):
                    chosen.append(node)
                    if len(chosen) >= k:
                        break
        return chosen

    # -- merge rules -----------------------------------------------------------
    def _refute(self, out: list, claimed: int) -> None:
        me = self._me
        me.incarnation = max(me.incarnation, claimed) + 1
        me.snap = me.row = None
        self._c["refutes"] += 1
        self._apply_awareness(1)
        self._broadcast_alive(me)

    def _on_alive(self, out: list, now: float, name: str, inc: int, addr: Addr,
                  tags: Mapping[str, str], meta: bytes, rebroadcast: bool) -> None:
        if len(meta) > self.config.meta_max_bytes:
            self._reject("malformed")
            return
        if name == self._name:
            me = self._me
            if self._leaving or inc < me.incarnation:
                return
            if inc == me.incarnation and addr == me.addr and meta == me.meta and tags == me.tags:
                return
            self._refute(out, inc)
            return
        n = self._nodes.get(name)
        if n is None:
            n = _Node(name, addr, ALIVE, inc, _freeze_tags(tags), meta, now)
            self._nodes[name] = n
            self._counts[0] += 1
            self._add_peer(name)
            self._event(out, EventKind.JOIN, n)
            if rebroadcast:
                self._broadcast_alive(n, self._weak)
            return
        if inc <= n.incarnation:
            if inc < n.incarnation:
                self._reject("stale_incarnation")
            return
        old = n.state
        if addr != n.addr and not (old in _GONE and self.config.dead_reclaim):
            self._reject("addr_conflict")
            return
        changed = addr != n.addr or meta != n.meta or tags != n.tags
        n.incarnation = inc
        if changed:
            n.addr = addr
            n.tags = _freeze_tags(tags)
            n.meta = meta
        n.susp = None
        self._set_state(n, ALIVE, now)
        if old in _GONE:
            self._event(out, EventKind.JOIN, n)
        elif old is SUSPECT or changed:
            self._event(out, EventKind.UPDATE, n)
        if rebroadcast:
            self._broadcast_alive(n, self._weak)

    def _answer_stale(self, out: list, src: Addr, name: str, inc: int, now: float) -> None:
        """A suspect or dead about ``name`` at ``inc``: if that is us at an
        incarnation older than ours, whoever sent it missed our refutation.
        Nobody else will correct it (every member that has the refutation
        drops the stale news instead of passing it on), so its suspicion
        would run out and declare us dead. Send our current alive straight
        back; at most once per probe interval per address. (memberlist
        ignores such a message.)"""
        if name != self._name or inc >= self._me.incarnation or self._leaving:
            return
        last = self._corrected.get(src)
        if last is not None and now - last < self.config.probe_interval_s:
            return
        if len(self._corrected) >= 256:
            self._corrected.clear()
        self._corrected[src] = now
        self._stale_corrections += 1
        self._send(out, src, [_pack(self._alive_fields(self._me))])

    def _on_suspect(self, out: list, now: float, name: str, inc: int, sender: str,
                    rebroadcast: bool) -> None:
        n = self._nodes.get(name)
        if n is None:
            return
        if inc < n.incarnation:
            self._reject("stale_incarnation")
            return
        if n is self._me:
            if not self._leaving:
                self._refute(out, inc)
            return
        if inc == n.incarnation:
            if n.state is SUSPECT:
                s = n.susp
                if s is not None and s.confirm(sender):
                    self._push_timer(s.deadline(), _T_SUSP, name, s)
                    if rebroadcast:
                        self._broadcast(name, _pack([MsgType.SUSPECT, inc, name, sender]), self._weak)
                return
            if n.state is not ALIVE:
                return  # dead/left beat suspect at equal incarnation
        old = n.state
        n.incarnation = inc
        if old is SUSPECT and n.susp is not None:
            s = n.susp
            n.snap = n.row = None
            if s.confirm(sender):
                self._push_timer(s.deadline(), _T_SUSP, name, s)
        else:
            live = self._live_n() + (1 if old in _GONE else 0)
            cfg = self.config
            s = Suspicion(sender, now, cfg.suspicion_k(live), cfg.suspicion_min_s(live),
                          cfg.suspicion_max_s(live))
            n.susp = s
            self._set_state(n, SUSPECT, now)
            self._push_timer(s.deadline(), _T_SUSP, name, s)
            if old in _GONE:
                self._event(out, EventKind.JOIN, n)
            self._event(out, EventKind.SUSPECT, n)
        if rebroadcast:
            self._broadcast(name, _pack([MsgType.SUSPECT, inc, name, sender]), self._weak)

    def _on_dead(self, out: list, now: float, name: str, inc: int, sender: str,
                 rebroadcast: bool) -> None:
        n = self._nodes.get(name)
        if n is None:
            return
        if inc < n.incarnation:
            self._reject("stale_incarnation")
            return
        new = LEFT if sender == name else DEAD
        if n is self._me:
            if not self._leaving:
                self._refute(out, inc)
            return
        if inc == n.incarnation and _rank(new) <= _rank(n.state):
            return
        n.incarnation = inc
        n.susp = None
        self._set_state(n, new, now)
        self._push_timer(now + self.config.reap_interval_s, _T_REAP, name, now)
        if self._probe is not None and self._probe.name == name:
            self._probe = None  # nothing left to learn; the next round starts on time
        self._event(out, EventKind.LEFT if new is LEFT else EventKind.DEAD, n)
        if rebroadcast:
            self._broadcast(name, _pack([MsgType.DEAD, inc, name, sender]), self._weak)

    def _apply_awareness(self, delta: int) -> None:
        a = self._awareness + delta
        hi = self.config.awareness_max_multiplier - 1
        self._awareness = 0 if a < 0 else (hi if a > hi else a)

    # -- datagrams -------------------------------------------------------------
    def handle_packet(self, src: Addr, data: bytes, now: float) -> list[Effect]:
        """Process one opened datagram body from ``src``.

        Never raises: a malformed body is counted in
        ``statistics().rejected["malformed"]`` and ignored.
        """
        out: list = []
        if now > self._now:
            self._now = now
        self._packets_in += 1
        self._bytes_in += len(data)
        # Validate the whole compound before acting on any of it. Fast path:
        # an ALIVE we already know at the same or a higher incarnation (the
        # bulk of gossip) is dropped after checking only the fields it needs.
        nodes = self._nodes
        me = self._me
        todo = []
        stale = 0
        try:
            items = wire.unpack_compound(data)
            for it in items:
                if type(it) is list and len(it) == 7 and it[0] == 5:
                    name = it[2]
                    inc = it[1]
                    if type(name) is str and type(inc) is int and inc >= 0:
                        n = nodes.get(name)
                        if n is not None and n is not me and inc <= n.incarnation:
                            if inc < n.incarnation:
                                stale += 1
                            continue
                wire.check_item(it)
                todo.append(it)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            return out
        if stale:
            self._reject("stale_incarnation", stale)
        for it in todo:
            try:
                self._dispatch(out, src, it, now)
            except Exception:  # a bug; count it rather than kill the receive loop
                self._reject("internal_error")
        return out

    def _dispatch(self, out: list, src: Addr, it: list, now: float) -> None:
        # ``it`` is a validated ``[type, field, ...]`` list (wire.decode_compound_raw)
        t = it[0]
        if t == 5:    # ALIVE
            self._on_alive(out, now, it[2], it[1], (it[3], it[4]), it[5], it[6], True)
        elif t == 0:  # PING
            if it[2] != self._name:
                self._reject("wrong_target")
                return
            self._send(out, src, [_pack([MsgType.ACK, it[1]])])
        elif t == 2:  # ACK
            self._on_ack(out, src, it[1], now)
        elif t == 4:  # SUSPECT
            self._answer_stale(out, src, it[2], it[1], now)
            self._on_suspect(out, now, it[2], it[1], it[3], True)
        elif t == 6:  # DEAD
            self._answer_stale(out, src, it[2], it[1], now)
            self._on_dead(out, now, it[2], it[1], it[3], True)
        elif t == 1:  # INDIRECT_PING
            self._on_indirect_ping(out, src, it[1], it[2], (it[3], it[4]), it[5], now)
        elif t == 3:  # NACK
            p = self._probe
            if p is not None and p.seq == it[1]:
                p.nacks += 1
                self._c["nacks"] += 1
        elif t == 7:  # USER
            out.append(UserMessage(it[1], it[3]))
        else:
            self._reject("unknown_type")

    def _on_ack(self, out: list, src: Addr, seq: int, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            self._c["acks_received"] += 1
            if now <= p.timeout_at and src == p.addr:
                self._apply_awareness(-1)
            self._probe = None
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            requester, orig_seq, _nack = relay
            self._send(out, requester, [_pack([MsgType.ACK, orig_seq])])

    def _on_indirect_ping(self, out: list, src: Addr, req_seq: int, target: str,
                          target_addr: Addr, nack: bool, now: float) -> None:
        if len(self._relays) >= 1024:
            self._reject("relay_overflow")
            return
        seq = self._next_seq()
        self._relays[seq] = (src, req_seq, nack)
        self._push_timer(now + self.config.probe_timeout_s, _T_RELAY, seq, None)
        self._send(out, target_addr, [_pack([MsgType.PING, seq, target, self._name])])

    # -- timers ------------------------------------------------------------------
    def next_deadline(self) -> float:
        """Earliest time :meth:`tick` has work (may be in the past)."""
        t = math.inf
        if not self._leaving:
            p = self._probe
            if p is not None:
                t = p.timeout_at if not p.indirect_sent else p.deadline_at
            elif self._peers:
                t = self._next_probe_at
            if self._peers and self._next_push_pull_at < t:
                t = self._next_push_pull_at
            if self._counts[2] and self._next_reconnect_at < t:
                t = self._next_reconnect_at
            if self._seeds and not self._join_pending:
                r = self._join_retry_due()
                if r is not None and r < t:
                    t = r
        if self._queue:
            g = self._gossip_due()
            if g < t:
                t = g
        timers = self._timers
        if timers and timers[0][0] < t:
            t = timers[0][0]
        return t

    def _join_retry_due(self) -> float | None:
        if not self._seeds or self._join_pending:
            return None
        if self._join_ok:
            # inline _live_peers() > 0
            c = self._counts
            n = c[0] + c[1]
            me_st = self._me.state
            if me_st is ALIVE or me_st is SUSPECT:
                n -= 1
            if n > 0:
                return None
        # None: alone again after a join; tick() at once starts the backoff
        return self._join_retry_at if self._join_retry_at is not None else self._now

    def tick(self, now: float) -> list[Effect]:
        """Run every timer due at ``now``."""
        out: list = []
        if now > self._now:
            self._now = now
        self._run_timers(out, now)
        if not self._leaving:
            self._tick_probe(out, now)
            # each guard repeats the first test of the method it skips
            if self._seeds and not self._join_pending:
                self._tick_join(out, now)
            if now >= self._next_push_pull_at:
                self._tick_push_pull(out, now)
            if now >= self._next_reconnect_at:
                self._tick_reconnect(out, now)
        # a confirmation above may have moved a suspicion deadline into the past
        self._run_timers(out, now)
        if self._queue:
            self._tick_gossip(out, now)
        return out

    def _run_timers(self, out: list, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _at, _s, kind, key, token = heapq.heappop(timers)
            if kind == _T_SUSP:
                n = self._nodes.get(key)
                if n is None or n.susp is not token or n.state is not SUSPECT:
                    continue
                if token is not None and token.deadline() > now:
                    continue  # a newer entry exists for the real deadline
                self._c["deaths_declared"] += 1
                inc = n.incarnation
                self._on_dead(out, now, key, inc, self._name, True)
            elif kind == _T_REAP:
                n = self._nodes.get(key)
                if n is None or n.state not in _GONE or n.state_change != token:
                    continue
                del self._nodes[key]
                self._counts[_rank(n.state)] -= 1
                self._remove_peer(key)
                self._queue.discard("m:" + key)
                self._event(out, EventKind.REAPED, n)
            elif kind == _T_RELAY:
                relay = self._relays.pop(key, None)
                if relay is not None and relay[2]:
                    self._send(out, relay[0], [_pack([MsgType.NACK, relay[1]])])
            elif kind == _T_JOIN:
                if self._join_pending.get(key) == token:
                    self._join_attempt_failed(key, now)

    def _pick_probe_target(self) -> _Node | None:
        nodes = self._nodes
        share = self.config.probe_suspect_share
        if self._suspects and share > 0 and self._rng.random() < share:
            # out of turn: a suspect member (it learns it is suspected from
            # the ping and refutes, or a failure confirms the suspicion)
            names = list(self._suspects)
            return nodes[names[int(self._rng.random() * len(names))]]
        for _ in range(len(self._probe_order) + 2):
            if self._probe_idx >= len(self._probe_order):
                order = sorted(self._peers)
                self._rng.shuffle(order)
                self._probe_order = order
                self._probe_idx = 0
                if not order:
                    return None
            name = self._probe_order[self._probe_idx]
            self._probe_idx += 1
            n = nodes.get(name)
            if n is not None and n.state in _LIVE:
                return n
        return None

    def _tick_probe(self, out: list, now: float) -> None:
        cfg = self.config
        p = self._probe
        if p is not None:
            if not p.indirect_sent and now >= p.timeout_at:
                p.indirect_sent = True
                target = self._nodes.get(p.name)
                if target is not None and target.state in _LIVE:
                    helpers = self._k_random(
                        cfg.indirect_checks,
                        lambda x: x.state is ALIVE and x.name != p.name)
                    if helpers:
                        req = _pack([MsgType.INDIRECT_PING, p.seq, p.name, p.addr[0], p.addr[1],
                                     True, self._name])
                        for h in helpers:
                            self._send(out, h.addr, [req])
                        p.expected_nacks = len(helpers)
                        self._c["indirect_probes"] += len(helpers)
            if now >= p.deadline_at:
                self._probe = None
                if p.expected_nacks > 0:
                    self._apply_awareness(max(0, p.expected_nacks - p.nacks))
                else:
                    self._apply_awareness(1)
                n = self._nodes.get(p.name)
                if n is not None and n.state in _LIVE and n.incarnation == p.incarnation:
                    was = n.state
                    self._on_suspect(out, now, p.name, p.incarnation, self._name, True)
                    if was is ALIVE and n.state is SUSPECT:
                        self._c["suspicions_raised"] += 1
                    # Lifeguard: tell the accused directly so it can refute at once
                    self._send(out, n.addr, [_pack([MsgType.SUSPECT, n.incarnation, n.name,
                                                     self._name])])
        if self._probe is None and now >= self._next_probe_at:
            scale = self._awareness + 1
            self._next_probe_at = now + cfg.probe_interval_s * scale
            target = self._pick_probe_target()
            if target is None:
                return
            seq = self._next_seq()
            msgs = [_pack([MsgType.PING, seq, target.name, self._name])]
            if target.state is SUSPECT:
                msgs.append(_pack([MsgType.SUSPECT, target.incarnation, target.name, self._name]))
            self._probe = _Probe(seq, target.name, target.addr, target.incarnation, now,
                                 now + cfg.probe_timeout_s * scale,
                                 now + cfg.probe_interval_s * scale)
            self._c["probes_sent"] += 1
            self._send(out, target.addr, msgs)

    def _gossip_due(self) -> float:
        """Next gossip round: every ``gossip_interval_s``, or sooner (but
        ``gossip_fresh_interval_s`` after the last one) while news sent fewer
        than half its retransmit limit is queued."""
        t = self._next_gossip_at
        cfg = self.config
        fast = cfg.gossip_fresh_interval_s
        if fast > 0 and self._queue.has_fresh(max(1, self._retransmit_limit() // 2)):
            f = self._last_gossip_at + fast
            tokens = self._gossip_tokens
            if tokens < 1.0:  # budget spent: wait until one round has refilled
                r = self._gossip_tokens_at + (1.0 - tokens) * cfg.gossip_interval_s
                if r > f:
                    f = r
            if f < t:
                t = f
        return t

    def _tick_gossip(self, out: list, now: float) -> None:
        if not self._queue or now < self._gossip_due():
            return
        cfg = self.config
        self._next_gossip_at = now + cfg.gossip_interval_s
        self._last_gossip_at = now
        # every round spends one of gossip_fresh_burst; one comes back per interval
        tokens = self._gossip_tokens + (now - self._gossip_tokens_at) / cfg.gossip_interval_s
        burst = cfg.gossip_fresh_burst
        self._gossip_tokens = (burst if tokens > burst else tokens) - 1.0
        if self._gossip_tokens < 0.0:
            self._gossip_tokens = 0.0
        self._gossip_tokens_at = now
        dead_horizon = now - cfg.gossip_to_the_dead_s

        def ok(x: _Node) -> bool:
            st = x.state
            return st is ALIVE or st is SUSPECT or (st is DEAD and x.state_change >= dead_horizon)

        for target in self._k_random(cfg.gossip_nodes, ok):
            if not self._queue:
                break
            self._send(out, target.addr, [])

    def _tick_push_pull(self, out: list, now: float) -> None:
        if now < self._next_push_pull_at:
            return
        cfg = self.config
        self._next_push_pull_at = now + cfg.push_pull_interval_for(self._live_n())
        targets = self._k_random(1, lambda x: x.state is ALIVE)
        if targets:
            self._c["push_pulls"] += 1
            out.append(StartPushPull(targets[0].addr, self._encode_state(join=False), False))

    def _tick_reconnect(self, out: list, now: float) -> None:
        if now < self._next_reconnect_at:
            return
        self._next_reconnect_at = now + self.config.reconnect_interval_s
        if not self._counts[2]:
            return
        targets = self._k_random(1, lambda x: x.state is DEAD)
        if targets:
            self._c["push_pulls"] += 1
            self._c["reconnects"] += 1
            out.append(StartPushPull(targets[0].addr, self._encode_state(join=False), False))

    # -- join --------------------------------------------------------------------
    def join(self, seeds: Sequence[Addr], now: float) -> list[Effect]:
        """Start joining through ``seeds`` (our own address is skipped).

        Sends a join push-pull to every seed; while none succeeds (and later
        whenever no peer is alive) retries with exponential backoff.
        """
        seen = set()
        self._seeds = []
        for s in seeds:
            a = (s[0], int(s[1]))
            if a != self._addr and a not in seen:
                seen.add(a)
                self._seeds.append(a)
        self._join_ok = False
        self._join_backoff_s = self.config.join_retry_initial_s
        self._join_retry_at = None
        # memberlist setAlive: announce ourselves; rides on our first datagrams
        self._broadcast_alive(self._me)
        out: list = []
        self._join_attempt(out, now)
        return out

    def _join_attempt(self, out: list, now: float) -> None:
        if not self._seeds:
            return
        data = self._encode_state(join=True)
        self._join_retry_at = None
        for a in self._seeds:
            deadline = now + self.config.stream_timeout_s * 1.5
            self._join_pending[a] = deadline
            self._push_timer(deadline, _T_JOIN, a, deadline)
            self._c["push_pulls"] += 1
            out.append(StartPushPull(a, data, True))

    def _join_attempt_failed(self, addr: Addr, now: float) -> None:
        if self._join_pending.pop(addr, None) is None:
            return
        if not self._join_pending:
            self._join_retry_at = now + self._join_backoff_s
            self._join_backoff_s = min(self._join_backoff_s * 2, self.config.join_retry_max_s)

    def _tick_join(self, out: list, now: float) -> None:
        if not self._seeds or self._join_pending:
            return
        if self._join_ok and self._live_peers() > 0:
            self._join_retry_at = None
            return
        if self._join_retry_at is None:
            # we joined once but are alone again: start the backoff afresh
            self._join_backoff_s = self.config.join_retry_initial_s
            self._join_retry_at = now + self._join_backoff_s
            return
        if now >= self._join_retry_at:
            self._join_attempt(out, now)

    def push_pull_failed(self, addr: Addr, now: float) -> list[Effect]:
        """The shell could not complete a push-pull with ``addr``."""
        self._reject("push_pull_failed")
        if now > self._now:
            self._now = now
        a = (addr[0], int(addr[1]))
        self._join_attempt_failed(a, now)
        return []

    # -- push-pull ---------------------------------------------------------------
    def _encode_state(self, join: bool) -> bytes:
        return wire.encode_push_pull_packed(
            [n.row if n.row is not None else n.packed_row() for n in self._nodes.values()],
            join, self._name)

    def _screen_rows(self, rows: list) -> list:
        """Validate the push-pull rows that could change something; skip the
        ones that cannot (known member, lower incarnation, or the same
        incarnation at an equal or lower rank). All or nothing.

        Raises:
            RemoteProtocolError: a row is malformed.
        """
        nodes = self._nodes
        me = self._me
        todo = []
        meta_max = wire.META_MAX_BYTES
        for r in rows:
            if type(r) is list and len(r) == 7:
                name, inc, st = r[0], r[3], r[6]
                if type(name) is str and type(inc) is int and type(st) is int and 0 <= st <= 3:
                    n = nodes.get(name)
                    if n is not None and n is not me and 0 <= inc <= n.incarnation:
                        if inc < n.incarnation:
                            continue
                        # remote DEAD is merged as SUSPECT (rank 1); _rank inlined
                        ns = n.state
                        if _WIRE_RANK[st] <= (0 if ns is ALIVE else 1 if ns is SUSPECT
                                              else 2 if ns is DEAD else 3):
                            continue
                    # the common shape, checked inline; anything else (and any
                    # doubt) goes through wire.check_row, which accepts all of
                    # these: short printable names/hosts (<= NAME_MAX/4 and
                    # HOST_MAX/4 chars, so within the byte limits), no tags
                    host, port, tags, meta = r[1], r[2], r[4], r[5]
                    if (0 < len(name) <= 32 and type(host) is str and 0 < len(host) <= 63
                            and type(port) is int and 0 <= port <= 65535
                            and 0 <= inc <= _UINT64_MAX and type(tags) is dict and not tags
                            and type(meta) is bytes and len(meta) <= meta_max
                            and name.isprintable() and host.isprintable()):
                        todo.append(r)
                        continue
            wire.check_row(r)
            todo.append(r)
        return todo

    def _merge(self, out: list, sender: str, rows: list[list], now: float) -> None:
        accuser = sender or "?"
        for name, host, port, inc, tags, meta, st in rows:
            try:
                if st == 0:    # ALIVE
                    self._on_alive(out, now, name, inc, (host, port), tags, meta, True)
                elif st == 3:  # LEFT
                    self._on_dead(out, now, name, inc, name, True)
                elif name in self._nodes:
                    # SUSPECT, and DEAD softened to SUSPECT (memberlist mergeState)
                    self._on_suspect(out, now, name, inc, accuser, True)
            except Exception:
                self._reject("internal_error")

    def handle_push_pull(self, src: Addr, data: bytes, now: float) -> tuple[bytes | None, list[Effect]]:
        """Serve a peer's push-pull: merge its state, reply with ours.

        Returns:
            ``(reply, effects)``; ``reply`` is None when ``data`` was
            rejected (close the stream without answering).
        """
        out: list = []
        self._bytes_in += len(data)
        try:
            _join, sender, rows = wire.decode_push_pull_raw(data, check_rows=False)
            rows = self._screen_rows(rows)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            return None, out
        self._merge(out, sender, rows, now)
        reply = self._encode_state(join=False)
        self._bytes_out += len(reply)
        return reply, out

    def handle_push_pull_reply(self, src: Addr, data: bytes, now: float) -> list[Effect]:
        """Merge the reply to a push-pull we started with ``src``."""
        out: list = []
        a = (src[0], int(src[1]))
        self._bytes_in += len(data)
        try:
            _join, sender, rows = wire.decode_push_pull_raw(data, check_rows=False)
            rows = self._screen_rows(rows)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            self._join_attempt_failed(a, now)
            return out
        was_join = a in self._join_pending
        self._weak = was_join
        try:
            self._merge(out, sender, rows, now)
        finally:
            self._weak = False
        if was_join:
            # first periodic push-pull: spread over the interval scaled for
            # the cluster we just learned (not all members at once)
            pp = self.config.push_pull_interval_s
            if pp > 0:
                self._next_push_pull_at = now + self._rng.uniform(0.1, 1.0) * \
                    self.config.push_pull_interval_for(self._live_n())
            self._join_pending.clear()
            self._join_ok = True
            self._join_retry_at = None
            self._join_backoff_s = self.config.join_retry_initial_s
        return out

    # -- local changes -------------------------------------------------------------
    def leave(self, now: float) -> list[Effect]:
        """Leave gracefully: broadcast DEAD-from-self (= left) at a higher
        incarnation and send it at once to a few members. Probing, push-pull
        and join retries stop; gossip continues so the news spreads (keep
        calling ``tick`` for a moment before closing)."""
        out: list = []
        if self._leaving:
            return out
        self._leaving = True
        self._probe = None
        me = self._me
        me.incarnation += 1
        self._set_state(me, LEFT, now)
        data = _pack([MsgType.DEAD, me.incarnation, me.name, me.name])
        self._broadcast(me.name, data)
        self._event(out, EventKind.LEFT, me)
        for target in self._k_random(self.config.gossip_nodes, lambda x: x.state in _LIVE):
            self._send(out, target.addr, [data])
        return out

    def update_local(self, now: float, *, tags: Mapping[str, str] | None = None,
                     meta: bytes | None = None) -> list[Effect]:
        """Change our tags and/or meta: bump the incarnation, broadcast ALIVE.

        Raises:
            ValueError: meta too large or tags invalid.
        """
        me = self._me
        new_tags = _freeze_tags(tags) if tags is not None else me.tags
        new_meta = bytes(meta) if meta is not None else me.meta
        self._check_alive(me.name, me.addr, new_tags, new_meta, me.incarnation + 1)
        out: list = []
        if self._leaving:
            return out
        me.tags = new_tags
        me.meta = new_meta
        me.incarnation += 1
        me.snap = me.row = None
        self._broadcast_alive(me)
        self._event(out, EventKind.UPDATE, me)
        return out

    def start_settle(self) -> None:
        """Until ``settle()``, do not queue membership news at all: ``settle``
        would drop it unsent, so building it is wasted (a settled bootstrap
        of 1000 members merges 10^6 records). ``settle`` counts it as
        dropped all the same, so the two give the same state and count as
        long as no datagram is built in between (it would have carried some
        of that news): the settled bootstrap only merges push-pull state."""
        if self._settling is None:
            self._settling = set()

    def settle(self) -> int:
        """Forget the queued membership news, as if every item had been sent
        its retransmit limit; returns how many items were dropped (a member
        counts once), including news held back since ``start_settle()``.
        User broadcasts stay queued.

        Only for simulators and tests that start from a cluster formed long
        ago (``peersim --bootstrap settled``), where every member already
        holds what this news says. A real node never calls it: news it drops
        is news nobody else may have.
        """
        q = self._queue
        held = self._settling
        self._settling = None
        dropped = 0
        for key, _transmits in q.pending():
            if key.startswith("m:"):
                q.discard(key)
                dropped += 1
                if held:
                    held.discard(key[2:])
        return dropped + (len(held) if held else 0)

    def queue_user_broadcast(self, key: str, data: bytes) -> None:
        """Piggyback ``data`` to the cluster; a newer broadcast with the same
        ``key`` supersedes a queued one. Receivers get ``UserMessage`` once
        per copy they receive (duplicates possible; the node layer dedups).

        Raises:
            ValueError: ``data`` does not fit one datagram.
        """
        enc = self._user_msg(key, data)
        self._queue.queue("u:" + key, enc)

    def send_user(self, addr: Addr, data: bytes) -> list[Effect]:
        """Send ``data`` to ``addr`` in one datagram (best effort)."""
        out: list = []
        self._send(out, (addr[0], int(addr[1])), [self._user_msg("", data)])
        return out

    def _user_msg(self, key: str, data: bytes) -> bytes:
        try:
            enc = wire.encode_msg(User(self._name, key, bytes(data)))
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        if len(enc) > self._payload:
            raise ValueError(f"user message of {len(enc)} bytes exceeds the datagram budget "
                             f"({self._payload})")
        return enc

    # -- views -----------------------------------------------------------------------
    def members(self) -> list[Member]:
        """Every known member, us included, dead and left until reaped,
        sorted by name."""
        return [self._nodes[k].snapshot() for k in sorted(self._nodes)]

    def member(self, name: str) -> Member | None:
        n = self._nodes.get(name)
        return None if n is None else n.snapshot()

    def alive_members(self) -> list[Member]:
        """Alive and suspect members (a suspect is still a member), us
        included while we have not left; sorted by name."""
        return [n.snapshot() for k, n in sorted(self._nodes.items()) if n.state in _LIVE]

    def num_alive(self) -> int:
        """Members alive or suspect, us included (O(1))."""
        c = self._counts
        return c[0] + c[1]

    def statistics(self) -> SwimStats:
        return SwimStats(
            **self._c,
            packets_in=self._packets_in,
            packets_out=self._packets_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            rejected=dict(sorted(self._rejected.items())),
            awareness=self._awareness,
            members_by_state={s.value: self._counts[_rank(s)] for s in MemberState},
            broadcast_queue=len(self._queue),
            broadcasts_dropped=self._queue.dropped,
            incarnation=self._me.incarnation,
            stale_corrections=self._stale_corrections,
        )

    def probe_interval_now_s(self) -> float:
        """Current probe interval (scaled by awareness)."""
        return self.config.probe_interval_s * (self._awareness + 1)
