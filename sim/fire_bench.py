"""Duplicate and missed slots over many seeds, per fencing mode and misfire policy.

Runs ``sim.app_run.simulate_app`` for every (scenario, seed) in each mode, with
and without the etcd fencing model, on the same fault schedule, and prints
per scenario x mode x misfire policy: runs, slots due, duplicate fires
(total, of which reclaims of a claimer wrongly declared dead, max per run),
missed slots (with their reasons), owner-loss reruns and invariant
violations. Each seed's tasks use one misfire policy (``skip``, ``run_once``
and ``run_all`` in turn, seed % 3), so every policy sees a third of the
seeds. Scenario ``etcd_outage`` is a steady cluster whose etcd is down for
5-15 s (drawn from the seed; fenced modes only); ``crash_etcd`` adds such an
outage to a crash. With ``run_all`` and outages shorter than the tasks'
catch-up window (60 s), a missed slot is an invariant violation. Writes
``bench/results/fire.json``.

Usage::

    python -m sim.fire_bench                          # 500 seeds x 6 scenarios x 2 modes
    python -m sim.fire_bench --seeds 10 --jobs 2
    python -m sim.fire_bench --replay partition 3 --mode fenced --misfire run_all   # one run

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

from sim.app_run import default_tasks, simulate_app

SCENARIOS = ("crash", "partition", "churn", "flaky", "etcd_outage", "crash_etcd")
MISFIRES = ("skip", "run_once", "run_all")
#: scenario -> (membership scenario, with an etcd outage)
_BASE = {"etcd_outage": ("steady", True), "crash_etcd": ("crash", True)}
# mode -> (fencing, on_owner_loss of every task)
MODES = {"fenced": (True, "rerun"), "fenced_skip": (True, "skip"), "unfenced": (False, "rerun")}
KEYS = ("slots_due", "slots_fired", "duplicate_fires", "reclaim_duplicates", "duplicate_fires_warmup",
        "missed_slots", "owner_loss_reruns", "fires")


def misfire_of(seed: int) -> str:
    return MISFIRES[seed % len(MISFIRES)]


def outage_of(scenario: str, seed: int, duration_s: float) -> list[tuple[float, float]]:
    """The etcd outage of an ``etcd_outage``/``crash_etcd`` run: 5-15 s,
    starting between a quarter and half of the run (drawn from the seed), so
    it ends at least ``duration/2 - 15`` s before the end (9 s at 60 s,
    after which the catch-up after it still runs before the bench stops
    scheduling)."""
    if not _BASE.get(scenario, (scenario, False))[1]:
        return []
    from sim.loop import child_rng
    rng = child_rng(seed, "etcd_outage")
    start = duration_s / 4 + rng.random() * duration_s / 4
    return [(start, start + 5.0 + 10.0 * rng.random())]


def simulate(scenario: str, seed: int, mode: str, nodes: int, duration_s: float, tasks: int,
             misfire: str | None = None, overlap: str = "forbid") -> dict:
    fencing, on_loss = MODES[mode]
    misfire = misfire or misfire_of(seed)
    base = _BASE.get(scenario, (scenario, False))[0]
    rep, _ = simulate_app(nodes=nodes, duration_s=duration_s, seed=seed, scenario=base,
                          tasks=default_tasks(tasks, on_owner_loss=on_loss, misfire=misfire, overlap=overlap,
                                              catchup_window_s=60.0),
                          fencing=fencing, etcd_outages=outage_of(scenario, seed, duration_s),
                          expect_no_missed=misfire == "run_all")
    return rep


def _one(args: tuple) -> dict:
    scenario, seed, mode, nodes, duration_s, tasks = args
    rep = simulate(scenario, seed, mode, nodes, duration_s, tasks)
    out = {k: rep[k] for k in KEYS}
    out.update(scenario=scenario, seed=seed, mode=mode, misfire=misfire_of(seed), violations=rep["violations"],
               wall_seconds=rep["wall_seconds"], ledger_hash=rep["ledger_hash"],
               replicas_equal=rep["replicas_equal"], missed_by_reason=rep["missed_by_reason"])
    return out


def replay_cmd(scenario: str, seed: int, mode: str, nodes: int, duration_s: float, tasks: int) -> str:
    return (f"python -m sim.fire_bench --replay {scenario} {seed} --nodes {nodes} --duration {duration_s:g}"
            f" --tasks {tasks} --mode {mode} --misfire {misfire_of(seed)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=500, help="seeds per scenario (default 500)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--json", default="bench/results/fire.json")
    ap.add_argument("--misfire", choices=MISFIRES, help="with --replay (default: the seed's)")
    ap.add_argument("--overlap", default="forbid", help="with --replay")
    ap.add_argument("--etcd-outage", help="with --replay: START:END virtual seconds (overrides the scenario's)")
    ap.add_argument("--replay", nargs=2, metavar=("SCENARIO", "SEED"))
    ap.add_argument("--modes", default="fenced,unfenced", help="fenced, fenced_skip, unfenced")
    ap.add_argument("--mode", default="fenced", choices=sorted(MODES), help="with --replay")
    a = ap.parse_args(argv)
    if a.replay:
        scenario, seed = a.replay[0], int(a.replay[1])
        if a.etcd_outage:
            start, end = (float(x) for x in a.etcd_outage.split(":"))
            fencing, on_loss = MODES[a.mode]
            misfire = a.misfire or misfire_of(seed)
            rep, _ = simulate_app(nodes=a.nodes, duration_s=a.duration, seed=seed,
                                  scenario=_BASE.get(scenario, (scenario, False))[0],
                                  tasks=default_tasks(a.tasks, on_owner_loss=on_loss, misfire=misfire,
                                                      overlap=a.overlap, catchup_window_s=60.0),
                                  fencing=fencing, etcd_outages=[(start, end)],
                                  expect_no_missed=misfire == "run_all")
        else:
            rep = simulate(scenario, seed, a.mode, a.nodes, a.duration, a.tasks, a.misfire, a.overlap)
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
            for m in modes if not (_BASE.get(sc, (sc, False))[1] and not MODES[m][0])]
    t0 = time.perf_counter()
    if a.jobs > 1:
        with mp.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_one, jobs, chunksize=4)
    else:
        results = [_one(j) for j in jobs]
    wall = time.perf_counter() - t0
    table = []
    for sc in scenarios:
        for m, mf in [(m, mf) for m in modes for mf in MISFIRES]:
            rs = [r for r in results if r["scenario"] == sc and r["mode"] == m and r["misfire"] == mf]
            if not rs:
                continue
            row = {"scenario": sc, "mode": m, "misfire": mf, "runs": len(rs)}
            why: dict[str, int] = {}
            for r in rs:
                for k, v in r["missed_by_reason"].items():
                    why[k] = why.get(k, 0) + v
            row["missed_by_reason"] = dict(sorted(why.items()))
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
    hdr = (f"{'scenario':11} {'mode':9} {'misfire':8} {'runs':>5} {'due':>7} {'fired':>7} {'dup':>5} "
           f"{'dup_reclaim':>11} {'dup_max':>7} {'missed':>6} {'reruns':>6} {'unequal':>7}  missed by reason")
    print(hdr)
    for r in table:
        why = ", ".join(f"{k} {v}" for k, v in r["missed_by_reason"].items()) or "-"
        print(f"{r['scenario']:11} {r['mode']:9} {r['misfire']:8} {r['runs']:5d} "
              f"{r['slots_due']:7d} {r['slots_fired']:7d} {r['duplicate_fires']:5d} "
              f"{r['reclaim_duplicates']:11d} {r['duplicate_fires_max']:7d} "
              f"{r['missed_slots']:6d} {r['owner_loss_reruns']:6d} {r['replicas_unequal_runs']:7d}  {why}")
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
