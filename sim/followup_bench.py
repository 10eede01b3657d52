"""Notifications and chained runs across owner deaths, over many seeds.

``python -m sim.followup_bench --seeds 200`` runs the node core on a
simulated 5-node cluster (``sim.app``) for each seed of each scenario, with
an upstream task ``@every 3s`` that notifies on success and lost, and a
downstream task ``after`` it that notifies too, and checks with
``sim.app_run.followup_report``:

- no run finished more than 15 s before the end without its notification
  (a new owner sends what a dead one left pending);
- no upstream run without its chained downstream run;
- with fencing, no chained slot run twice.

Notifications are at least once: a sender that dies, restarts or is
declared dead while alive (a partition) around a send can make the next
sender send again; those duplicates are counted, not failed. A failing seed
prints the command that replays it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sim.app_run import followup_report, simulate_app

HOOK = {"on": ["success", "lost"], "type": "webhook", "url": "http://receiver.invalid/hook"}


def followup_tasks() -> list[dict]:
    return [
        {"id": "up", "schedule": "@every 3s", "command": {"type": "exec", "argv": ["true"]},
         "misfire": "run_all", "overlap": "allow", "catchup_window": "60s", "notify": [dict(HOOK)]},
        {"id": "down", "after": {"task": "up", "on": "success"},
         "command": {"type": "exec", "argv": ["true"]}, "overlap": "allow", "notify": [dict(HOOK)]},
    ]


def check(fr: dict, *, fencing: bool) -> list[str]:
    out = []
    if fr["notify_missing"]:
        out.append(f"{fr['notify_missing']} run(s) never notified: {fr['notify_missing_examples']}")
    if fr["chain_missing"]:
        out.append(f"{fr['chain_missing']} upstream run(s) without their chained run: "
                   f"{fr['chain_missing_examples']}")
    if fencing and fr["chain_duplicates"]:
        out.append(f"chained slots run twice with fencing: {fr['chain_duplicates']}")
    return out


def run_one(scenario: str, seed: int, *, fencing: bool, nodes: int = 5, duration_s: float = 90.0) -> dict:
    _, cluster = simulate_app(nodes=nodes, duration_s=duration_s, seed=seed, scenario=scenario,
                              tasks=followup_tasks(), fencing=fencing)
    fr = followup_report(cluster)
    fr["violations"] = check(fr, fencing=fencing)
    return fr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.followup_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--scenarios", nargs="+", default=["crash", "churn", "partition"])
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    results = []
    failed = 0
    for scenario in args.scenarios:
        for fencing in (False, True):
            t0 = time.monotonic()
            agg = {"scenario": scenario, "fencing": fencing, "seeds": args.seeds, "notify_expected": 0,
                   "notify_missing": 0, "notify_duplicates": 0, "chain_expected": 0, "chain_missing": 0,
                   "chain_duplicate_slots": 0, "failed_seeds": []}
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                fr = run_one(scenario, seed, fencing=fencing)
                for k in ("notify_expected", "notify_missing", "notify_duplicates", "chain_expected",
                          "chain_missing"):
                    agg[k] += fr[k]
                agg["chain_duplicate_slots"] += len(fr["chain_duplicates"])
                if fr["violations"]:
                    failed += 1
                    agg["failed_seeds"].append(seed)
                    print(f"FAIL {scenario} fencing={fencing} seed {seed}: {'; '.join(fr['violations'])}\n"
                          f"  replay: python -m sim.followup_bench --scenarios {scenario} --first-seed {seed} "
                          f"--seeds 1", file=sys.stderr)
            agg["wall_s"] = round(time.monotonic() - t0, 1)
            results.append(agg)
            print(json.dumps(agg), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
