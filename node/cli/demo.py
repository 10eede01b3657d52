"""``peerd demo``: a local 3-node cluster with the example tasks.

Starts three real ``peerd`` processes on free loopback ports, sealed with a
fresh key, with a fresh API token, the first one applying
``configs/tasks.example.yaml``; prints the ``peerctl`` commands to look at
it; on Ctrl-C (or after ``--duration``) sends SIGTERM to every node, which
leave gracefully.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports, each free for both UDP and TCP on ``host`` right now.

    Every probe socket stays bound until all ``n`` are found: the kernel may
    hand a port out again as soon as its probe closes, and two nodes once got
    the same API port from two calls in a row.
    """
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        for _ in range(100 * n):
            if len(ports) == n:
                return ports
            t = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            t.bind((host, 0))
            port = t.getsockname()[1]
            u = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                u.bind((host, port))
            except OSError:
                continue  # t stays bound, so this port is not offered again
            ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports found on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (for several,
    use ``free_ports``: separate calls may return the same port)."""
    return free_ports(1, host)[0]


def example_tasks_path() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "configs" / "tasks.example.yaml"
    return here if here.exists() else None


def demo_tasks_file(example: Path, base: Path, now: float) -> Path:
    """The example task file with its one-shot moved to a minute after
    ``now``, so the demo shows it fire instead of skipping a date long past."""
    import re
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(int(now) + 60, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = re.sub(r'once: "[0-9T:Z-]+"', f'once: "{when}"', example.read_text(), count=1)
    out = base / "tasks.yaml"
    out.write_text(text)
    return out


def node_command(n: dict, seeds: str, base: Path, key_file: Path, token: str, *,
                 role: str, tasks: str = "") -> list[str]:
    """The ``peerd`` command line of demo node ``n`` (name, gossip, api ports).
    Values go as ``--flag=value``: a random token may start with ``-``, which
    argparse would take for an option."""
    cmd = [
        sys.executable, "-m", "node.cli.daemon",
        f"--name={n['name']}",
        f"--bind=127.0.0.1:{n['gossip']}",
        f"--api=127.0.0.1:{n['api']}",
        f"--seeds={seeds}",
        f"--data-dir={base / n['name']}",
        f"--key-file={key_file}",
        f"--api-token={token}",
        "--profile=lan",
        "--shutdown-grace-s=5",
        # two workers and one edge node, to show tag placement
        f"--tags=role={role}",
    ]
    if tasks:
        cmd.append(f"--tasks={tasks}")
    return cmd


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peerd demo", description="Run a local 3-node peerd cluster with example tasks.")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--dir", help="state directory (default: a new temp dir)")
    p.add_argument("--tasks", help="task file (default configs/tasks.example.yaml)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 20:
        print("peerd demo: --nodes must be 1-20", file=sys.stderr)
        return 2
    base = Path(args.dir or tempfile.mkdtemp(prefix="peerd-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    from gossip.seal_shell import generate_key

    key_file = base / "gossip.key"
    if not key_file.exists():
        key_file.write_text(generate_key() + "\n")
        key_file.chmod(0o600)
    token = secrets.token_urlsafe(18)
    tasks = args.tasks or (str(example_tasks_path()) if example_tasks_path() else "")
    if tasks and not args.tasks:
        tasks = str(demo_tasks_file(Path(tasks), base, time.time()))
    nodes = []
    ports = free_ports(2 * args.nodes)
    for i in range(args.nodes):
        nodes.append({"name": f"node{i + 1}", "gossip": ports[2 * i], "api": ports[2 * i + 1]})
    seeds = f"127.0.0.1:{nodes[0]['gossip']}"
    cmds = [node_command(n, seeds, base, key_file, token, role="worker" if i < 2 else "edge",
                         tasks=tasks if i == 0 else "")
            for i, n in enumerate(nodes)]

    first = f"127.0.0.1:{nodes[0]['api']}"
    print(f"peerd demo: {args.nodes} nodes, state in {base}")
    for n in nodes:
        print(f"  {n['name']}: gossip 127.0.0.1:{n['gossip']}  api 127.0.0.1:{n['api']}")
    print("\nLook at it from another shell:")
    print(f"  export PEERCTL_NODE={first} PEERCTL_TOKEN={token}")
    print("  peerctl members")
    print("  peerctl tasks ls")
    print("  peerctl owner heartbeat")
    print("  peerctl runs heartbeat")
    print("  peerctl tasks explain nightly-report")
    print(f"  curl -s http://{first}/metrics | grep ^peerd_")
    print("\nOr open the status page of any node in a browser (it asks for the PEERCTL_TOKEN value):")
    print(f"  http://{first}/")
    print("\nCtrl-C stops the cluster (each node leaves gracefully).\n", flush=True)

    async def run() -> int:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        procs = []
        status = 0
        try:
            for cmd in cmds:
                procs.append(await trio.lowlevel.open_process(cmd, env=env, stdin=None))
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                with trio.move_on_after(args.duration if args.duration > 0 else float("inf")):
                    async with trio.open_nursery() as nursery:
                        async def watch(proc):
                            await proc.wait()
                            nursery.cancel_scope.cancel()

                        async def wait_signal():
                            async for _ in sigs:
                                nursery.cancel_scope.cancel()
                                return

                        for proc in procs:
                            nursery.start_soon(watch, proc)
                        nursery.start_soon(wait_signal)
        finally:
            print("\npeerd demo: stopping nodes", flush=True)
            with trio.CancelScope(shield=True):
                for proc in procs:
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    for proc in procs:
                        await proc.wait()
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                        status = 1
                    elif proc.returncode not in (0, -signal.SIGTERM):
                        status = 1
        return status

    try:
        return trio.run(run)
    except KeyboardInterrupt:
        return 0
