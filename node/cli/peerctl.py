"""peerctl: look at and steer a peerd cluster through any node's HTTP API.

Every command talks to one node (``--node HOST:PORT`` or an ``https://``
URL, or ``PEERCTL_NODE``; default 127.0.0.1:7701) with a bearer token
(``--token`` or ``PEERCTL_TOKEN``), through ``node.client`` (the Python
client library). Output is an aligned table; ``-o json`` (or ``--json``)
prints the API's JSON for scripts, ``-o yaml`` the same as YAML, ``-o wide``
a table with more columns. Global flags go before or after the command.
Any error prints one line to stderr and exits non-zero: 1 for an error
answered by the node, 2 for usage or a bad file, 3 when the node cannot be
reached.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from datetime import datetime, timezone

from node.client import (
    DEFAULT_NODE,
    DEFAULT_TIMEOUT_S,
    ApiError,
    BadResponseError,
    Client as ApiClient,
    UnreachableError,
)

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
OUTPUTS = ("table", "json", "yaml", "wide")


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_API):
        super().__init__(message)
        self.code = code


class Client:
    """``node.client.Client`` with peerctl's errors (one line, exit code)."""

    def __init__(self, node: str, token: str, timeout_s: float = DEFAULT_TIMEOUT_S, ca_cert: str | None = None):
        try:
            self._c = ApiClient(node, token, timeout_s=timeout_s, ca_cert=ca_cert)
        except (ValueError, OSError) as e:
            raise CtlError(f"--node/--ca-cert: {e}", EXIT_USAGE) from None
        self.base = self._c.base

    @contextlib.contextmanager
    def _one_line_errors(self):
        try:
            yield
        except ApiError as e:
            raise CtlError(f"{self.base}: {e.status}: {e.error}") from None
        except UnreachableError as e:
            raise CtlError(str(e), EXIT_UNREACHABLE) from None
        except BadResponseError as e:
            raise CtlError(f"{self.base}: {e}") from None

    def call(self, method: str, path: str, body=None, *, raw: bool = False):
        with self._one_line_errors():
            return self._c.request(method, path, body, raw=raw)

    def follow(self, run_id: str):
        """A run's output as the node streams it, until the run ends."""
        with self._one_line_errors():
            yield from self._c.runs.follow(run_id)


def table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    headers = headers or [c.upper() for c in columns]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return ",".join(f"{k}={val}" for k, val in sorted(v.items())) or "-"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "-"
    return str(v)


def _ts(v) -> str | None:
    if v is None:
        return None
    try:
        return datetime.fromtimestamp(float(v), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError):
        return str(v)


def _load_tasks_file(path: str) -> list[dict]:
    from node.tasks.files_shell import load_task_file
    from node.tasks.model import TaskError

    try:
        tasks = load_task_file(path)
    except TaskError as e:
        raise CtlError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CtlError(f"{path}: {e.strerror or e}", EXIT_USAGE) from None
    return [t.to_dict() for t in tasks]


def run(args) -> int:
    out = sys.stdout
    mode = "json" if args.json else args.output
    cmd = args.cmd
    if cmd == "completion":
        out.write(completion_script(build_parser(), args.shell))
        return 0
    c = Client(args.node, args.token, timeout_s=args.timeout, ca_cert=args.ca_cert)
    js = mode in ("json", "yaml")

    def emit(obj, text: str, wide: str | None = None):
        if mode == "json":
            json.dump(obj, out, indent=2, sort_keys=True)
            out.write("\n")
        elif mode == "yaml":
            import yaml

            out.write(yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, allow_unicode=True))
        else:
            out.write((wide if mode == "wide" and wide is not None else text) + "\n")

    if cmd == "audit":
        rows = c.call("GET", "/v1/audit")
        rows_t = [dict(r, at=_ts(r.get("at"))) for r in rows]
        emit(rows, table(rows_t, ["at", "token", "method", "route", "task", "status"]),
             table(rows_t, ["at", "node", "token", "role", "peer", "method", "path", "task", "status", "detail"]))
    elif cmd == "status":
        s = c.call("GET", "/v1/status")
        lines = [f"{k}: {_cell(v)}" for k, v in s.items() if not isinstance(v, (dict, list))]
        for k, v in s.items():
            if isinstance(v, dict):
                lines.append(f"{k}: " + ", ".join(f"{kk}={_cell(vv)}" for kk, vv in v.items()))
        emit(s, "\n".join(lines))
    elif cmd == "members":
        ms = c.call("GET", "/v1/members")
        emit(ms, table(ms, ["name", "addr", "state", "incarnation", "tags", "since"]),
             table(ms, sorted({k for m in ms for k in m}, key=lambda k: (k != "name", k))))
    elif cmd == "ring":
        r = c.call("GET", "/v1/ring")
        rows = r.get("members", [])
        emit(r, table(rows, ["name", "eligible", "owned", "replica_of", "skew_ms"]))
    elif cmd == "owner":
        o = c.call("GET", f"/v1/owner/{_q(args.id)}")
        emit(o, f"task {o['task_id']}: owner {o['owner'] or '-'}; replicas {', '.join(o['replicas']) or '-'}")
    elif cmd == "runs" and len(args.words) == 2 and args.words[0] == "logs":
        return _logs(c, args.words[1], follow=args.follow, out=out)
    elif cmd == "runs" and len(args.words) == 2 and args.words[0] == "cancel":
        r = c.call("POST", f"/v1/runs/{_q(args.words[1])}/cancel")
        emit(r, f"run {r.get('run_id')} of {r.get('task_id')}: cancelling on {r.get('node')} "
                "(SIGTERM to its process group, SIGKILL after the grace)")
    elif cmd == "runs":
        if len(args.words) != 1:
            raise CtlError("usage: peerctl runs TASK_ID | peerctl runs cancel RUN_ID", EXIT_USAGE)
        args.id = args.words[0]
        rs = c.call("GET", f"/v1/tasks/{_q(args.id)}/runs")
        rows = [
            dict(r, slot_s=_ts(r.get("slot")), started_s=_ts(r.get("started")), finished_s=_ts(r.get("finished")))
            for r in rs
        ]
        cols = ["slot_s", "run_id", "node", "attempt", "status", "exit_code", "started_s", "finished_s",
                "fencing_token"]
        heads = ["SLOT", "RUN", "NODE", "ATTEMPT", "STATUS", "EXIT", "STARTED", "FINISHED", "TOKEN"]
        for r in rows:
            if isinstance(r.get("started"), (int, float)) and isinstance(r.get("finished"), (int, float)):
                r["duration"] = f"{max(0.0, r['finished'] - r['started']):.3f}s"
            r["upstream_run"] = (r.get("upstream") or {}).get("run_id")
        emit(rs, table(rows, cols, heads),
             table(rows, cols + ["duration", "error", "cancelled_by", "upstream_run", "notify"],
                   heads + ["DURATION", "ERROR", "CANCELLED_BY", "AFTER", "NOTIFY"]))
    elif cmd == "keys":
        if args.keys_cmd == "list":
            k = c.call("GET", "/v1/keys")
            emit(k, table(k.get("keys", []), ["fingerprint", "primary", "members"]))
        else:
            r = c.call("POST", "/v1/keys", {"op": args.keys_cmd, "key": args.key})
            emit(r, f"{args.keys_cmd}: ok" + (f" ({r.get('detail')})" if r.get("detail") else ""))
    elif cmd == "tasks":
        tc = args.tasks_cmd
        if tc == "apply":
            tasks = _load_tasks_file(args.file)
            query = f"source={_q(os.path.basename(args.file))}"
            if args.dry_run:
                query += "&dry_run=1"
            if args.prune:
                query += "&prune=1"
            r = c.call("PUT", f"/v1/tasks?{query}", tasks)
            if not js:
                for w in r.get("warnings") or []:
                    print(f"peerctl: warning: task {w.get('task_id')!r}: {w.get('message')}",
                          file=sys.stderr)
            text = _diff_text(r)
            if not args.dry_run:
                text = (f"applied {len(r.get('applied', []))} task(s): {', '.join(r.get('applied', []))}"
                        + (f"\ndeleted {len(r['removed'])} task(s): {', '.join(r['removed'])}"
                           if r.get("removed") else ""))
            emit(r, text)
        elif tc == "ls":
            ts = c.call("GET", "/v1/tasks")
            rows = [dict(t, last_fired=_ts(t.get("last_fired"))) for t in ts]
            cols = ["id", "schedule", "type", "owner", "paused", "last_fired", "conflict"]
            emit(ts, table(rows, cols), table(rows, cols + sorted({k for t in ts for k in t} - set(cols))))
        elif tc == "get":
            t = c.call("GET", f"/v1/tasks/{_q(args.id)}")
            text = json.dumps(t.get("task"), indent=2, sort_keys=True)
            extra = [f"owner: {t.get('owner')}", f"paused: {_cell(t.get('paused'))}", f"last fired: {_ts(t.get('last_fired')) or '-'}"]
            if t.get("conflict"):
                extra.append(f"CONFLICT: {len(t.get('siblings', []))} concurrent versions; showing the one chosen by the resolution rule ({t.get('resolution')})")
            emit(t, text + "\n" + "\n".join(extra))
        elif tc == "rm":
            r = c.call("DELETE", f"/v1/tasks/{_q(args.id)}")
            emit(r, f"deleted {args.id}")
        elif tc in ("pause", "resume"):
            r = c.call("POST", f"/v1/tasks/{_q(args.id)}/{tc}")
            emit(r, f"{args.id}: {'paused' if tc == 'pause' else 'resumed'}")
        elif tc == "run":
            body = {}
            if args.env:
                env = {}
                for kv in args.env:
                    k, sep, v = kv.partition("=")
                    if not sep or not k:
                        raise CtlError(f"--env {kv!r}: expected NAME=VALUE", EXIT_USAGE)
                    env[k] = v
                body["env"] = env
            if args.arg:
                body["args"] = list(args.arg)
            r = c.call("POST", f"/v1/tasks/{_q(args.id)}/run", body or None)
            emit(r, f"{args.id}: run requested on {r.get('node')} (slot {_ts(r.get('slot'))})")
        elif tc == "explain":
            e = c.call("GET", f"/v1/tasks/{_q(args.id)}/explain?n={args.n}")
            lines = [
                f"task {e.get('task_id')}: {e.get('schedule')} ({e.get('timezone')})",
                f"owner: {e.get('owner') or '-'}   replicas: {', '.join(e.get('replicas') or []) or '-'}",
                f"last fired: {_ts(e.get('last_fired_slot')) or '-'}",
                "why: " + ("; ".join(e["why"]) if isinstance(e.get("why"), list) else str(e.get("why"))),
            ]
            lines += [f"note: {n}" for n in e.get("notes") or []]
            if e.get("upgrade"):
                lines.append(f"upgrade: {e['upgrade']}")
            lines.append("next fires:")
            for f in e.get("next", []):
                note = f"  ({f['note']})" if f.get("note") else ""
                lines.append(f"  {f.get('utc')}   {f.get('local')}{note}")
            emit(e, "\n".join(lines))
        elif tc == "upgrade-check":
            emit_rows = _upgrade_check(_load_tasks_file(args.file) if args.file else c.call("GET", "/v1/tasks"))
            emit(emit_rows, table(emit_rows, ["id", "schedule", "difference"]) if emit_rows
                 else "no task fires on other days than under earlier releases")
        elif tc == "backfill":
            r = c.call(
                "POST",
                f"/v1/tasks/{_q(args.id)}/backfill",
                {"from": args.from_, "to": args.to, "dry_run": args.dry_run},
            )
            verb = "would run" if args.dry_run else "queued"
            slots = r.get("slots", [])
            emit(r, f"{verb} {len(slots)} slot(s):" + "".join(f"\n  {_ts(s)}" for s in slots))
    return 0


def _logs(c: Client, run_id: str, *, follow: bool, out) -> int:
    """``runs logs [-f]``: the output so far; with ``-f`` the node streams it
    (chunked) from the node that runs it until the run ends."""
    if follow:
        data = ""
        for text in c.follow(run_id):
            out.write(text)
            out.flush()
            data = text
    else:
        chunk = c.call("GET", f"/v1/runs/{_q(run_id)}/logs?format=json")
        data = chunk.get("data") or ""
        if chunk.get("skipped"):
            out.write(f"[... {chunk['skipped']} bytes no longer kept]\n")
        out.write(data)
    if data and not data.endswith("\n"):
        out.write("\n")
    return 0


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A completion script for ``shell`` from the parser's commands and flags
    (static: no dependency, regenerate after an upgrade)."""
    tree: dict[str, list[str]] = {}
    flags: set[str] = set()
    for a in parser._actions:
        flags.update(o for o in a.option_strings if o.startswith("--"))
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                subs = []
                for b in sp._actions:
                    flags.update(o for o in b.option_strings if o.startswith("--"))
                    if isinstance(b, argparse._SubParsersAction):
                        subs = sorted(b.choices)
                        for leaf in b.choices.values():
                            for x in leaf._actions:
                                flags.update(o for o in x.option_strings if o.startswith("--"))
                if name == "runs":
                    subs = ["cancel", "logs"]
                tree[name] = subs
    cmds = " ".join(sorted(tree))
    fl = " ".join(sorted(flags))
    if shell == "fish":
        lines = [f"complete -c peerctl -f -n '__fish_use_subcommand' -a '{cmds}'"]
        for name, subs in sorted(tree.items()):
            if subs:
                lines.append(f"complete -c peerctl -f -n '__fish_seen_subcommand_from {name}' -a '{' '.join(subs)}'")
        lines += [f"complete -c peerctl -l {f[2:]}" for f in sorted(flags)]
        return "\n".join(lines) + "\n"
    cases = "\n".join(f"        {name}) words_next=\"{' '.join(subs)}\" ;;" for name, subs in sorted(tree.items()))
    bash = f"""_peerctl() {{
    local cur cmd words_next
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "{fl}" -- "$cur")); return
    fi
    cmd=""
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        [[ "$w" != -* ]] && {{ cmd="$w"; break; }}
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{cmds}" -- "$cur")); return
    fi
    case "$cmd" in
{cases}
        *) words_next="" ;;
    esac
    COMPREPLY=($(compgen -W "$words_next" -- "$cur"))
}}
complete -o default -F _peerctl peerctl
"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + bash
    return bash


def _short(v, limit: int = 60) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_text(r: dict) -> str:
    """``apply --dry-run``: + added, ~ changed (one line per field), - removed."""
    lines = [f"+ {tid}   (added)" for tid in r.get("added", [])]
    for ch in r.get("changed", []):
        lines.append(f"~ {ch['id']}   (changed)")
        for f in ch.get("fields", []):
            if f.get("added"):
                lines.append(f"    {f['field']}: set to {_short(f['to'])}")
            elif f.get("removed"):
                lines.append(f"    {f['field']}: unset (was {_short(f['from'])})")
            else:
                lines.append(f"    {f['field']}: {_short(f['from'])} -> {_short(f['to'])}")
    lines += [f"- {tid}   (removed)" for tid in r.get("removed", [])]
    n_same = len(r.get("unchanged", []))
    if not lines:
        return f"no change ({n_same} task(s) unchanged)"
    summary = (f"would add {len(r.get('added', []))}, change {len(r.get('changed', []))}, "
               f"remove {len(r.get('removed', []))}; {n_same} unchanged")
    return "\n".join(lines + [summary])


def _upgrade_check(tasks: list[dict]) -> list[dict]:
    """Tasks whose cron day fields now select other days than under earlier
    releases (which read them as croniter does)."""
    import time
    from types import SimpleNamespace

    from node.schedule.slots import upgrade_differences

    now = time.time()
    rows = []
    for t in tasks:
        diff = upgrade_differences(SimpleNamespace(schedule=t.get("schedule", "")), now)
        if diff:
            rows.append({"id": t.get("id"), "schedule": t.get("schedule"), "difference": diff})
    return rows


def _q(s: str) -> str:
    import urllib.parse

    return urllib.parse.quote(s, safe="")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("peerd")
    except Exception:
        return "unknown (not installed)"


def _global_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags; on every subcommand too (``suppress``: no default
    there, so a flag after the command wins and its absence changes nothing)."""
    def d(value):
        return argparse.SUPPRESS if suppress else value

    env = os.environ
    p.add_argument("--node", default=d(env.get("PEERCTL_NODE", DEFAULT_NODE)),
                   help="node API address HOST:PORT or https://HOST:PORT (PEERCTL_NODE)")
    p.add_argument("--token", default=d(env.get("PEERCTL_TOKEN", "")), help="API bearer token (PEERCTL_TOKEN)")
    p.add_argument("--ca-cert", default=d(env.get("PEERCTL_CA_CERT") or None), metavar="FILE",
                   help="CA bundle that signed the node's certificate, for https (PEERCTL_CA_CERT)")
    p.add_argument("--timeout", type=_timeout, default=d(env.get("PEERCTL_TIMEOUT") or str(DEFAULT_TIMEOUT_S)),
                   metavar="SECONDS", help=f"bound on each call (PEERCTL_TIMEOUT; default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("-o", "--output", choices=OUTPUTS, default=d("table"),
                   help="table (default), json, yaml, or wide (a table with more columns)")
    p.add_argument("--json", action="store_true", default=d(False), help="same as -o json")


def _timeout(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of seconds") from None
    if not 0 < f <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peerctl",
        description="Inspect and control a peerd cluster through any node's HTTP API.",
        epilog="Environment: PEERCTL_NODE (default 127.0.0.1:7701), PEERCTL_TOKEN, PEERCTL_CA_CERT, "
        "PEERCTL_TIMEOUT. Global flags may also follow the command. "
        "Exit status: 0 ok, 1 error from the node, 2 usage or bad file, 3 node unreachable.",
    )
    _global_flags(p, suppress=False)
    p.add_argument("--version", action="version", version=f"peerctl (peerd) {_version()}")
    g = argparse.ArgumentParser(add_help=False)
    _global_flags(g, suppress=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(parent, name, **kw):
        return parent.add_parser(name, parents=[g], **kw)

    cmd(sub, "status", help="this node's view: name, members, tasks owned, versions")
    cmd(sub, "members", help="cluster members with state (alive, suspect, dead, left)")
    cmd(sub, "ring", help="ownership: tasks owned per member, eligibility, clock skew")
    cmd(sub, "audit", help="the last state-changing API requests this node answered (token, route, result)")
    o = cmd(sub, "owner", help="owner and replicas of a task")
    o.add_argument("id")
    r = cmd(sub, "runs", help="run records of a task; cancel a run; its output",
            usage="peerctl runs TASK_ID\n       peerctl runs cancel RUN_ID\n       peerctl runs logs [-f] RUN_ID")
    r.add_argument("words", nargs="+", metavar="TASK_ID | cancel RUN_ID | logs RUN_ID",
                   help="a task id lists its runs; 'cancel RUN_ID' ends a running run on the node "
                        "that runs it (the record ends 'cancelled'); 'logs RUN_ID' prints its output")
    r.add_argument("-f", "--follow", action="store_true", help="with logs: keep printing until the run ends")
    k = cmd(sub, "keys", help="gossip keyring: list, install, use, remove")
    ksub = k.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    cmd(ksub, "list", help="keys and how many members hold each")
    for name, h in (("install", "add a key to every member"), ("use", "make an installed key primary"),
                    ("remove", "drop a non-primary key")):
        kk = cmd(ksub, name, help=h)
        kk.add_argument("key", help="base64 key (see `peerd keygen`)")
    t = cmd(sub, "tasks", help="task commands")
    tsub = t.add_subparsers(dest="tasks_cmd", required=True, metavar="ACTION")
    ta = cmd(tsub, "apply", help="apply a task file (all or nothing)")
    ta.add_argument("-f", "--file", required=True, help="YAML, JSON or TOML task file")
    ta.add_argument("--dry-run", action="store_true",
                    help="print what would change (added, changed with a field diff, removed with --prune); "
                         "apply nothing")
    ta.add_argument("--prune", action="store_true",
                    help="also delete every task of the cluster that the file does not name")
    cmd(tsub, "ls", help="list tasks")
    for name, h in (
        ("get", "show a task's definition (and any conflict)"),
        ("rm", "delete a task"),
        ("pause", "pause a task"),
        ("resume", "resume a task"),
    ):
        x = cmd(tsub, name, help=h)
        x.add_argument("id")
    tr = cmd(tsub, "run", help="run a task now, once, cluster-wide (with parameters)")
    tr.add_argument("id")
    tr.add_argument("--env", action="append", metavar="NAME=VALUE",
                    help="environment for this run only (checked against the task's params); repeatable")
    tr.add_argument("--arg", action="append", metavar="ARG",
                    help="argument appended for this run only (exec argv, python args, shell $1...); "
                         "repeatable")
    te = cmd(tsub, "explain", help="next fires, owner, last fired slot and why")
    te.add_argument("id")
    te.add_argument("-n", type=int, default=5, help="number of next fires (default 5)")
    tu = cmd(tsub, "upgrade-check",
             help="tasks whose cron day fields fire on other days than under earlier releases")
    tu.add_argument("-f", "--file", help="check a task file instead of the cluster's tasks")
    tb = cmd(tsub, "backfill", help="run the slots of a past window once each")
    tb.add_argument("id")
    tb.add_argument("--from", dest="from_", required=True, help="start (ISO 8601 or epoch seconds)")
    tb.add_argument("--to", required=True, help="end (ISO 8601 or epoch seconds)")
    tb.add_argument("--dry-run", action="store_true", help="list the slots, run nothing")
    comp = sub.add_parser("completion", help="print a shell completion script: "
                                              "eval \"$(peerctl completion bash)\"")
    comp.add_argument("shell", choices=("bash", "zsh", "fish"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `runs logs -f RUN_ID`: words after a flag
        if args.cmd == "runs" and not any(x.startswith("-") for x in extra):
            args.words += extra
        else:
            parser.error("unrecognized arguments: " + " ".join(extra))
    try:
        return run(args)
    except CtlError as e:
        print(f"peerctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
