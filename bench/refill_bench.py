"""Refill of a wiped replica by anti-entropy, in bounded pages.

``python bench/refill_bench.py --tasks 2500 --history 100 --output 256``
builds one node's store with ``tasks`` task definitions and ``history``
run records each (``output`` bytes of output per record), then lets an
empty store catch up through the store's exchange protocol exactly as two
nodes do (``Store.start_exchange`` / ``handle_exchange``, catalogue scope
then runs scope), one exchange after another, and prints and writes as JSON:
exchanges, messages, bytes, the largest message (bounded by
``node.state.exchange.PAGE_BYTES`` of entries), and CPU time. Between two real nodes
each exchange is one anti-entropy round (every ``ae_interval_s``, or at once
for a handoff), so the wall time of a refill is about exchanges x the round
interval plus these CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.state.exchange import PAGE_BYTES  # noqa: E402
from node.state.store import Store  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=2500)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--json", default="bench/results/refill.json")
    a = p.parse_args()
    full, empty = Store("a"), Store("b")
    pad = "x" * a.output
    tids = [f"t{i:05d}" for i in range(a.tasks)]
    t0 = time.process_time()
    for tid in tids:
        full.put_task(tid, {"id": tid, "history": a.history}, None, 1.0)
        for r in range(a.history):
            full.put_run({"task_id": tid, "run_id": f"{r}-a-{r:08x}.1", "slot": 1_800_000_000 + r,
                          "status": "succeeded", "attempt": 1, "started": 1.0, "finished": 2.0,
                          "exit_code": 0, "output": pad})
    state_bytes = sum(len(v) for _, v in full.drain_dirty() if v is not None)
    build_s = time.process_time() - t0
    out = {"tasks": a.tasks, "history": a.history, "output_bytes": a.output, "state_bytes": state_bytes,
           "page_bytes": PAGE_BYTES}
    t0 = time.process_time()
    for scope, scope_tasks in (("catalogue", None), ("runs", tids)):
        exchanges = messages = nbytes = biggest = 0
        while empty.digest_root(scope, scope_tasks) != full.digest_root(scope, scope_tasks):
            exchanges += 1
            msg = empty.start_exchange(scope, scope_tasks)
            side = (full, empty)
            i = 0
            while msg is not None:
                messages += 1
                nbytes += len(msg)
                biggest = max(biggest, len(msg))
                msg = side[i % 2].handle_exchange(msg, scope_tasks).reply
                i += 1
            if exchanges > 100_000:
                raise SystemExit("no progress")
        out[scope] = {"exchanges": exchanges, "messages": messages, "bytes": nbytes, "largest_message": biggest}
    out["refill_cpu_s"] = round(time.process_time() - t0, 2)
    out["build_cpu_s"] = round(build_s, 2)
    out["date"] = time.strftime("%Y-%m-%d")
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    print(json.dumps(out, indent=1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
