"""How the simulated cluster forms at t=0: staggered joins, or a warm or settled start (a core).

``ClusterOptions.bootstrap`` picks one: "join" boots every node and has it
call ``core.join(seeds)`` at a random time in ``[0, join_stagger_s]`` (the
real thing); "warm" completes every node's join push-pull with ``n000`` at
t=0 without latency (``warm_bootstrap``); "settled" is warm, then every core
forgets its queued membership news (``Swim.settle``). The functions take the
:class:`sim.cluster.Cluster` they act on; they run once per run, before the
event loop (``sim/cluster.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gossip.effects import StartPushPull
from sim.loop import child_rng
from sim.streams import STREAM_FRAME_HEADER_BYTES, STREAM_FRAME_MAX_BYTES, STREAM_PUSH_PULL

if TYPE_CHECKING:
    from sim.cluster import Cluster

__all__ = ["boot_cluster", "warm_bootstrap"]


def boot_cluster(cluster: Cluster) -> None:
    """Form the cluster at t=0 as ``options.bootstrap`` says.

    Raises:
        ValueError: an unknown bootstrap.
    """
    opts = cluster.options
    boot_rng = child_rng(cluster.seed, "boot")
    if opts.bootstrap in ("warm", "settled"):
        settle = opts.bootstrap == "settled"
        dropped = warm_bootstrap(cluster, settle)
        if settle:
            cluster.trace.append((0.0, "settled", dropped))
    elif opts.bootstrap == "join":
        for booting in cluster.nodes:
            join_at_s = 0.0 if booting.idx == 0 else boot_rng.uniform(0.0, opts.join_stagger_s)
            cluster._boot(booting, 0.0, join_at_s)
    else:
        raise ValueError(f"unknown bootstrap {opts.bootstrap!r}; join, warm or settled")


def warm_bootstrap(cluster: Cluster, settle: bool = False) -> int:
    """Start with every node already joined (``bootstrap="warm"``).

    Each node's real join push-pull (``core.join([seed])``, sealed and
    opened) is served by the seed ``n000`` in index order, then every node
    merges the seed's full-state reply (``handle_push_pull_reply``), all
    at virtual time 0 and without latency. Only the bootstrap is fast
    forwarded: the gossip the seed then spreads, and everything after,
    runs normally. It skips the O(N^2 log N) storm of N nodes joining at
    once (measured separately with ``bootstrap="join"``).

    With ``settle`` (``bootstrap="settled"``) each core forgets its queued
    membership news (``Swim.settle``) as soon as it has merged the reply,
    not after all of them: the same news is dropped (nothing reads a queue
    during the bootstrap), but the ~10^6 dropped broadcasts never live at
    once, so their memory is reused instead of left as holes among the
    cores' state. Since ``Swim.start_settle`` that news is not even built
    (settle() counts it all the same). Returns how many items were dropped.
    """
    dropped = 0
    seed = cluster.nodes[0]
    cluster._boot(seed, 0.0, None)
    if settle:
        seed.core.start_settle()
    seed_now = seed.local(0.0)
    requests = []
    for node in cluster.nodes[1:]:
        cluster._boot(node, 0.0, None)
        if settle:
            # the news settle() drops is not even built (same state, same count)
            node.core.start_settle()
        effects = node.core.join([seed.addr], node.local(0.0))
        for e in effects:
            if type(e) is StartPushPull:
                sealed = node.sealer.seal(STREAM_PUSH_PULL + e.data)
                cluster.net.count_stream(node.idx, len(sealed) + STREAM_FRAME_HEADER_BYTES)
                _sender, body = seed.sealer.open(sealed, max_bytes=STREAM_FRAME_MAX_BYTES)
                reply, seed_effects = seed.core.handle_push_pull(node.addr, body[1:], seed_now)
                cluster._effects(seed, seed_effects, 0.0)
                requests.append((node, body[1:]))
            else:
                cluster._effects(node, [e], 0.0)
    if requests:
        # The seed's state no longer changes: one more (duplicate) request
        # yields the full reply every joiner gets.
        last, body = requests[-1]
        reply, seed_effects = seed.core.handle_push_pull(last.addr, body, seed_now)
        cluster._effects(seed, seed_effects, 0.0)
        for node, _body in requests:
            sealed = seed.sealer.seal(STREAM_PUSH_PULL + reply)
            cluster.net.count_stream(seed.idx, len(sealed) + STREAM_FRAME_HEADER_BYTES)
            _sender, rbody = node.sealer.open(sealed, max_bytes=STREAM_FRAME_MAX_BYTES)
            cluster.stats["pp_ok"] += 1
            cluster._effects(node, node.core.handle_push_pull_reply(seed.addr, rbody[1:],
                                                                    node.local(0.0)), 0.0)
            if settle:
                dropped += node.core.settle()
            cluster._arm(node, 0.0)
    if settle:
        dropped += seed.core.settle()
    cluster._arm(seed, 0.0)
    return dropped
