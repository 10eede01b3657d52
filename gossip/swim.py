"""SWIM + Lifeguard membership core (sans-IO).

Bytes and time go in (``handle_*``, ``tick``, ``now``), effects come out
(:mod:`gossip.effects`). No sockets, no clock, no logging; randomness only
from the ``random.Random`` handed to the constructor. One (config, seed,
inputs) gives one output, byte for byte.

Theory of operation (hashicorp/memberlist ``state.go`` semantics)
-----------------------------------------------------------------
Probing and awareness: :mod:`gossip.probe`.

Suspicion. A suspicion ends in DEAD at ``Suspicion.deadline()``:
``max`` at first, shrinking toward ``min`` as distinct members confirm
(:mod:`gossip.suspicion`). Each new confirmation is re-gossiped.

State merge (one total order, alive/suspect/dead/left precedence):
:mod:`gossip.merge`.

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

Where the code is. This module holds :class:`Swim`, the coordinator:
datagram dispatch, timers, gossip rounds, push-pull, join, local changes and
views. Its state and primitives (sending, broadcasting, random picks) are in
:mod:`gossip.swimstate`, the merge rules in :mod:`gossip.merge`, probing in
:mod:`gossip.probe`, push-pull and join in :mod:`gossip.pushpull`, member
records in :mod:`gossip.members` (public snapshot) and
:mod:`gossip.records` (the core's own), the fast constructors in
:mod:`gossip.fastnew`, the simulator-only settle in :mod:`gossip.settle`.
The layers are one chain of base classes, each using only those below it
(``_SwimState`` <- ``_MergeRules`` <- ``_Prober`` <- ``_PushPull`` <-
``Swim``; probing and push-pull do not use each other, their order is
arbitrary): single inheritance, so compiled by mypyc (sim/accel.py) every
call stays a direct native call and every field a native slot, as when it
was one class.

Performance. Per datagram the work is O(messages): an ALIVE we already
know at that incarnation (most gossip) is screened after checking two
fields; push-pull rows that cannot change anything are skipped the same
way, and our own rows are cached packed. ``members()`` is O(N log N).

Push-pull, reconnect and join: :mod:`gossip.pushpull`.

Shell contract. After every call, re-read :meth:`next_deadline` (it may
move earlier) and call :meth:`tick` when it is due. ``handle_packet`` never
raises; bad input is counted in ``statistics().rejected`` by reason.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

from . import wire
from .effects import Addr, Effect, EventKind, UserMessage
from .fastnew import _pack
from .members import ALIVE, DEAD, LEFT, SUSPECT, Member, MemberState, _GONE, _LIVE, _rank
from .pushpull import _PushPull
from .records import _Node, _freeze_tags
from .settle import drop_membership_news
from .swimstate import _T_JOIN, _T_REAP, _T_RELAY, _T_SUSP
from .wire import LocalProtocolError, MsgType, RemoteProtocolError, User

__all__ = ["MemberState", "Member", "SwimStats", "Swim"]


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


class Swim(_PushPull):
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

    # construction, state and primitives: gossip.swimstate._SwimState.__init__

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

    def note_rejected(self, reason: str, n: int = 1) -> None:
        """Count a rejection decided outside the core (e.g. by the sealer)."""
        self._reject(reason, n)

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
        held = self._settling
        self._settling = None
        return drop_membership_news(self._queue, held)

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
