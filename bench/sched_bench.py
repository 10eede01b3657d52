"""Scheduling overhead: peerd's scheduler core (trio shell) vs APScheduler 3.

Each scenario runs in its own subprocess (no shared GC, threads or caches):

- ``1000/s``: 1,000 tasks ``@every 1s``;
- ``5000/s``: 5,000 tasks ``@every 1s``;
- ``10000/min``: 10,000 tasks ``* * * * *`` (APScheduler: CronTrigger second=0).

The executor records its start time and does nothing. Lateness = start time
of the executor minus the slot's scheduled time. For peerd the shell is the
minimal trio loop a daemon would run: sleep until ``next_deadline()``,
``tick(time.time())``, hand each Fire of the tick to the executor, which
records the time it accepted the run (``lateness_ms``) and reports
run_started / run_finished to the core; then the empty run bodies start, one
trio task each (the time each task first runs is reported too, as
``task_start_lateness_ms``: that part is the executor's cost of spawning). For
APScheduler it is ``BackgroundScheduler`` with its default thread pool (10
workers), ``coalesce=False``, ``misfire_grace_time=None`` and a large
``max_instances`` so that no run is dropped; the k-th run of a job is matched
to its k-th scheduled time. CPU is process CPU time / wall time over the
measured window (1.0 = one core).

Options:

- ``--gc-freeze``: both processes call ``gc.collect(); gc.freeze()`` once
  their tasks/jobs are set up, so the cyclic GC no longer walks the tasks,
  the imported modules and the scheduler state on every full collection
  (a full collection of a 5,000-task peerd process took 40-70 ms on the dev
  machine, and one in the window puts every fire of that second late). The
  daemon should do the same after startup (proposed for node/cli/daemon.py);
  without it, figures are worse at p99.
- ``--batch K``: the peerd shell calls ``tick(now, limit=K)`` and yields
  (``trio.sleep(0)``) between batches, so the first runs start before the
  last ones are decided. Default 0 (one tick decides everything due): on the
  loaded dev machine, yielding let the started runs' trio tasks take the CPU
  before the later fires were accepted, so p99 acceptance lateness got worse
  (5,000/s: 85 ms -> 350 ms) while body start p50 improved a little.
- ``--only 1000/s,5000/s``: run some scenarios; ``--out FILE``: JSON path.

Run:  .venv/bin/python bench/sched_bench.py [--seconds 10] [--minutes 1] [--gc-freeze]
Writes bench/results/sched.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pct(values, q):
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))
    return v[k]


def _summary(lat_s, cpu_s, wall_s, expected):
    ms = [x * 1000 for x in lat_s]
    return {
        "runs": len(ms), "expected_runs": expected,
        "lateness_ms": {"min": min(ms) if ms else None, "p50": _pct(ms, 0.50), "p99": _pct(ms, 0.99),
                        "max": max(ms) if ms else None},
        "cpu_cores": cpu_s / wall_s if wall_s else None,
    }


def _align(period_s: int, lead_s: float = 2.0) -> int:
    """First multiple of period at least lead_s from now."""
    now = time.time()
    return int((now + lead_s) // period_s + 1) * period_s


def _setup_done(gc_freeze: bool) -> None:
    """End of setup: optionally move every object alive now out of the GC's reach."""
    if gc_freeze:
        gc.collect()
        gc.freeze()


def run_peerd(n: int, period: str, measure_s: float, batch: int = 0, gc_freeze: bool = False) -> dict:
    import trio

    from node.schedule.effects import Fire
    from node.schedule.scheduler import Scheduler
    from node.tasks.model import Task

    spec = "@every 1s" if period == "s" else "* * * * *"
    step = 1 if period == "s" else 60
    core = Scheduler("bench")
    now = time.time()
    for i in range(n):
        t = Task.from_dict({"id": f"t{i}", "schedule": spec, "overlap": "allow",
                            "command": {"type": "shell", "run": "true"}})
        core.set_task(t, now=now)
        core.set_owned(t.id, True, now)
    _setup_done(gc_freeze)
    begin = _align(step)
    end = begin + measure_s
    lat: list[float] = []
    task_lat: list[float] = []
    limit = batch if batch > 0 else None

    async def noop(fire_at: float) -> None:
        started = time.time()
        if begin <= fire_at < end:
            task_lat.append(started - fire_at)

    def accept(fire) -> None:
        # The no-op executor accepts the run: its start time is recorded here,
        # and it reports the run's start and end to the core as the daemon would.
        started = time.time()
        if begin <= fire.fire_at < end:
            lat.append(started - fire.fire_at)
        core.run_started(fire.task_id, fire.slot, fire.task_id, started)
        core.run_finished(fire.task_id, fire.task_id, started)

    async def main():
        nonlocal cpu0, wall0
        async with trio.open_nursery() as nursery:
            while True:
                dl = core.next_deadline()
                if dl is None or dl >= end:
                    break
                delay = dl - time.time()
                # Sleep until due; when a batch left due work (dl <= now),
                # yield once so the runs already started get the CPU.
                await trio.sleep(max(0.0, delay))
                if cpu0 is None and time.time() >= begin - 0.5:
                    cpu0, wall0 = time.process_time(), time.time()
                fires = [eff for eff in core.tick(time.time(), limit=limit) if type(eff) is Fire]
                for eff in fires:  # the executor accepts (and records) every run first,
                    accept(eff)
                for eff in fires:  # then starts each (empty) body in its own trio task
                    nursery.start_soon(noop, eff.fire_at)
            rest = end + 1.0 - time.time()  # measure CPU over the same window as APScheduler
            if rest > 0:
                await trio.sleep(rest)

    cpu0 = wall0 = None
    trio.run(main)
    cpu1, wall1 = time.process_time(), time.time()
    expected = n * len(range(int(begin), int(end), step))
    out = _summary(lat, cpu1 - cpu0, wall1 - wall0, expected)
    ms = [x * 1000 for x in task_lat]
    out["task_start_lateness_ms"] = {"min": min(ms) if ms else None, "p50": _pct(ms, 0.5), "p99": _pct(ms, 0.99), "max": max(ms) if ms else None}
    return out


def run_apscheduler(n: int, period: str, measure_s: float, batch: int = 0, gc_freeze: bool = False) -> dict:
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger
    from datetime import datetime, timezone

    step = 1 if period == "s" else 60
    begin = _align(step, lead_s=3.0 if n < 5000 else 6.0)
    end = begin + measure_s
    lat: list[float] = []
    lock = threading.Lock()
    sched = BackgroundScheduler(timezone="UTC", job_defaults={
        "coalesce": False, "misfire_grace_time": None, "max_instances": 10_000})

    def make(counter):
        def job():
            started = time.time()
            k = next(counter)
            fire_at = begin + k * step
            if fire_at < end:
                with lock:
                    lat.append(started - fire_at)
        return job

    start_dt = datetime.fromtimestamp(begin, timezone.utc)
    for i in range(n):
        if period == "s":
            trig = IntervalTrigger(seconds=1, start_date=start_dt, timezone="UTC")
        else:
            trig = CronTrigger(second=0, start_date=start_dt, timezone="UTC")
        sched.add_job(make(itertools.count()), trig, id=f"t{i}")
    _setup_done(gc_freeze)
    sched.start()
    while time.time() < begin - 0.5:
        time.sleep(0.05)
    cpu0, wall0 = time.process_time(), time.time()
    while time.time() < end + 1.0:
        time.sleep(0.05)
    cpu1, wall1 = time.process_time(), time.time()
    sched.shutdown(wait=False)
    expected = n * len(range(int(begin), int(end), step))
    return _summary(lat, cpu1 - cpu0, wall1 - wall0, expected)


#: Due tasks decided per tick by the peerd shell (0: all; node/shell.py's loop does the same).
DEFAULT_BATCH = 0

SCENARIOS = [("1000/s", 1000, "s"), ("5000/s", 5000, "s"), ("10000/min", 10000, "min")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window for per-second loads")
    ap.add_argument("--minutes", type=int, default=1, help="minute boundaries for the per-minute load")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "N", "PERIOD"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                    help="peerd: decide at most this many due tasks per tick, yield between "
                         "batches (0: all due tasks in one tick)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="both schedulers: gc.collect(); gc.freeze() after setup")
    ap.add_argument("--only", help="comma-separated scenario names (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sched.json"))
    args = ap.parse_args()
    if args.one:
        impl, n, period = args.one[0], int(args.one[1]), args.one[2]
        measure = args.seconds if period == "s" else 60.0 * args.minutes
        fn = run_peerd if impl == "peerd" else run_apscheduler
        print(json.dumps(fn(n, period, measure, batch=args.batch, gc_freeze=args.gc_freeze)))
        return
    try:
        import apscheduler
        aps_version = apscheduler.__version__
    except ImportError:
        aps_version = None
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform()},
               "apscheduler_version": aps_version, "seconds": args.seconds,
               "minutes": args.minutes, "batch": args.batch, "gc_freeze": args.gc_freeze,
               "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               "loadavg_start": os.getloadavg(), "scenarios": {}}
    print(f"{'scenario':<11} {'impl':<12} {'runs':>8} {'min ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu':>6}")
    for name, n, period in SCENARIOS:
        if args.only and name not in args.only.split(","):
            continue
        row = {}
        for impl in ("peerd", "apscheduler") if aps_version else ("peerd",):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, str(n), period,
                   "--seconds", str(args.seconds), "--minutes", str(args.minutes),
                   "--batch", str(args.batch)] + (["--gc-freeze"] if args.gc_freeze else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
            if out.returncode != 0:
                row[impl] = {"error": out.stderr.strip()[-2000:]}
                print(f"{name:<11} {impl:<12} ERROR {out.stderr.strip()[-300:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row[impl] = r
            lm = r["lateness_ms"]
            print(f"{name:<11} {impl:<12} {r['runs']:>8} {lm['min']:>8.2f} {lm['p50']:>8.2f} {lm['p99']:>8.2f} "
                  f"{lm['max']:>8.2f} {r['cpu_cores']:>6.2f}")
            if "task_start_lateness_ms" in r:
                ts = r["task_start_lateness_ms"]
                print(f"{'':<11} {'  body start':<12} {'':>8} {ts['min']:>8.2f} {ts['p50']:>8.2f} {ts['p99']:>8.2f} "
                      f"{ts['max']:>8.2f}")
        if "apscheduler" in row and "error" not in row["apscheduler"] and "error" not in row["peerd"]:
            a, p = row["apscheduler"]["lateness_ms"]["p99"], row["peerd"]["lateness_ms"]["p99"]
            row["p99_ratio_peerd_over_apscheduler"] = p / a if a else None
        results["scenarios"][name] = row
    results["loadavg_end"] = os.getloadavg()
    print(f"load average start {results['loadavg_start']} end {results['loadavg_end']} "
          f"(other work on the machine inflates every figure)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
