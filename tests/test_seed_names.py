"""Seeds given as DNS names (gossip/udp.py "Seed names", node/cli/settings.py).

Real UDP/TCP on 127.0.0.1 with Config.local(). Names resolve either through
the real resolver (``localhost``) or through an injected resolver function,
so a test can make one name stand for several members, or for nothing at
first. Waits are conditions under trio.fail_after deadlines.
"""
from __future__ import annotations

import os
import random
from contextlib import asynccontextmanager

import pytest
import trio

from gossip.config import Config
from gossip.seal import Keyring
from gossip.udp import GossipNode, resolve_seed
from node.cli.config import build_config
from node.cli.settings import ConfigError
from node.cli.demo import free_ports

KEY = bytes(range(32))
DEADLINE_S = 30


async def wait_for(cond, what: str, timeout_s: float = DEADLINE_S) -> None:
    try:
        with trio.fail_after(timeout_s):
            while not cond():
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}") from None


def alive(node: GossipNode) -> set[str]:
    return {m.name for m in node.alive_members()}


@asynccontextmanager
async def nodes():
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"rng seed={seed}")
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        started: list[GossipNode] = []

        async def start(name: str, **kw) -> GossipNode:
            n = GossipNode(Config.local(), name, bind=("127.0.0.1", 0), keyring=Keyring([KEY]),
                           rng=random.Random(rng.random()), **kw)
            await nursery.start(n.run)
            started.append(n)
            return n

        yield start
        nursery.cancel_scope.cancel()


class FakeDns:
    """A resolver whose answer the test sets; it records every lookup."""

    def __init__(self) -> None:
        self.answer: list[tuple[str, int]] | None = None  # None: NXDOMAIN
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int):
        await trio.lowlevel.checkpoint()
        self.lookups.append((host, port))
        if self.answer is None:
            raise OSError(f"{host}: name or service not known")
        return list(self.answer)


async def test_name_with_several_addresses_joins_them_all():
    """n1 and n2 run alone, unaware of each other; a joiner whose seed name
    resolves to both (and to a dead address) push-pulls with each, so all
    three end up in one cluster. Had it contacted one address only, the
    other member would stay alone."""
    dns = FakeDns()
    (dead_port,) = free_ports(1)
    async with nodes() as start:
        n1 = await start("n1")
        n2 = await start("n2")
        dns.answer = [("127.0.0.1", dead_port), n1.bound_addr, n2.bound_addr]
        n3 = await start("n3", seeds=[("peers.cluster.test", 7946)], resolver=dns)
        want = {"n1", "n2", "n3"}
        await wait_for(lambda: all(alive(n) == want for n in (n1, n2, n3)), "3 alive everywhere")
        assert dns.lookups[0] == ("peers.cluster.test", 7946)


async def test_name_is_resolved_again_at_every_join_attempt():
    """The name does not resolve at first (no pod is ready), then resolves
    to a member that started later: the joiner finds it without a restart."""
    dns = FakeDns()
    async with nodes() as start:
        joiner = await start("joiner", seeds=[("peers.cluster.test", 7946)], resolver=dns)
        await wait_for(lambda: len(dns.lookups) >= 3, "three failed join attempts")
        assert alive(joiner) == {"joiner"}
        late = await start("late")
        dns.answer = [late.bound_addr]
        await wait_for(lambda: alive(joiner) == {"joiner", "late"} and alive(late) == {"joiner", "late"},
                       "joiner and late see each other")
        assert len(dns.lookups) >= 4


async def test_own_address_in_the_answer_is_skipped():
    """A headless Service lists the pod itself: a name that resolves only to
    ourselves is a failed attempt (retried), not a push-pull with ourselves."""
    dns = FakeDns()
    async with nodes() as start:
        me = await start("me", seeds=[("peers.cluster.test", 7946)], resolver=dns)
        dns.answer = [me.bound_addr]
        await wait_for(lambda: len(dns.lookups) >= 4, "four join attempts")
        st = me.statistics()
        assert st.push_pull_ok == 0
        assert st.core.rejected.get("push_pull_failed", 0) >= 3
        other = await start("other")
        dns.answer = [me.bound_addr, other.bound_addr]
        await wait_for(lambda: alive(me) == {"me", "other"}, "me joins other")


async def test_localhost_through_the_real_resolver():
    """No injected resolver: ``localhost`` goes through getaddrinfo (it may
    also give ::1, where nothing listens; 127.0.0.1 answers)."""
    async with nodes() as start:
        first = await start("first")
        port = first.bound_addr[1]
        assert ("127.0.0.1", port) in await resolve_seed("localhost", port)
        second = await start("second", seeds=[("localhost", port)])
        await wait_for(lambda: alive(first) == alive(second) == {"first", "second"}, "both alive")


def test_config_accepts_names_and_rejects_garbage():
    cfg = build_config(flags={"insecure": True, "name": "a",
                              "seeds": "peerd.prod.svc.cluster.local:7946,10.0.0.7:7946,[::1]:7946"},
                       environ={})
    assert cfg.seeds == (("peerd.prod.svc.cluster.local", 7946), ("10.0.0.7", 7946), ("::1", 7946))
    for bad, reason in (("under score:1", "neither an IP address nor a DNS name"),
                        ("-peer.example:7946", "neither an IP address nor a DNS name"),
                        ("a..b:7946", "neither an IP address nor a DNS name"),
                        ("peer.example:0", "port 0"),
                        ("peer.example", "expected HOST:PORT")):
        with pytest.raises(ConfigError) as ei:
            build_config(flags={"insecure": True, "name": "a", "seeds": bad}, environ={})
        assert "--seeds" in str(ei.value) and reason in str(ei.value), str(ei.value)
    with pytest.raises(ConfigError) as ei:
        build_config(flags={"insecure": True, "name": "a"}, environ={"PEERD_SEEDS": "bad host:1"})
    assert "PEERD_SEEDS" in str(ei.value)
