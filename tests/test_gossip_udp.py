"""Shell tests for gossip.udp.GossipNode.

Real UDP/TCP on 127.0.0.1 (and [::1] when available) with Config.local() and
real keyrings; plus the same shell on a MemoryNetwork under MockClock.
Conditions are polled under generous trio.fail_after deadlines; no fixed
sleeps.
"""
from __future__ import annotations

import os
import random
import socket
from contextlib import asynccontextmanager

import pytest
import trio

from gossip.config import Config
from gossip.effects import EventKind, MemberEvent, UserMessage
from gossip.seal import Keyring, KeyringError
from gossip.transport import MemoryNetwork
from gossip.udp import GossipNode, RequestError

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
KBAD = bytes(range(50, 82))
DEADLINE_S = 30


def state_of(member) -> str:
    s = member.state
    return getattr(s, "value", s) if not isinstance(s, str) else s


def view(node: GossipNode) -> dict[str, str]:
    return {m.name: str(state_of(m)).lower() for m in node.members()}


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def wait_for(cond, what: str, timeout_s: float = DEADLINE_S):
    try:
        with trio.fail_after(timeout_s):
            while not cond():
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}") from None


class Cluster:
    def __init__(self, nursery, config, seed):
        self.nursery = nursery
        self.config = config
        self.rng = random.Random(seed)
        self.seed = seed
        self.nodes: list[GossipNode] = []
        self.events: dict[str, list] = {}

    async def start(self, name, *, host="127.0.0.1", seeds=(), keyring=None, transport=None, **kw):
        node = GossipNode(
            self.config,
            name,
            bind=(host, 0),
            seeds=seeds,
            keyring=keyring if keyring is not None else Keyring([K1]),
            transport=transport,
            rng=random.Random(self.rng.random()),
            **kw,
        )
        await self.nursery.start(node.run)
        recv = node.subscribe(max_buffer=10_000)
        self.events[name] = []
        self.nursery.start_soon(self._collect, recv, self.events[name])
        self.nodes.append(node)
        return node

    @staticmethod
    async def _collect(recv, out):
        async for ev in recv:
            out.append(ev)

    def kinds(self, name, kind):
        return [e.member.name for e in self.events[name] if isinstance(e, MemberEvent) and e.kind == kind]


@asynccontextmanager
async def cluster(config=None, seed=None):
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"cluster seed={seed}")
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, config or Config.local(), seed)
        yield c
        nursery.cancel_scope.cancel()


def all_alive(nodes, names):
    want = {n: "alive" for n in names}
    return all({k: v for k, v in view(n).items() if k in want} == want for n in nodes)


# -- real sockets --------------------------------------------------------------


async def test_five_join_crash_and_leave():
    async with cluster() as c:
        seed = await c.start("n0")
        for i in range(1, 5):
            await c.start(f"n{i}", seeds=[seed.bound_addr])
        names = [f"n{i}" for i in range(5)]
        await wait_for(lambda: all_alive(c.nodes, names), "all 5 see 5 alive")
        for n in c.nodes:
            assert sorted(view(n)) == names

        # n4 crashes (cancelled, no leave): everyone else marks it dead
        crashed = c.nodes[4]
        crashed.stop()
        rest = c.nodes[:4]
        await wait_for(lambda: all(view(n).get("n4") == "dead" for n in rest), "n4 dead at all")

        # n3 leaves gracefully: seen as left, not dead
        await c.nodes[3].leave(timeout_s=5)
        rest = c.nodes[:3]
        await wait_for(lambda: all(view(n).get("n3") == "left" for n in rest), "n3 left at all")
        for n in rest:
            assert "n3" not in c.kinds(n.name, EventKind.DEAD)
            assert "n3" in c.kinds(n.name, EventKind.LEFT)
            assert "n4" in c.kinds(n.name, EventKind.DEAD)
            st = n.statistics()
            assert st.internal_errors == 0 and st.oversized_sends == 0
            assert st.transport.udp_max_datagram_bytes <= c.config.packet_budget_bytes


async def test_wrong_key_never_admitted():
    async with cluster() as c:
        a = await c.start("a")
        b = await c.start("b", seeds=[a.bound_addr])
        await wait_for(lambda: all_alive([a, b], ["a", "b"]), "a and b alive")
        intruder = await c.start("intruder", seeds=[a.bound_addr], keyring=Keyring([KBAD]))
        # the intruder also probes b directly, so b rejects it too
        intruder.send_user(b.bound_addr, b"hello?")
        await wait_for(
            lambda: a.statistics().rejected["wrong_key"] >= 3 and b.statistics().rejected["wrong_key"] >= 1,
            "wrong_key rejections at a and b",
        )
        for n in (a, b):
            assert "intruder" not in view(n)
            assert "intruder" not in c.kinds(n.name, EventKind.JOIN)
        assert set(view(intruder)) == {"intruder"}


async def test_key_rotation_without_suspicion():
    async with cluster() as c:
        first = await c.start("r0")
        for i in range(1, 4):
            await c.start(f"r{i}", seeds=[first.bound_addr])
        names = [f"r{i}" for i in range(4)]
        await wait_for(lambda: all_alive(c.nodes, names), "4 alive")

        async def traffic_round():
            # every member receives a fresh batch of datagrams (several probe rounds)
            base = [n.statistics().transport.udp_packets_received for n in c.nodes]
            await wait_for(
                lambda: all(
                    n.statistics().transport.udp_packets_received >= b + 20 for n, b in zip(c.nodes, base)
                ),
                "traffic",
            )

        for step in ("install", "use", "remove"):
            for n in c.nodes:
                if step == "install":
                    n.install_key(K2)
                elif step == "use":
                    n.use_key(K2)
                else:
                    n.remove_key(K1)
                await trio.sleep(0)  # steps are not atomic across the cluster
            await traffic_round()
        for n in c.nodes:
            assert n.keyring.keys() == [K2]
            st = n.statistics()
            assert st.rejected["wrong_key"] == 0, (n.name, st.rejected)
            assert st.core.suspicions_raised == 0, (n.name, st.core)
            assert c.kinds(n.name, EventKind.SUSPECT) == [], (n.name, c.events[n.name])
            assert c.kinds(n.name, EventKind.DEAD) == []
        assert all_alive(c.nodes, names)
        with pytest.raises(KeyringError):
            c.nodes[0].remove_key(K2)  # cannot remove the primary


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback on this machine")
async def test_ipv6_smoke():
    async with cluster() as c:
        a = await c.start("v6a", host="::1")
        b = await c.start("v6b", host="::1", seeds=[a.bound_addr])
        assert a.bound_addr[0] == "::1"
        await wait_for(lambda: all_alive([a, b], ["v6a", "v6b"]), "v6 pair alive")


async def test_garbage_datagrams_counted_not_fatal():
    async with cluster() as c:
        a = await c.start("g0")
        b = await c.start("g1", seeds=[a.bound_addr])
        await wait_for(lambda: all_alive([a, b], ["g0", "g1"]), "pair alive")
        rng = random.Random(c.seed)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            for i in range(200):
                junk = bytes([rng.choice([0, 1, 2, 255])]) + rng.randbytes(rng.randrange(0, 300))
                await sock.sendto(junk, a.bound_addr)
            # garbage on the TCP port too
            stream = await trio.open_tcp_stream(*a.bound_addr)
            await stream.send_all(b"\x00\x00\x00\x05hello")
            await stream.aclose()
        await wait_for(lambda: sum(a.statistics().rejected.values()) >= 150, "junk counted")
        assert a.statistics().internal_errors == 0
        # still healthy: a user request round trip works
        a.set_stream_handler(lambda sender, data: _echo(sender, data))
        with trio.fail_after(DEADLINE_S):
            assert await b.request(a.bound_addr, b"ping") == b"g1:ping"
        assert all_alive([a, b], ["g0", "g1"])


async def _echo(sender, data):
    await trio.sleep(0)
    return sender.encode() + b":" + data


def test_no_key_refuses_to_start():
    with pytest.raises(KeyringError, match="refusing to start"):
        GossipNode(Config.local(), "x", bind=("127.0.0.1", 0), keyring=None)


# -- memory network + MockClock ---------------------------------------------------------


async def test_memory_network_shell(autojump_clock):
    net = MemoryNetwork()
    async with cluster(seed=7) as c:
        nodes = []
        for i in range(4):
            t = net.transport()
            seeds = [nodes[0].bound_addr] if nodes else []
            nodes.append(await c.start(f"m{i}", transport=t, seeds=seeds, epoch=1))
        names = [f"m{i}" for i in range(4)]
        with trio.fail_after(60):
            while not all_alive(nodes, names):
                await trio.sleep(0.05)

        # user messages and streams
        got = []
        nodes[1].set_stream_handler(_echo)
        assert await nodes[0].request(nodes[1].bound_addr, b"x") == b"m0:x"

        async def boom(sender, data):
            raise RuntimeError("handler exploded")

        nodes[2].set_stream_handler(boom)
        with pytest.raises(RequestError, match="handler exploded"):
            await nodes[0].request(nodes[2].bound_addr, b"x")
        with pytest.raises(RequestError):
            await nodes[0].request(("10.0.0.99", 1), b"x", timeout_s=1)
        nodes[0].send_user(nodes[3].bound_addr, b"direct")
        with trio.fail_after(10):
            while not got:
                got = [e for e in c.events["m3"] if isinstance(e, UserMessage)]
                await trio.sleep(0.01)
        assert got[0].sender == "m0" and got[0].data == b"direct"

        # cut m3 off completely (packets and streams): the rest declare it dead
        victim = nodes[3].bound_addr
        net.route_packet = lambda src, dst, data: None if victim in (src, dst) else net.deliver(src, dst, data)
        net.route_stream = lambda src, dst: victim not in (src, dst)
        with trio.fail_after(120):
            while not all(view(n).get("m3") == "dead" for n in nodes[:3]):
                await trio.sleep(0.05)
        for n in nodes[:3]:
            kinds = [e.kind for e in c.events[n.name] if isinstance(e, MemberEvent) and e.member.name == "m3"]
            assert kinds.index(EventKind.SUSPECT) < kinds.index(EventKind.DEAD)


async def test_slow_subscriber_never_blocks(autojump_clock):
    net = MemoryNetwork()
    async with cluster(seed=3) as c:
        a = await c.start("s0", transport=net.transport(), epoch=1)
        slow = a.subscribe(max_buffer=1)  # never read
        b = await c.start("s1", transport=net.transport(), seeds=[a.bound_addr], epoch=1)
        for i in range(5):
            a.send_user(b.bound_addr, b"m%d" % i)
            b.send_user(a.bound_addr, b"m%d" % i)
        with trio.fail_after(30):
            while not (all_alive([a, b], ["s0", "s1"]) and a.statistics().events_dropped > 0):
                await trio.sleep(0.05)
        assert slow.statistics().current_buffer_used == 1
