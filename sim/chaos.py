"""Chaos on real processes: kill, stall, wipe, skew and restart real ``peerd``
nodes (and etcd) from a seeded fault schedule, and check that nothing is lost.

The simulator proves the cores; this runs the real processes, sockets, child
processes, SQLite files and etcd together, and puts the simulator's verdict
on the same schedule beside theirs.

Faults (one at a time, each followed by a settle period, so at most one node
is down at once, below ``replicas - 1 = 2``):

- ``kill``: SIGKILL a node, restart it on the same data dir after ``down_s``;
- ``stall``: SIGSTOP a node for ``down_s`` (beyond the suspicion timeout, so
  its peers declare it dead), then SIGCONT;
- ``wipe``: SIGKILL a node, delete its data dir, restart it empty (it must
  refill from its peers);
- ``skew``: restart a node with its clock ``offset_s`` off (beyond
  ``max_skew_s``, through the ``PEERD_CLOCK_OFFSET_S`` test hook), then
  restart it again with a true clock;
- ``restart_all``: SIGTERM every node, start them all again;
- ``etcd``: SIGKILL etcd for ``down_s`` and restart it (with ``--etcd``).

With ``--net netns`` (``sim/netns.py``) every node runs in its own network
namespace behind a veth pair to a bridge (etcd listens on the bridge
address), and the schedule gains network faults, made of nftables rules on
each namespace's input and healed after ``down_s`` by flushing the table:

- ``partition``: two halves cannot talk (both ways);
- ``isolate``: one node cut from every peer (both ways);
- ``oneway``: ``peer`` drops everything ``node`` sends (``node`` still
  hears ``peer``);
- ``loss``: ``loss_pct`` (5-30) % of the packets on one node's input, or
  on every node's (``node`` is ``-``).

etcd and the harness stay reachable from every namespace through a
partition; loss drops their packets too. No slow links: the kernel this was
built on has no netem. ``--net auto`` (default) uses namespaces where this
process may create one and otherwise falls back to loopback, drops the
network faults from the schedule and says so in the plan and the report
(``network: loopback``); ``--net loopback`` gives the schedule of earlier
releases for a seed.

The tasks write a ledger themselves (``$PEERD_TASK_ID $PEERD_SLOT
$PEERD_RUN_ID $PEERD_FENCING_TOKEN $PEERD_NODE $(date +%s.%N)`` per run), every one
``@every 1s`` with ``misfire: run_all`` and a 60 s catch-up window, so every
slot from the first to the end must be in it. They use ``overlap: allow``, so
the invariant holds whatever a real run's duration on a loaded machine (a
run started on its own time that overruns its period makes ``forbid`` skip
the next slot, by design). Invariants:

- every task defined on every node at the end (no definition lost);
- every slot of every task in the ledger (none missed);
- a slot twice only where a run of it was ``lost`` (its node died mid-run:
  ``on_owner_loss: rerun``); without etcd also a slot whose time is in a
  network fault's window (from its start to ``NET_GRACE_S`` after its
  heal: both sides of a partition own the task); with etcd never in a
  network window, every fire carries a token, tokens are unique and, per
  task, grow with the slot (but for re-claimed slots, which run later with
  a greater token by design: ``reclaimed_slots``);
- every slot in the ledger: a slot missing inside a network fault's window
  is counted apart (``missed_in_net_window``; a minority-side owner may
  miss it) and is not a failure; one outside is;
- no run starts more than ``EARLY_TOLERANCE_S`` before its slot's time
  (the ledger line carries the machine's true time; a node with a skewed
  clock must not fire early);
- membership converges after the last fault (every node lists all alive);
- no node exits but those the harness killed, no traceback in any log;
- RSS of every node sampled; growth from the first to the last sample
  reported.

Measured while it runs (the harness polls every node's ``/v1/members``
about twice a second): *detection*, from a kill, wipe, stall, isolation or
partition until every observer (the other nodes; for a partition, the
larger half) lists the target(s) ``dead``; *convergence*, from each heal
until every node lists every node ``alive`` (not measured past the next
fault's start).

A failure prints the seed and the command that replays the schedule.

Where it lives: the schedule and its simulator twin in
``sim/chaos_plan.py``, the harness that runs it against real processes in
``sim/chaos_harness_shell.py``, the failure checks in
``sim/chaos_verdict.py``; this module is the command line.

Usage::

    python -m sim.chaos [--nodes 5] [--duration 120] [--seed 1] [--tasks 4]
        [--etcd] [--net auto|netns|loopback] [--json FILE] [--no-sim]
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from sim.chaos_harness_shell import ROOT, Harness
from sim.chaos_plan import (END_SETTLE_S, NET_GRACE_S, NET_KINDS, SETTLE_S, START_S, ChaosFault, plan,
                            sim_schedule)
from sim.chaos_verdict import failures

__all__ = ["simulate_same", "choose_net", "print_plan", "main"]


def simulate_same(faults: list[ChaosFault], args) -> dict:
    """The same schedule in the simulator (``sim.app``, see
    :func:`sim_schedule`). Same task set (run_all, 60 s window)."""
    from sim.app import AppOptions
    from sim.app_run import simulate_app

    sched, outages, not_mapped = sim_schedule(faults, args.nodes)
    duration = START_S + args.duration + 10
    tasks = [{"id": f"chaos-{i}", "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "60s",
              "overlap": "allow", "command": {"type": "exec", "argv": ["true"]}} for i in range(args.tasks)]
    t = time.monotonic()
    rep, _ = simulate_app(nodes=args.nodes, duration_s=duration, seed=args.seed, tasks=tasks,
                          fencing=args.etcd, etcd_outages=outages, schedule=sched,
                          profile="local", catchup_margin_s=END_SETTLE_S,
                          # the fencer's mark one local etcd round trip after the claim (p50 5 ms)
                          app_options=AppOptions(mark_latency_s=0.005 if args.etcd else 0.0))
    out = {k: rep.get(k) for k in ("slots_due", "slots_fired", "duplicate_fires", "missed_slots",
                                   "missed_by_reason", "detection_latency_s", "convergence_s",
                                   "violations", "trace_hash")}
    out["not_mapped"] = not_mapped
    out["wall_s"] = round(time.monotonic() - t, 1)
    return out


def choose_net(requested: str) -> tuple[str, str]:
    """``(mode, why)``: ``netns`` or ``loopback`` for ``--net``."""
    if requested == "loopback":
        return "loopback", "asked for"
    from sim.netns import netns_available

    ok, why = netns_available()
    if ok:
        return "netns", "network namespaces available"
    if requested == "netns":
        raise SystemExit(f"sim.chaos: --net netns: cannot create a network namespace: {why}")
    return "loopback", f"network namespaces not permitted here ({why})"


def print_plan(faults: list[ChaosFault], args, net: str, why: str, dropped: list[ChaosFault]) -> None:
    print(f"nodes={args.nodes} duration_s={args.duration:g} tasks={args.tasks} (@every 1s, run_all, "
          f"catchup 60s, overlap allow) etcd={args.etcd}")
    if net == "netns":
        print(f"network=netns ({why}): one namespace per node, veth to a bridge, faults as nftables "
              f"rules on input (no netem here: no slow links)")
    else:
        print(f"network=loopback ({why}): no partitions or loss")
    if dropped:
        print(f"network faults dropped from the schedule: {len(dropped)} "
              f"({', '.join(sorted({f.kind for f in dropped}))})")
    print(f"settle_s={SETTLE_S} start_s={START_S} end_settle_s={END_SETTLE_S} net_grace_s={NET_GRACE_S} "
          f"profile=local")
    print(f"schedule: {len(faults)} fault(s) {dict(Counter(f.kind for f in faults))}")
    for f in faults:
        print(f"  {f.at_s:7.2f}s {f.kind:12s} down {f.down_s:5.2f}s  {f.describe()}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of faults and firing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--etcd", action="store_true", help="fencing with a real etcd (and etcd faults)")
    ap.add_argument("--net", choices=("auto", "netns", "loopback"), default="auto",
                    help="netns: a network namespace per node and network faults; loopback: no network "
                         "faults (the schedule of earlier releases); auto: netns where permitted")
    ap.add_argument("--json", default="")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator's side")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = ap.parse_args(argv)
    if args.nodes < 3:
        ap.error("--nodes must be at least 3")
    net, why = choose_net(args.net)
    dropped: list[ChaosFault] = []
    if args.net == "loopback":
        faults = plan(args.seed, args.nodes, args.duration, args.etcd)
    else:
        faults = plan(args.seed, args.nodes, args.duration, args.etcd, net=True)
        if net == "loopback":
            dropped = [f for f in faults if f.kind in NET_KINDS]
            faults = [f for f in faults if f.kind not in NET_KINDS]
    replay = (f"python -m sim.chaos --nodes {args.nodes} --duration {args.duration:g} --seed {args.seed} "
              f"--tasks {args.tasks}{' --etcd' if args.etcd else ''} --net {args.net}")
    print(f"SEED={args.seed}\nreplay: {replay}")
    print_plan(faults, args, net, why, dropped)
    tmp = Path(tempfile.mkdtemp(prefix="peerd-chaos-"))
    h = Harness(args, tmp, net)
    t_wall = time.monotonic()
    started = datetime.now().astimezone().isoformat(timespec="seconds")

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGHUP)}
    left: list[str] = []
    try:
        h.setup()
        verdicts = h.run(faults)
    except BaseException:
        print(f"sim.chaos: run stopped; data dirs and logs kept in {tmp}\nreplay: {replay}", flush=True)
        raise
    finally:
        try:
            left = h.close()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if left:
            print(f"could not remove: {' '.join(left)}", file=sys.stderr)
    report = {"seed": args.seed, "replay": replay, "nodes": args.nodes, "duration_s": args.duration,
              "tasks": args.tasks, "etcd": args.etcd, "network": net, "network_why": why,
              "network_faults_dropped": [asdict(f) for f in dropped],
              "started": started, "commit": _git_commit(),
              "faults": [asdict(f) for f in faults], "real": verdicts,
              "wall_s": round(time.monotonic() - t_wall, 1)}
    if not args.no_sim:
        report["sim"] = simulate_same(faults, args)
    bad = failures(verdicts)
    report["failures"] = bad
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=1, default=str))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept: {tmp}")
    if bad:
        print("FAILED:\n  " + "\n  ".join(bad) + f"\nreplay: {replay}")
        return 1
    print("invariants: ok")
    return 0


def _git_commit() -> str:
    try:
        import subprocess

        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, ValueError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
