"""``peersim``: run the deterministic cluster simulator from the shell.

``peersim run --nodes N --duration SECONDS --seed S [--loss P]
[--scenario steady|crash|partition|flaky|pause|churn] [--json FILE]
[--profile lan|local] [--compiled] [--plot FILE.png]``

Like TigerBeetle's VOPR, a run prints ``SEED=`` and every derived parameter
first, then the report. The checkers run at the end; when one fails the run
prints the seed and the one-line command that replays it, and exits 1.
Exit status: 0 all invariants held, 1 an invariant failed, 2 bad arguments
(or ``--compiled`` without a fresh build: ``python -m sim.accel build``).

``--compiled`` re-executes the same command with the mypyc build of
sim/accel.py first on ``PYTHONPATH``; results are identical (same
trace_hash), only faster. The report says ``compiled: true`` and lists the
compiled modules that were loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys

from sim.accel import ENV_MARKER, compiled_modules, huge_page_stats, install_huge_pages
from sim.scenarios import SCENARIOS

__all__ = ["main", "build_parser", "replay_command", "parse_window"]


DESCRIPTION = """\
Deterministic in-process simulator for peerd membership (SWIM + Lifeguard).
Drives the real gossip cores and sealers over a virtual network with a
virtual clock: one seed and the same arguments give the same trace, byte for
byte (trace_hash proves it).

scenarios:
  steady     no faults
  crash      10% of the nodes crash at 1/3 of the run
  partition  two random halves are cut apart from 1/3 to 2/3, then heal
  flaky      loss on every link (--loss, default 0.05)
  pause      10% of the nodes stall for 1.5-3 s each at random times
  churn      nodes keep leaving, crashing and coming back

Every scenario heals at 80% of the run (liveness phase); then the checkers
require converged views, and no false DEAD in steady/crash/churn without
loss.
"""

EPILOG = """\
examples:
  peersim run --nodes 20 --duration 60 --seed 1 --scenario crash --profile local
  peersim run --nodes 1000 --duration 600 --seed 7 --json bench/results/run.json
  peersim run --nodes 100 --duration 300 --seed 3 --scenario flaky --loss 0.2
  peersim run --nodes 6 --duration 60 --seed 3 --scenario partition --tasks 5 --fencing
  python -m sim.accel build && peersim run --nodes 1000 --duration 600 --seed 1 --compiled
  peersim run --nodes 30 --duration 120 --seed 1 --scenario churn --profile local --plot churn.png

JSON keys: seed, nodes, virtual_seconds, wall_seconds, trace_hash,
detection_latency_s {p50,p99,max}, false_positives, dissemination_rounds
{p50,p99}, msgs_per_node_per_s, bytes_per_node_per_s, converged,
convergence_s, slots_due/slots_fired/duplicate_fires/missed_slots (with
--tasks N: the scheduler, store and ring ride on every simulated node; add
--fencing for etcd claims; null without --tasks), compiled (true with
--compiled), compiled_modules (the compiled modules loaded) and huge_pages
(the huge-page arena counters of a compiled run, null when off), plus diagnostics.
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {v}")
    return v


def parse_window(text: str) -> tuple[float, float]:
    """``FROM,TO`` virtual seconds (``--load-window``, ``sim.bench load --window``)."""
    parts = text.split(",")
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FROM,TO in virtual seconds") from None
    if not (0 <= a < b) or b == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= FROM < TO (finite)")
    return (a, b)


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("seed must be >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peersim", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="simulate one cluster run and check invariants",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--nodes", type=_positive_int, required=True, metavar="N",
                   help="cluster size")
    r.add_argument("--duration", type=_positive_float, required=True, metavar="SECONDS",
                   help="virtual seconds to simulate")
    r.add_argument("--seed", type=_seed, default=None, metavar="S",
                   help="root seed (default: random, printed first so the run can be replayed)")
    r.add_argument("--scenario", choices=sorted(SCENARIOS), default="steady",
                   help="fault schedule (default steady)")
    r.add_argument("--loss", type=_probability, default=None, metavar="P",
                   help="datagram loss probability on every link until the liveness phase "
                        "(default 0; flaky: 0.05)")
    r.add_argument("--profile", choices=("lan", "local"), default="lan",
                   help="gossip Config profile: lan (memberlist defaults, default) or local (fast timers)")
    r.add_argument("--bootstrap", choices=("join", "warm", "settled"), default="join",
                   help="join: every node joins through the seeds at t=0 (default); warm: start "
                        "with every join push-pull already done (skips the N^2 log N join storm); "
                        "settled: warm, and the joins' re-broadcasts already sent (steady state "
                        "from t=0)")
    r.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON to FILE")
    r.add_argument("--load-window", type=parse_window, default=None, metavar="FROM,TO",
                   help="also report msgs and bytes per member per s between these virtual "
                        "seconds (JSON key load_window), e.g. 100,300: steady state after a warm "
                        "start has drained")
    r.add_argument("--quiet", action="store_true", help="print only the seed line and the verdict")
    r.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw the run into a PNG (sim/plot.py: members as each node sees them, the "
                        "fault schedule, detection and dissemination histograms, task slots with --tasks); "
                        "needs matplotlib (pip install 'peerd[plot]'); the run itself is unchanged")
    r.add_argument("--tasks", type=int, default=0, metavar="N",
                   help="run the scheduler app (sim/app.py) with N tasks (@every 1s / 5s) and report "
                        "slots_due, slots_fired, duplicate_fires, missed_slots (default 0: membership only)")
    r.add_argument("--fencing", action="store_true",
                   help="with --tasks: claim every slot in a modelled etcd before firing")
    r.add_argument("--compiled", action="store_true",
                   help="run with the mypyc-compiled gossip modules (build first: "
                        "python -m sim.accel build); same trace, less wall time")
    r.add_argument("--accel-dir", default=None, metavar="DIR",
                   help="with --compiled: the build directory (default build/accel)")
    return p


def replay_command(args: argparse.Namespace, seed: int) -> str:
    """The one-line command that replays a run."""
    parts = ["peersim", "run", "--nodes", str(args.nodes), "--duration", f"{args.duration:g}",
             "--seed", str(seed), "--scenario", args.scenario, "--profile", args.profile]
    if args.loss is not None:
        parts += ["--loss", f"{args.loss:g}"]
    if getattr(args, "tasks", 0):
        parts += ["--tasks", str(args.tasks)] + (["--fencing"] if args.fencing else [])
    if getattr(args, "bootstrap", "join") != "join":
        parts += ["--bootstrap", args.bootstrap]
    if getattr(args, "load_window", None):
        parts += ["--load-window", "%g,%g" % args.load_window]
    return " ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _print_header(args, seed: int, config, net_opts, cluster_opts, schedule) -> None:
    print(f"SEED={seed}")
    print(f"replay: {replay_command(args, seed)}")
    print(f"nodes={args.nodes} duration_s={args.duration:g} scenario={args.scenario} "
          f"profile={args.profile} loss={args.loss if args.loss is not None else 'default'}")
    skip = {"network", "nodes", "seed"}
    print("cluster: " + " ".join(f"{f.name}={getattr(cluster_opts, f.name)}"
                                 for f in dataclasses.fields(cluster_opts) if f.name not in skip))
    print("network: " + " ".join(f"{f.name}={getattr(net_opts, f.name)}"
                                 for f in dataclasses.fields(net_opts)))
    print("config: " + " ".join(f"{f.name}={getattr(config, f.name)}"
                                for f in dataclasses.fields(config)))
    by_kind: dict[str, list] = {}
    for f in schedule:
        by_kind.setdefault(f.kind, []).append(f)
    print(f"schedule: {len(schedule)} fault(s)")
    for kind in sorted(by_kind):
        fs = by_kind[kind]
        shown = ", ".join(f"{f.at_s:.2f}s" + (f" {f.node}" if f.node else "")
                          + (f" {f.args[0]:.2f}s" if kind == "pause" else "")
                          + (f" p={f.args[0]}" if kind == "loss" else "")
                          + (f" sizes={[len(g) for g in f.args[0]]}" if kind == "partition" else "")
                          for f in fs[:8])
        more = f" ... (+{len(fs) - 8})" if len(fs) > 8 else ""
        print(f"  {kind:<9} x{len(fs)}: {shown}{more}")
    sys.stdout.flush()


def _print_report(r: dict) -> None:
    d = r["detection_latency_s"]
    s = r["first_suspicion_s"]
    dr = r["dissemination_rounds"]
    ddr = r["dead_dissemination_rounds"]
    print("report:")
    print(f"  simulated           {r['nodes']} nodes x {r['virtual_seconds']:g} s in "
          f"{r['wall_seconds']:.2f} s wall ({_fmt(r['node_seconds_per_wall_second'])} node-s/s, "
          f"{r['stats']['events']} events)")
    print(f"  trace_hash          {r['trace_hash']}")
    print(f"  detection latency   p50 {_fmt(d['p50'])} s  p99 {_fmt(d['p99'])} s  max {_fmt(d['max'])} s"
          f"  ({r['detections']} detections, {r['undetected']} undetected)")
    print(f"  first suspicion     p50 {_fmt(s['p50'])} s  p99 {_fmt(s['p99'])} s")
    print(f"  false positives     {r['false_positives']} dead ({r['false_positives_paused']} of paused members), "
          f"{r['false_suspicions']} suspect ({r['false_suspicions_paused']} of paused members)")
    print(f"  dissemination       p50 {_fmt(dr['p50'])}  p99 {_fmt(dr['p99'])} rounds "
          f"({r['dissemination_updates']} updates, {r['dissemination_incomplete']} incomplete); "
          f"DEAD spread p50 {_fmt(ddr['p50'])} p99 {_fmt(ddr['p99'])} rounds")
    print(f"  load per node       {_fmt(r['msgs_per_node_per_s'])} msgs/s  {_fmt(r['bytes_per_node_per_s'])} B/s "
          f"(from t={_fmt(r['measure_start_s'])} s)")
    lw = r.get("load_window")
    if lw:
        print(f"  load in window      {_fmt(lw['msgs_per_node_per_s'])} msgs/s  "
              f"{_fmt(lw['bytes_per_node_per_s'])} B/s (t={lw['from_s']:g}..{lw['to_s']:g} s)")
    print(f"  converged           {r['converged']}  convergence_s {_fmt(r['convergence_s'])} "
          f"(last fault {r['last_fault_s']:g} s, first converged {_fmt(r['first_converged_s'])} s)")
    print(f"  drops               {r['drops'] or '{}'}   rejected {r['stats']['rejected'] or '{}'}")
    st = r["stats"]
    print(f"  push-pull           {st['pp_ok']} ok, {st['pp_failed']} failed; "
          f"paused deliveries deferred {st['paused_deferred']}")


def _reexec_compiled(argv: list[str], build_dir: str | None, *, module: str = "sim.cli",
                     prog: str = "peersim") -> int:
    """Run ``python -m module argv`` (without ``--compiled``) again in a child
    interpreter with the fresh mypyc build first on PYTHONPATH; its exit
    status, or 2 when no fresh build exists."""
    from sim import accel

    root = accel.repo_root()
    reason = accel.stale_reason(root, build_dir)  # hashes every source once
    if reason is not None:
        where = f" --dir {build_dir}" if build_dir else ""
        print(f"{prog}: --compiled: {reason}; build it with: "
              f"cd {root} && {sys.executable} -m sim.accel build{where}", file=sys.stderr)
        return 2
    path = str(accel.build_dir_of(root, build_dir).resolve())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env[accel.ENV_MARKER] = path
    env[accel.REPO_ENV] = str(root.resolve())
    if env.get(accel.HUGEPAGES_ENV, "1") != "0":
        # glibc >= 2.35: malloc's own heap (objects over 512 B: dict tables,
        # datagrams) on transparent huge pages too; older glibc ignores it
        tunables = env.get("GLIBC_TUNABLES", "")
        if "glibc.malloc.hugetlb" not in tunables:
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, accel.MALLOC_HUGETLB]))
    sys.stdout.flush()
    sys.stderr.flush()
    child = [a for a in argv if a != "--compiled"]
    import subprocess
    # -P: no cwd/script dir ahead of PYTHONPATH, or a run from the repo root
    # would import the interpreted sources instead of the build
    return subprocess.run([sys.executable, "-P", "-m", module, *child], env=env).returncode


def cmd_run(args: argparse.Namespace) -> int:
    from gossip.config import Config
    from sim.cluster import Cluster, ClusterOptions, node_names
    from sim.loop import child_rng
    from sim.network import NetworkOptions
    from sim.scenarios import build, check_invariants

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**63)
    config = Config.lan() if args.profile == "lan" else Config.local()
    net_opts = NetworkOptions()
    cluster_opts = ClusterOptions(nodes=args.nodes, seed=seed, network=net_opts,
                                  bootstrap=args.bootstrap, load_window_s=args.load_window)
    schedule = build(args.scenario, node_names(args.nodes), args.duration,
                     child_rng(seed, "scenario"), loss=args.loss)
    if args.fencing and not args.tasks:
        print("peersim: --fencing needs --tasks N", file=sys.stderr)
        return 2
    if args.plot:
        from sim import plot
        missing = plot.require_matplotlib()
        if missing:
            print(f"peersim: {missing}", file=sys.stderr)
            return 2
    cluster: Cluster
    if args.tasks:
        from sim.app_run import build_app_cluster
        cluster = build_app_cluster(config, cluster_opts, schedule, duration_s=args.duration,
                                    tasks=args.tasks, fencing=args.fencing,
                                    catchup_margin_s=min(10.0, args.duration / 4),
                                    start_s=min(10.0, args.duration / 4))
        cluster_opts = cluster.options  # wall clocks within 50 ms (see build_app_cluster)
    else:
        cluster = Cluster(config, cluster_opts, schedule)
    if args.quiet:
        print(f"SEED={seed}")
    else:
        # derived values, as the run will use them
        cluster_opts = dataclasses.replace(cluster_opts, update_interval_s=cluster.update_interval_s)
        _print_header(args, seed, config, cluster.net.options, cluster_opts, schedule)
    recorder = None
    if args.plot:
        recorder = plot.Recorder(cluster, args.duration)  # reads the run, changes nothing
    report = cluster.run(args.duration)
    report["scenario"] = args.scenario
    report["profile"] = args.profile
    report["loss"] = args.loss
    loss = args.loss if args.loss is not None else (0.05 if args.scenario == "flaky" else 0.0)
    failures = check_invariants(report, scenario=args.scenario, loss=loss)
    if args.tasks:
        from sim.app import AppCluster
        from sim.app_run import app_report
        assert isinstance(cluster, AppCluster)
        app_report(cluster, report)
        failures += report["violations"]
    report["invariants_failed"] = failures
    report["replay"] = replay_command(args, seed)
    compiled = compiled_modules()
    report["compiled"] = bool(compiled)
    report["compiled_modules"] = compiled
    report["huge_pages"] = huge_page_stats() if compiled else None
    if not args.quiet:
        _print_report(report)
        if compiled:
            print(f"  compiled (mypyc)    {', '.join(compiled)}")
            hp = report["huge_pages"]
            print("  huge-page arenas    " + (f"{hp['arenas_in_range']} arenas of {hp['arena_bytes'] >> 10} KiB"
                                            if hp else "off"))
        if args.tasks:
            print(f"  slots               due {report['slots_due']}  fired {report['slots_fired']}  "
                  f"duplicate_fires {report['duplicate_fires']} (reclaims {report['reclaim_duplicates']})  "
                  f"missed {report['missed_slots']}  fencing {args.fencing}")
    if recorder is not None:
        recorder.finish()
        try:
            plot.write_plot(args.plot, recorder, report)
        except OSError as exc:
            print(f"peersim: cannot write --plot {args.plot}: {exc}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"  plot                {args.plot}")
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2, sort_keys=False, default=str)
                fh.write("\n")
        except OSError as exc:
            print(f"peersim: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return 2
    if failures:
        print("INVARIANT FAILED:")
        for f in failures:
            print(f"  - {f}")
        print(f"SEED={seed}")
        print(f"replay: {replay_command(args, seed)}")
        return 1
    print("invariants: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.print_help()
        return 2
    if args.compiled and not os.environ.get(ENV_MARKER):
        return _reexec_compiled(argv, args.accel_dir)
    if os.environ.get(ENV_MARKER):
        import gossip.swim
        if not gossip.swim.__file__.endswith(".so") and not gossip.swim.__file__.endswith(".pyd"):
            print(f"peersim: --compiled: gossip.swim loaded from {gossip.swim.__file__}, not from "
                  f"the build {os.environ[ENV_MARKER]}", file=sys.stderr)
            return 2
        install_huge_pages()  # before the cluster's objects exist
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
