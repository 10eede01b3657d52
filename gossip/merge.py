"""Merge rules of the membership core (core): how a claim about a member
(ALIVE, SUSPECT, DEAD, LEFT at an incarnation) from a datagram or a push-pull
row changes what we know (``_MergeRules``).

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

Suspicion timers and re-gossiped confirmations: :mod:`gossip.suspicion`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from . import wire
from .effects import Addr, EventKind
from .fastnew import _pack
from .members import ALIVE, DEAD, LEFT, SUSPECT, _GONE, _rank
from .records import _Node, _freeze_tags
from .suspicion import Suspicion
from .swimstate import _T_REAP, _T_SUSP, _SwimState
from .wire import MsgType

_WIRE_RANK: Final = (0, 1, 1, 3)   # wire state code -> rank it is merged at (DEAD as SUSPECT)
_UINT64_MAX = wire.UINT64_MAX


class _MergeRules(_SwimState):
    """The merge rules (module docstring); base of :class:`gossip.probe._Prober`."""

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

    # -- push-pull rows ------------------------------------------------------------
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
