"""Benchmark runner for the simulator: speed and protocol figures.

    python -m sim.bench speed  [--nodes 1000] [--duration 600]
    python -m sim.bench protocol [--sizes 100,300] [--duration 300] [--jobs 2]
    python -m sim.bench table          # markdown table of bench/results/sim.json
    python -m sim.bench load [--sizes 100,300,1000] [--window 100,300]

``--compiled`` (speed, protocol, load) runs them with the mypyc build, as
``peersim run --compiled`` does (``python -m sim.accel build`` first).

Every run is one ``simulate(...)`` call (the same code path as ``peersim
run``) with a fixed seed; results are merged into ``bench/results/sim.json``
keyed by (kind, scenario, nodes, loss, duration, seed), so runs can be added
one at a time. Figures and commands are in ``bench/README-sim.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time

from sim.accel import ENV_MARKER, compiled_modules, repo_root
from sim.cli import parse_window

__all__ = ["main", "run_one", "PROTOCOL_RUNS"]

# the repository's, also in a --compiled child (which imports the build dir's copy)
RESULTS = os.path.join(repo_root(), "bench", "results", "sim.json")
SEED = 1

# (scenario, loss): loss None = scenario default.
PROTOCOL_RUNS = [
    ("steady", None),
    ("crash", None),
    ("flaky", 0.05),
    ("flaky", 0.20),
    ("crash", 0.05),   # detection latency under loss
    ("crash", 0.20),
    ("pause", None),
]

ROW_KEYS = (
    "wall_seconds", "node_seconds_per_wall_second", "detection_latency_s", "detections",
    "undetected", "first_suspicion_s", "false_positives", "false_suspicions",
    "false_positives_paused", "false_suspicions_paused", "dissemination_rounds", "dissemination_incomplete",
    "dead_dissemination_rounds", "msgs_per_node_per_s", "bytes_per_node_per_s", "converged",
    "convergence_s", "first_converged_s", "trace_hash", "drops",
)


def run_one(job: tuple) -> dict:
    """Run one (kind, scenario, nodes, loss, duration_s, seed, profile) job."""
    from sim.cluster import simulate
    from sim.scenarios import check_invariants
    kind, scenario, nodes, loss, duration_s, seed, profile, bootstrap = job
    cpu0 = time.process_time()
    r, _ = simulate(nodes=nodes, duration_s=duration_s, seed=seed, scenario=scenario, loss=loss,
                    profile=profile, bootstrap=bootstrap)
    cpu_s = time.process_time() - cpu0
    eff_loss = loss if loss is not None else (0.05 if scenario == "flaky" else 0.0)
    row = {"kind": kind, "scenario": scenario, "nodes": nodes, "loss": eff_loss,
           "duration_s": duration_s, "seed": seed, "profile": profile, "bootstrap": bootstrap,
           "cpu_seconds": round(cpu_s, 2),
           # wall and cpu figures differ ~2x between the two; the rest does not
           "compiled": bool(compiled_modules()),
           "date": time.strftime("%Y-%m-%d"),
           "node_seconds_per_cpu_second": round(nodes * duration_s / cpu_s, 1) if cpu_s else None,
           "invariants_failed": check_invariants(r, scenario=scenario, loss=eff_loss),
           "command": (f"peersim run --nodes {nodes} --duration {duration_s:g} --seed {seed} "
                       f"--scenario {scenario} --profile {profile}"
                       + (f" --loss {loss:g}" if loss is not None else "")
                       + (f" --bootstrap {bootstrap}" if bootstrap != "join" else ""))}
    for k in ROW_KEYS:
        row[k] = r.get(k)
    _merge([row])  # each run lands in the results file as soon as it is done
    print(json.dumps({k: row[k] for k in ("scenario", "nodes", "loss", "wall_seconds", "cpu_seconds",
                                          "converged", "false_positives", "detection_latency_s",
                                          "msgs_per_node_per_s", "bytes_per_node_per_s")}),
          flush=True)
    return row


def _key(row: dict) -> str:
    return (f"{row['kind']}|{row['scenario']}|{row['nodes']}|{row['loss']}|{row['duration_s']}"
            f"|{row['seed']}|{row.get('bootstrap')}")


def _merge(rows: list[dict], path: str = RESULTS) -> None:
    """Read-modify-write the results file (runs keyed by ``_key``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        doc = {"runs": {}}
    doc["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "platform": platform.platform()}
    for row in rows:
        doc["runs"][_key(row)] = row
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def _run(jobs: list[tuple], n_jobs: int) -> list[dict]:
    if n_jobs > 1 and len(jobs) > 1:
        with multiprocessing.Pool(n_jobs) as pool:
            return pool.map(run_one, jobs, chunksize=1)
    return [run_one(j) for j in jobs]


def load_window(sizes: str, window: tuple[float, float], seed: int) -> int:
    """Messages and bytes per running member per virtual second between
    ``window`` bounds (after the warm start's broadcasts have drained), per
    cluster size: does the steady-state load per member grow with N?"""
    from sim.cluster import simulate
    a, b = window
    rows = []
    for n in (int(x) for x in sizes.split(",")):
        r, c = simulate(nodes=n, duration_s=b + 1, seed=seed, scenario="steady", bootstrap="warm",
                        load_window_s=(a, b))
        lw = r["load_window"]
        row = {"nodes": n, "msgs_per_node_per_s": lw["msgs_per_node_per_s"],
               "bytes_per_node_per_s": lw["bytes_per_node_per_s"],
               "whole_run_msgs_per_node_per_s": r["msgs_per_node_per_s"],
               "retransmit_limit": c.config.retransmit_limit(n),
               "trace_hash": r["trace_hash"],
               "command": f"peersim run --nodes {n} --duration {b + 1:g} --seed {seed} "
                          f"--bootstrap warm --load-window {a:g},{b:g}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = os.path.join(os.path.dirname(RESULTS), "sim-load-window.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"what": f"load per running member between t={a:g} and t={b:g} virtual s, steady, "
                           f"lan profile, warm bootstrap, seed {seed}",
                   "command": f"python -m sim.bench load --sizes {sizes} --window {a:g},{b:g} --seed {seed}",
                   "python": platform.python_version(), "rows": rows}, fh, indent=2)
        fh.write("\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def table(path: str = RESULTS) -> str:
    """Markdown table of the stored results."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    rows = sorted(doc["runs"].values(), key=lambda r: (r["kind"], r["nodes"], r["scenario"], r["loss"]))

    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))
    out = ["| kind | scenario | N | loss | boot | virt s | code | wall s | cpu s | node-s/cpu-s "
           "| detect p50/p99/max s | 1st suspect p50 s | FP dead (suspect) | dissem. rounds p50/p99 "
           "| msgs/node/s | B/node/s | converged (s after fault) |",
           "|---" * 17 + "|"]
    for r in rows:
        d = r["detection_latency_s"] or {}
        s = r["first_suspicion_s"] or {}
        dr = r["dissemination_rounds"] or {}
        out.append(
            f"| {r['kind']} | {r['scenario']} | {r['nodes']} | {r['loss']:g} | {r.get('bootstrap')} "
            f"| {r['duration_s']:g} | {'compiled' if r.get('compiled') else 'pure'} "
            f"| {f(r['wall_seconds'], 1)} | {f(r['cpu_seconds'], 1)} | {f(r['node_seconds_per_cpu_second'], 0)} "
            f"| {f(d.get('p50'))}/{f(d.get('p99'))}/{f(d.get('max'))} | {f(s.get('p50'))} "
            f"| {r['false_positives']} ({r['false_suspicions']}) | {f(dr.get('p50'))}/{f(dr.get('p99'))} "
            f"| {f(r['msgs_per_node_per_s'])} | {f(r['bytes_per_node_per_s'], 0)} "
            f"| {r['converged']} ({f(r['convergence_s'], 1)}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed", help="1000 nodes x 600 virtual s, steady, lan")
    sp.add_argument("--nodes", type=int, default=1000)
    sp.add_argument("--duration", type=float, default=600.0)
    pp = sub.add_parser("protocol", help="protocol figures per scenario and size")
    pp.add_argument("--sizes", default="100,300")
    pp.add_argument("--duration", type=float, default=300.0)
    pp.add_argument("--scenarios", default=None,
                    help="comma list of scenario[@loss] (default: the PROTOCOL_RUNS set)")
    pp.add_argument("--jobs", type=int, default=1)
    for q in (sp, pp):
        q.add_argument("--profile", default="lan", choices=("lan", "local"))
        q.add_argument("--seed", type=int, default=SEED)
        q.add_argument("--bootstrap", default="warm", choices=("join", "warm", "settled"),
                       help="warm (default here) skips the join storm; settled also skips the "
                            "warm start's re-broadcasts; see ClusterOptions.bootstrap")
    lp = sub.add_parser("load", help="steady-state load per member in a window, per size "
                                     "(writes bench/results/sim-load-window.json)")
    lp.add_argument("--sizes", default="100,300,1000")
    lp.add_argument("--window", type=parse_window, default=(100.0, 300.0),
                    help="FROM,TO virtual seconds (default 100,300)")
    lp.add_argument("--seed", type=int, default=SEED)
    for q in (sp, pp, lp):
        q.add_argument("--compiled", action="store_true",
                       help="run with the mypyc build (python -m sim.accel build first), as "
                            "peersim run --compiled does; rows record compiled: true")
    sub.add_parser("table", help="print the markdown table of bench/results/sim.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if getattr(args, "compiled", False) and not os.environ.get(ENV_MARKER):
        from sim.cli import _reexec_compiled
        return _reexec_compiled(argv, None, module="sim.bench", prog="python -m sim.bench")
    if os.environ.get(ENV_MARKER):
        from sim.accel import install_huge_pages
        install_huge_pages()  # as peersim run --compiled does
    if args.cmd == "table":
        print(table())
        return 0
    if args.cmd == "load":
        return load_window(args.sizes, args.window, args.seed)
    if args.cmd == "speed":
        jobs = [("speed", "steady", args.nodes, None, args.duration, args.seed, args.profile,
                 args.bootstrap)]
        rows = _run(jobs, 1)
    else:
        runs = PROTOCOL_RUNS
        if args.scenarios:
            runs = []
            for item in args.scenarios.split(","):
                name, _, loss = item.partition("@")
                runs.append((name, float(loss) if loss else None))
        jobs = [("protocol", sc, int(n), loss, args.duration, args.seed, args.profile, args.bootstrap)
                for n in args.sizes.split(",") for sc, loss in runs]
        rows = _run(jobs, args.jobs)
    _merge(rows)
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
