"""Cost of parsing and stepping schedules in node/schedule/parse.py and slots.py.

For each expression, three figures (median of --repeat rounds, microseconds):

- ``validate_us``: ``validate_schedule`` with its memo cleared (what applying
  a new task pays once per distinct expression);
- ``compile_us``: ``compile_schedule`` with the rule memo cleared (validate
  memoised), i.e. building a rule;
- ``step_us``: one ``next_after`` on a compiled schedule, stepping forward
  from slot to slot (the scheduler's hot path; continuation memo in use);
- ``cold_step_us``: one ``next_after`` from a time the rule has not seen (a
  new croniter per call).

``--module FILE`` loads another copy of schedule.py (e.g. the previous
commit's, ``git show HEAD~1:node/schedule/slots.py > /tmp/old.py``) so two versions
can be measured side by side on the same machine.

Run:  .venv/bin/python bench/cron_parse_bench.py [--module FILE] [--out FILE]
Writes bench/results/cron_parse.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types

EXPRS = [
    "@every 30s",
    "*/5 * * * *",
    "30 2 * * *",
    "0 9 * * mon-fri",
    "*/10 * * * * 30",
    "0 0 1,15 * 1",       # both day fields restricted: OR
    "0 0 */2 * 1",        # AND (day-of-month starts with '*')
    "0 0 1 * 5#2",        # OR with a '#' weekday
]
BASE = 1780272000  # 2026-06-01T00:00Z


def load(path: str | None):
    if path is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        import node.schedule.parse as parse
        import node.schedule.slots as slots
        # one namespace, as the single-file module of older commits was (--module)
        return types.SimpleNamespace(**{**vars(parse), **vars(slots)})
    spec = importlib.util.spec_from_file_location("schedule_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def measure(mod, expr: str, repeat: int) -> dict:
    def validate(i):
        mod._validate_cron_cached.cache_clear()
        mod.validate_schedule(expr)

    def compile_(i):
        mod._RULES.clear()
        mod.compile_schedule(expr, "UTC")

    sched = mod.compile_schedule(expr, "Europe/Berlin")  # a zone with DST: the usual case
    state = {"t": BASE}

    def step(i):
        state["t"] = sched.next_after(state["t"]) or BASE  # past the last searched year: start over

    def cold(i):
        sched.next_after(BASE + 7919 * (i + 1) + repeat_round[0] * 104729)

    repeat_round = [0]
    out = {}
    for name, fn, n in (("validate_us", validate, 200), ("compile_us", compile_, 200),
                        ("step_us", step, 2000), ("cold_step_us", cold, 200)):
        runs = []
        for r in range(repeat):
            repeat_round[0] = r + 1
            runs.append(per_call_us(fn, n))
        out[name] = round(statistics.median(runs), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", help="schedule.py to measure (default: node/schedule/parse.py and slots.py)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cron_parse.json"))
    args = ap.parse_args()
    mod = load(args.module)
    rows = {}
    for e in EXPRS:
        try:
            rows[e] = measure(mod, e, args.repeat)
        except mod.ScheduleError as exc:  # an older schedule.py may refuse it
            rows[e] = {"refused": str(exc)}
    print(f"{'expression':20} {'validate':>9} {'compile':>9} {'step':>9} {'cold step':>9}  (us)")
    for e, r in rows.items():
        if "refused" in r:
            print(f"{e:20} refused: {r['refused']}")
            continue
        print(f"{e:20} {r['validate_us']:9.1f} {r['compile_us']:9.1f} {r['step_us']:9.2f} "
              f"{r['cold_step_us']:9.1f}")
    load_avg = os.getloadavg()
    print(f"load average {load_avg} (other work on the machine inflates every figure)")
    with open(args.out, "w") as f:
        json.dump({"module": args.module or "node/schedule/slots.py", "repeat": args.repeat,
                   "loadavg": load_avg, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
