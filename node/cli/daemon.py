"""``peerd``: run one node, make a key, or run a local demo cluster.

    peerd --name n1 --bind 127.0.0.1:7946 --api 127.0.0.1:7701 \\
          --seeds 127.0.0.1:7947 --key-file key --api-token T [--config FILE]
    peerd keygen [-o FILE]  print a new base64 AES-256 gossip key, or write it
                            to a new FILE with mode 0600
    peerd demo              start a local 3-node cluster with example tasks

Every flag can also come from ``--config FILE`` (TOML/YAML/JSON) and from
``PEERD_<NAME>`` environment variables (flag > environment > file).
SIGTERM / SIGINT: leave the cluster gracefully, stop taking new slots, let
running runs finish within ``shutdown_grace_s``, flush state, exit 0.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

import trio

from node.cli.config import build_config
from node.cli.settings import ConfigError

log = logging.getLogger("peerd")

RUN_FLAGS = [
    ("name", "member name, unique in the cluster (default: host name)"),
    ("bind", "gossip bind address HOST:PORT, UDP and TCP (default 0.0.0.0:7946)"),
    ("advertise", "address peers use to reach this node (default: bind)"),
    ("seeds", "comma-separated HOST:PORT of members to join through"),
    ("api", "HTTP API and /metrics address (default 127.0.0.1:7701)"),
    ("data_dir", "directory for the node's SQLite state (default ./peerd-data/NAME)"),
    ("key_file", "gossip keyring file: base64 AES keys, one per line, first seals"),
    ("api_token", "bearer token required by API routes that change state or run code "
                  "(visible to local users in the process list: prefer --api-token-file)"),
    ("api_token_file", "file whose first line is the API token (mode 0600)"),
    ("api_tokens_file", "YAML/JSON file of named tokens with roles read|operate|admin (mode 0600); "
                        "reloaded on SIGHUP"),
    ("etcd_password_file", "file whose first line is the etcd password (mode 0600)"),
    ("tags", "member tags k=v,... used by task placement"),
    ("etcd", "etcd endpoints http://HOST:PORT,... (enables fencing tokens)"),
    ("tasks", "task file (YAML/JSON/TOML) applied at start"),
    ("log_format", "json or text (default text)"),
    ("log_level", "debug, info, warning, error (default info)"),
    ("profile", "membership timing: lan (memberlist defaults) or local (fast, for tests)"),
    ("reap_interval_s", "seconds dead/left members stay listed (default 3600)"),
    ("shutdown_grace_s", "seconds running runs may finish on SIGTERM (default 30)"),
    ("fencing_on_unavailable", "skip (default) or fire when etcd is unreachable"),
    ("fencing_session_ttl_s", "etcd session TTL proving this node alive to reclaimers (default 10)"),
    ("etcd_prefix", "etcd key prefix (default /peerd)"),
    ("etcd_ca_file", "CA bundle (PEM) that signed the https:// etcd endpoints' certificates"),
    ("etcd_cert_file", "client certificate (PEM) for etcd endpoints that require one"),
    ("etcd_key_file", "private key (PEM) of --etcd-cert-file"),
    ("api_tls_cert", "serve the API over https with this certificate chain (PEM); needs --api-tls-key"),
    ("api_tls_key", "private key (PEM) of --api-tls-cert (mode 0600)"),
    ("max_skew_s", "members with clocks off by more than this own nothing (default 2)"),
    ("notify", "default notification targets for tasks without notify: JSON list (config file: a list)"),
    ("write_ack", "answer a write once it is committed here (local, default) or also on a replica (replica)"),
    ("run_records_max_bytes", "bytes of run records and outputs this node keeps; over it the oldest "
                              "outputs are trimmed (default 268435456, 256 MiB)"),
    ("otlp_endpoint", "send a trace of every run to this OTLP/HTTP collector, e.g. http://localhost:4318 "
                      "(needs the otel extra: pip install 'peerd[otel]')"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peerd",
        description="peerd: a masterless distributed task scheduler node. "
        "Subcommands: `peerd keygen` (print a new gossip key), `peerd demo` (local 3-node cluster).",
        epilog="Each flag may also be set in --config FILE or as PEERD_<NAME> (e.g. PEERD_API_TOKEN).",
    )
    p.add_argument("--config", help="config file (TOML, YAML or JSON) with the same keys as the flags")
    for key, help_ in RUN_FLAGS:
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_)
    p.add_argument("--insecure", dest="insecure", action="store_const", const=True, default=None,
                   help="run gossip without encryption (throwaway test clusters only)")
    p.add_argument("--open-reads", dest="open_reads", action="store_const", const=True, default=None,
                   help="let read-only API routes answer without the token")
    p.add_argument("--start-empty", dest="start_empty", action="store_const", const=True, default=None,
                   help="if the state database is corrupt, move it aside and start empty")
    return p


def cmd_keygen(argv: list[str]) -> int:
    """``peerd keygen [-o FILE]``: print a key, or write it to a new 0600 file."""
    from gossip.seal_shell import generate_key

    p = argparse.ArgumentParser(prog="peerd keygen", description="Make a new base64 AES-256 gossip key.")
    p.add_argument("-o", "--output", help="write the key to this new file, mode 0600 (refuses to overwrite)")
    args = p.parse_args(argv)
    key = generate_key()
    if not args.output:
        print(key)
        return 0
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"peerd keygen: {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask allowed
        f.write(key + "\n")
    print(f"wrote a new key to {args.output} (mode 0600)", file=sys.stderr)
    return 0


def _check_start_files(cfg) -> int | None:
    """Before the node starts: warn about secrets others can read, and refuse
    a task file with errors (exit 2, every error naming file, task, field)."""
    from node.cli.config import loose_permissions

    for what, path in (("key_file", cfg.key_file), ("api_token_file", cfg.api_token_file),
                       ("api_tokens_file", cfg.api_tokens_file),
                       ("etcd_password_file", cfg.etcd_password_file), ("api_tls_key", cfg.api_tls_key),
                       ("etcd_key_file", cfg.etcd_key_file)):
        mode = loose_permissions(path) if path else None
        if mode is not None:
            log.warning("%s %s is readable by group or others (mode %04o); run: chmod 600 %s",
                        what, path, mode, path)
    if cfg.tasks:
        from node.tasks.files_shell import load_task_file
        from node.tasks.model import TaskError

        try:
            load_task_file(cfg.tasks)
        except TaskError as e:
            print(f"peerd: tasks file not applied:\n{e}", file=sys.stderr)
            return 2
    return None


def cmd_run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = build_config(flags=flags, config_file=args.config)
    except ConfigError as e:
        print(f"peerd: config error: {e}", file=sys.stderr)
        return 2
    from node.observe.logs_shell import setup_logging

    setup_logging(cfg.name, cfg.log_format, cfg.log_level)
    code = _check_start_files(cfg)
    if code is not None:
        return code
    from node.shell import Node, StartupError

    async def main_async() -> int:
        try:
            node = await Node.create(cfg)
        except StartupError as e:
            log.error("cannot start: %s", e)
            return 1
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            # Everything loaded so far (code, stored tasks, the tasks file)
            # lives as long as the process: move it out of the collector's
            # view, so a full collection does not walk it (measured: a 55 ms
            # pause at 1,000 tasks without, 0.6 ms with; bench/sched_bench.py).
            gc.collect()
            gc.freeze()

            async def leave():
                await node.shutdown()
                nursery.cancel_scope.cancel()

            async def signals():
                # Keep reading signals while the node leaves: a second SIGINT
                # (a terminal's Ctrl-C reaches the whole process group, and
                # `peerd demo` forwards it too) left pending here would be
                # re-raised by trio on exit as a KeyboardInterrupt traceback.
                leaving = False
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for signum in sigs:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            node.reload_tokens()
                            continue
                        if leaving:
                            log.info("received %s again: already leaving the cluster", name)
                            continue
                        leaving = True
                        log.info("received %s: leaving the cluster", name)
                        nursery.start_soon(leave)

            nursery.start_soon(signals)
        return 0

    try:
        return trio.run(main_async)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "keygen":
        return cmd_keygen(argv[1:])
    if argv and argv[0] == "demo":
        from node.cli.demo import main as demo_main

        return demo_main(argv[1:])
    return cmd_run(argv)


if __name__ == "__main__":
    sys.exit(main())
