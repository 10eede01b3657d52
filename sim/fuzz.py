"""Fuzzing every decoder a peer or a client reaches.

Each target is one entry point that takes bytes from outside, exactly as a
shell hands them over: a gossip datagram (sealed, then the SWIM core's
``handle_packet`` on what a keyed peer could send), a push-pull body, a
stream head, a node peer message (``NodeCore.serve``), an anti-entropy
message (``Store.handle_exchange``), task files and API task bodies (JSON,
YAML, TOML through ``node.tasks.decoding`` and ``node.tasks.parse.parse_tasks``), node
config files (``node.cli.config.build_config`` on a file), etcd gateway replies
and claim values. A target passes an input when it either accepts it or
raises the one error type its caller turns into a refusal (``allowed``);
any other exception is a finding.

Engines:

- ``hypothesis`` (always): valid samples of each input, mutated (bytes
  flipped, cut, spliced, repeated), plus raw random bytes; seeded.
- ``atheris`` (where ``pip install '.[fuzz]'`` works): coverage-guided
  libFuzzer over the same targets, each in a child process
  (``python -m sim.fuzz --engine atheris --target NAME --runs N``).

Usage::

    python -m sim.fuzz [--runs 20000] [--engine hypothesis|atheris|both]
        [--target NAME ...] [--seed 1] [--json bench/results/fuzz.json]

Prints inputs tried and findings per target; a finding prints the input
(hex) and the command that replays the target. ``tests/test_fuzz_decoders.py``
runs every target under hypothesis in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Target", "targets", "mutate", "run_target", "main"]


@dataclass
class Target:
    name: str
    fn: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: list[bytes] = field(default_factory=list)
    what: str = ""


# ------------------------------------------------------------------ targets

def _gossip_targets() -> list[Target]:
    from gossip import wire
    from gossip.config import Config
    from gossip.seal import Keyring, PacketRejected
    from gossip.seal_shell import new_sealer
    from gossip.streams import KINDS, StreamRefused, decode_head, encode_head
    from gossip.swim import Swim

    key = bytes(range(32))
    peer = new_sealer(Keyring([key]), "peer", epoch=7)
    me = new_sealer(Keyring([key]), "me", epoch=9)

    def core() -> Swim:
        return Swim(Config.local(), "me", ("127.0.0.1", 7000), rng=random.Random(0), now=0.0)

    swim = core()
    other = core()
    other_pp = Swim(Config.local(), "peer", ("127.0.0.1", 7001), rng=random.Random(1), now=0.0)
    joined = other_pp.join([("127.0.0.1", 7000)], 0.0)
    push_pull_seed = b""
    for eff in joined:
        data = getattr(eff, "data", None)
        if isinstance(data, (bytes, bytearray)):
            push_pull_seed = bytes(data)
            break
    del other

    packet_seeds = []
    for e in swim.tick(1.0) + other_pp.tick(1.0):
        data = getattr(e, "data", None)
        if isinstance(data, (bytes, bytearray)):
            packet_seeds.append(bytes(data))
    state = {"now": 1.0}

    def datagram(data: bytes) -> None:
        try:
            _sender, body = me.open(data)
        except PacketRejected:
            return
        state["now"] += 0.01
        swim.handle_packet(("127.0.0.1", 7001), body, state["now"])

    def packet(data: bytes) -> None:
        state["now"] += 0.01
        swim.handle_packet(("127.0.0.1", 7001), data, state["now"])

    def push_pull(data: bytes) -> None:
        state["now"] += 0.01
        swim.handle_push_pull(("127.0.0.1", 7001), data, state["now"])

    def head(data: bytes) -> None:
        decode_head(data)

    sealed = [peer.seal(p) for p in packet_seeds[:4]]
    return [
        Target("gossip.datagram", datagram, (), sealed, "sealed UDP datagram -> open -> Swim.handle_packet"),
        Target("gossip.packet", packet, (), packet_seeds or [b"\x90"],
               "opened datagram body from a keyed peer -> Swim.handle_packet"),
        Target("gossip.push_pull", push_pull, (wire.ProtocolError, ValueError),
               [push_pull_seed] if push_pull_seed else [], "push-pull body -> Swim.handle_push_pull"),
        Target("gossip.stream_head", head, (StreamRefused,),
               [encode_head(k, 100) for k in sorted(KINDS)], "stream head -> decode_head"),
    ]


def _node_targets() -> list[Target]:
    import msgpack

    from node import peerwire
    from node.core import NodeCore
    from node.tasks.decoding import DecodeError, loads_json
    from node.fencing.codec import (EtcdClientError, decode_body, decode_lease_grant,
                              decode_range, decode_txn)
    from node.fencing.rules import decode_claim
    from node.state.store import Store
    from node.tasks.files_shell import load_task_file
    from node.tasks.model import Task, TaskError
    from node.tasks.parse import parse_tasks

    store = Store("me")
    core = NodeCore("me", store, rng=random.Random(0))
    other = Store("peer")
    t = Task.from_dict({"id": "t1", "schedule": "*/5 * * * *", "command": {"type": "shell", "run": "true"}})
    entries = other.put_task(t.id, t.to_dict(), None, 1_800_000_000.0)
    push = peerwire.encode({"t": "push", "entries": [list(e) for e in entries]})
    ae = store.start_exchange("catalogue")
    ae_msg = peerwire.encode({"t": "ae", "msg": ae})
    state = {"now": 1_800_000_000.0}

    def serve(data: bytes) -> None:
        state["now"] += 0.01
        core.serve("peer", data, state["now"])

    def exchange(data: bytes) -> None:
        other.handle_exchange(data)

    def task_json(data: bytes) -> None:
        parse_tasks(loads_json(data), "fuzz.json")

    tmp = tempfile.mkdtemp(prefix="peerd-fuzz-tasks-")

    def task_file(suffix: str):
        path = os.path.join(tmp, "tasks" + suffix)

        def load(data: bytes) -> None:
            with open(path, "wb") as f:
                f.write(data)
            load_task_file(path)
        return load

    def etcd_reply(data: bytes) -> None:
        obj = decode_body(data)
        for dec in (decode_txn, decode_range, decode_lease_grant):
            try:
                dec(obj)
            except EtcdClientError:
                pass

    def claim(data: bytes) -> None:
        decode_claim(data)

    tj = json.dumps([t.to_dict()]).encode()
    ty = b"tasks:\n  - id: a\n    schedule: '@every 1s'\n    command: {type: shell, run: 'echo hi'}\n"
    tt = b'[[tasks]]\nid = "a"\nschedule = "0 3 * * *"\n[tasks.command]\ntype = "exec"\nargv = ["true"]\n'
    good_reply = json.dumps({"header": {"revision": "5"}, "succeeded": True, "responses": [
        {"response_put": {"header": {"revision": "5"}}},
        {"response_range": {"header": {"revision": "5"}, "count": "1", "kvs": [
            {"key": "L3BlZXJkL2Vwb2No", "value": "Mw==", "create_revision": "2",
             "mod_revision": "2", "version": "1"}]}}]}).encode()
    return [
        Target("node.peer_message", serve, (), [push, ae_msg, peerwire.reply(True, 1.0)],
               "peer stream request -> NodeCore.serve"),
        Target("node.exchange", exchange, (ValueError,), [ae, msgpack.packb([0, 0, b"x" * 16])],
               "anti-entropy message -> Store.handle_exchange"),
        Target("node.task_body", task_json, (DecodeError, TaskError), [tj],
               "PUT /v1/tasks body (JSON) -> loads_json + parse_tasks"),
        Target("node.task_file_json", task_file(".json"), (TaskError,), [tj], "task file (JSON) -> load_task_file"),
        Target("node.task_file_yaml", task_file(".yaml"), (TaskError,), [ty], "task file (YAML) -> load_task_file"),
        Target("node.task_file_toml", task_file(".toml"), (TaskError,), [tt], "task file (TOML) -> load_task_file"),
        Target("etcd.reply", etcd_reply, (EtcdClientError,), [good_reply],
               "etcd gateway reply -> decode_body + decode_txn/range/lease"),
        Target("etcd.claim_value", claim, (ValueError,),
               [b'{"v":1,"node":"a","run_id":"r","epoch":0,"reclaims":0,"dead":[],"session":3}'],
               "claim value read from etcd -> decode_claim"),
    ]


def _config_target() -> list[Target]:
    from node.cli.config import build_config
    from node.cli.settings import ConfigError

    tmp = tempfile.mkdtemp(prefix="peerd-fuzz-")
    seeds = {
        ".toml": b'name = "n1"\nbind = "127.0.0.1:7946"\nseeds = ["127.0.0.1:7947"]\ninsecure = true\n',
        ".yaml": b"name: n1\nbind: 127.0.0.1:7946\ninsecure: true\ntags: {zone: a}\n",
        ".json": b'{"name": "n1", "api": "127.0.0.1:7701", "insecure": true}',
    }
    counter = {"i": 0}

    def config(data: bytes) -> None:
        counter["i"] += 1
        suffix = (".toml", ".yaml", ".json")[counter["i"] % 3]
        path = os.path.join(tmp, "node" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        build_config(flags={}, environ={}, config_file=path)

    return [Target("node.config_file", config, (ConfigError,), list(seeds.values()),
                   "node config file (TOML/YAML/JSON) -> build_config")]


def targets() -> dict[str, Target]:
    out = _gossip_targets() + _node_targets() + _config_target()
    return {t.name: t for t in out}


# ---------------------------------------------------------------- mutation

def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One input: a seed mutated 1-4 times, or raw random bytes."""
    if not seeds or rng.random() < 0.15:
        return rng.randbytes(rng.randrange(0, 256))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(7)
        if op == 0 and data:                        # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:                      # set an interesting byte
            data[rng.randrange(len(data))] = rng.choice((0, 0x7F, 0x80, 0xFF, 0xC0, 0xDC, 0xDD, 0xCF, 0x22, 0x5B))
        elif op == 2 and data:                      # cut
            i = rng.randrange(len(data))
            del data[i:i + rng.randrange(1, 16)]
        elif op == 3:                               # insert random bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 4 and data:                      # repeat a slice
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randrange(1, 32))
            data[i:i] = data[i:j] * rng.randrange(1, 8)
        elif op == 5 and len(seeds) > 1:            # splice with another seed
            other = rng.choice(seeds)
            i = rng.randrange(len(data) + 1)
            data = data[:i] + other[rng.randrange(len(other) + 1):]
        elif op == 6:                               # truncate
            data = data[:rng.randrange(len(data) + 1)]
    return bytes(data)


@dataclass
class Finding:
    target: str
    data: bytes
    error: str


def check_one(t: Target, data: bytes) -> Finding | None:
    try:
        t.fn(data)
    except t.allowed:
        return None
    except RecursionError:
        return Finding(t.name, data, "RecursionError")
    except Exception as exc:  # the finding
        return Finding(t.name, data, "".join(traceback.format_exception_only(type(exc), exc)).strip())
    return None


def run_target(t: Target, runs: int, seed: int) -> tuple[int, list[Finding]]:
    rng = random.Random(f"{seed}-{t.name}")
    findings: list[Finding] = []
    for s in t.seeds:
        f = check_one(t, s)
        if f:
            findings.append(f)
    for _ in range(runs):
        f = check_one(t, mutate(rng, t.seeds))
        if f and len(findings) < 20:
            findings.append(f)
    return runs + len(t.seeds), findings


# ------------------------------------------------------------------ atheris

def _atheris_child(name: str, runs: int) -> None:
    import atheris  # type: ignore[import-not-found]

    t = targets()[name]
    atheris.instrument_all()  # coverage of every loaded Python function guides the mutations

    def one(data: bytes) -> None:
        try:
            t.fn(data)
        except t.allowed:
            pass

    corpus = tempfile.mkdtemp(prefix="peerd-fuzz-corpus-")
    for i, s in enumerate(t.seeds):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(s)
    artifacts = os.path.join(tempfile.gettempdir(), f"peerd-fuzz-{name}-")
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-seed=1",
                   f"-artifact_prefix={artifacts}", corpus], one)
    atheris.Fuzz()


def _atheris_run(name: str, runs: int) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "sim.fuzz", "--engine", "atheris-child", "--target", name,
                        "--runs", str(runs)], capture_output=True, text=True, timeout=3600)
    done = 0
    for line in p.stderr.splitlines():
        if line.startswith("Done ") and " runs" in line:
            done = int(line.split()[1])
    crashed = p.returncode != 0
    tail = "\n".join(p.stderr.splitlines()[-15:]) if crashed else ""
    return {"runs": done, "finding": tail, "wall_s": round(time.monotonic() - t0, 1), "rc": p.returncode}


def atheris_available() -> bool:
    try:
        import atheris  # type: ignore[import-not-found]  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20000, help="inputs per target per engine")
    ap.add_argument("--engine", choices=("hypothesis", "atheris", "both", "atheris-child"), default="both")
    ap.add_argument("--target", action="append", help="only these targets (repeatable)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)
    if args.engine == "atheris-child":
        _atheris_child(args.target[0], args.runs)
        return 0
    all_t = targets()
    names = args.target or sorted(all_t)
    print(f"SEED={args.seed} runs={args.runs} engine={args.engine} targets={len(names)}")
    out: dict = {"seed": args.seed, "date": time.strftime("%Y-%m-%d"), "targets": {}}
    bad = 0
    for name in names:
        t = all_t[name]
        row: dict = {"what": t.what}
        if args.engine in ("hypothesis", "both"):
            t0 = time.monotonic()
            n, findings = run_target(t, args.runs, args.seed)
            row["mutation"] = {"inputs": n, "findings": len(findings), "wall_s": round(time.monotonic() - t0, 1)}
            for f in findings[:3]:
                bad += 1
                print(f"FINDING {name}: {f.error}\n  input {f.data[:200].hex()}\n  replay: "
                      f"python -m sim.fuzz --engine hypothesis --target {name} --seed {args.seed} "
                      f"--runs {args.runs}")
        if args.engine in ("atheris", "both"):
            if atheris_available():
                row["atheris"] = _atheris_run(name, args.runs)
                if row["atheris"]["rc"] != 0:
                    bad += 1
                    print(f"FINDING {name} (atheris):\n{row['atheris']['finding']}")
            else:
                row["atheris"] = None
        out["targets"][name] = row
        m = row.get("mutation") or {}
        a = row.get("atheris") or {}
        print(f"  {name:22s} mutation {m.get('inputs', '-'):>8} inputs {m.get('findings', '-')} findings   "
              f"atheris {a.get('runs', '-') if a else 'not installed'}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
