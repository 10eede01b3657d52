"""peerctl: look at and steer a peerd cluster through any node's HTTP API.

Every command talks to one node (``--node HOST:PORT`` or ``PEERCTL_NODE``,
default 127.0.0.1:7701) with a bearer token (``--token`` or
``PEERCTL_TOKEN``). Output is an aligned table; ``--json`` prints the API's
JSON for scripts. Any error prints one line to stderr and exits non-zero:
1 for an error answered by the node, 2 for usage or a bad file, 3 when the
node cannot be reached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_API):
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, node: str, token: str, timeout_s: float = 10.0):
        if "://" not in node:
            node = "http://" + node
        self.base = node.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("error") or raw.decode(errors="replace")
            except Exception:
                msg = raw.decode(errors="replace").strip() or e.reason
            raise CtlError(f"{self.base}: {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CtlError(f"cannot reach node {self.base}: {reason}", EXIT_UNREACHABLE) from None
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise CtlError(f"{self.base}: answer is not JSON") from None


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
    from .tasks import TaskError, load_task_file

    try:
        tasks = load_task_file(path)
    except TaskError as e:
        raise CtlError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CtlError(f"{path}: {e.strerror or e}", EXIT_USAGE) from None
    return [t.to_dict() for t in tasks]


def run(args) -> int:
    c = Client(args.node, args.token)
    out = sys.stdout
    js = args.json

    def emit(obj, text: str):
        if js:
            json.dump(obj, out, indent=2, sort_keys=True)
            out.write("\n")
        else:
            out.write(text + "\n")

    cmd = args.cmd
    if cmd == "status":
        s = c.call("GET", "/v1/status")
        lines = [f"{k}: {_cell(v)}" for k, v in s.items() if not isinstance(v, (dict, list))]
        for k, v in s.items():
            if isinstance(v, dict):
                lines.append(f"{k}: " + ", ".join(f"{kk}={_cell(vv)}" for kk, vv in v.items()))
        emit(s, "\n".join(lines))
    elif cmd == "members":
        ms = c.call("GET", "/v1/members")
        emit(ms, table(ms, ["name", "addr", "state", "incarnation", "tags", "since"]))
    elif cmd == "ring":
        r = c.call("GET", "/v1/ring")
        rows = r.get("members", [])
        emit(r, table(rows, ["name", "eligible", "owned", "replica_of", "skew_ms"]))
    elif cmd == "owner":
        o = c.call("GET", f"/v1/owner/{_q(args.id)}")
        emit(o, f"task {o['task_id']}: owner {o['owner'] or '-'}; replicas {', '.join(o['replicas']) or '-'}")
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
        emit(
            rs,
            table(
                rows,
                ["slot_s", "run_id", "node", "attempt", "status", "exit_code", "started_s", "finished_s", "fencing_token"],
                ["SLOT", "RUN", "NODE", "ATTEMPT", "STATUS", "EXIT", "STARTED", "FINISHED", "TOKEN"],
            ),
        )
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
            emit(ts, table(rows, ["id", "schedule", "type", "owner", "paused", "last_fired", "conflict"]))
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

    from .schedule import upgrade_differences

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peerctl",
        description="Inspect and control a peerd cluster through any node's HTTP API.",
        epilog="Environment: PEERCTL_NODE (default 127.0.0.1:7701), PEERCTL_TOKEN. "
        "Exit status: 0 ok, 1 error from the node, 2 usage or bad file, 3 node unreachable.",
    )
    p.add_argument("--node", default=os.environ.get("PEERCTL_NODE", "127.0.0.1:7701"), help="node API address HOST:PORT")
    p.add_argument("--token", default=os.environ.get("PEERCTL_TOKEN", ""), help="API bearer token")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", help="this node's view: name, members, tasks owned, versions")
    sub.add_parser("members", help="cluster members with state (alive, suspect, dead, left)")
    sub.add_parser("ring", help="ownership: tasks owned per member, eligibility, clock skew")
    o = sub.add_parser("owner", help="owner and replicas of a task")
    o.add_argument("id")
    r = sub.add_parser("runs", help="run records of a task; cancel a running run",
                       usage="peerctl runs TASK_ID\n       peerctl runs cancel RUN_ID")
    r.add_argument("words", nargs="+", metavar="TASK_ID | cancel RUN_ID",
                   help="a task id lists its runs; 'cancel RUN_ID' ends a running run on the node "
                        "that runs it (the record ends 'cancelled')")
    k = sub.add_parser("keys", help="gossip keyring: list, install, use, remove")
    ksub = k.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    ksub.add_parser("list", help="keys and how many members hold each")
    for name, h in (("install", "add a key to every member"), ("use", "make an installed key primary"), ("remove", "drop a non-primary key")):
        kk = ksub.add_parser(name, help=h)
        kk.add_argument("key", help="base64 key (see `peerd keygen`)")
    t = sub.add_parser("tasks", help="task commands")
    tsub = t.add_subparsers(dest="tasks_cmd", required=True, metavar="ACTION")
    ta = tsub.add_parser("apply", help="apply a task file (all or nothing)")
    ta.add_argument("-f", "--file", required=True, help="YAML, JSON or TOML task file")
    ta.add_argument("--dry-run", action="store_true",
                    help="print what would change (added, changed with a field diff, removed with --prune); "
                         "apply nothing")
    ta.add_argument("--prune", action="store_true",
                    help="also delete every task of the cluster that the file does not name")
    tsub.add_parser("ls", help="list tasks")
    for name, h in (
        ("get", "show a task's definition (and any conflict)"),
        ("rm", "delete a task"),
        ("pause", "pause a task"),
        ("resume", "resume a task"),
    ):
        x = tsub.add_parser(name, help=h)
        x.add_argument("id")
    tr = tsub.add_parser("run", help="run a task now, once, cluster-wide (with parameters)")
    tr.add_argument("id")
    tr.add_argument("--env", action="append", metavar="NAME=VALUE",
                    help="environment for this run only (checked against the task's params); repeatable")
    tr.add_argument("--arg", action="append", metavar="ARG",
                    help="argument appended for this run only (exec argv, python args, shell $1...); "
                         "repeatable")
    te = tsub.add_parser("explain", help="next fires, owner, last fired slot and why")
    te.add_argument("id")
    te.add_argument("-n", type=int, default=5, help="number of next fires (default 5)")
    tu = tsub.add_parser("upgrade-check",
                         help="tasks whose cron day fields fire on other days than under earlier releases")
    tu.add_argument("-f", "--file", help="check a task file instead of the cluster's tasks")
    tb = tsub.add_parser("backfill", help="run the slots of a past window once each")
    tb.add_argument("id")
    tb.add_argument("--from", dest="from_", required=True, help="start (ISO 8601 or epoch seconds)")
    tb.add_argument("--to", required=True, help="end (ISO 8601 or epoch seconds)")
    tb.add_argument("--dry-run", action="store_true", help="list the slots, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CtlError as e:
        print(f"peerctl: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
