"""Anti-entropy benchmark: bytes per exchange in sync, and per differing task.

For 1e3, 1e4, 1e5 tasks (each with a task/ and a ctl/ key): two stores in
sync exchange one root each way; then k tasks are edited on one side and one
exchange repairs them (all messages counted, both directions).
Writes bench/results/store.json.

    .venv/bin/python bench/store_bench.py            # 1e3, 1e4, 1e5
    .venv/bin/python bench/store_bench.py --quick    # 1e3, 1e4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from node.state.store import Store  # noqa: E402


def exchange(a: Store, b: Store) -> tuple[list[int], int]:
    msg = a.start_exchange()
    sizes = [len(msg)]
    shipped = 0
    sides = [b, a]
    for i in range(10):
        res = sides[i % 2].handle_exchange(msg)
        shipped += res.shipped
        if res.reply is None:
            return sizes, shipped
        msg = res.reply
        sizes.append(len(msg))
    raise AssertionError("exchange did not end")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "store.json"))
    a = ap.parse_args()
    counts = [1000, 10000] if a.quick else [1000, 10000, 100000]
    rows = []
    for n in counts:
        t0 = time.perf_counter()
        x, y = Store("a"), Store("b")
        for i in range(n):
            tid = f"task-{i:06d}"
            x.put_task(tid, {"schedule": "*/5 * * * *", "command": ["echo", str(i)], "history": 100}, None, 1.0)
            x.advance_fired(tid, 1_700_000_000 + 300 * (i % 100))
        y.load(x.drain_dirty())
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sizes, shipped = exchange(x, y)
        insync_ms = (time.perf_counter() - t0) * 1000
        row = {"tasks": n, "keys": len(x.keys()), "fill_s": round(fill_s, 2),
               "in_sync": {"messages": len(sizes), "bytes_each": sizes, "bytes_total": sum(sizes),
                           "ms": round(insync_ms, 2)}}
        for k in (1, 10, 100):
            for i in range(k):
                tid = f"task-{(i * 7919 + k) % n:06d}"
                x.put_task(tid, {"schedule": "@hourly", "command": ["true"], "edit": k}, x.get_task(tid).context, 2.0)
            t0 = time.perf_counter()
            sizes, shipped = exchange(x, y)
            ms = (time.perf_counter() - t0) * 1000
            assert x.digest_root() == y.digest_root()
            row[f"diff_{k}"] = {"messages": len(sizes), "bytes_total": sum(sizes), "shipped": shipped,
                                "bytes_per_differing_task": round(sum(sizes) / k, 1), "ms": round(ms, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    out = {"command": "python bench/store_bench.py" + (" --quick" if a.quick else ""),
           "python": platform.python_version(), "cpus": os.cpu_count(),
           "load_avg_at_end": os.getloadavg(), "results": rows}
    with open(a.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
