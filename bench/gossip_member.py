"""Run one membership member in this process and print JSON lines.

Used by ``bench/gossip_bench.py`` (one process per member). Output, one JSON
object per line on stdout, flushed:

    {"t": <unix time>, "ev": "ready", "name": ..., "addr": "host:port"}
    {"t": ..., "ev": "join"|"suspect"|"dead"|"left"|"update"|"reaped", "member": NAME,
     "state": "alive"|"suspect"|"dead"|"left"}   (state after the event)
    {"t": ..., "ev": "stats", "udp_out": B, "udp_in": B, "tcp_out": B, "tcp_in": B,
     "max_datagram": B, "members": {...}, "suspicions_raised": n, ...}   (every --stats-s)

Usage:
    python bench/gossip_member.py NAME BIND [--seeds H:P,...] [--key-file F]
        [--config lan|local] [--stats-s 1.0] [--insecure] [--impl peerd|kinship]

``--impl kinship`` runs the same member on the PyPI package ``kinship``
(asyncio, Rust core) with its LAN preset, for comparison; its stats lines
carry kinship's own counters (it exposes no byte counters).

SIGTERM or SIGINT: leave gracefully and exit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio  # noqa: E402

from gossip.config import Config  # noqa: E402
from gossip.effects import MemberEvent  # noqa: E402
from gossip.seal_shell import read_keyring  # noqa: E402
from gossip.addr import format_addr, parse_addr  # noqa: E402
from gossip.udp import GossipNode  # noqa: E402


def emit(obj: dict) -> None:
    obj = {"t": time.time(), **obj}
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    config = Config.lan() if args.config == "lan" else Config.local()
    keyring = None if args.insecure else read_keyring(args.key_file)
    seeds = [parse_addr(s) for s in args.seeds.split(",") if s] if args.seeds else []
    node = GossipNode(
        config,
        args.name,
        bind=parse_addr(args.bind),
        seeds=seeds,
        keyring=keyring,
        insecure=args.insecure,
    )
    async with trio.open_nursery() as nursery:
        events = node.subscribe(max_buffer=100_000)
        emit({"ev": "starting", "name": args.name})
        await nursery.start(node.run)
        emit({"ev": "ready", "name": args.name, "addr": format_addr(node.bound_addr), "pid": os.getpid()})

        async def pump_events():
            async for ev in events:
                if isinstance(ev, MemberEvent):
                    emit({"ev": ev.kind.value, "member": ev.member.name, "inc": ev.member.incarnation,
                          "state": ev.member.state.value})

        async def pump_stats():
            while True:
                await trio.sleep(args.stats_s)
                st = node.statistics()
                core = st.core
                emit(
                    {
                        "ev": "stats",
                        "udp_out": st.transport.udp_bytes_sent,
                        "udp_in": st.transport.udp_bytes_received,
                        "udp_pkts_out": st.transport.udp_packets_sent,
                        "tcp_out": st.transport.tcp_bytes_sent,
                        "tcp_in": st.transport.tcp_bytes_received,
                        "max_datagram": st.transport.udp_max_datagram_bytes,
                        "oversized_sends": st.oversized_sends,
                        "members": core.members_by_state,
                        "suspicions_raised": core.suspicions_raised,
                        "deaths_declared": core.deaths_declared,
                        "awareness": core.awareness,
                        "rejected": st.rejected,
                    }
                )

        async def on_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    await node.leave(timeout_s=2.0)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(pump_events)
        nursery.start_soon(pump_stats)
        nursery.start_soon(on_signals)


async def main_kinship(args: argparse.Namespace) -> None:
    import asyncio

    import kinship

    keys = []
    if not args.insecure:
        with open(args.key_file, encoding="utf-8") as fh:
            keys = [ln.split("#", 1)[0].strip() for ln in fh if ln.split("#", 1)[0].strip()]
    preset = kinship.Config.lan if args.config == "lan" else kinship.Config.local
    fields = dict(name=args.name, bind=args.bind, seeds=[s for s in args.seeds.split(",") if s])
    if args.insecure:
        fields["insecure_plaintext"] = True
    else:
        fields["keys"] = keys
    cluster = kinship.Cluster(preset(**fields))
    kinds = {
        "MemberJoined": "join",
        "MemberRecovered": "join",
        "MemberSuspect": "suspect",
        "MemberDead": "dead",
        "MemberLeft": "left",
        "MemberUpdated": "update",
    }
    emit({"ev": "starting", "name": args.name})
    await cluster.start()
    events = cluster.events()
    emit({"ev": "ready", "name": args.name, "addr": cluster.local.addr, "pid": os.getpid()})
    # members learned during start() came before we could subscribe
    for m in cluster.members():
        if m.name != args.name:
            emit({"ev": "join", "member": m.name, "inc": m.incarnation, "snapshot": True})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def pump_events():
        async for ev in events:
            kind = kinds.get(type(ev).__name__)
            if kind is not None:
                emit({"ev": kind, "member": ev.member.name, "inc": ev.member.incarnation,
                      "state": ev.member.state.name.lower()})

    async def pump_stats():
        while True:
            await asyncio.sleep(args.stats_s)
            st = cluster.stats()
            emit({"ev": "stats", "suspicions_raised": st.suspicions, "kinship": dataclasses.asdict(st)})

    tasks = [asyncio.create_task(pump_events()), asyncio.create_task(pump_stats())]
    await stop.wait()
    try:
        await cluster.leave(2.0)
    finally:
        for t in tasks:
            t.cancel()
        await cluster.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("bind")
    p.add_argument("--seeds", default="")
    p.add_argument("--key-file")
    p.add_argument("--config", choices=("lan", "local"), default="lan")
    p.add_argument("--stats-s", type=float, default=1.0)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--impl", choices=("peerd", "kinship"), default="peerd")
    a = p.parse_args()
    if not a.insecure and not a.key_file:
        p.error("--key-file is required (or --insecure)")
    if a.impl == "kinship":
        import asyncio

        asyncio.run(main_kinship(a))
    else:
        trio.run(main, a)
