"""The real-process chaos run's fault schedule: a pure function of the seed, and its simulator twin (a core).

``plan`` draws the faults of a seed (one at a time, each followed by
``SETTLE_S``; with ``net`` also the network faults of ``NET_KINDS``);
``net_windows`` and ``detection_targets`` say what each fault lets the
checks expect; ``sim_schedule`` maps a schedule onto the simulator's fault
kinds (``sim/scenarios.py``). ``sim/chaos.py`` describes the faults and
runs them (``sim/chaos_harness_shell.py``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ChaosFault", "KINDS", "NET_KINDS", "SETTLE_S", "NET_GRACE_S", "EARLY_TOLERANCE_S", "START_S",
           "END_SETTLE_S", "plan", "net_windows", "detection_targets", "sim_schedule"]

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
