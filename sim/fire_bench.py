"""Fenced vs unfenced fires over many seeds (issue 7's simulator table).

Runs ``sim.app.simulate_app`` for every (scenario, seed) twice, with and
without the etcd fencing model, on the same fault schedule, and prints per
scenario x mode: runs, slots due, duplicate fires (total, of which reclaims
of a claimer wrongly declared dead, max per run), missed slots, owner-loss
reruns and invariant violations. Writes ``bench/results/fencing.json``.

Usage::

    python -m sim.fire_bench                         # 125 seeds x 4 scenarios x 2
    python -m sim.fire_bench --seeds 10 --jobs 2
    python -m sim.fire_bench --replay partition 3 --mode fenced   # one run, full report

Modes: ``fenced`` (etcd model, tasks ``on_owner_loss: rerun``, the default),
``fenced_skip`` (etcd model, ``on_owner_loss: skip``: no reclaims) and
``unfenced`` (ownership alone).

Every violated invariant is printed with its replay command.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

from sim.app import default_tasks, simulate_app

SCENARIOS = ("crash", "partition", "churn", "flaky")
# mode -> (fencing, on_owner_loss of every task)
MODES = {"fenced": (True, "rerun"), "fenced_skip": (True, "skip"), "unfenced": (False, "rerun")}
KEYS = ("slots_due", "slots_fired", "duplicate_fires", "reclaim_duplicates", "duplicate_fires_warmup",
        "missed_slots", "owner_loss_reruns", "fires")


def _one(args: tuple) -> dict:
    scenario, seed, mode, nodes, duration_s, tasks = args
    fencing, on_loss = MODES[mode]
    rep, _ = simulate_app(nodes=nodes, duration_s=duration_s, seed=seed, scenario=scenario,
                          tasks=default_tasks(tasks, on_owner_loss=on_loss), fencing=fencing)
    out = {k: rep[k] for k in KEYS}
    out.update(scenario=scenario, seed=seed, mode=mode, violations=rep["violations"],
               wall_seconds=rep["wall_seconds"], ledger_hash=rep["ledger_hash"],
               replicas_equal=rep["replicas_equal"])
    return out


def replay_cmd(scenario: str, seed: int, mode: str, nodes: int, duration_s: float, tasks: int) -> str:
    return (f"python -m sim.fire_bench --replay {scenario} {seed} --nodes {nodes} --duration {duration_s:g}"
            f" --tasks {tasks} --mode {mode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=125, help="seeds per scenario (default 125)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--json", default="bench/results/fencing.json")
    ap.add_argument("--replay", nargs=2, metavar=("SCENARIO", "SEED"))
    ap.add_argument("--modes", default=",".join(MODES), help="fenced, fenced_skip, unfenced")
    ap.add_argument("--mode", default="fenced", choices=sorted(MODES), help="with --replay")
    a = ap.parse_args(argv)
    if a.replay:
        fencing, on_loss = MODES[a.mode]
        rep, _ = simulate_app(nodes=a.nodes, duration_s=a.duration, seed=int(a.replay[1]),
                              scenario=a.replay[0], tasks=default_tasks(a.tasks, on_owner_loss=on_loss),
                              fencing=fencing)
        rep.pop("disagreement", None)
        print(json.dumps(rep, indent=1, sort_keys=True, default=str))
        return 1 if rep["violations"] else 0
    scenarios = [s for s in a.scenarios.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; one of {', '.join(MODES)}")
    jobs = [(sc, seed, m, a.nodes, a.duration, a.tasks)
            for sc in scenarios for seed in range(a.first_seed, a.first_seed + a.seeds)
            for m in modes]
    t0 = time.perf_counter()
    if a.jobs > 1:
        with mp.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_one, jobs, chunksize=4)
    else:
        results = [_one(j) for j in jobs]
    wall = time.perf_counter() - t0
    table = []
    for sc in scenarios:
        for m in modes:
            rs = [r for r in results if r["scenario"] == sc and r["mode"] == m]
            row = {"scenario": sc, "mode": m, "runs": len(rs)}
            for k in KEYS:
                row[k] = sum(r[k] for r in rs)
            row["duplicate_fires_max"] = max((r["duplicate_fires"] for r in rs), default=0)
            row["runs_with_duplicates"] = sum(1 for r in rs if r["duplicate_fires"])
            row["replicas_unequal_runs"] = sum(1 for r in rs if not r["replicas_equal"])
            row["violating_runs"] = sum(1 for r in rs if r["violations"])
            # seeds to replay: any duplicate or missed slot
            row["runs_to_look_at"] = [{"seed": r["seed"], "duplicate_fires": r["duplicate_fires"],
                                       "missed_slots": r["missed_slots"]}
                                      for r in rs if r["duplicate_fires"] or r["missed_slots"]][:50]
            table.append(row)
    hdr = (f"{'scenario':10} {'mode':11} {'runs':>5} {'due':>7} {'fired':>7} {'dup':>6} {'dup_reclaim':>11} "
           f"{'dup_max':>7} {'runs_dup':>8} {'missed':>6} {'reruns':>6} {'unequal':>7}")
    print(hdr)
    for r in table:
        print(f"{r['scenario']:10} {r['mode']:11} {r['runs']:5d} "
              f"{r['slots_due']:7d} {r['slots_fired']:7d} {r['duplicate_fires']:6d} "
              f"{r['reclaim_duplicates']:11d} {r['duplicate_fires_max']:7d} {r['runs_with_duplicates']:8d} "
              f"{r['missed_slots']:6d} {r['owner_loss_reruns']:6d} {r['replicas_unequal_runs']:7d}")
    print(f"{len(jobs)} runs ({a.nodes} nodes, {a.duration:g} virtual s, {a.tasks} tasks) in {wall:.1f} s wall,"
          f" {a.jobs} process(es)")
    for r in table:
        for x in r["runs_to_look_at"][:3]:
            print(f"  {r['scenario']} {r['mode']} seed {x['seed']}: dup {x['duplicate_fires']} "
                  f"missed {x['missed_slots']}; replay: "
                  + replay_cmd(r["scenario"], x["seed"], r["mode"], a.nodes, a.duration, a.tasks))
    bad = [r for r in results if r["violations"]]
    for r in bad[:20]:
        print(f"VIOLATION seed={r['seed']} scenario={r['scenario']} mode={r['mode']}: "
              f"{'; '.join(v[:200] for v in r['violations'])}\n  replay: "
              + replay_cmd(r["scenario"], r["seed"], r["mode"], a.nodes, a.duration, a.tasks))
    if len(bad) > 20:
        print(f"... {len(bad) - 20} more violating runs (see JSON)")
    doc = {"command": "python -m sim.fire_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "nodes": a.nodes, "duration_s": a.duration, "tasks": a.tasks, "seeds_per_scenario": a.seeds,
           "first_seed": a.first_seed, "wall_seconds": round(wall, 1), "jobs": a.jobs, "table": table,
           "violations": [{k: r[k] for k in ("scenario", "seed", "mode", "violations")} for r in bad]}
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
