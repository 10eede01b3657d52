"""Membership benchmark: N member processes on loopback, LAN profile, sealed.

For each implementation (peerd's ``gossip/``, and ``kinship`` from PyPI when
it is installed) and each N (default 16 and 48), in one run:

1. start N members (``bench/gossip_member.py``, one process each), all
   seeded with member 0; wait until every member sees the N-1 others alive;
2. steady state for ``--steady-s``: bytes on the wire per member per second,
   CPU per member (``/proc/PID/stat``), suspicions raised at rest;
3. a joiner starts: time from its ``starting`` line until every other member
   reported it joined;
4. SIGKILL one member: time to the first suspicion of it anywhere, and until
   every surviving member declared it dead;
5. (N = 16 only) freeze 3 members with SIGSTOP for 1.5 s every 5 s, for
   ``--freeze-cycles`` cycles plus a grace period: suspicions and deaths of
   members that never died ("false").

Bytes: when ``unshare -n`` works (root, Linux) the whole run happens in a
private network namespace, so the loopback counters (``/proc/net/dev``,
``/proc/net/snmp``) see only this run's traffic: IP-level bytes, UDP
datagrams and TCP segments, the same measure for both implementations.
peerd's own counters (sealed UDP payload bytes, TCP bytes, largest datagram)
come from its stats lines. kinship exposes no byte counters.

Usage:
    .venv/bin/python bench/gossip_bench.py [--sizes 16,48] [--impls peerd,kinship]
        [--steady-s 30] [--freeze-cycles 6] [--out bench/results/gossip.json]

Writes JSON to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEMBER = os.path.join(HERE, "gossip_member.py")
NETNS_ENV = "PEERD_BENCH_IN_NETNS"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- network namespace ---------------------------------------------------------


def maybe_reexec_in_netns(argv: list[str]) -> None:
    if os.environ.get(NETNS_ENV) or "--no-netns" in argv:
        return
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        log("unshare/ip not found: running in the shared network namespace")
        return
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True
    )
    if probe.returncode != 0:
        log(f"unshare -n failed ({probe.stderr.decode().strip()}): shared namespace")
        return
    env = dict(os.environ, **{NETNS_ENV: "1"})
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    inner = "ip link set lo up && exec " + " ".join(_q(c) for c in cmd)
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", inner], env)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def net_counters() -> dict[str, int]:
    out = {"lo_bytes": 0, "udp_out_datagrams": 0, "tcp_out_segs": 0}
    with open("/proc/net/dev") as fh:
        for line in fh:
            if line.strip().startswith("lo:"):
                fields = line.split(":", 1)[1].split()
                out["lo_bytes"] = int(fields[8])  # transmitted bytes (= received on lo)
    with open("/proc/net/snmp") as fh:
        lines = fh.read().splitlines()
    for i in range(0, len(lines) - 1, 2):
        keys, vals = lines[i].split(), lines[i + 1].split()
        table = dict(zip(keys[1:], map(int, vals[1:])))
        if keys[0] == "Udp:":
            out["udp_out_datagrams"] = table.get("OutDatagrams", 0)
        elif keys[0] == "Tcp:":
            out["tcp_out_segs"] = table.get("OutSegs", 0)
    return out


# -- member processes ------------------------------------------------------------


class Member:
    def __init__(self, name: str, port: int, impl: str, seeds: list[str], key_file: str) -> None:
        self.name = name
        self.port = port
        self.lines: list[dict] = []
        self.lock = threading.Lock()
        cmd = [
            sys.executable, MEMBER, name, f"127.0.0.1:{port}", "--impl", impl,
            "--key-file", key_file, "--config", "lan", "--stats-s", "1.0",
        ]
        if seeds:
            cmd += ["--seeds", ",".join(seeds)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.lines.append(obj)

    def events(self, kind: str | None = None, member: str | None = None, since: float = 0.0) -> list[dict]:
        with self.lock:
            return [
                e for e in self.lines
                if e["t"] >= since and (kind is None or e["ev"] == kind)
                and (member is None or e.get("member") == member)
            ]

    def first(self, kind: str, member: str | None = None, since: float = 0.0) -> dict | None:
        evs = self.events(kind, member, since)
        return evs[0] if evs else None

    def last_stats(self) -> dict | None:
        with self.lock:
            for e in reversed(self.lines):
                if e["ev"] == "stats":
                    return e
        return None

    def view(self) -> dict[str, str]:
        state: dict[str, str] = {}
        with self.lock:
            for e in self.lines:
                if e.get("member") in (None, self.name):
                    continue
                if "state" in e:  # e.g. suspect -> alive is an "update" event
                    state[e["member"]] = e["state"]
                elif e["ev"] in ("join", "suspect", "dead", "left"):
                    state[e["member"]] = {"join": "alive"}.get(e["ev"], e["ev"])
        return state

    def cpu_s(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass


def wait_until(cond, timeout_s: float, what: str, step_s: float = 0.02) -> float | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return time.time()
        time.sleep(step_s)
    log(f"timeout after {timeout_s} s: {what}")
    return None


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


# -- one run -------------------------------------------------------------------------


def run_one(impl: str, n: int, port_base: int, key_file: str, args) -> dict:
    log(f"== {impl} N={n}")
    result: dict = {"impl": impl, "n": n}
    members: list[Member] = []
    try:
        seed = Member("m000", port_base, impl, [], key_file)
        members.append(seed)
        if wait_until(lambda: seed.first("ready"), 30, "seed ready") is None:
            result["error"] = "seed did not start"
            return result
        seeds = [f"127.0.0.1:{port_base}"]
        for i in range(1, n):
            members.append(Member(f"m{i:03d}", port_base + i, impl, seeds, key_file))
            time.sleep(0.05)  # stagger interpreter start-up on small machines
        t0 = time.time()

        def converged(ms=members):
            names = {m.name for m in ms}
            for m in ms:
                v = m.view()
                if any(v.get(x) != "alive" for x in names - {m.name}):
                    return False
            return True

        t = wait_until(converged, 180, f"{n} members converge", step_s=0.2)
        result["converge_s"] = None if t is None else round(t - t0, 2)
        if t is None:
            result["error"] = "did not converge"
            return result
        time.sleep(args.settle_s)

        # -- steady state ----------------------------------------------------------
        net0, cpu0, tw0 = net_counters(), [m.cpu_s() for m in members], time.time()
        st0 = [m.last_stats() or {} for m in members]
        time.sleep(args.steady_s)
        net1, cpu1, tw1 = net_counters(), [m.cpu_s() for m in members], time.time()
        st1 = [m.last_stats() or {} for m in members]
        window = tw1 - tw0
        steady = {
            "window_s": round(window, 1),
            "cpu_pct_per_member": round(100 * (sum(cpu1) - sum(cpu0)) / n / window, 3),
            "cpu_pct_per_member_max": round(100 * max(b - a for a, b in zip(cpu0, cpu1)) / window, 3),
            "lo_bytes_per_member_s": round((net1["lo_bytes"] - net0["lo_bytes"]) / n / window, 1),
            "udp_datagrams_per_member_s": round(
                (net1["udp_out_datagrams"] - net0["udp_out_datagrams"]) / n / window, 2),
            "tcp_segments_per_member_s": round((net1["tcp_out_segs"] - net0["tcp_out_segs"]) / n / window, 2),
            "suspicions_at_rest": sum(len(m.events("suspect", since=tw0)) for m in members),
        }
        if impl == "peerd":
            def delta(key):
                return sum(b.get(key, 0) - a.get(key, 0) for a, b in zip(st0, st1)) / n / window
            steady["udp_payload_bytes_out_per_member_s"] = round(delta("udp_out"), 1)
            steady["tcp_bytes_out_per_member_s"] = round(delta("tcp_out"), 1)
        result["steady"] = steady
        log(f"steady: {steady}")

        # -- joiner --------------------------------------------------------------
        joiner = Member(f"m{n:03d}", port_base + n, impl, seeds, key_file)
        wait_until(lambda: joiner.first("starting"), 30, "joiner starting")
        others = list(members)
        members.append(joiner)

        def joined():
            return all(m.first("join", joiner.name) for m in others)

        t = wait_until(joined, 60, "joiner known by all")
        start = joiner.first("starting")
        if t is not None and start is not None:
            last = max(m.first("join", joiner.name)["t"] for m in others)
            ready = joiner.first("ready")
            result["join_known_by_all_s"] = round(last - start["t"], 3)
            result["join_known_by_all_from_ready_s"] = round(last - ready["t"], 3) if ready else None
        else:
            result["join_known_by_all_s"] = None
        wait_until(lambda: converged(members), 60, "converged with joiner", step_s=0.2)
        time.sleep(2.0)

        # -- crash -----------------------------------------------------------------
        victim = members[3]
        survivors = [m for m in members if m is not victim]
        t_kill = time.time()
        victim.signal(signal.SIGKILL)
        victim.proc.wait()

        def dead_everywhere():
            return all(m.first("dead", victim.name, t_kill) for m in survivors)

        t = wait_until(dead_everywhere, args.detect_timeout_s, "victim dead everywhere", step_s=0.05)
        susp = [e["t"] for m in survivors for e in m.events("suspect", victim.name, t_kill)]
        deads = [m.first("dead", victim.name, t_kill) for m in survivors]
        dead_t = [d["t"] - t_kill for d in deads if d]
        result["first_suspicion_s"] = round(min(susp) - t_kill, 3) if susp else None
        result["dead_at_first_member_s"] = round(min(dead_t), 3) if dead_t else None
        result["dead_at_all_s"] = round(max(dead_t), 3) if t is not None else None
        result["dead_members_reporting"] = f"{len(dead_t)}/{len(survivors)}"
        log(f"crash: first suspicion {result['first_suspicion_s']} s, dead at all {result['dead_at_all_s']} s")

        # -- freezes ------------------------------------------------------------------
        if n == args.freeze_n and args.freeze_cycles > 0:
            time.sleep(2.0)
            frozen = survivors[5:8]
            t_f = time.time()
            for _ in range(args.freeze_cycles):
                for m in frozen:
                    m.signal(signal.SIGSTOP)
                time.sleep(1.5)
                for m in frozen:
                    m.signal(signal.SIGCONT)
                time.sleep(3.5)
            time.sleep(args.freeze_grace_s)
            frozen_names = {m.name for m in frozen}
            susp_ev = [(m.name, e) for m in survivors for e in m.events("suspect", since=t_f)
                       if e["member"] != victim.name]
            dead_ev = [(m.name, e) for m in survivors for e in m.events("dead", since=t_f)
                       if e["member"] != victim.name]
            result["freeze"] = {
                "frozen": sorted(frozen_names),
                "cycles": args.freeze_cycles,
                "stop_s": 1.5,
                "period_s": 5.0,
                "false_suspicions": len(susp_ev),
                "false_suspicions_of_frozen": sum(1 for _, e in susp_ev if e["member"] in frozen_names),
                "false_suspicions_by_frozen": sum(1 for o, _ in susp_ev if o in frozen_names),
                "false_deaths": len(dead_ev),
                "members_ever_dead": sorted({e["member"] for _, e in dead_ev}),
            }
            log(f"freeze: {result['freeze']}")

        if impl == "peerd":
            maxes = [(m.last_stats() or {}).get("max_datagram", 0) for m in members if m is not victim]
            result["max_datagram_bytes"] = max(maxes) if maxes else None
            result["oversized_sends"] = sum((m.last_stats() or {}).get("oversized_sends", 0) for m in members)
        return result
    finally:
        for m in members:
            m.signal(signal.SIGCONT)
            m.signal(signal.SIGTERM)
        deadline = time.time() + 5
        for m in members:
            try:
                m.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                m.signal(signal.SIGKILL)
                m.proc.wait()


def kinship_available() -> str | None:
    r = subprocess.run([sys.executable, "-c", "import kinship; print(kinship.__version__)"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def summarize(results: list[dict]) -> list[dict]:
    """Median of each figure per (impl, N) over the repetitions."""
    import statistics

    out = []
    keys = sorted({(r["impl"], r["n"]) for r in results}, key=lambda k: (k[1], k[0]))
    for impl, n in keys:
        rs = [r for r in results if r["impl"] == impl and r["n"] == n]

        def med(get):
            vals = [v for v in (get(r) for r in rs) if isinstance(v, (int, float))]
            return round(statistics.median(vals), 3) if vals else None

        row: dict = {"impl": impl, "n": n, "runs": len(rs)}
        for k in ("first_suspicion_s", "dead_at_all_s", "join_known_by_all_s", "converge_s"):
            row[k] = med(lambda r, k=k: r.get(k))
        row["steady"] = {
            k: med(lambda r, k=k: r.get("steady", {}).get(k))
            for k in ("lo_bytes_per_member_s", "udp_datagrams_per_member_s",
                      "udp_payload_bytes_out_per_member_s", "tcp_bytes_out_per_member_s",
                      "cpu_pct_per_member", "suspicions_at_rest")
        }
        row["steady"] = {k: v for k, v in row["steady"].items() if v is not None}
        if any("freeze" in r for r in rs):
            row["freeze"] = {
                "false_suspicions": med(lambda r: r.get("freeze", {}).get("false_suspicions")),
                "false_deaths": max(r.get("freeze", {}).get("false_deaths", 0) for r in rs),
            }
        out.append(row)
    return out


def print_table(results: list[dict]) -> None:
    cols = [
        ("impl", lambda r: r["impl"]),
        ("N", lambda r: r["n"]),
        ("1st susp s", lambda r: r.get("first_suspicion_s")),
        ("dead@all s", lambda r: r.get("dead_at_all_s")),
        ("join s", lambda r: r.get("join_known_by_all_s")),
        ("lo B/s/mbr", lambda r: r.get("steady", {}).get("lo_bytes_per_member_s")),
        ("udp dg/s/mbr", lambda r: r.get("steady", {}).get("udp_datagrams_per_member_s")),
        ("udp B/s/mbr*", lambda r: r.get("steady", {}).get("udp_payload_bytes_out_per_member_s", "-")),
        ("tcp B/s/mbr*", lambda r: r.get("steady", {}).get("tcp_bytes_out_per_member_s", "-")),
        ("cpu %/mbr", lambda r: r.get("steady", {}).get("cpu_pct_per_member")),
        ("frz susp", lambda r: r.get("freeze", {}).get("false_suspicions", "-")),
        ("frz dead", lambda r: r.get("freeze", {}).get("false_deaths", "-")),
    ]
    rows = [[name for name, _ in cols]] + [[str(f(r)) for _, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("* peerd's own counters (sealed UDP payload / TCP bytes sent); lo = IP bytes on loopback")


def main() -> None:
    argv = sys.argv[1:]
    maybe_reexec_in_netns(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="16,48")
    p.add_argument("--impls", default="peerd,kinship")
    p.add_argument("--steady-s", type=float, default=30.0)
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--detect-timeout-s", type=float, default=90.0)
    p.add_argument("--freeze-n", type=int, default=16)
    p.add_argument("--freeze-cycles", type=int, default=6)
    p.add_argument("--freeze-grace-s", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gossip.json"))
    p.add_argument("--repeat", type=int, default=1, help="runs per (N, implementation)")
    p.add_argument("--no-netns", action="store_true")
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    impls = [s for s in args.impls.split(",") if s]
    kin = kinship_available()
    notes = []
    if "kinship" in impls and kin is None:
        notes.append("kinship is not installed (pip install kinship); skipped")
        impls = [i for i in impls if i != "kinship"]
    in_netns = bool(os.environ.get(NETNS_ENV))
    if not in_netns:
        notes.append("shared network namespace: loopback counters include other traffic")

    key_dir = tempfile.mkdtemp(prefix="gossip-bench-")
    key_file = os.path.join(key_dir, "key")
    with open(key_file, "w") as fh:
        fh.write(base64.b64encode(os.urandom(32)).decode() + "\n")

    results = []
    port_base = 31000
    started = time.time()
    try:
        for rep in range(args.repeat):
            for n in sizes:
                for impl in impls:  # alternate implementations so drift hits both
                    r = run_one(impl, n, port_base, key_file, args)
                    r["rep"] = rep
                    results.append(r)
                    port_base += 200
                    time.sleep(1.0)
    finally:
        shutil.rmtree(key_dir, ignore_errors=True)
    doc = {
        "command": "python bench/gossip_bench.py " + " ".join(argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kinship_version": kin,
        "private_netns": in_netns,
        "profile": "lan",
        "notes": notes,
        "results": results,
        "summary": summarize(results),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print_table(results)
    if args.repeat > 1:
        print("medians:")
        print_table(doc["summary"])
    for note in notes:
        print("note:", note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
