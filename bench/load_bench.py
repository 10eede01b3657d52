"""The real daemon under load, side by side with APScheduler.

Three ``peerd`` processes on loopback (local profile, sealed gossip, SQLite
data dirs, every run record replicated to all three as in production) get
``--tasks`` exec tasks ``@every 1s`` running ``/bin/true`` (``overlap``
left at its default, ``forbid``). After a warm-up,
two windows of ``--window`` seconds each are measured:

* ``quiet``: the cluster alone;
* ``api``: the same while ``--clients`` threads of this process read
  ``GET /v1/tasks`` and ``GET /v1/status`` from the three nodes in a loop
  (the API's latency is reported too).

For each window, from the run records (``started`` is stamped just before
the process is spawned, ``slot`` is the scheduled instant): p50/p99/max of
``started - slot``, slots due without any run (``not_run``: skipped as an
overlap, or never fired) and runs later than the
2 s misfire grace; per node: CPU seconds per second (utime+stime of the
process and its children that were reaped), peak RSS, SQLite rows written per
second (``peerd_store_persist_rows_total``).

Then APScheduler 3 (the ``bench`` extra; ``BackgroundScheduler``, a thread
pool of ``--aps-workers``) fires the same number of interval jobs, each
spawning ``/bin/true`` with ``subprocess.run``; lateness is the spawn time
minus the job's scheduled run time.

Usage::

    python bench/load_bench.py [--tasks 1000] [--window 60] [--clients 50]
        [--out bench/results/load.json] [--no-aps]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_util import TOKEN, Cluster, api, wait_converged, wait_for  # noqa: E402

GRACE_S = 2.0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary_ms(xs: list[float]) -> dict:
    f = (lambda v: None if v is None else round(v * 1000, 1))
    return {"n": len(xs), "p50_ms": f(_pct(xs, 0.5)), "p99_ms": f(_pct(xs, 0.99)),
            "max_ms": f(max(xs) if xs else None)}


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(parts[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / ticks


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rows_written(addr: str) -> float | None:
    """``peerd_store_persist_rows_total`` (None: the node did not answer in 60 s)."""
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=60) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("peerd_store_persist_rows_total "):
                    return float(line.split()[1])
    except OSError:
        return None
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids, self.peak = pids, {n: 0.0 for n in pids}
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.wait(0.5):
            for n, pid in self.pids.items():
                try:
                    self.peak[n] = max(self.peak[n], _rss_mb(pid))
                except OSError:
                    pass


class ApiLoad:
    def __init__(self, addrs: list[str], clients: int):
        self.addrs, self.clients = addrs, clients
        self.lat: list[float] = []
        self.errors = 0
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def _loop(self, i: int) -> None:
        paths = ("/v1/tasks", "/v1/status")
        k = 0
        while not self.stop_ev.is_set():
            addr = self.addrs[(i + k) % len(self.addrs)]
            path = paths[k % 2]
            k += 1
            t0 = time.monotonic()
            try:
                st, _ = api(addr, "GET", path, timeout=30)
                if st != 200:
                    self.errors += 1
                else:
                    self.lat.append(time.monotonic() - t0)
            except Exception:
                self.errors += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=60)


def _window(cluster: Cluster, seconds: float, api_clients: int) -> dict:
    pids = {p.name: p.popen.pid for p in cluster.procs}
    addrs = [p.api_addr for p in cluster.procs]
    cpu0 = {n: _proc_cpu_s(pid) for n, pid in pids.items()}
    rows0 = {p.name: _rows_written(p.api_addr) for p in cluster.procs}
    sampler = Sampler(pids)
    sampler.start()
    load = ApiLoad(addrs, api_clients) if api_clients else None
    start = time.time()
    if load:
        with load:
            time.sleep(seconds)  # the measurement window itself (not a wait for a condition)
    else:
        time.sleep(seconds)
    end = time.time()
    sampler.stop_ev.set()
    cpu1 = {n: _proc_cpu_s(pid) for n, pid in pids.items()}
    rows1 = {p.name: _rows_written(p.api_addr) for p in cluster.procs}
    out = {"start": start, "end": end, "nodes": {
        n: {"cpu_per_s": round((cpu1[n] - cpu0[n]) / (end - start), 3),
            "rss_peak_mb": round(sampler.peak[n], 1),
            "sqlite_rows_per_s": None if rows0[n] is None or rows1[n] is None
            else round((rows1[n] - rows0[n]) / (end - start), 1)} for n in pids}}
    if load:
        out["api"] = dict(_summary_ms(load.lat), errors=load.errors, clients=api_clients,
                          requests_per_s=round(len(load.lat) / (end - start), 1))
    return out


def _lateness(cluster: Cluster, ids: list[str], start: float, end: float) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    addrs = [p.api_addr for p in cluster.procs]

    def fetch(i_tid):
        i, tid = i_tid
        st, runs = api(addrs[i % len(addrs)], "GET", f"/v1/tasks/{tid}/runs", timeout=120)
        if st != 200:
            raise RuntimeError(f"runs of {tid}: {st} {runs}")
        return runs

    with ThreadPoolExecutor(8) as pool:
        all_runs = list(pool.map(fetch, enumerate(ids)))
    late, not_run, over_grace = [], 0, 0
    statuses: dict[str, int] = {}
    for runs in all_runs:
        for r in runs:
            statuses[r.get("status")] = statuses.get(r.get("status"), 0) + 1
        by_slot: dict[int, float] = {}
        for r in runs:
            slot = r.get("slot")
            if isinstance(slot, str):
                from datetime import datetime
                slot = datetime.fromisoformat(slot.replace("Z", "+00:00")).timestamp()
            if r.get("attempt", 1) == 1 and r.get("started") is not None:
                by_slot[int(slot)] = min(by_slot.get(int(slot), 1e18), float(r["started"]))
        # slots due in the window (ending 3 s early: runs of the last slots may be unreplicated)
        for slot in range(int(start) + 1, int(end) - 3):
            s = by_slot.get(slot)
            if s is None:
                not_run += 1
            else:
                late.append(s - slot)
                over_grace += s - slot > GRACE_S
    return dict(_summary_ms(late), not_run=not_run, late_beyond_grace=over_grace, run_statuses=statuses)


def run_peerd(n_tasks: int, window_s: float, clients: int, warmup_s: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="peerd-load-"))
    cluster = Cluster(tmp, 3, profile="local")
    cluster.start()
    try:
        wait_converged(cluster, 90)
        ids = [f"load-{i:05d}" for i in range(n_tasks)]
        tasks = [{"id": t, "schedule": "@every 1s", "history": 300,
                  "command": {"type": "exec", "argv": ["/bin/true"]}} for t in ids]
        a = cluster.procs[0].api_addr
        for i in range(0, n_tasks, 250):
            st, body = api(a, "PUT", "/v1/tasks", tasks[i:i + 250], timeout=120)
            if st != 200:
                raise RuntimeError(f"apply: {st} {body}")
        wait_for(lambda: all(api(p.api_addr, "GET", "/v1/status")[1].get("tasks") == n_tasks
                             for p in cluster.procs), timeout=120, what="tasks everywhere", cluster=cluster)
        time.sleep(warmup_s)  # warm-up: takeovers settle, caches fill (part of the method)
        quiet = _window(cluster, window_s, 0)
        loaded = _window(cluster, window_s, clients)
        time.sleep(4)  # the last runs' records replicate before they are read
        quiet["fires"] = _lateness(cluster, ids, quiet["start"], quiet["end"])
        loaded["fires"] = _lateness(cluster, ids, loaded["start"], loaded["end"])
        return {"quiet": quiet, "api_load": loaded}
    finally:
        cluster.stop()


def run_apscheduler(n_tasks: int, window_s: float, workers: int) -> dict:
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from datetime import datetime, timedelta, timezone

    late: list[float] = []
    missed = [0]
    errors = [0]
    measuring = threading.Event()

    def job() -> float:
        t = time.time()
        subprocess.run(["/bin/true"], check=False)
        return t

    def on_event(ev) -> None:
        if not measuring.is_set():
            return
        if ev.code == EVENT_JOB_EXECUTED:
            late.append(ev.retval - ev.scheduled_run_time.timestamp())
        elif ev.code == EVENT_JOB_MISSED:
            missed[0] += 1
        else:
            errors[0] += 1

    s = BackgroundScheduler(executors={"default": ThreadPoolExecutor(workers)},
                            job_defaults={"coalesce": False, "misfire_grace_time": int(GRACE_S),
                                          "max_instances": 3})
    s.add_listener(on_event, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED | EVENT_JOB_ERROR)
    first = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)
    for i in range(n_tasks):
        s.add_job(job, "interval", seconds=1, start_date=first, id=f"j{i}")
    cpu0 = _proc_cpu_s(os.getpid())
    s.start()
    time.sleep(10)  # warm-up, as for peerd
    measuring.set()
    t0 = time.time()
    cpu_m0 = _proc_cpu_s(os.getpid())
    time.sleep(window_s)
    measuring.clear()
    t1 = time.time()
    cpu_m1 = _proc_cpu_s(os.getpid())
    s.shutdown(wait=True)
    del cpu0
    due = int(t1 - t0) * n_tasks
    return dict(_summary_ms(late), due_approx=due, missed=missed[0], errors=errors[0],
                late_beyond_grace=sum(x > GRACE_S for x in late), workers=workers,
                cpu_per_s=round((cpu_m1 - cpu_m0) / (t1 - t0), 3), rss_mb=round(_rss_mb(os.getpid()), 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--aps-workers", type=int, default=20)
    ap.add_argument("--no-aps", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/load.json"))
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                 "tasks": a.tasks, "window_s": a.window, "loadavg_before": os.getloadavg()}
    res["peerd"] = run_peerd(a.tasks, a.window, a.clients, a.warmup)
    if not a.no_aps:
        res["apscheduler"] = run_apscheduler(a.tasks, a.window, a.aps_workers)
    res["loadavg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
