"""RSS and database size of real peerd nodes whose tasks print a lot.

Starts ``--nodes`` ``peerd`` processes on loopback (local profile, sealed,
each with its own SQLite data dir), applies ``--tasks`` tasks ``@every 1s``
that each print ``--output-kib`` KiB (``head -c`` of a per-task text file:
one process per run), and samples every ``--every-s`` seconds, for
``--minutes`` minutes:

* ``VmRSS`` of every node (``/proc/PID/status``);
* the size of node 1's database (``state.db`` + ``-wal``);
* from node 1's ``/metrics``: ``peerd_run_record_bytes{kind}``,
  ``peerd_run_records_trimmed_total{what}``, ``peerd_store_run_records``.

With the default ``history`` (100) and 3 replicas, every node holds
``tasks x 100`` records and would hold ``tasks x 100 x 64 KiB`` of outputs
(640 MiB for 100 tasks) without the budget; ``run_records_max_bytes``
(``--budget-mib``, default the node's 256 MiB) bounds them on disk, and
records hold no output in memory, so RSS must level off once every task
has ``history`` records (after ``history`` seconds).

At the end the output of a recent run is read back from each node through
``GET /v1/tasks/{id}/runs`` (replicas hold outputs too), then the nodes are
stopped. Figures are printed and written as JSON (``--out``).

Usage::

    python bench/output_bench.py [--minutes 10] [--tasks 100] [--nodes 3]
        [--budget-mib 256] [--out bench/results/outputs.json]

Linux only (reads /proc). Not a test: it prints figures and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gossip.seal_shell import generate_key  # noqa: E402
from node.cli.demo import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def api(port: int, method: str, path: str, body=None, timeout: float = 30.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return raw if path == "/metrics" else json.loads(raw)


def wait(cond, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for: {what}")


def metric_values(text: bytes, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith(names):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


def db_bytes(data_dir: Path) -> int:
    return sum(os.path.getsize(data_dir / f) for f in ("state.db", "state.db-wal") if (data_dir / f).exists())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--output-kib", type=int, default=64)
    ap.add_argument("--budget-mib", type=float, default=0.0, help="run_records_max_bytes in MiB (0: default)")
    ap.add_argument("--every-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "outputs.json"))
    args = ap.parse_args()
    print(f"output_bench: seed={args.seed} minutes={args.minutes} tasks={args.tasks} nodes={args.nodes} "
          f"output={args.output_kib} KiB budget_mib={args.budget_mib or 'default'}", flush=True)
    rng = random.Random(args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="peerd-output-bench-"))
    key_file = tmp / "gossip.key"
    key_file.write_text(generate_key() + "\n")
    files = tmp / "outputs"
    files.mkdir()
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 \n"
    for t in range(args.tasks):
        (files / f"t{t:03d}.txt").write_text("".join(rng.choice(alphabet) for _ in range(args.output_kib * 1024)))
    flat = free_ports(2 * args.nodes)
    ports = list(zip(flat[::2], flat[1::2]))
    seeds = ",".join(f"127.0.0.1:{g}" for g, _ in ports[:2])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.budget_mib:
        env["PEERD_RUN_RECORDS_MAX_BYTES"] = str(int(args.budget_mib * 1024 * 1024))
    procs = []
    for i, (g, a) in enumerate(ports):
        name = f"n{i + 1}"
        log = open(tmp / f"{name}.log", "wb")
        procs.append((name, a, tmp / name, subprocess.Popen(
            [sys.executable, "-m", "node.cli.daemon", "--name", name, "--bind", f"127.0.0.1:{g}",
             "--api", f"127.0.0.1:{a}", "--seeds", seeds, "--data-dir", str(tmp / name),
             "--key-file", str(key_file), "--api-token", TOKEN, "--profile", "local", "--log-level", "info"],
            cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env=env)))
    samples: list[dict] = []
    result: dict = {}
    try:
        for _, a, _, _ in procs:
            wait(lambda a=a: len([m for m in api(a, "GET", "/v1/members") if m["state"] == "alive"]) == args.nodes,
                 "every node sees every node alive")
        tasks = [{"id": f"t{t:03d}", "schedule": "@every 1s",
                  "command": {"type": "exec", "argv": ["head", "-c", str(args.output_kib * 1024),
                                                       str(files / f"t{t:03d}.txt")]}}
                 for t in range(args.tasks)]
        api(procs[0][1], "PUT", "/v1/tasks", tasks)
        n1 = procs[0]
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        names = ("peerd_run_record_bytes", "peerd_run_records_trimmed_total", "peerd_store_run_records",
                 "peerd_runs_total", "peerd_gossip_streams_rejected_total", "peerd_replication_updates_total",
                 "peerd_antientropy_rounds_total")
        while time.monotonic() < end:
            for name, _, _, p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}: see {tmp}/{name}.log")
            try:
                m = metric_values(api(n1[1], "GET", "/metrics"), names)
            except OSError as e:
                m = {"error": str(e)}
            s = {"t_s": round(time.monotonic() - t0, 1),
                 "rss_mb": {name: round(rss_kb(p.pid) / 1024, 1) for name, _, _, p in procs},
                 "db_mb": round(db_bytes(n1[2]) / 2**20, 1), "metrics": m}
            samples.append(s)
            outs = m.get('peerd_run_record_bytes{kind="outputs"}', 0) / 2**20
            trimmed = m.get('peerd_run_records_trimmed_total{what="output"}', 0)
            print(f"t={s['t_s']:6.0f}s rss={s['rss_mb']} db(n1)={s['db_mb']} MB "
                  f"records={m.get('peerd_store_run_records', 0):.0f} outputs={outs:.0f} MiB "
                  f"trimmed={trimmed:.0f}", flush=True)
            time.sleep(max(0.0, min(args.every_s, end - time.monotonic())))
        # a recent run's output, read from every node (owner or replica)
        reads = {}
        for t in ("t000", f"t{args.tasks - 1:03d}"):
            for name, a, _, _ in procs:
                runs = api(a, "GET", f"/v1/tasks/{t}/runs")
                done = [r for r in runs if r["status"] == "succeeded"]
                last = done[-1] if done else {}
                reads[f"{t}@{name}"] = {"runs": len(runs), "last_output_bytes": len(last.get("output") or ""),
                                        "last_run_node": last.get("node")}
        # leveling off: growth of RSS over the second half of the run
        half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2]
        first_half_end = half[0] if half else samples[0]

        def growth(key):
            return {name: round(samples[-1]["rss_mb"][name] - first_half_end["rss_mb"][name], 1)
                    for name, _, _, _ in procs} if key == "rss" else round(samples[-1]["db_mb"] - first_half_end["db_mb"], 1)
        result = {
            "bench": "output_bench", "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit,
            "args": vars(args), "cpus": os.cpu_count(),
            "rss_mb_max": {name: max(s["rss_mb"][name] for s in samples) for name, _, _, _ in procs},
            "rss_mb_end": samples[-1]["rss_mb"], "rss_growth_second_half_mb": growth("rss"),
            "db_mb_max": max(s["db_mb"] for s in samples), "db_mb_end": samples[-1]["db_mb"],
            "db_growth_second_half_mb": growth("db"),
            "metrics_end": samples[-1]["metrics"], "reads": reads, "samples": samples,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1), flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    finally:
        for _, _, _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, _, _, p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if result and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} for its logs")


if __name__ == "__main__":
    main()
