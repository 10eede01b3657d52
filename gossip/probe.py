"""Failure detection of the membership core (core): the probe round, indirect
probes through other members, the relay of their pings, and Lifeguard's
local-health awareness (``_Prober``).

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
+1 each time we refute; -1 per ack received before the probe timeout
(``_SwimState._apply_awareness``).
"""
from __future__ import annotations

from .effects import Addr
from .fastnew import _pack
from .members import ALIVE, SUSPECT, _LIVE
from .merge import _MergeRules
from .records import _Node, _Probe
from .swimstate import _T_RELAY
from .wire import MsgType


class _Prober(_MergeRules):
    """Probing (module docstring); base of :class:`gossip.pushpull._PushPull`."""

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
