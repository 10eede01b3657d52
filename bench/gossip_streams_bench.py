"""RSS of a real peerd node under hostile gossip stream connections.

Starts two ``peerd`` processes on loopback (LAN profile, sealed), then
attacks the first one's gossip port from this process, in phases, each with
``--conns`` connections open at once from ``--sources`` loopback source
addresses (127.0.1.1, ...):

* ``announce``: each connection announces a 4 MiB frame (4-byte length) and
  sends it in 64 KiB pieces until the node closes the connection (the
  attack that took a node from 88 to 425 MB with 64 connections);
* ``garbage_head``: each sends a frame of the largest head size (128 bytes)
  that looks sealed but opens under no key;
* ``idle``: each connects and sends nothing, until the node drops it.

The node's RSS (``VmRSS`` of ``/proc/PID/status``) is sampled every 50 ms.
After the attack, a task applied on the second node must reach the first one
(replication runs over the same, sealed streams) and its ``/metrics`` must
answer; ``peerd_gossip_streams_rejected_total`` is read from it.

The bound checked (and printed): peak RSS during every phase minus the RSS
before the attack <= ``--bound-mb`` (default 32 MB: 32 unauthenticated
slots x (128 + 64 KiB) = 2 MiB of buffers, plus a trio task and a socket
per connection in flight, plus the allocator's slack).

Usage::

    python bench/gossip_streams_bench.py [--conns 1000] [--sources 50]
        [--root DIR] [--out bench/results/gossip-streams.json]

``--root`` runs the node from another checkout of peerd (e.g. an export of
an older commit) for comparison; the attack and the measure are the same.
Linux only (reads /proc). Not a test: it prints figures and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import trio  # noqa: E402

from gossip.seal_shell import generate_key  # noqa: E402
from node.cli.demo import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
LEN = struct.Struct(">I")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def api(port: int, method: str, path: str, body=None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return raw if path == "/metrics" else json.loads(raw)


def wait(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for: {what}")


def start_node(root: Path, tmp: Path, name: str, gport: int, aport: int, seeds: str, key_file: Path):
    log = open(tmp / f"{name}.log", "wb")
    args = [
        sys.executable, "-m", "node.cli.daemon", "--name", name, "--bind", f"127.0.0.1:{gport}",
        "--api", f"127.0.0.1:{aport}", "--data-dir", str(tmp / name), "--key-file", str(key_file),
        "--api-token", TOKEN, "--profile", "lan", "--log-level", "warning",
    ]
    if seeds:
        args += ["--seeds", seeds]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.Popen(args, cwd=str(root), stdout=log, stderr=subprocess.STDOUT, env=env)


def rejected_by_reason(metrics_text: bytes) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.decode().splitlines():
        if line.startswith("peerd_gossip_streams_rejected_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


async def attack(phase: str, port: int, conns: int, sources: int, seed: int) -> dict:
    rng = random.Random(seed)
    stats = {"connected": 0, "connect_failed": 0, "closed_by_node": 0, "bytes_sent": 0}
    garbage = b"\x01" + rng.randbytes(127)
    chunk = rng.randbytes(64 * 1024)
    limit = trio.CapacityLimiter(conns)

    async def one(i: int) -> None:
        src = f"127.0.1.{i % sources + 1}"
        async with limit:
            try:
                with trio.fail_after(30):
                    s = await trio.open_tcp_stream("127.0.0.1", port, local_address=src)
            except (OSError, trio.TooSlowError):
                stats["connect_failed"] += 1
                return
            stats["connected"] += 1
            try:
                with trio.move_on_after(60):
                    if phase == "announce":
                        await s.send_all(LEN.pack(4 * 1024 * 1024))
                        for _ in range(64):  # 4 MiB in 64 KiB pieces
                            await s.send_all(chunk)
                            stats["bytes_sent"] += len(chunk)
                    elif phase == "garbage_head":
                        await s.send_all(LEN.pack(len(garbage)) + garbage)
                    while await s.receive_some(4096):  # until the node closes it
                        pass
                stats["closed_by_node"] += 1
            except (trio.BrokenResourceError, OSError):
                stats["closed_by_node"] += 1
            finally:
                await s.aclose()

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(one, i)
    stats["seconds"] = round(time.monotonic() - t0, 2)
    return stats


async def run_phase(phase: str, pid: int, port: int, conns: int, sources: int, seed: int) -> dict:
    samples: list[int] = []
    done = trio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append(rss_kb(pid))
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        stats = await attack(phase, port, conns, sources, seed)
        done.set()
    stats["rss_peak_kb"] = max(samples)
    stats["rss_samples"] = len(samples)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=50)
    ap.add_argument("--phases", default="announce,garbage_head,idle")
    ap.add_argument("--bound-mb", type=float, default=32.0)
    ap.add_argument("--root", type=Path, default=ROOT, help="peerd checkout to run the node from")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gossip-streams.json")
    args = ap.parse_args()
    print(f"SEED={args.seed} conns={args.conns} sources={args.sources} root={args.root}", flush=True)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.conns + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.conns + 64:
        raise SystemExit(f"open-file limit {want} is too low for {args.conns} connections")

    tmp = Path(tempfile.mkdtemp(prefix="peerd-streams-bench-"))
    key_file = tmp / "gossip.key"
    key_file.write_text(generate_key() + "\n")
    g1, a1, g2, a2 = free_ports(4)
    n1 = start_node(args.root, tmp, "n1", g1, a1, "", key_file)
    n2 = start_node(args.root, tmp, "n2", g2, a2, f"127.0.0.1:{g1}", key_file)
    result: dict = {"conns": args.conns, "sources": args.sources, "seed": args.seed, "root": str(args.root)}
    try:
        wait(lambda: len([m for m in api(a1, "GET", "/v1/members") if m["state"] == "alive"]) == 2,
             "two members alive")
        time.sleep(3.0)  # let start-up settle before the baseline
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.root, capture_output=True,
                                text=True).stdout.strip() or "unknown"
        result["commit"] = commit
        result["date"] = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        base = rss_kb(n1.pid)
        result["rss_before_kb"] = base
        print(f"node n1 pid {n1.pid}, RSS before: {base / 1024:.1f} MB", flush=True)
        result["phases"] = {}
        for i, phase in enumerate(p for p in args.phases.split(",") if p):
            st = trio.run(run_phase, phase, n1.pid, g1, args.conns, args.sources, args.seed + i)
            st["rss_after_kb"] = rss_kb(n1.pid)
            st["rss_growth_peak_mb"] = round((st["rss_peak_kb"] - base) / 1024, 1)
            result["phases"][phase] = st
            print(f"{phase:>13}: {st['connected']} connected ({st['connect_failed']} failed), "
                  f"{st['closed_by_node']} closed by the node, in {st['seconds']} s; RSS peak "
                  f"{st['rss_peak_kb'] / 1024:.1f} MB (+{st['rss_growth_peak_mb']} MB), after "
                  f"{st['rss_after_kb'] / 1024:.1f} MB", flush=True)
            if n1.poll() is not None:
                raise SystemExit(f"node n1 exited during {phase} (status {n1.returncode})")
        # the node still serves members: a task applied on n2 reaches n1 over sealed streams
        task = {"id": "bench-probe", "schedule": "@hourly", "command": {"type": "shell", "run": "true"}}
        t0 = time.monotonic()
        api(a2, "PUT", "/v1/tasks", [task])
        wait(lambda: any(t.get("id") == "bench-probe" for t in api(a1, "GET", "/v1/tasks")),
             "task replicated from n2 to n1 after the attack")
        result["replicated_after_attack_s"] = round(time.monotonic() - t0, 2)
        result["streams_rejected"] = rejected_by_reason(api(a1, "GET", "/metrics"))
        peak_growth = max(p["rss_growth_peak_mb"] for p in result["phases"].values())
        result["rss_growth_peak_mb"] = peak_growth
        result["bound_mb"] = args.bound_mb
        result["within_bound"] = peak_growth <= args.bound_mb
        print(f"replication n2 -> n1 after the attack: {result['replicated_after_attack_s']} s")
        print(f"streams rejected by n1: {json.dumps(result['streams_rejected'], sort_keys=True)}")
        print(f"peak RSS growth {peak_growth} MB; bound {args.bound_mb} MB: "
              f"{'within' if result['within_bound'] else 'OVER'}")
    finally:
        for p in (n1, n2):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (n1, n2):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    if not result.get("within_bound", False):
        sys.exit(1)


if __name__ == "__main__":
    main()
