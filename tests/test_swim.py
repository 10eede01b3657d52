"""Swim core scenarios on an in-memory network with a fake clock.

``Cluster`` is the harness (h11 ``ConnectionPair`` / memberlist
``MockNetwork`` idea): it routes ``SendPacket`` and ``StartPushPull``
effects between N ``Swim`` cores through a heap of ``(time, seq, event)``,
calls ``tick`` when each core's ``next_deadline`` comes, and records every
``MemberEvent``. Faults: ``crash(name)`` (nothing in or out),
``drop_out`` / ``drop_in`` sets, seeded loss.
"""
from __future__ import annotations

import heapq
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.config import Config
from gossip.effects import EventKind, MemberEvent, SendPacket, StartPushPull, UserMessage
from gossip.swim import MemberState, Swim

LAT_S = 0.001
_PKT, _PP_REQ, _PP_REP, _PP_FAIL, _TICK = range(5)


class Cluster:
    def __init__(self, config: Config | None = None, seed: int = 0, loss: float = 0.0) -> None:
        self.config = config or Config.local()
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.now = 0.0
        self.heap: list = []
        self.seq = 0
        self.cores: dict[str, Swim] = {}
        self.by_addr: dict[tuple, str] = {}
        self.crashed: set[str] = set()
        self.drop_out: set[str] = set()
        self.drop_in: set[str] = set()
        self.events: dict[str, list[MemberEvent]] = {}
        self.user: dict[str, list[UserMessage]] = {}
        self.tick_at: dict[str, float] = {}
        self.max_packet = 0
        self.packets = 0

    # -- building ---------------------------------------------------------------
    def add(self, name: str, *, seeds: list[str] | None = None, port: int | None = None,
            incarnation: int = 0, config: Config | None = None, **kw) -> Swim:
        port = port or 7000 + len(self.cores)
        addr = ("10.0.0.1", port)
        core = Swim(config or self.config, name, addr, rng=random.Random(f"{self.seed}-{name}-{len(self.cores)}"),
                    now=self.now, incarnation=incarnation, **kw)
        self.cores[name] = core
        self.by_addr[addr] = name
        self.crashed.discard(name)
        self.events.setdefault(name, [])
        self.user.setdefault(name, [])
        self.tick_at.pop(name, None)
        if seeds is not None:
            self.apply(name, core.join([self.cores[s].addr for s in seeds], self.now))
        self._schedule_tick(name)
        return core

    def addr(self, name: str):
        return self.cores[name].addr

    def _push(self, at: float, kind: int, *payload) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, payload))

    def _schedule_tick(self, name: str) -> None:
        core = self.cores[name]
        t = max(core.next_deadline(), self.now)
        if math.isinf(t):
            return
        cur = self.tick_at.get(name)
        if cur is None or t < cur:
            self.tick_at[name] = t
            self._push(t, _TICK, name, t)

    # -- effects ------------------------------------------------------------------
    def apply(self, name: str, effects) -> None:
        for eff in effects or ():
            if isinstance(eff, SendPacket):
                assert len(eff.data) <= self.config.payload_budget_bytes, len(eff.data)
                self.max_packet = max(self.max_packet, len(eff.data))
                self.packets += 1
                self._route(name, eff.addr, eff.data)
            elif isinstance(eff, StartPushPull):
                dst = self.by_addr.get(eff.addr)
                if dst is None or self._blocked(name, dst):
                    self._push(self.now + 5 * LAT_S, _PP_FAIL, name, eff.addr)
                else:
                    self._push(self.now + LAT_S, _PP_REQ, name, dst, eff.addr, eff.data)
            elif isinstance(eff, MemberEvent):
                self.events[name].append(eff)
            elif isinstance(eff, UserMessage):
                self.user[name].append(eff)
            else:  # pragma: no cover
                raise AssertionError(f"unknown effect {eff!r}")
        if name in self.cores and name not in self.crashed:
            self._schedule_tick(name)

    def _blocked(self, src: str, dst: str) -> bool:
        return (src in self.crashed or dst in self.crashed or src in self.drop_out
                or dst in self.drop_in)

    def _route(self, src: str, addr, data: bytes) -> None:
        dst = self.by_addr.get(addr)
        if dst is None or self._blocked(src, dst):
            return
        if self.loss and self.rng.random() < self.loss:
            return
        self._push(self.now + LAT_S, _PKT, src, dst, data)

    # -- running ------------------------------------------------------------------
    def run_until(self, t_end: float, stop=None) -> bool:
        """Process events until ``t_end`` (or until ``stop()`` is true)."""
        while self.heap and self.heap[0][0] <= t_end:
            at, _s, kind, p = heapq.heappop(self.heap)
            self.now = at
            if kind == _TICK:
                name, t = p
                if self.tick_at.get(name) != t or name in self.crashed:
                    continue
                del self.tick_at[name]
                core = self.cores[name]
                self.apply(name, core.tick(at))
                assert core.next_deadline() > at, (name, at, self.seed)  # no busy loop
            elif kind == _PKT:
                src, dst, data = p
                if self._blocked(src, dst):
                    continue
                self.apply(dst, self.cores[dst].handle_packet(self.cores[src].addr, data, at))
            elif kind == _PP_REQ:
                src, dst, addr, data = p
                if self._blocked(src, dst):
                    self._push(at + LAT_S, _PP_FAIL, src, addr)
                    continue
                reply, effs = self.cores[dst].handle_push_pull(self.cores[src].addr, data, at)
                self.apply(dst, effs)
                if reply is None:
                    self._push(at + LAT_S, _PP_FAIL, src, addr)
                else:
                    self._push(at + LAT_S, _PP_REP, src, addr, reply)
            elif kind == _PP_REP:
                src, addr, reply = p
                if src in self.crashed:
                    continue
                self.apply(src, self.cores[src].handle_push_pull_reply(addr, reply, at))
            elif kind == _PP_FAIL:
                src, addr = p
                if src in self.crashed:
                    continue
                self.apply(src, self.cores[src].push_pull_failed(addr, at))
            if stop is not None and stop():
                return True
        self.now = max(self.now, t_end)
        return stop() if stop is not None else True

    def run_until_true(self, cond, limit_s: float) -> float:
        """Run until ``cond()``; returns the virtual time it took."""
        start = self.now
        ok = self.run_until(start + limit_s, cond)
        assert ok, f"condition not met within {limit_s}s (seed={self.seed})"
        return self.now - start

    # -- faults and views -----------------------------------------------------------
    def crash(self, name: str) -> None:
        self.crashed.add(name)

    def state_of(self, viewer: str, name: str):
        m = self.cores[viewer].member(name)
        return None if m is None else m.state

    def live(self) -> list[str]:
        return sorted(n for n in self.cores if n not in self.crashed)

    def all_see(self, name: str, state: MemberState, viewers=None) -> bool:
        viewers = viewers if viewers is not None else [v for v in self.live() if v != name]
        return all(self.state_of(v, name) is state for v in viewers)

    def converged_alive(self, names) -> bool:
        return all(self.all_see(n, MemberState.ALIVE, [v for v in names if v != n]) for n in names)

    def no_internal_errors(self) -> None:
        for name, core in self.cores.items():
            rej = core.statistics().rejected
            assert "internal_error" not in rej, (name, rej, self.seed)
            assert "malformed" not in rej, (name, rej, self.seed)


def kinds(cluster: Cluster, viewer: str, about: str) -> list[EventKind]:
    return [e.kind for e in cluster.events[viewer] if e.member.name == about]


def make_cluster(n: int, seed: int = 0, config: Config | None = None, **kw) -> Cluster:
    c = Cluster(config, seed=seed, **kw)
    c.add("n0")
    for i in range(1, n):
        c.add(f"n{i}", seeds=["n0"])
    return c


# -- scenarios ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_join_through_one_seed(seed):
    c = make_cluster(5, seed)
    names = list(c.cores)
    took = c.run_until_true(lambda: c.converged_alive(names), 5.0)
    assert took < 2.0, f"join took {took}s seed={seed}"
    for name in names:
        alive = [m.name for m in c.cores[name].alive_members()]
        assert alive == sorted(names)
    # stays converged under steady state, no false suspicion
    c.run_until(c.now + 10.0)
    assert c.converged_alive(names)
    for name in names:
        for other in names:
            if other != name:
                assert kinds(c, name, other) == [EventKind.JOIN], (name, other, seed)
    c.no_internal_errors()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_crash_detected_by_all_and_nobody_else(seed):
    c = make_cluster(6, seed)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.run_until(c.now + 2.0)
    c.crash("n3")
    took = c.run_until_true(lambda: c.all_see("n3", MemberState.DEAD), 30.0)
    cfg = c.config
    # bounded by one probe round plus the max suspicion timeout, with slack
    assert took < 6 * cfg.probe_interval_s + cfg.suspicion_max_s(6) + 1.0, (took, seed)
    c.run_until(c.now + 5.0)
    for v in c.live():
        for other in c.live():
            if other != v:
                assert c.state_of(v, other) is MemberState.ALIVE, (v, other, seed)
        assert EventKind.DEAD in kinds(c, v, "n3")
        assert EventKind.LEFT not in kinds(c, v, "n3")
    c.no_internal_errors()


def test_graceful_leave_is_left_not_dead():
    c = make_cluster(5, 7)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.apply("n2", c.cores["n2"].leave(c.now))
    assert c.cores["n2"].member("n2").state is MemberState.LEFT
    c.run_until_true(lambda: c.all_see("n2", MemberState.LEFT), 2.0)
    c.crash("n2")  # the process exits after leaving
    c.run_until(c.now + 20.0)
    for v in c.live():
        assert c.state_of(v, "n2") is MemberState.LEFT
        assert kinds(c, v, "n2") == [EventKind.JOIN, EventKind.LEFT], (v, kinds(c, v, "n2"))
    c.no_internal_errors()


def test_refutes_false_suspicion():
    c = make_cluster(5, 3)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    inc0 = c.cores["n4"].incarnation
    # n4 cannot receive for a while: others suspect it
    c.drop_in.add("n4")
    c.run_until_true(lambda: any(c.state_of(v, "n4") is MemberState.SUSPECT
                                 for v in names if v != "n4"), 10.0)
    c.drop_in.discard("n4")
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    assert c.cores["n4"].incarnation > inc0
    assert c.cores["n4"].statistics().refutes >= 1
    for v in names:
        if v != "n4":
            ks = kinds(c, v, "n4")
            assert EventKind.DEAD not in ks, (v, ks)
    c.no_internal_errors()


def test_restarted_node_rejoins_with_higher_incarnation():
    c = make_cluster(5, 11)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.crash("n2")
    c.run_until_true(lambda: c.all_see("n2", MemberState.DEAD), 30.0)
    dead_inc = c.cores["n0"].member("n2").incarnation
    port = c.addr("n2")[1]
    c.add("n2", seeds=["n0"], port=port)  # same name, same address, incarnation 0
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    assert c.cores["n2"].incarnation > dead_inc
    for v in names:
        if v != "n2":
            assert kinds(c, v, "n2")[-1] == EventKind.JOIN
    c.no_internal_errors()


def test_restart_on_new_address_reclaims_dead_member():
    c = make_cluster(4, 12)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.crash("n3")
    c.run_until_true(lambda: c.all_see("n3", MemberState.DEAD), 30.0)
    new = c.add("n3", seeds=["n1"], port=9999)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    for v in names:
        assert c.cores[v].member("n3").addr == new.addr


def test_join_retries_while_seed_down():
    c = Cluster(seed=5)
    c.add("seed")
    c.crash("seed")
    j = c.add("joiner", seeds=["seed"])
    c.run_until(3.0)
    failed = j.statistics().rejected.get("push_pull_failed", 0)
    assert failed >= 4, failed  # retried with backoff, not once
    assert failed < 30          # ... but backed off
    c.crashed.discard("seed")
    c._schedule_tick("seed")
    c.run_until_true(lambda: c.converged_alive(["seed", "joiner"]), c.config.join_retry_max_s + 2)


def test_alone_member_retries_seeds():
    c = make_cluster(2, 6)
    c.run_until_true(lambda: c.converged_alive(["n0", "n1"]), 3.0)
    c.crash("n0")
    c.run_until_true(lambda: c.state_of("n1", "n0") is MemberState.DEAD, 30.0)
    before = c.packets
    c.crashed.discard("n0")  # n0 comes back (it never saw itself dead)
    c.cores["n0"] = c.cores["n0"]
    c._schedule_tick("n0")
    c.run_until_true(lambda: c.state_of("n1", "n0") is MemberState.ALIVE, 10.0)
    assert c.packets > before


def test_packets_never_exceed_budget_with_many_broadcasts():
    cfg = Config.local()
    c = make_cluster(6, 9, config=cfg)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    for i in range(200):
        c.cores["n1"].queue_user_broadcast(f"k{i}", i.to_bytes(2, "big") + bytes(50 + i % 150))
    c.apply("n1", c.cores["n1"].update_local(c.now, meta=b"x" * cfg.meta_max_bytes,
                                             tags={"role": "worker" * 10}))
    c.run_until(c.now + 5.0)
    assert 0 < c.max_packet <= cfg.payload_budget_bytes
    # every broadcast reached someone (user broadcasts are not re-gossiped
    # by receivers; each is sent retransmit_limit times by n1)
    got = {u.data for v in names if v != "n1" for u in c.user[v]}
    assert len(got) == 200
    assert c.cores["n1"].statistics().packets_out < 200
    assert c.cores["n3"].member("n1").meta == b"x" * cfg.meta_max_bytes
    with pytest.raises(ValueError):
        c.cores["n1"].update_local(c.now, meta=b"x" * (cfg.meta_max_bytes + 1))
    with pytest.raises(ValueError):
        c.cores["n1"].queue_user_broadcast("big", b"x" * 2000)


def test_awareness_rises_when_outbound_dropped_and_interval_scales():
    c = make_cluster(5, 4)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    core = c.cores["n1"]
    assert core.awareness == 0
    c.drop_out.add("n1")
    c.run_until(c.now + 3.0)
    assert core.awareness >= 2
    assert core.probe_interval_now_s() == pytest.approx(
        c.config.probe_interval_s * (core.awareness + 1))
    # fewer probes per second while unhealthy
    p0, t0 = core.statistics().probes_sent, c.now
    c.run_until(c.now + 4.0)
    rate = (core.statistics().probes_sent - p0) / (c.now - t0)
    assert rate < 0.6 / c.config.probe_interval_s
    c.drop_out.discard("n1")
    c.run_until(c.now + 30.0)
    assert core.awareness == 0
    assert c.converged_alive(names)


def test_user_messages_direct_and_broadcast():
    c = make_cluster(3, 2)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.apply("n0", c.cores["n0"].send_user(c.addr("n2"), b"hello"))
    c.cores["n1"].queue_user_broadcast("v", b"one")
    c.cores["n1"].queue_user_broadcast("v", b"two")  # supersedes "one"
    c._schedule_tick("n1")
    c.run_until(c.now + 1.0)
    assert [u.data for u in c.user["n2"] if u.sender == "n0"] == [b"hello"]
    datas = {u.data for u in c.user["n2"] if u.sender == "n1"}
    assert datas == {b"two"}


def test_reap_removes_dead_after_interval():
    cfg = Config.local().replace(reap_interval_s=5.0)
    c = make_cluster(4, 8, config=cfg)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    c.crash("n3")
    c.run_until_true(lambda: c.all_see("n3", MemberState.DEAD), 30.0)
    c.run_until_true(lambda: all(c.cores[v].member("n3") is None for v in c.live()), 10.0)
    for v in c.live():
        assert kinds(c, v, "n3")[-1] == EventKind.REAPED


def test_handle_packet_counts_malformed_and_stale():
    core = Swim(Config.local(), "a", ("h", 1), rng=random.Random(0), now=0.0)
    assert core.handle_packet(("h", 2), b"\xc1garbage", 0.0) == []
    alive = wire.encode_compound([wire.Alive(5, "b", "h", 2, {}, b"")])
    effs = core.handle_packet(("h", 2), alive, 0.0)
    assert [e.kind for e in effs if isinstance(e, MemberEvent)] == [EventKind.JOIN]
    core.handle_packet(("h", 2), wire.encode_compound([wire.Suspect(4, "b", "c")]), 0.0)
    st = core.statistics()
    assert st.rejected == {"malformed": 1, "stale_incarnation": 1}
    assert core.member("b").state is MemberState.ALIVE
    # a ping for someone else (address reuse) is dropped
    core.handle_packet(("h", 2), wire.encode_compound([wire.Ping(1, "zz", "b")]), 0.0)
    assert core.statistics().rejected["wrong_target"] == 1


def test_suspected_member_told_directly_refutes_and_raises_awareness():
    core = Swim(Config.local(), "a", ("h", 1), rng=random.Random(0), now=0.0)
    effs = core.handle_packet(("h", 2), wire.encode_compound([wire.Suspect(0, "a", "b")]), 0.0)
    assert core.incarnation == 1
    assert core.awareness == 1
    # the refutation is queued and rides on the next datagram
    effs = core.handle_packet(("h", 2), wire.encode_compound([wire.Ping(9, "a", "b")]), 0.0)
    (pkt,) = [e for e in effs if isinstance(e, SendPacket)]
    msgs = wire.decode_compound(pkt.data)
    assert msgs[0] == wire.Ack(9)
    assert any(isinstance(m, wire.Alive) and m.node == "a" and m.incarnation == 1 for m in msgs)


def _alives_sent(effs, to=None):
    out = []
    for e in effs:
        if isinstance(e, SendPacket) and (to is None or e.addr == to):
            out += [m for m in wire.decode_compound(e.data) if isinstance(m, wire.Alive)]
    return out


def test_stale_accusation_about_us_is_answered_to_its_sender():
    # Beyond memberlist: a member that missed our refutation would declare us
    # dead when its suspicion runs out, and nobody else corrects it (they
    # drop its stale news). We answer it with our current alive, directly,
    # at most once per probe interval per address.
    cfg = Config.local()
    core = Swim(cfg, "a", ("h", 1), rng=random.Random(0), now=0.0, incarnation=3)
    p, q = ("h", 2), ("h", 3)
    effs = core.handle_packet(p, wire.encode_compound([wire.Suspect(1, "a", "b")]), 0.0)
    assert [(m.node, m.incarnation) for m in _alives_sent(effs, p)] == [("a", 3)]
    assert core.incarnation == 3  # no refutation needed: we are already newer
    assert core.statistics().stale_corrections == 1
    # rate-limited per address; another address gets its own answer
    effs = core.handle_packet(p, wire.encode_compound([wire.Dead(2, "a", "b")]), 0.5 * cfg.probe_interval_s)
    assert _alives_sent(effs, p) == []
    effs = core.handle_packet(q, wire.encode_compound([wire.Dead(2, "a", "c")]), 0.5 * cfg.probe_interval_s)
    assert [(m.node, m.incarnation) for m in _alives_sent(effs, q)] == [("a", 3)]
    effs = core.handle_packet(p, wire.encode_compound([wire.Suspect(0, "a", "b")]), 1.5 * cfg.probe_interval_s)
    assert [(m.node, m.incarnation) for m in _alives_sent(effs, p)] == [("a", 3)]
    assert core.statistics().stale_corrections == 3
    # a current accusation is refuted as before (broadcast, higher incarnation), not answered
    t = 3.0 * cfg.probe_interval_s
    core.handle_packet(("h", 4), wire.encode_compound([wire.Suspect(3, "a", "d")]), t)
    assert core.incarnation == 4
    assert core.statistics().stale_corrections == 3
    # stale news about someone else is not ours to answer
    core.handle_packet(("h", 5), wire.encode_compound([wire.Suspect(0, "zz", "d")]), t)
    assert core.statistics().stale_corrections == 3


def test_a_member_behind_on_our_incarnation_is_corrected_before_it_declares_us_dead():
    # b holds a at incarnation 0 and suspects it; a is at 1 (it refuted an
    # accusation b never heard of). b's suspicion reaches a (the buddy
    # message), a answers, and b takes a back as alive: no DEAD.
    cfg = Config.local()
    a = Swim(cfg, "a", ("h", 1), rng=random.Random(1), now=0.0)
    b = Swim(cfg, "b", ("h", 2), rng=random.Random(2), now=0.0)
    b.handle_packet(a.addr, wire.encode_compound([wire.Alive(0, "a", "h", 1, {}, b"")]), 0.0)
    a.handle_packet(b.addr, wire.encode_compound([wire.Alive(0, "b", "h", 2, {}, b"")]), 0.0)
    a.handle_packet(("h", 3), wire.encode_compound([wire.Suspect(0, "a", "c")]), 0.0)
    assert a.incarnation == 1
    b.handle_packet(("h", 3), wire.encode_compound([wire.Suspect(0, "a", "c")]), 0.1)
    assert b.member("a").state is MemberState.SUSPECT and b.member("a").incarnation == 0
    # b's suspicion, as gossip or as the buddy message on its next ping, reaches a
    answer = a.handle_packet(b.addr, wire.encode_compound([wire.Suspect(0, "a", "b")]), 0.2)
    (pkt,) = [e for e in answer if isinstance(e, SendPacket) and e.addr == b.addr]
    effs = b.handle_packet(a.addr, pkt.data, 0.3)
    assert b.member("a").state is MemberState.ALIVE and b.member("a").incarnation == 1
    assert [e.kind for e in effs if isinstance(e, MemberEvent)] == [EventKind.UPDATE]
    # and b's suspicion timer, when it comes, declares nothing
    effs = b.tick(100.0)
    assert not [e for e in effs if isinstance(e, MemberEvent) and e.kind is EventKind.DEAD]
    assert b.member("a").state is MemberState.ALIVE


def test_deterministic_given_seed():
    def trace(seed):
        c = make_cluster(5, seed)
        c.run_until(5.0)
        c.crash("n2")
        c.run_until(20.0)
        return [(v, [(e.kind.value, e.member.name, e.member.state_change) for e in c.events[v]])
                for v in sorted(c.events)], c.packets
    assert trace(21) == trace(21)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_false_death_under_loss(seed):
    c = make_cluster(10, seed, loss=0.05)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 10.0)
    c.run_until(c.now + 60.0)
    for v in names:
        deaths = [e for e in c.events[v] if e.kind in (EventKind.DEAD, EventKind.LEFT)]
        assert deaths == [], (v, deaths[:3], seed)
    assert c.converged_alive(names)


def test_partition_heals_through_push_pull():
    c = make_cluster(6, 13)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    side_a, side_b = {"n0", "n1", "n2"}, {"n3", "n4", "n5"}
    orig = c._blocked
    c._blocked = lambda s, d: orig(s, d) or ((s in side_a) != (d in side_a))
    c.run_until_true(lambda: all(c.state_of(a, b) is MemberState.DEAD
                                 for a in side_a for b in side_b), 60.0)
    c._blocked = orig
    # dead members are not probed; seeds/push-pull and gossip-to-the-dead heal it
    c.run_until_true(lambda: c.converged_alive(names), 60.0)
    c.no_internal_errors()


def test_indirect_probes_prevent_suspicion_over_a_broken_link():
    c = make_cluster(5, 14)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    orig = c._blocked
    c._blocked = lambda s, d: orig(s, d) or {s, d} == {"n1", "n2"}
    c.run_until(c.now + 30.0)
    st = c.cores["n1"].statistics()
    assert st.indirect_probes > 0
    for v in names:
        assert c.state_of(v, "n2") is MemberState.ALIVE and c.state_of(v, "n1") is MemberState.ALIVE
        assert EventKind.DEAD not in kinds(c, v, "n2") + kinds(c, v, "n1")
    # Lifeguard: the helpers' NACKs tell n1 that it is not the one at fault
    assert c.cores["n1"].awareness <= 1


def test_nack_when_target_silent():
    core = Swim(Config.local(), "a", ("h", 1), rng=random.Random(0), now=0.0)
    core.handle_packet(("h", 3), wire.encode_compound([wire.Alive(0, "t", "h", 3, {}, b"")]), 0.0)
    req = wire.encode_compound([wire.IndirectPing(77, "t", "h", 3, True, "b")])
    effs = core.handle_packet(("h", 2), req, 0.0)
    (ping,) = [e for e in effs if isinstance(e, SendPacket)]
    assert ping.addr == ("h", 3) and isinstance(wire.decode_compound(ping.data)[0], wire.Ping)
    effs = core.tick(core.config.probe_timeout_s + 0.001)
    nacks = [e for e in effs if isinstance(e, SendPacket) and e.addr == ("h", 2)]
    assert len(nacks) == 1 and wire.decode_compound(nacks[0].data)[0] == wire.Nack(77)


def test_push_pull_with_one_bad_row_is_rejected_whole():
    core = Swim(Config.local(), "a", ("h", 1), rng=random.Random(0), now=0.0)
    good = wire.MemberRecord("b", "h", 2, 0, {}, b"", wire.WireState.ALIVE).fields()
    bad = ["c", "h", 70000, 0, {}, b"", 0]
    import msgpack
    body = msgpack.packb([8, 1, False, "b", [good, bad]], use_bin_type=True)
    reply, effs = core.handle_push_pull(("h", 2), body, 0.0)
    assert reply is None and effs == []
    assert core.member("b") is None
    assert core.statistics().rejected == {"malformed": 1}
    ok = wire.encode_push_pull([wire.MemberRecord(*good[:6], wire.WireState.ALIVE)], False, "b")
    reply, effs = core.handle_push_pull(("h", 2), ok, 0.0)
    assert [e.kind for e in effs] == [EventKind.JOIN]
    names = [r.name for r in wire.decode_push_pull(reply).members]
    assert sorted(names) == ["a", "b"]


def test_reconnect_reaches_dead_members():
    cfg = Config.local().replace(gossip_to_the_dead_s=0.5, push_pull_interval_s=0)
    c = make_cluster(4, 15, config=cfg)
    names = list(c.cores)
    c.run_until_true(lambda: c.converged_alive(names), 5.0)
    side_a = {"n0", "n1"}
    orig = c._blocked
    c._blocked = lambda s, d: orig(s, d) or ((s in side_a) != (d in side_a))
    c.run_until_true(lambda: c.state_of("n0", "n3") is MemberState.DEAD
                     and c.state_of("n3", "n0") is MemberState.DEAD, 60.0)
    c.run_until(c.now + 3.0)
    c._blocked = orig
    c.run_until_true(lambda: c.converged_alive(names), 4 * cfg.reconnect_interval_s + 2)
    assert sum(c.cores[n].statistics().reconnects for n in names) > 0


@pytest.mark.parametrize("seed", [101, 102, 103, 104])
def test_swarm_faults_then_heal_converges(seed):
    """VOPR-style: random faults for a while, then heal; must converge."""
    rnd = random.Random(seed)
    c = make_cluster(6, seed, loss=rnd.choice([0.0, 0.02, 0.1]))
    names = list(c.cores)
    c.run_until(3.0)
    restarted = 0
    for _ in range(8):
        victim = rnd.choice(names[1:])
        action = rnd.choice(["crash_restart", "deaf", "mute", "leave_rejoin"])
        if action == "crash_restart":
            c.crash(victim)
            c.run_until(c.now + rnd.uniform(0.5, 8.0))
            c.add(victim, seeds=["n0"], port=c.addr(victim)[1])
            restarted += 1
        elif action == "deaf":
            c.drop_in.add(victim)
            c.run_until(c.now + rnd.uniform(0.2, 3.0))
            c.drop_in.discard(victim)
        elif action == "mute":
            c.drop_out.add(victim)
            c.run_until(c.now + rnd.uniform(0.2, 3.0))
            c.drop_out.discard(victim)
        else:
            c.apply(victim, c.cores[victim].leave(c.now))
            c.run_until(c.now + 1.0)
            c.crash(victim)
            c.add(victim, seeds=["n0"], port=c.addr(victim)[1])
        c.run_until(c.now + rnd.uniform(0.0, 2.0))
    c.loss = 0.0
    c.run_until_true(lambda: c.converged_alive(names), 60.0)
    c.no_internal_errors()


# -- gossip round budget (gossip_fresh_burst) -----------------------------------------

def _lone_core(cfg: Config, peers: int = 30) -> Swim:
    """A core that knows ``peers`` members and never probes or push-pulls, so
    every datagram it sends is a gossip round's."""
    core = Swim(cfg, "me", ("10.0.0.1", 7000), rng=random.Random(5), now=0.0)
    alive = [wire.Alive(0, f"p{i}", "10.0.0.2", 8000 + i, {}, b"") for i in range(peers)]
    core.handle_packet(("10.0.0.2", 8000), wire.encode_compound(alive), 0.0)
    assert core.num_alive() == peers + 1
    core._queue.reset()  # the joins' own re-broadcasts: start with an empty queue
    return core


def _gossip_rounds(core: Swim, news_at: list[float], t_end: float) -> list[float]:
    """Feed a user broadcast at each time in ``news_at``; return the time of
    every gossip round (a tick that sent datagrams)."""
    rounds, pending, now = [], sorted(news_at), 0.0
    while True:
        due = core.next_deadline()
        nxt = min(due, pending[0] if pending else math.inf)
        if nxt > t_end:
            return rounds
        now = max(now, nxt)
        while pending and pending[0] <= now:
            core.queue_user_broadcast(f"n{len(pending)}-{pending.pop(0)!r}", b"x" * 40)
        if core.next_deadline() <= now:
            sent = [e for e in core.tick(now) if isinstance(e, SendPacket)]
            if sent:
                rounds.append(now)


def _quiet(cfg: Config) -> Config:
    return cfg.replace(probe_interval_s=1e6, push_pull_interval_s=0, reconnect_interval_s=0)


def test_lone_news_gossips_at_network_speed():
    cfg = _quiet(Config.local())
    rounds = _gossip_rounds(_lone_core(cfg), [1.0], 2.0)
    # the first round at once, the next after gossip_fresh_interval_s, not gossip_interval_s
    assert rounds[0] == 1.0
    assert rounds[1] == pytest.approx(1.0 + cfg.gossip_fresh_interval_s)


def test_steady_news_gossips_at_the_memberlist_rate():
    """A stream of news (heavy loss: suspicions and refutations all the time)
    must not make a member send a round every gossip_fresh_interval_s: that
    was 150 datagrams/s per member at N=1000 under 20 % loss."""
    cfg = _quiet(Config.local())
    news = [1.0 + i * 0.002 for i in range(5000)]  # 500 pieces of news per second for 10 s
    rounds = _gossip_rounds(_lone_core(cfg), news, 11.0)
    bound = cfg.gossip_fresh_burst + 10.0 / cfg.gossip_interval_s + 1
    assert len(rounds) <= bound
    assert len(rounds) >= 10.0 / cfg.gossip_interval_s - 1  # and it does keep gossiping
    off = _gossip_rounds(_lone_core(cfg.replace(gossip_fresh_burst=10**6)), news, 11.0)
    assert len(off) > 3 * bound  # without the budget it would (the test can fail)


@settings(deadline=None)
@given(st.lists(st.floats(0.0, 3.0, allow_nan=False), max_size=60),
       st.integers(1, 6), st.sampled_from([0.05, 0.2]))
def test_rounds_in_any_window_stay_within_the_budget(news, burst, interval):
    cfg = _quiet(Config.local()).replace(gossip_fresh_burst=burst, gossip_interval_s=interval,
                                         gossip_fresh_interval_s=interval / 10)
    rounds = _gossip_rounds(_lone_core(cfg), news, 4.0)
    for i, t0 in enumerate(rounds):
        for j in range(i, len(rounds)):
            # rounds in [t0, rounds[j]]: at most the burst plus one per interval elapsed
            assert j - i + 1 <= burst + (rounds[j] - t0) / interval + 1e-6, (rounds, burst)


def test_settle_forgets_membership_news_only():
    """Swim.settle (simulators' "settled" start): queued membership news is
    dropped, user broadcasts stay, and with nothing left no gossip round runs."""
    cfg = _quiet(Config.local())
    core = Swim(cfg, "me", ("10.0.0.1", 7000), rng=random.Random(5), now=0.0)
    alive = [wire.Alive(0, f"p{i}", "10.0.0.2", 8000 + i, {}, b"") for i in range(12)]
    core.handle_packet(("10.0.0.2", 8000), wire.encode_compound(alive), 0.0)
    news = [k for k, _ in core._queue.pending() if k.startswith("m:")]
    assert len(news) == 12
    assert core.settle() == 12 and core.settle() == 0
    assert not core._queue and _gossip_rounds(core, [], 5.0) == []
    core.queue_user_broadcast("app", b"payload")
    core.handle_packet(("10.0.0.2", 8000), wire.encode_compound(
        [wire.Alive(1, "p3", "10.0.0.2", 8003, {}, b"")]), 1.0)
    assert core.settle() == 1
    assert [k for k, _ in core._queue.pending()] == ["u:app"]
    assert core.member("p3").incarnation == 1  # the view itself is untouched


# -- Member snapshots -------------------------------------------------------------

def test_member_snapshots_are_immutable_values():
    import dataclasses

    from gossip.fastnew import _new_member
    from gossip.members import Member

    fields = ("n1", ("10.0.0.1", 7946), MemberState.ALIVE, 3, {"role": "db"}, b"m", 12.5)
    built, fast = Member(*fields), _new_member(*fields)
    assert built == fast and not (built != fast)
    assert repr(built) == ("Member(name='n1', addr=('10.0.0.1', 7946), state=<MemberState.ALIVE: "
                           "'alive'>, incarnation=3, tags={'role': 'db'}, meta=b'm', state_change=12.5)")
    assert built != Member(*fields[:3], 4, *fields[4:])
    assert built != fields  # not equal to a plain tuple of the same fields
    for m in (built, fast):
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.incarnation = 9
        with pytest.raises(dataclasses.FrozenInstanceError):
            del m.name
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.other = 1
        assert m.incarnation == 3 and m.name == "n1"
    with pytest.raises(TypeError):  # as the frozen dataclass: the tags mapping is unhashable
        hash(built)
    assert hash(Member(*fields[:4], (), *fields[5:])) == hash(Member(*fields[:4], (), *fields[5:]))


def test_member_events_carry_snapshots_of_the_view():
    a = Swim(Config.local(), "a", ("10.0.0.1", 1), rng=random.Random(1), now=0.0)
    b = Swim(Config.local(), "b", ("10.0.0.2", 1), rng=random.Random(2), now=0.0,
             tags={"zone": "z1"})
    req = next(e for e in a.join([("10.0.0.2", 1)], 0.0) if isinstance(e, StartPushPull))
    reply, _ = b.handle_push_pull(("10.0.0.1", 1), req.data, 0.0)
    events = [e for e in a.handle_push_pull_reply(("10.0.0.2", 1), reply, 0.0)
              if isinstance(e, MemberEvent)]
    m = next(e.member for e in events if e.member.name == "b")
    assert m.state is MemberState.ALIVE and dict(m.tags) == {"zone": "z1"}
    assert a.member("b") == m


def test_statistics_count_datagrams_and_bytes_both_ways():
    a = Swim(Config.local(), "a", ("10.0.0.1", 1), rng=random.Random(1), now=0.0)
    b = Swim(Config.local(), "b", ("10.0.0.2", 1), rng=random.Random(2), now=0.0)
    req = next(e for e in a.join([("10.0.0.2", 1)], 0.0) if isinstance(e, StartPushPull))
    reply, _ = b.handle_push_pull(("10.0.0.1", 1), req.data, 0.0)
    a.handle_push_pull_reply(("10.0.0.2", 1), reply, 0.0)
    sa, sb = a.statistics(), b.statistics()
    assert (sb.bytes_in, sb.bytes_out, sa.bytes_in) == (len(req.data), len(reply), len(reply))
    assert sa.packets_in == sa.packets_out == sb.packets_in == sb.packets_out == 0
    out_a: list = []
    while a.statistics().probes_sent == 0:  # gossip rounds, then the first probe
        out_a += [e for e in a.tick(a.next_deadline()) if isinstance(e, SendPacket)]
    out_b = [e for p in out_a for e in b.handle_packet(("10.0.0.1", 1), p.data, 0.1)
             if isinstance(e, SendPacket)]
    assert out_b  # at least the ack
    for p in out_b:
        a.handle_packet(("10.0.0.2", 1), p.data, 0.1)
    sa2, sb2 = a.statistics(), b.statistics()
    sent_a, sent_b = sum(len(p.data) for p in out_a), sum(len(p.data) for p in out_b)
    assert (sa2.packets_out, sb2.packets_in) == (len(out_a), len(out_a))
    assert (sb2.packets_out, sa2.packets_in) == (len(out_b), len(out_b))
    assert (sa2.bytes_out - sa.bytes_out, sb2.bytes_in - sb.bytes_in) == (sent_a, sent_a)
    assert (sb2.bytes_out - sb.bytes_out, sa2.bytes_in - sa.bytes_in) == (sent_b, sent_b)
