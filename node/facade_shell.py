"""The node's HTTP-facing methods (shell): what node/api/routes_shell.py
calls (status, tasks, runs, manual runs, cancels, backfills, tokens, audit,
keys), answered here or forwarded to the member that owns the task.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import trio

from gossip.seal import Keyring, KeyringError
from gossip.addr import format_addr

from node.api import views
from node.api.messages import HTTPError
from node.schedule.slots import reading_notes
from node.tasks.diff import diff_tasks
from node.tasks.model import Task, TaskError, after_cycle, bind_run
from node.tasks.parse import parse_tasks

from node.clock_shell import wall_clock

log = logging.getLogger("peerd.node")


#: A run id: ``<slot>-<node>-<8 hex>`` and, for one attempt, ``.<n>``.
RUN_ID_RE = re.compile(r"(-?[0-9]{1,20})-(.{1,160})-([0-9a-f]{8})(?:\.([0-9]{1,4}))?")


#: Audit entries kept (memory and the SQLite audit table).
AUDIT_KEEP = 1000


class FacadeMixin:
    """The API facade: a mixin of :class:`node.shell.Node`, whose
    constructor holds the state it uses."""

    # ------------------------------------------------------------ API facade
    def _snapshot(self) -> dict:
        g: dict = {}
        if self.gossip is not None:
            st = self.gossip.statistics()
            core = st.core
            if core is not None:
                g = {k: getattr(core, k) for k in core.__dataclass_fields__}
            # bytes on the wire are the sealed datagrams the transport moved
            g["bytes_in"] = st.transport.udp_bytes_received
            g["bytes_out"] = st.transport.udp_bytes_sent
            g["packets_in"] = st.transport.udp_packets_received
            g["packets_out"] = st.transport.udp_packets_sent
        st_store = self.store.statistics()
        st_store = {k: getattr(st_store, k) for k in getattr(st_store, "__dataclass_fields__", {})}
        owned = sum(1 for t in self.core.tasks if self.core.ring.owner(t) == self.name)
        skew = {p: self.core.skew.offset_s(p) for p in self._members_api
                if self.core.skew.offset_s(p) is not None}
        return {"gossip": g, "store": st_store, "owned": owned, "skew": skew}

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def status(self) -> dict:
        try:
            self.gossip is not None and self.gossip.core
        except RuntimeError:
            # the API listens a moment before gossip has bound its sockets
            raise HTTPError(503, "node is starting: gossip not up yet") from None
        members = self.gossip.members() if self.gossip else []
        by_state: dict[str, int] = {}
        for m in members:
            by_state[m.state.value] = by_state.get(m.state.value, 0) + 1
        core = self.core
        return {
            "name": self.name,
            "gossip": format_addr(self.gossip.advertise_addr) if self.gossip else None,
            "api": format_addr(self.api_addr) if self.api_addr else None,
            "incarnation": self.gossip.core.incarnation if self.gossip else 0,
            "members": by_state,
            "tasks": len(core.tasks),
            "tasks_owned": sum(1 for t in core.tasks if core.ring.owner(t) == self.name),
            "runs_running": len(core.running),
            "fencing": bool(self.fencer),
            "clock_suspect": core.clock_suspect,
            "uptime_s": round(wall_clock() - self._started_wall, 1),
            "version": "0.1.0",
        }

    def members_json(self) -> list[dict]:
        now_mono = trio.current_time()
        out = []
        for m in self.gossip.members() if self.gossip else []:
            api = self._members_api.get(m.name) or (
                format_addr(self.api_addr) if m.name == self.name and self.api_addr else None)
            out.append(views.member_json(m, api=api, since_s=now_mono - m.state_change, addr=format_addr(m.addr)))
        return out

    def ring_json(self) -> dict:
        return views.ring_json(self.core, self.gossip.members() if self.gossip else [])

    def tasks_json(self) -> list[dict]:
        return views.tasks_json(self.core)

    def _task_or_404(self, task_id: str) -> Task:
        t = self.core.tasks.get(task_id)
        if t is None:
            raise HTTPError(404, f"unknown task {task_id!r}")
        return t

    def task_json(self, task_id: str) -> dict:
        try:
            return views.task_json(self.core, task_id)
        except LookupError as e:
            raise HTTPError(404, str(e.args[0])) from None

    def owner_json(self, task_id: str) -> dict:
        return views.owner_json(self.core, task_id)

    def runs_json(self, task_id: str) -> list[dict]:
        try:
            return views.runs_json(self.core, task_id)
        except LookupError as e:
            raise HTTPError(404, str(e.args[0])) from None

    def explain_json(self, task_id: str, n: int) -> dict:
        try:
            return views.explain_json(self.core, task_id, n, wall_clock())
        except LookupError as e:
            raise HTTPError(404, str(e.args[0])) from None

    async def apply_tasks(self, items: list, *, source: str = "request", dry_run: bool = False,
                          prune: bool = False) -> dict:
        try:
            tasks = parse_tasks(items, source=source)
        except TaskError as e:
            raise HTTPError(400, str(e)) from None
        links = {tid: t.after["task"] for tid, t in self.core.tasks.items() if t.after}
        for t in tasks:
            links.pop(t.id, None)
            if t.after:
                links[t.id] = t.after["task"]
        cycle = after_cycle(links)
        if cycle:
            raise HTTPError(400, "after: chained tasks would form a cycle: " + " -> ".join(cycle))
        now = wall_clock()
        resolved = [t.resolve_now(now) for t in tasks]
        diff = diff_tasks({tid: t.to_dict() for tid, t in self.core.tasks.items()},
                          [t.to_dict() for t in resolved], prune=prune)
        if dry_run:
            out: dict = {"dry_run": True, **diff}
        else:
            self._writable()
            applied, effects = self.core.apply_tasks(resolved, now)
            pushes = self._do_collect(effects)
            for tid in diff["removed"]:
                pushes += self._do_collect(self.core.delete_task(tid, now))
            out = {"applied": applied, **diff, "durable": await self._acknowledge(pushes)}
        warnings = [{"task_id": t.id, "message": msg} for t in tasks for msg in reading_notes(t)]
        if warnings:
            out["warnings"] = warnings
        return out

    async def delete_task(self, task_id: str) -> dict:
        self._task_or_404(task_id)
        self._writable()
        pushes = self._do_collect(self.core.delete_task(task_id, wall_clock()))
        return {"deleted": task_id, "durable": await self._acknowledge(pushes)}

    async def set_paused(self, task_id: str, paused: bool) -> dict:
        self._task_or_404(task_id)
        self._writable()
        pushes = self._do_collect(self.core.set_paused(task_id, paused, wall_clock()))
        return {"task_id": task_id, "paused": paused, "durable": await self._acknowledge(pushes)}

    def _do_collect(self, effects) -> list:
        """Carry out a write's effects; its pushes to replicas are returned
        (``write_ack: replica`` waits for one of them)."""
        self._collect = []
        try:
            self._do(effects)
            return self._collect
        finally:
            self._collect = None

    async def run_now(self, task_id: str, env=None, args=None) -> dict:
        task = self._task_or_404(task_id)
        self._writable()
        try:
            params = bind_run(task, env, args)
        except TaskError as e:
            raise HTTPError(400, str(e)) from None
        msg = {"t": "run_now", "task_id": task_id}
        if params["env"] or params["args"]:
            msg["params"] = params
        if task.target:
            # a broadcast task: every shard's member runs its shard now
            out = []
            for member in sorted(set(self.core.shard_list(task_id))):
                try:
                    if member == self.name:
                        out.append(await self._run_now_local(task_id, params))
                    else:
                        out.append((await self._request(member, msg)).get("body") or {})
                except HTTPError as e:
                    out.append({"task_id": task_id, "node": member, "error": e.message})
            if not out:
                raise HTTPError(409, f"task {task_id!r} has no eligible member to run on")
            first = next((x for x in out if "slot" in x), out[0])
            return {"task_id": task_id, "node": ",".join(x.get("node", "?") for x in out),
                    "slot": first.get("slot"), "shards": out}
        owner = self.core.ring.owner(task_id)
        if owner is None:
            raise HTTPError(409, f"task {task_id!r} has no eligible member to run on")
        if owner == self.name:
            return await self._run_now_local(task_id, params)
        rep = await self._request(owner, msg)
        return rep.get("body") or {}

    async def _run_now_local(self, task_id: str, params: dict | None = None) -> dict:
        task = self._task_or_404(task_id)
        if task.target:
            if self.name not in self.core.shard_list(task_id):
                raise HTTPError(409, f"{self.name} holds no shard of {task_id!r}")
        elif self.core.ring.owner(task_id) != self.name:
            raise HTTPError(409, f"{self.name} does not own {task_id!r} (owner: {self.core.ring.owner(task_id)})")
        if params is not None:
            # checked again here: the definition may have changed on the way
            try:
                params = bind_run(task, params.get("env"), params.get("args"))
            except (TaskError, AttributeError) as e:
                raise HTTPError(400, str(e)) from None
        slot, reasons, effects = self.core.run_now(task_id, wall_clock(), params)
        self._do(effects)
        if slot is None:
            raise HTTPError(409, f"{task_id}: not run now ({', '.join(reasons) or 'overlap policy'})")
        out = {"task_id": task_id, "node": self.name, "slot": slot}
        if params and (params["env"] or params["args"]):
            out["params"] = params
        return out

    async def cancel_run(self, run_id: str, by: str) -> dict:
        """End a running run wherever it runs: the node named in its run id
        (``<slot>-<node>-<8 hex>[.<attempt>]``) ends its process group."""
        runner, _ = self._runner_of(run_id)
        if runner is None:
            raise HTTPError(400, f"run id {run_id[:80]!r}: expected <slot>-<node>-<8 hex digits>[.<attempt>] "
                                 "(see peerctl runs TASK)")
        if runner == self.name:
            return self._cancel_local(run_id, by)
        state = self._member_state(runner)
        if state is None:
            raise HTTPError(404, f"run {run_id}: its node {runner} is not a member")
        if state in ("dead", "left"):
            raise HTTPError(409, f"run {run_id}: its node {runner} is {state}; "
                                 "its unfinished runs are lost, not running")
        rep = await self._request(runner, {"t": "cancel", "run_id": run_id, "by": by})
        return rep.get("body") or {}

    def _runner_of(self, run_id: str) -> tuple[str | None, dict | None]:
        """The node that runs (or ran) ``run_id``: the one its record names
        when this node holds the record (a chained run's id names no node),
        else the one named in the id; and the record."""
        rec = self._find_run(run_id)
        if rec is not None and isinstance(rec.get("node"), str):
            return rec["node"], rec
        m = RUN_ID_RE.fullmatch(run_id)
        return (m.group(2) if m else None), rec

    def _member_state(self, name: str) -> str | None:
        member = self.gossip.core.member(name) if self.gossip else None
        return member.state.value if member is not None else None

    # ------------------------------------------------------------ tokens, audit
    def reload_tokens(self) -> bool:
        """SIGHUP: read ``api_tokens_file`` again; a bad file leaves the
        tokens in force (and says why)."""
        from node.cli.config import load_token_file
        from node.cli.settings import ConfigError

        if not self.cfg.api_tokens_file or self.api is None:
            log.info("SIGHUP: no api_tokens_file to reload")
            return False
        try:
            tokens = load_token_file(self.cfg.api_tokens_file)
        except ConfigError as e:
            log.error("SIGHUP: tokens not reloaded, the previous ones stay in force: %s", e)
            return False
        self.api.set_tokens(tokens)
        log.info("SIGHUP: %d named API token(s) loaded from %s", len(tokens), self.cfg.api_tokens_file)
        return True

    def audit(self, entry: dict) -> None:
        """One state-changing API request answered: a log line, the bounded
        audit table (newest ``AUDIT_KEEP``, in SQLite) and ``GET /v1/audit``."""
        entry = {"at": round(wall_clock(), 3), "node": self.name, **entry}
        self._audit.append(entry)
        self._audit_pending.append(json.dumps(entry, sort_keys=True))
        log.info("audit: %s %s by %s: %s", entry["method"], entry["path"], entry.get("token") or "-",
                 entry["status"], extra={"task_id": entry.get("task"), "audit": True})
        self._dirty.set()

    def audit_json(self) -> list[dict]:
        return list(self._audit)

    def _cancel_local(self, run_id: str, by: str) -> dict:
        found, effects = self.core.cancel_run(run_id, by, wall_clock())
        self._do(effects)
        if found is None:
            raise HTTPError(409, f"run {run_id} is not running on {self.name} (finished, or never started here)")
        log.info("run cancel requested by %s", by, extra={"task_id": found["task_id"], "run_id": run_id})
        return {"run_id": found["run_id"], "task_id": found["task_id"], "node": self.name,
                "attempt": found["attempt"], "status": "cancelling", "by": by}

    async def backfill(self, task_id: str, start: int, end: int, dry_run: bool) -> dict:
        self._task_or_404(task_id)
        owner = self.core.ring.owner(task_id)
        if owner is None:
            raise HTTPError(409, f"task {task_id!r} has no eligible member")
        if owner == self.name:
            return await self._backfill_local(task_id, start, end, dry_run)
        rep = await self._request(owner, {"t": "backfill", "task_id": task_id, "start": start, "end": end,
                                          "dry_run": dry_run})
        return rep.get("body") or {}

    async def _backfill_local(self, task_id, start, end, dry_run) -> dict:
        self._task_or_404(task_id)
        try:
            slots = self.core.backfill(task_id, int(start), int(end), wall_clock(), bool(dry_run))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        self._wake.set()
        return {"task_id": task_id, "node": self.name, "dry_run": dry_run, "slots": slots}

    # ------------------------------------------------------------------ keys
    def keys_json(self) -> dict:
        if self.keyring is None:
            return {"insecure": True, "keys": []}
        prim = self.keyring.primary
        return {
            "insecure": False,
            "keys": [
                {"fingerprint": Keyring.fingerprint(k), "primary": k == prim, "members": None}
                for k in self.keyring.keys()
            ],
        }

    def _key_op_local(self, op: str, key_b64: str) -> dict:
        if self.keyring is None:
            raise HTTPError(409, "this node runs insecure (no keyring)")
        if op == "list":
            return {"keys": [Keyring.fingerprint(k) for k in self.keyring.keys()], "primary": Keyring.fingerprint(self.keyring.primary)}
        try:
            key = Keyring.decode_key(key_b64)
            getattr(self.keyring, op)(key)
        except KeyringError as e:
            raise HTTPError(400, f"{op}: {e}") from None
        self._persist_keyring()
        return {"op": op, "fingerprint": Keyring.fingerprint(key)}

    def _persist_keyring(self) -> None:
        """Rewrite the key file so a restart keeps the rotated ring."""
        try:
            path = Path(self.cfg.key_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text("".join(Keyring.encode_key(k) + "\n" for k in self.keyring.keys()))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as e:
            log.error("could not rewrite key file %s: %s", self.cfg.key_file, e)

    async def key_op(self, op: str, key_b64: str) -> dict:
        """Apply a keyring change on every alive member (serf's keyring query)."""
        results = {self.name: "ok"}
        self._key_op_local(op, key_b64)
        peers = sorted(m.name for m in self.gossip.members() if m.state.value == "alive" and m.name != self.name)
        errors = {}

        async def one(name):
            try:
                await self._request(name, {"t": "key", "op": op, "key": key_b64}, timeout_s=5.0)
                results[name] = "ok"
            except HTTPError as e:
                errors[name] = e.message

        async with trio.open_nursery() as n:
            for p in peers:
                n.start_soon(one, p)
        if errors:
            raise HTTPError(502, f"{op} failed on {len(errors)} member(s): " + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
        return {"op": op, "members": sorted(results), "detail": f"{len(results)} member(s)"}
