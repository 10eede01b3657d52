"""Ownership benchmark: ring-160-vnodes vs plain HRW vs HRW with a load cap.

For each N (members) and T (tasks): keys moved on one join and one leave,
relative to the ideal (T/N' keys), max/mean owned load, and the wall and CPU
time for ``Ring.set_members`` to recompute after one change (median of a few
joins and leaves; also join + ``tasks_of(joiner)``, the time until the joiner
knows its own tasks). Writes bench/results/ownership.json.

    .venv/bin/python bench/ring_bench.py                 # N 3,10,100,1000 x T 1e3,1e5
    .venv/bin/python bench/ring_bench.py --big           # adds T=1e6 for N 3,10
    .venv/bin/python bench/ring_bench.py --quick         # small sizes, seconds
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from node.ownership.ring import Ring  # noqa: E402


def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


class VnodeRing:
    """Classic consistent hashing: 160 points per member (ketama's default)."""

    def __init__(self, members: list[str], vnodes: int = 160) -> None:
        pts = sorted((_h64(f"{m}#{i}"), m) for m in members for i in range(vnodes))
        self.keys = [p for p, _ in pts]
        self.owner_at = [m for _, m in pts]

    def owner(self, kh: int) -> str:
        i = bisect.bisect_right(self.keys, kh)
        return self.owner_at[i % len(self.keys)]


def members(n: int, extra: int = 0) -> dict[str, dict[str, str]]:
    return {f"node-{i:04d}": {} for i in range(n + extra)}


def load_ratio(owners: list[str], n: int) -> float:
    counts: dict[str, int] = {}
    for o in owners:
        counts[o] = counts.get(o, 0) + 1
    return max(counts.values()) / (len(owners) / n)


def bench_vnodes(n: int, tids: list[str]) -> dict:
    khs = [_h64(t) for t in tids]
    base = list(members(n))
    r0 = VnodeRing(base)
    own0 = [r0.owner(k) for k in khs]
    t0 = time.perf_counter()
    rj = VnodeRing(base + ["node-join"])
    own_j = [rj.owner(k) for k in khs]
    t_join = time.perf_counter() - t0
    rl = VnodeRing(base[1:])
    own_l = [rl.owner(k) for k in khs]
    t = len(tids)
    return {
        "max_mean_load": round(load_ratio(own0, n), 3),
        "join_moved_vs_ideal": round(sum(a != b for a, b in zip(own0, own_j)) / (t / (n + 1)), 3),
        "leave_moved_vs_ideal": round(sum(a != b for a, b in zip(own0, own_l)) / (t / n), 3),
        "recompute_ms_full_rebuild": round(t_join * 1000, 1),
    }


def bench_hrw(n: int, tids: list[str], repeats: int) -> dict:
    t = len(tids)
    r = Ring()
    t0, c0 = time.perf_counter(), time.process_time()
    r.set_tasks({tid: None for tid in tids})
    r.set_members(members(n))
    build_s = time.perf_counter() - t0
    build_cpu_s = time.process_time() - c0
    # warm the per-group arrays once (first join after a bulk load)
    r.set_members(members(n, 1))
    r.set_members(members(n))
    cap0 = [r.owner(x) for x in tids]
    plain0 = [r.first_choice(x) for x in tids]
    join_ms, leave_ms, cpu_ms, leave_cpu_ms, known_ms, changed_n = [], [], [], [], [], []
    joiner = f"node-{n:04d}"
    cap_j = plain_j = None
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        changed = r.set_members(members(n, 1))
        join_ms.append((time.perf_counter() - t0) * 1000)
        cpu_ms.append((time.process_time() - c0) * 1000)
        # "the node knows what to fire": the joiner's own task list as well
        r.tasks_of(joiner)
        known_ms.append((time.perf_counter() - t0) * 1000)
        changed_n.append(len(changed))
        if i == 0:
            cap_j = [r.owner(x) for x in tids]
            plain_j = [r.first_choice(x) for x in tids]
        t0, c0 = time.perf_counter(), time.process_time()
        r.set_members(members(n))
        leave_ms.append((time.perf_counter() - t0) * 1000)
        leave_cpu_ms.append((time.process_time() - c0) * 1000)
    # leaves: three different leavers, each against the full view
    leave_ratio, leave_vs_owned, plain_leave = [], [], []
    if n > 1:
        for leaver in sorted(members(n))[:3]:
            view = {k: v for k, v in members(n).items() if k != leaver}
            owned = sum(1 for o in cap0 if o == leaver)
            t0, c0 = time.perf_counter(), time.process_time()
            r.set_members(view)
            leave_ms.append((time.perf_counter() - t0) * 1000)
            leave_cpu_ms.append((time.process_time() - c0) * 1000)
            cap_l = [r.owner(x) for x in tids]
            plain_l = [r.first_choice(x) for x in tids]
            mv = sum(x != y for x, y in zip(cap0, cap_l))
            leave_ratio.append(mv / (t / n))
            leave_vs_owned.append(mv / max(1, owned))
            plain_leave.append(sum(x != y for x, y in zip(plain0, plain_l)) / (t / n))
            r.set_members(members(n))
    st = r.statistics()

    def moved(a, b, ideal):
        return round(sum(x != y for x, y in zip(a, b)) / ideal, 3) if b else None

    return {
        "build_s": round(build_s, 2),
        "build_cpu_s": round(build_cpu_s, 2),
        "recompute_join_plus_tasks_of_ms_median": round(statistics.median(known_ms), 1),
        "recompute_leave_cpu_ms_median": round(statistics.median(leave_cpu_ms), 1),
        "join_changed_lists": int(statistics.median(changed_n)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "recompute_join_ms_median": round(statistics.median(join_ms), 1),
        "recompute_leave_ms_median": round(statistics.median(leave_ms), 1),
        "recompute_ms_max": round(max(join_ms + leave_ms), 1),
        "recompute_join_cpu_ms_median": round(statistics.median(cpu_ms), 1),
        "plain_hrw": {
            "max_mean_load": round(load_ratio(plain0, n), 3),
            "join_moved_vs_ideal": moved(plain0, plain_j, t / (n + 1)),
            "leave_moved_vs_ideal_mean3": round(statistics.mean(plain_leave), 3) if plain_leave else None,
        },
        "hrw_cap_1.25": {
            "max_mean_load": round(load_ratio(cap0, n), 3),
            "join_moved_vs_ideal": moved(cap0, cap_j, t / (n + 1)),
            "leave_moved_vs_ideal_mean3": round(statistics.mean(leave_ratio), 3) if leave_ratio else None,
            "leave_moved_vs_leaver_owned_mean3": round(statistics.mean(leave_vs_owned), 3) if leave_vs_owned else None,
            "cap": st.cap,
            "displaced": st.displaced,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--only-big", action="store_true", help="just the 1e6 rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ownership.json"))
    a = ap.parse_args()
    if a.quick:
        grid = [(3, 1000), (10, 1000), (100, 10000)]
    else:
        grid = [(n, t) for n in (3, 10, 100, 1000) for t in (1000, 100000)]
        if a.big:
            grid += [(3, 1000000), (10, 1000000)]
        if a.only_big:
            grid = [(3, 1000000), (10, 1000000)]
            if a.out == ap.get_default("out"):
                a.out = a.out.replace("ownership.json", "ownership-1e6.json")
    rows = []
    load_start = os.getloadavg()
    for n, t in grid:
        tids = [f"task-{i:07d}" for i in range(t)]
        row = {"N": n, "tasks": t, "ring_160_vnodes": bench_vnodes(n, tids)}
        row.update(bench_hrw(n, tids, a.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    out = {
        "command": "python bench/ring_bench.py" + (" --big" if a.big else "") + (" --quick" if a.quick else "")
        + (" --only-big" if a.only_big else ""),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": load_start,
        "load_avg_at_end": os.getloadavg(),
        "results": rows,
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
