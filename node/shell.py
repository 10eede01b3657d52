"""The node shell: one trio process around the node core.

Every decision is made by ``node.core.NodeCore`` (ownership, handoff, owner
loss, run records, claim turns and retries, re-claims, catch-up,
anti-entropy rounds) and the cores it drives; the simulator drives the same
core. This module only reads the world (time, membership, sockets, etcd,
child processes, SQLite) and carries out the core's effects:

- ``Request``  -> a sealed gossip stream request to a peer, answered back;
- ``StartRun`` -> the executor with retries (attempts reported back);
- ``CancelRun`` -> cancel that run's scope;
- ``Claim`` / ``Reclaim`` -> one attempt through the fencer (etcd);
- ``Note``     -> a log line and metrics.

The store's dirty rows are written to SQLite in batches by the persist loop.
The HTTP API's read model is ``node.api.views``.

Test hook: ``PEERD_CLOCK_OFFSET_S`` (seconds, may be negative) is added to
this process's wall clock, to test clock skew between real nodes. Never set
it in production.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import secrets
import sqlite3
import time
from functools import partial
from pathlib import Path

import msgpack
import trio

from gossip.config import Config as GossipConfig
from gossip.effects import EventKind, MemberEvent, UserMessage
from gossip.seal import Keyring, KeyringError
from gossip.seal_shell import read_keyring
from gossip.transport import format_addr
from gossip.udp import GossipNode

from node import peerwire
from node.api import views
from node.cli.settings import NodeConfig
from node.run import followups
from node.core import NodeCore
from node.core_effects import CancelRun, Claim, Note, Notify, Reclaim, Request, StartRun, claim_run_id
from node.fencing.fencer_shell import Fencer, FencerClosed
from node.api.routes_shell import Api
from node.api.http_shell import HTTPError, serve_http
from node.knobs import NodeKnobs
from node.observe.metrics_shell import NodeMetrics
from node.schedule.slots import reading_notes
from node.state.sqlite_shell import CorruptDatabase, SqliteStore
from node.state.store import Store
from node.tasks.diff import diff_tasks
from node.run.traceids import trace_id_for
from node.tasks.commands import command_with_args
from node.tasks.model import SecretError, Task, TaskError, after_cycle, bind_run, resolve_env
from node.tasks.parse import parse_tasks

log = logging.getLogger("peerd.node")

_SKIP_IS_MISFIRE = ("misfire_skip", "coalesced", "expired", "catchup_limit")


#: A run id: ``<slot>-<node>-<8 hex>`` and, for one attempt, ``.<n>``.
RUN_ID_RE = re.compile(r"(-?[0-9]{1,20})-(.{1,160})-([0-9a-f]{8})(?:\.([0-9]{1,4}))?")


#: ``write_ack: replica``: how long a write waits for a replica's ack.
REPLICA_ACK_S = 5.0
_GONE = object()


def _push_ok(raw: bytes) -> bool:
    try:
        rep = peerwire.decode(raw)
    except peerwire.PeerProtocolError:
        return False
    return rep.get("t") == "reply" and bool(rep.get("ok"))


#: Audit entries kept (memory and the SQLite audit table).
AUDIT_KEEP = 1000
#: Live output kept per running attempt (the oldest bytes are dropped).
LIVE_OUTPUT_BYTES = 1 << 20
#: Most output one logs call returns.
LOGS_CHUNK_BYTES = 256 * 1024


class OutputFile:
    """A run's whole output on disk, up to ``max_bytes`` (plain writes of
    the chunks the pipe gives; the file is the node's own)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.left = max_bytes
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if self.fd is None or self.left <= 0:
            return
        chunk = data[: self.left]
        try:
            os.write(self.fd, chunk)
            self.left -= len(chunk)
            if self.left <= 0:
                os.write(self.fd, b"\n[peerd: output file limit reached; the rest is in the record's tail]\n")
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LiveOutput:
    """A running attempt's output: the last ``LIVE_OUTPUT_BYTES`` with their
    byte offsets, and the output file when the task keeps one."""

    __slots__ = ("buf", "base", "file")

    def __init__(self, file: OutputFile | None = None) -> None:
        self.buf = bytearray()
        self.base = 0
        self.file = file

    def feed(self, data: bytes) -> None:
        self.buf += data
        excess = len(self.buf) - LIVE_OUTPUT_BYTES
        if excess > 0:
            del self.buf[:excess]
            self.base += excess
        if self.file is not None:
            self.file.write(data)

    def read(self, offset: int) -> tuple[bytes, int, int]:
        """``(data, its start offset, next offset)`` from ``offset`` (or
        from the oldest byte kept)."""
        start = max(offset, self.base)
        i = start - self.base
        data = bytes(self.buf[i:i + LOGS_CHUNK_BYTES])
        return data, start, start + len(data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _logs_from_record(rec: dict, offset: int, node: str) -> dict:
    raw = (rec.get("output") or "").encode("utf-8", "replace")
    data = raw[max(0, offset):][:LOGS_CHUNK_BYTES]
    return {"run_id": rec.get("run_id"), "node": node, "running": rec.get("status") == "running",
            "offset": offset, "next_offset": offset + len(data), "skipped": 0,
            "data": data.decode("utf-8", "replace"), "source": "record"}


def _read_secret(path: str) -> bytes:
    """A secret file's bytes (bounded: at most one byte over the limit is read)."""
    from node.tasks.model import MAX_SECRET_BYTES

    with open(path, "rb") as fh:
        return fh.read(MAX_SECRET_BYTES + 1)


def _clock_offset_s() -> float:
    raw = os.environ.get("PEERD_CLOCK_OFFSET_S", "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


_OFFSET_S = _clock_offset_s()


def _wall() -> float:
    return time.time() + _OFFSET_S


class StartupError(Exception):
    """The node cannot start; the message says why."""


class Node:
    """One peerd node. Build with ``await Node.create(cfg)``, then
    ``await nursery.start(node.run)``; ``await node.shutdown()`` leaves."""

    def __init__(self, cfg: NodeConfig, keyring: Keyring | None, db: SqliteStore, store: Store):
        self.cfg = cfg
        self.name = cfg.name
        self.keyring = keyring
        self.db = db
        self.store = store
        self.rng = random.Random(secrets.randbits(64))
        gcfg = GossipConfig.local() if cfg.profile == "local" else GossipConfig.lan()
        self.gossip_config = gcfg.replace(reap_interval_s=cfg.reap_interval_s)
        knobs = NodeKnobs.local() if cfg.profile == "local" else NodeKnobs.lan()
        self.knobs = knobs.replace(max_skew_s=cfg.max_skew_s, session_ttl_s=cfg.fencing_session_ttl_s)
        self.core = NodeCore(cfg.name, store, tags=dict(cfg.tags), knobs=self.knobs, rng=self.rng,
                             fencing=bool(cfg.etcd), default_notify=tuple(cfg.notify))
        self.metrics = NodeMetrics(self._snapshot)
        self.api_addr: tuple[str, int] | None = None
        self.gossip: GossipNode | None = None
        self.fencer: Fencer | None = None
        self._wake = trio.Event()
        self._dirty = trio.Event()
        self._scopes: dict[str, trio.CancelScope] = {}     # run id -> its cancel scope
        self.api: Api | None = None
        self._tokens = None     # named tokens (Node.create reads api_tokens_file)
        self._audit: collections.deque = collections.deque(maxlen=AUDIT_KEEP)
        self._flush_lock = trio.Lock()
        self._unflushed: dict[str, bytes | None] = {}      # rows not yet in SQLite (a failing disk)
        self.disk_error: str | None = None
        self._collect: list | None = None                   # pushes of the write being acknowledged
        self._acked: dict[int, bool] = {}
        self._ack_event = trio.Event()
        self._audit_pending: list[str] = []
        self._live: dict[str, LiveOutput] = {}             # attempt run id -> its output so far
        self._live_by_claim: dict[str, str] = {}           # claim run id -> current attempt run id
        self._members_api: dict[str, str] = {}
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        self._started_wall = _wall()
        self._applied_startup_tasks = False
        store.set_output_reader(self._read_output)
        from node.run import tracing_shell as tracing

        # traces of runs (node/run/tracing_shell.py): a no-op without otlp_endpoint
        self.tracing = tracing.from_config(cfg)

    # ------------------------------------------------------------------ setup
    @classmethod
    async def create(cls, cfg: NodeConfig) -> "Node":
        keyring = None
        if not cfg.insecure:
            try:
                keyring = read_keyring(cfg.key_file)
            except (KeyringError, OSError) as e:
                raise StartupError(f"key_file {cfg.key_file}: {e}") from None
        data = cfg.data_path()
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"data_dir {data}: {e.strerror or e}") from None
        db = SqliteStore(str(data / "state.db"), start_empty=cfg.start_empty)
        try:
            await db.open()
            rows = await db.load()
        except CorruptDatabase as e:
            raise StartupError(f"{e} (start with --start-empty to move it aside and refill from peers)") from None
        tokens = None
        if cfg.api_tokens_file:
            from node.cli.config import load_token_file
            from node.cli.settings import ConfigError

            try:
                tokens = load_token_file(cfg.api_tokens_file)
            except ConfigError as e:
                raise StartupError(str(e)) from None
        audit = await db.load_audit(AUDIT_KEEP)
        store = Store(cfg.name, max_bytes=cfg.run_records_max_bytes)
        store.load(rows)
        store.note_outputs(await db.output_index())
        node = cls(cfg, keyring, db, store)
        node._tokens = tokens
        for line in audit:
            try:
                node._audit.append(json.loads(line))
            except ValueError:
                continue
        return node

    # convenience views of the core (tests and the API read them)
    @property
    def ring(self):
        return self.core.ring

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def skew(self):
        return self.core.skew

    @property
    def _tasks(self) -> dict[str, Task]:
        return self.core.tasks

    def _meta(self) -> bytes:
        api = format_addr(self.api_addr) if self.api_addr else ""
        return msgpack.packb({"api": api, "v": 1}, use_bin_type=True)

    # -------------------------------------------------------------------- run
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            api = self.api = Api(self, token=cfg.api_token, open_reads=cfg.open_reads, tokens=self._tokens)
            try:
                from node.cli.config import api_tls_context

                self.api_addr = await nursery.start(partial(serve_http, ssl_context=api_tls_context(cfg)),
                                                    api, cfg.api[0], cfg.api[1])
            except OSError as e:
                raise StartupError(f"api {format_addr(cfg.api)}: cannot listen: {e.strerror or e}") from None
            self.gossip = GossipNode(
                self.gossip_config, self.name, bind=cfg.bind, advertise=cfg.advertise,
                seeds=list(cfg.seeds), keyring=self.keyring, insecure=cfg.insecure,
                tags=dict(cfg.tags), meta=self._meta(),
            )
            self.gossip.set_stream_handler(self._handle_request)
            events = self.gossip.subscribe(max_buffer=10000)
            try:
                await nursery.start(self.gossip.run)
            except OSError as e:
                raise StartupError(f"bind {format_addr(cfg.bind)}: {e.strerror or e}") from None
            if cfg.etcd:
                self._start_fencing(nursery)
            # no seeds but ourselves (a one-node cluster) = joined at once
            joined = not any(s != cfg.advertise_addr() and s != cfg.bind for s in cfg.seeds)
            self._do(self.core.start(_wall(), joined=joined))
            self._do(self.core.members_changed(self._view(), _wall()))
            log.info("node %s up: gossip %s, api %s, %d tasks known", self.name,
                     format_addr(self.gossip.bound_addr), format_addr(self.api_addr), len(self.core.tasks))
            nursery.start_soon(self._event_loop, events)
            nursery.start_soon(self._scheduler_loop)
            nursery.start_soon(self._persist_loop)
            if cfg.tasks and not self._applied_startup_tasks:
                self._applied_startup_tasks = True
                try:
                    from node.tasks.files_shell import load_task_file

                    tasks = load_task_file(cfg.tasks)
                    await self.apply_tasks([t.to_dict() for t in tasks], source=os.path.basename(cfg.tasks))
                except (TaskError, OSError, HTTPError) as e:
                    log.error("tasks file not applied: %s", getattr(e, "message", e))
            task_status.started(self)

    def _start_fencing(self, nursery: trio.Nursery) -> None:
        from node.fencing.etcd_shell import EtcdClient

        client = EtcdClient.from_config(self.cfg)
        self.fencer = Fencer(
            client, self.name, prefix=self.cfg.etcd_prefix, retention_s=self.cfg.fencing_retention_s,
            on_unavailable=self.cfg.fencing_on_unavailable, session_ttl_s=self.cfg.fencing_session_ttl_s,
        )
        nursery.start_soon(self._run_fencer)

    async def _run_fencer(self) -> None:
        try:
            await self.fencer.run()
        except Exception:
            log.exception("fencing loop stopped; slots will not fire until it recovers")

    async def shutdown(self) -> None:
        """Graceful stop: no new slots, wait for runs (grace), leave, flush."""
        if self._stopping:
            return
        self._stopping = True
        self._do(self.core.begin_shutdown(_wall()))
        grace = self.cfg.shutdown_grace_s
        core = self.core
        if core.running or core.claims_in_flight() or core.notifications_in_flight():
            log.info("waiting up to %.0fs for %d running run(s), %d claim(s) and %d notification(s) in flight",
                     grace, len(core.running), core.claims_in_flight(), core.notifications_in_flight())
            with trio.move_on_after(grace):
                # a claim answered in time becomes a run, and is waited for too
                while core.running or core.claims_in_flight() or core.notifications_in_flight():
                    await trio.sleep(0.05)
        # From here no claim starts a run: the session is about to be revoked
        # and a run started now could not be waited for.
        self._do(self.core.close_runs(_wall()))
        if self._scopes:
            for run_id, scope in sorted(self._scopes.items()):
                log.warning("run still going at shutdown; cancelling and handing back", extra={"run_id": run_id})
                scope.cancel()
            with trio.move_on_after(5):
                while self._scopes:
                    await trio.sleep(0.05)
        if self.gossip is not None:
            with trio.move_on_after(5):
                await self.gossip.leave(timeout_s=3.0)
        if self.fencer is not None:
            await self.fencer.aclose()  # end our session: reclaimers need not wait its TTL
        await self._flush()
        await self.db.close()
        log.info("node %s stopped", self.name)

    # ---------------------------------------------------------------- effects
    def _do(self, effects, *, wake: bool = True) -> None:
        """Carry out the core's effects."""
        n = self._nursery
        for eff in effects:
            t = type(eff)
            if t is Note:
                self._on_note(eff)
            elif n is None:
                continue
            elif t is Request:
                if self._collect is not None and eff.kind == "push":
                    self._collect.append(eff)
                    self._acked[eff.xid] = False
                n.start_soon(self._send_request, eff)
            elif t is StartRun:
                n.start_soon(self._execute, eff)
            elif t is CancelRun:
                scope = self._scopes.get(eff.run_id)
                if scope is not None:
                    scope.cancel()
            elif t is Claim:
                n.start_soon(self._claim, eff)
            elif t is Reclaim:
                n.start_soon(self._reclaim, eff)
            elif t is Notify:
                n.start_soon(self._notify, eff)
        self._dirty.set()
        if wake:
            self._wake.set()

    def _on_note(self, note: Note) -> None:
        f = note.fields
        ev = note.event
        m = self.metrics
        if ev == "slot_skipped":
            m.slots.labels(f["reason"]).inc()
            if f["reason"] in _SKIP_IS_MISFIRE:
                m.misfires.labels(f.get("misfire") or "unknown").inc()
            log.info("slot skipped: %s", f["reason"], extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "slot_fired":
            m.slots.labels("fired").inc()
            m.fire_lateness.observe(f["late_s"])
        elif ev == "misfire":
            m.misfires.labels(f["policy"]).inc()
        elif ev == "claim":
            if f["result"] not in ("won", "reclaim_won"):
                log.info("slot not claimed (%s%s)", f["result"], f": {f['detail']}" if f.get("detail") else "",
                         extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "claim_after_shutdown":
            log.warning("slot claimed after the shutdown wait; not run (the claim stands in etcd under "
                        "our ending session)", extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "run_started":
            if f["attempt"] > 1:
                m.retries.inc()
            log.info("run started", extra={"task_id": f["task_id"], "run_id": f["run_id"], "attempt": f["attempt"],
                                           "trace_id": trace_id_for(f["run_id"])})
        elif ev == "run_finished":
            m.runs.labels(f["status"]).inc()
            m.run_duration.observe(f["duration_s"])
            why = f": {f['error']}" if f.get("error") else ""
            log.info("run finished: %s (exit %s)%s", f["status"], f["exit_code"], why,
                     extra={"task_id": f["task_id"], "run_id": f["run_id"], "status": f["status"],
                            "trace_id": trace_id_for(f["run_id"])})
        elif ev == "clock":
            if f["suspect"]:
                log.error("this node's clock disagrees with most peers by more than max_skew_s (%s): owning "
                          "nothing until it agrees (check NTP)", ", ".join(f["skewed"]))
            else:
                log.warning("this node's clock agrees with its peers again: taking part in ownership")
        elif ev == "chain_triggered":
            m.chained.inc()
            log.info("chained run triggered by %s run %s", f["upstream"], f["run_id"],
                     extra={"task_id": f["task_id"], "slot": f["slot"]})
        elif ev == "rerun_dropped":
            log.info("rerun not needed: the run seen lost ended %s on its node", f["status"],
                     extra={"task_id": f["task_id"], "slot": f["slot"], "run_id": f["run_id"]})
        elif ev == "run_lost":
            log.warning("run of member %s was unfinished; marked lost", f["node"],
                        extra={"task_id": f["task_id"], "run_id": f["run_id"],
                               "trace_id": trace_id_for(str(f["run_id"]))})
        elif ev == "handoff_timeout":
            m.handoff_timeouts.inc()
            log.info("handoff for %s %s (asked %s); taking over with the state we have", f["task_id"],
                     f["why"], ", ".join(f["asked"]) or "nobody", extra={"task_id": f["task_id"]})
        elif ev == "ae_round":
            if f["result"] != "served":
                m.antientropy_rounds.labels(f["result"]).inc()
                if f["result"] == "failed":
                    log.debug("anti-entropy with %s failed: %s", f["peer"], f.get("why"), extra={"peer": f["peer"]})
            m.antientropy_bytes.inc(f["bytes"])
        elif ev == "replication_in":
            m.replication_updates.labels("in").inc(f["n"])
        elif ev == "replication_out":
            m.replication_updates.labels("out").inc(f["n"])
        elif ev in ("bad_message", "rejected_entries"):
            log.warning("bad message from %s: %s", f["peer"], f["error"], extra={"peer": f["peer"]})
        elif ev == "task_invalid":
            log.error("task %s in the store is invalid here: %s", f["task_id"], f["error"],
                      extra={"task_id": f["task_id"]})
        elif ev == "joined":
            log.info("joined the cluster through %s", f["member"], extra={"member": f["member"]})
        elif ev == "boot_alone":
            log.warning("no seed answered within %.0fs; owning tasks alone until one does", f["grace_s"])

    async def _send_request(self, eff: Request) -> None:
        m = self.gossip.core.member(eff.peer) if self.gossip else None
        if m is None:
            self._do(self.core.request_failed(eff.xid, _wall(), f"member {eff.peer} is unknown here"))
            return
        try:
            with trio.fail_after(eff.timeout_s):
                raw = await self.gossip.request(m.addr, eff.data, timeout_s=eff.timeout_s)
        except trio.TooSlowError:
            self._do(self.core.request_failed(eff.xid, _wall(), f"no answer in {eff.timeout_s:g} s"))
            return
        except Exception as e:
            self._do(self.core.request_failed(eff.xid, _wall(), f"{type(e).__name__}: {e}"))
            return
        if eff.kind == "push" and eff.xid in self._acked:
            self._acked[eff.xid] = _push_ok(raw)
            self._ack_event.set()
        self._do(self.core.request_answered(eff.xid, raw, _wall()))

    async def _claim(self, eff: Claim) -> None:
        t0 = time.time_ns()
        attrs = dict(task_id=eff.task_id, slot=eff.slot)
        try:
            res = await self.fencer.claim(eff.task_id, eff.slot, eff.run_id,
                                          deadline=trio.current_time() + eff.attempt_s)
        except FencerClosed:
            self.tracing.record_span("claim", eff.run_id, t0, under_root=False, status="closed", **attrs)
            self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, "closed", None, _wall()))
            return
        self.metrics.fencing_claims.labels(res.reason).inc()
        outcome = "won" if res.won and res.reason != "fire_without_token" else res.reason
        # a claim won is under the run's root span; a lost one is a root of its own
        self.tracing.record_span("claim", eff.run_id, t0, under_root=res.won, status=outcome,
                                 error=res.detail or None, fencing_token=res.token, **attrs)
        hc = res.holder_claim
        self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, outcome, res.token, _wall(),
                                          detail=res.detail,
                                          holder=(hc.node, hc.run_id, hc.started) if hc else None))

    async def _reclaim(self, eff: Reclaim) -> None:
        t0 = time.time_ns()
        attrs = dict(task_id=eff.task_id, slot=eff.slot, reclaim_from=eff.dead, reclaim_run_id=eff.expected_run_id)
        try:
            res = await self.fencer.reclaim(eff.task_id, eff.slot, eff.run_id, eff.dead,
                                            deadline=trio.current_time() + eff.attempt_s,
                                            expected_run_id=eff.expected_run_id, alive_wait_s=0.0,
                                            unstarted_only=eff.unstarted)
        except FencerClosed:
            self.tracing.record_span("claim", eff.run_id, t0, under_root=False, status="closed", **attrs)
            self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, "closed", None, _wall()))
            return
        self.metrics.fencing_claims.labels(res.reason).inc()
        if res.won:
            outcome = "won" if res.reason != "fire_without_token" else res.reason
        elif res.reason == "lost" and res.detail.startswith("claimer alive"):
            outcome = "claimer_alive"
        else:
            outcome = res.reason
        self.tracing.record_span("claim", eff.run_id, t0, under_root=res.won, status=outcome,
                                 error=res.detail or None, fencing_token=res.token, **attrs)
        self._do(self.core.claim_answered(eff.task_id, eff.slot, eff.run_id, outcome, res.token, _wall(),
                                          detail=res.detail))

    async def _execute(self, eff: StartRun) -> None:
        from node.run.attempt import RunContext
        from node.run.executor_shell import execute_with_retries

        task = eff.task
        scope = trio.CancelScope()
        self._scopes[eff.run_id] = scope
        self.metrics.running.inc()
        from node.run.tracing_shell import trace_id_for

        # the run's trace (node/run/tracing_shell.py): root span "run <task>", one
        # child span per attempt; its id is in every log line of the run
        trace_id = trace_id_for(eff.run_id)
        root = self.tracing.run_span(task.id, eff.run_id, slot=eff.slot, fencing_token=eff.token,
                                     reason=eff.reason)
        attempt_spans: dict = {}
        final: list = [None, None]      # the last attempt's status and error

        params = eff.params or {}
        secret_error = None
        try:
            # secret references resolve here, on the node that runs the task,
            # and never go into a record, a log line or the API
            task_env = resolve_env(dict(task.env or {}), os.environ, _read_secret)
        except SecretError as e:
            task_env, secret_error = {}, str(e)
        run_env = task_env | task.param_defaults() | dict(params.get("env") or {})
        command = command_with_args(task.command, list(params.get("args") or []))

        def ctx(attempt: int) -> RunContext:
            attempt_id = f"{eff.run_id}.{attempt}"
            live = self._live.get(attempt_id)
            if live is None:
                live = self._live[attempt_id] = LiveOutput(self._output_file(task, attempt_id))
                self._live_by_claim[eff.run_id] = attempt_id
            span = attempt_spans.get(attempt)
            if span is None:
                span = attempt_spans[attempt] = self.tracing.child_span(
                    f"attempt {attempt}", attempt_id, task_id=task.id, slot=eff.slot, attempt=attempt,
                    fencing_token=eff.token)
            return RunContext(
                task_id=task.id, slot=eff.slot, run_id=attempt_id, attempt=attempt, on_output=live.feed,
                node=self.name, fencing_token=eff.token, env=run_env,
                cwd=task.cwd or None, timeout_s=float(task.timeout_s), traceparent=span.traceparent,
            )

        current: list[int] = []
        last: list[int] = [0]

        def on_start(c: RunContext) -> None:
            current[:] = [c.attempt]
            last[0] = c.attempt
            self._do(self.core.attempt_started(eff.run_id, c.attempt, _wall()))

        def on_done(c: RunContext, r) -> None:
            current.clear()
            live = self._live.pop(c.run_id, None)
            if live is not None:
                live.close()
            final[:] = [r.status, r.error]
            span = attempt_spans.pop(c.attempt, None)
            if span is not None:
                span.set(exit_code=r.exit_code, **{"http.response.status_code": getattr(r, "http_status", None)})
                span.end(r.status, r.error)
            self._do(self.core.attempt_finished(
                eff.run_id, c.attempt, r.status, _wall(), exit_code=r.exit_code, started=r.started,
                finished=r.finished, output=r.output, error=r.error))

        cancelled_attempt = None
        try:
            with scope:
                if secret_error is not None:
                    from node.run.attempt import RunResult

                    c1 = ctx(1)
                    on_start(c1)
                    t = time.time()
                    on_done(c1, RunResult(status="error", exit_code=None, started=t, finished=t, output="",
                                          error=secret_error))
                else:
                    await execute_with_retries(command, ctx, task.retries, self.rng, on_done, on_start=on_start)
            if scope.cancelled_caught:
                # during an attempt, or waiting to retry (the next attempt
                # is the one cancelled)
                cancelled_attempt = current[0] if current else last[0] + 1
        except Exception as e:
            # a bug in the executor: the run ends as 'error' with the reason
            log.exception("executor failed: %s: %s", type(e).__name__, e,
                          extra={"task_id": task.id, "run_id": eff.run_id, "trace_id": trace_id})
            final[:] = ["error", f"executor failed: {type(e).__name__}: {e}"]
            if current:
                self._do(self.core.attempt_finished(eff.run_id, current[0], "error", _wall(),
                                                    error=f"executor failed: {type(e).__name__}: {e}"))
        finally:
            self._scopes.pop(eff.run_id, None)
            for aid in [a for a in self._live if a.rsplit(".", 1)[0] == eff.run_id]:
                self._live.pop(aid).close()
            self._live_by_claim.pop(eff.run_id, None)
            self.metrics.running.dec()
            self._do(self.core.run_ended(eff.run_id, _wall(), cancelled_attempt=cancelled_attempt))
            status, error = ("cancelled", None) if cancelled_attempt is not None else final
            for span in attempt_spans.values():     # cancelled, or the executor failed
                span.end(status or "error", error)
            root.set(attempts=last[0])
            root.end(status or "error", error)

    async def _notify(self, eff: Notify) -> None:
        """Send one notification with the target's timeout and retries
        (followups rule 3: nothing waits for it), then report it."""
        from node.run.http_client_shell import HttpError, request
        from node.run.retry import RetryPolicy

        target = eff.target
        fields = dict(eff.fields)
        if self.api_addr is not None:
            scheme = "https" if getattr(self.cfg, "api_tls_cert", "") else "http"
            fields["link"] = f"{scheme}://{format_addr(self.api_addr)}/#task/{eff.task_id}"
        body = followups.render_body(target.get("template"), fields)
        headers = [("content-type", "application/json"), ("user-agent", "peerd")]
        headers += [(k, v) for k, v in (target.get("headers") or {}).items()]
        policy = RetryPolicy(max=int(target.get("retries", 3)), backoff_s=1.0, max_backoff_s=30.0)
        tries = 1 + policy.max
        detail = ""
        ok = False
        from node.run.tracing_shell import trace_id_for

        # a span under the run's root span (a missed slot's: a trace of its own)
        trace_id = trace_id_for(eff.run_id) if eff.run_id is not None else None
        span = self.tracing.child_span(f"notify {eff.event}", eff.run_id, task_id=eff.task_id,
                                       event=eff.event, notify_target=eff.key)
        if span.traceparent is not None:
            headers.append(("traceparent", span.traceparent))
        status, attempt = "cancelled", 0
        try:
            for attempt in range(1, tries + 1):
                try:
                    resp = await request("POST", target["url"], headers=headers, body=body,
                                         timeout_s=float(target.get("timeout", 10.0)), max_body_bytes=1024)
                    ok = 200 <= resp.status < 300
                    detail = f"HTTP {resp.status}"
                except (HttpError, ValueError, OSError) as e:
                    detail = str(e)
                if ok:
                    break
                if attempt < tries:
                    self.metrics.notifications.labels("retried").inc()
                    await trio.sleep(policy.delay_s(attempt, self.rng))
            status = "sent" if ok else "failed"
        finally:
            span.set(tries=attempt, detail=detail)
            span.end(status, None if ok else detail or None)
        self.metrics.notifications.labels("sent" if ok else "failed").inc()
        if not ok:
            log.warning("notification %s to %s failed after %d tries: %s", eff.event, target["url"], tries, detail,
                        extra={"task_id": eff.task_id, "run_id": eff.run_id, "trace_id": trace_id})
        if eff.run_id is not None:
            self._do(self.core.notify_done(eff.task_id, eff.run_id, eff.key, ok, _wall(), detail))

    # ------------------------------------------------------------ membership
    def _view(self) -> list[tuple[str, str, dict]]:
        if self.gossip is None:
            return []
        return [(m.name, m.state.value, dict(m.tags)) for m in self.gossip.members()]

    async def _event_loop(self, events) -> None:
        async for ev in events:
            try:
                if isinstance(ev, MemberEvent):
                    self._on_member_event(ev)
                elif isinstance(ev, UserMessage):
                    _, effects = self.core.serve(ev.sender, ev.data, _wall())
                    self._do(effects)
            except Exception:
                log.exception("failed to handle %s", type(ev).__name__)

    def _on_member_event(self, ev: MemberEvent) -> None:
        m = ev.member
        if ev.kind in (EventKind.JOIN, EventKind.UPDATE):
            try:
                meta = msgpack.unpackb(m.meta, raw=False) if m.meta else {}
                if isinstance(meta, dict) and isinstance(meta.get("api"), str):
                    self._members_api[m.name] = meta["api"]
            except Exception:
                log.warning("member %s has unreadable metadata", m.name, extra={"member": m.name})
        log.info("member %s %s (incarnation %d)", m.name, ev.kind.value, m.incarnation, extra={"member": m.name})
        self._do(self.core.members_changed(self._view(), _wall(), kind=ev.kind.value, member=m.name))

    async def _handle_request(self, sender: str, data: bytes) -> bytes:
        """Serve a peer's stream request (sealed by gossip)."""
        wall = _wall()
        try:
            msg = peerwire.decode(data)
        except peerwire.PeerProtocolError as e:
            log.warning("bad request from %s: %s", sender, e, extra={"peer": sender})
            return peerwire.reply(False, wall, error=str(e))
        t = msg["t"]
        try:
            if t in ("push", "ae"):
                reply, effects = self.core.serve(sender, data, wall)
                self._do(effects)
                return reply
            if t == "run_now":
                params = msg.get("params")
                if params is not None and not isinstance(params, dict):
                    return peerwire.reply(False, wall, error="run_now: params must be a map")
                return peerwire.reply(True, wall, body=await self._run_now_local(msg["task_id"], params))
            if t == "backfill":
                body = await self._backfill_local(msg["task_id"], msg["start"], msg["end"], msg["dry_run"])
                return peerwire.reply(True, wall, body=body)
            if t == "key":
                return peerwire.reply(True, wall, body=self._key_op_local(msg["op"], msg["key"]))
            if t == "logs":
                body = self._logs_local(msg["run_id"][:200], max(0, msg["offset"]))
                return peerwire.reply(True, wall, body=body)
            if t == "cancel":
                return peerwire.reply(True, wall, body=self._cancel_local(msg["run_id"][:200], msg["by"][:200]))
        except HTTPError as e:
            return peerwire.reply(False, wall, error=e.message)
        except Exception as e:
            log.exception("request %s from %s failed", t, sender)
            return peerwire.reply(False, wall, error=f"{type(e).__name__}: {e}")
        return peerwire.reply(False, wall, error=f"unexpected message type {t}")

    async def _request(self, name: str, msg: dict, timeout_s: float = 10.0) -> dict:
        """Forward an API request to the member that must answer it."""
        m = self.gossip.core.member(name) if self.gossip else None
        if m is None:
            raise HTTPError(503, f"member {name} is unknown here")
        try:
            with trio.fail_after(timeout_s):
                raw = await self.gossip.request(m.addr, peerwire.encode(msg), timeout_s=timeout_s)
        except trio.TooSlowError:
            raise HTTPError(504, f"member {name} did not answer in {timeout_s:.0f}s") from None
        except Exception as e:
            raise HTTPError(502, f"member {name}: {e}") from None
        try:
            rep = peerwire.decode(raw)
        except peerwire.PeerProtocolError as e:
            raise HTTPError(502, f"member {name} answered badly: {e}") from None
        if rep["t"] != "reply":
            raise HTTPError(502, f"member {name} answered with {rep['t']}")
        if not rep["ok"]:
            raise HTTPError(409, f"{name}: {rep.get('error')}")
        return rep

    # ------------------------------------------------------------ loops
    async def _persist_loop(self) -> None:
        while True:
            if self.disk_error is None:
                await self._dirty.wait()
            else:
                # failing: try again every second (space may come back)
                with trio.move_on_after(1.0):
                    await self._dirty.wait()
            self._dirty = trio.Event()
            await self._flush()
            await trio.sleep(0.05)  # batch bursts of changes into one transaction

    def _read_output(self, key: str) -> bytes | None:
        """An output row: not yet written (``_unflushed``), else from SQLite."""
        v = self._unflushed.get(key, _GONE)
        return self.db.read_output(key) if v is _GONE else v

    def _log_trims(self) -> None:
        for t in self.store.take_trim_reports():
            if t["records_bytes"] > t["budget"] * 0.8:
                log.warning("run-record budget: the records alone hold %d of %d bytes; outputs are not kept "
                            "(lower history or raise run_records_max_bytes)", t["records_bytes"], t["budget"])
                continue
            log.info("run-record budget: dropped the %d oldest output(s), %d -> %d bytes (budget %d; "
                     "records alone %d)", t["outputs"], t["before"], t["after"], t["budget"], t["records_bytes"])

    async def _flush(self) -> bool:
        """Write what changed to SQLite, in order (one flush at a time).
        False when the write failed: the rows are kept and written by the
        next flush that works, and the node refuses writes (507) meanwhile."""
        async with self._flush_lock:
            self._log_trims()
            for k, v in self.store.drain_dirty():
                self._unflushed[k] = v
            if not self._unflushed and not self._audit_pending:
                return True
            rows = list(self._unflushed.items())
            try:
                if rows:
                    await self.db.write(rows)
                if self._audit_pending:
                    await self.db.append_audit(self._audit_pending, AUDIT_KEEP)
            except (sqlite3.Error, OSError) as e:
                reason = "full" if "full" in str(e).lower() or getattr(e, "errno", None) == 28 else (
                    "readonly" if "readonly" in str(e).lower() or "read-only" in str(e).lower() else "other")
                self.metrics.store_write_errors.labels(reason).inc()
                if self.disk_error is None:
                    log.error("cannot write the data dir (%s): %s; serving reads and gossip, refusing writes "
                              "with 507 until a write succeeds", reason, e)
                self.disk_error = f"{e}"
                self.metrics.store_failing.set(1)
                return False
            for k, v in rows:
                if self._unflushed.get(k, _GONE) is v:
                    del self._unflushed[k]
            self._audit_pending = []
            self.metrics.store_writes.inc(len(rows))
            if self.disk_error is not None:
                log.warning("the data dir is writable again: %d row(s) written, writes accepted", len(rows))
                self.disk_error = None
                self.metrics.store_failing.set(0)
            return True

    def _writable(self) -> None:
        """Raise 507 while the data dir cannot be written."""
        if self.disk_error is not None:
            raise HTTPError(507, f"{self.name} cannot write its data dir ({self.disk_error}); it serves reads "
                                 "and gossip and takes writes again when space returns")

    async def _acknowledge(self, pushes: list) -> str:
        """A write is answered once it is committed here (and with
        ``write_ack: replica``, once a replica has it). Returns the level."""
        try:
            if not await self._flush():
                raise HTTPError(507, f"not written on {self.name}: cannot write its data dir ({self.disk_error}); "
                                     "retry when space returns")
            if self.cfg.write_ack != "replica" or not pushes:
                return "local"
            with trio.move_on_after(REPLICA_ACK_S):
                while not any(self._acked.get(x.xid) for x in pushes):
                    ev = self._ack_event = trio.Event()
                    await ev.wait()
                return "replica"
            raise HTTPError(504, f"written on {self.name} but no replica acknowledged it within "
                                 f"{REPLICA_ACK_S:g} s; it replicates when one answers")
        finally:
            for x in pushes:
                self._acked.pop(x.xid, None)

    async def _scheduler_loop(self) -> None:
        while not self._stopping:
            # at most knobs.tick_limit decisions per pass: with more due,
            # next_deadline() is already past and the loop yields before the
            # next batch, so a burst of 10,000 fires never blocks the node
            self._do(self.core.tick(_wall()), wake=False)
            nd = self.core.next_deadline()
            timeout = 1.0 if nd is None else max(0.0, min(1.0, nd - _wall()))
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0)

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
            "uptime_s": round(_wall() - self._started_wall, 1),
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
            return views.explain_json(self.core, task_id, n, _wall())
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
        now = _wall()
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
        pushes = self._do_collect(self.core.delete_task(task_id, _wall()))
        return {"deleted": task_id, "durable": await self._acknowledge(pushes)}

    async def set_paused(self, task_id: str, paused: bool) -> dict:
        self._task_or_404(task_id)
        self._writable()
        pushes = self._do_collect(self.core.set_paused(task_id, paused, _wall()))
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
        slot, reasons, effects = self.core.run_now(task_id, _wall(), params)
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
        entry = {"at": round(_wall(), 3), "node": self.name, **entry}
        self._audit.append(entry)
        self._audit_pending.append(json.dumps(entry, sort_keys=True))
        log.info("audit: %s %s by %s: %s", entry["method"], entry["path"], entry.get("token") or "-",
                 entry["status"], extra={"task_id": entry.get("task"), "audit": True})
        self._dirty.set()

    def audit_json(self) -> list[dict]:
        return list(self._audit)

    # ------------------------------------------------------------ run output
    def _output_file(self, task: Task, attempt_id: str) -> OutputFile | None:
        """``output: {keep: file}``: the run's whole output (up to max_bytes)
        in ``<data_dir>/output/<task>/<run id>.log``; the task's newest
        ``history`` files are kept."""
        if not task.output or task.output.get("keep") != "file":
            return None
        path = self._output_path(task.id, attempt_id)
        d = path.parent
        try:
            d.mkdir(parents=True, exist_ok=True)
            old = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
            for f in old[: max(0, len(old) - task.history + 1)]:
                f.unlink(missing_ok=True)
            return OutputFile(path, int(task.output["max_bytes"]))
        except OSError as e:
            log.warning("cannot keep the run's output in a file: %s", e,
                        extra={"task_id": task.id, "run_id": attempt_id})
            return None

    def _output_path(self, task_id: str, attempt_id: str) -> Path:
        """Where ``output: {keep: file}`` keeps one attempt's output."""
        return self.cfg.data_path() / "output" / task_id / (attempt_id.replace("/", "_") + ".log")

    def _find_run(self, run_id: str) -> dict | None:
        """A run record this node holds, by attempt run id or, for a claim
        run id, its latest attempt."""
        store = self.store
        for tid in store.run_tasks():
            rec = store.run_record(tid, run_id)
            if rec is not None:
                return rec
        attempts = [r for tid in store.run_tasks() for r in store.runs(tid) if claim_run_id(r) == run_id]
        return max(attempts, key=lambda r: r.get("attempt") or 0, default=None)

    async def run_logs(self, run_id: str, offset: int) -> dict:
        """A run's output from byte ``offset``: live from the node that runs
        it, then its output file (``output: {keep: file}``) or its record's
        tail."""
        if run_id in self._live or run_id in self._live_by_claim:
            return self._logs_local(run_id, offset)
        runner, rec = self._runner_of(run_id)
        if runner is None:
            raise HTTPError(404, f"run {run_id[:80]!r}: no such run known here")
        if runner == self.name:
            return self._logs_local(run_id, offset)
        if self._member_state(runner) in (None, "dead", "left"):
            if rec is None:
                raise HTTPError(404, f"run {run_id}: its node {runner} is not reachable and no record is here")
            return _logs_from_record(self.store.with_output(rec), offset, self.name)
        rep = await self._request(runner, {"t": "logs", "run_id": run_id, "offset": offset})
        return rep.get("body") or {}

    def _logs_local(self, run_id: str, offset: int) -> dict:
        aid = self._live_by_claim.get(run_id, run_id)
        live = self._live.get(aid)
        if live is not None:
            data, start, nxt = live.read(offset)
            return {"run_id": aid, "node": self.name, "running": True, "offset": start, "next_offset": nxt,
                    "skipped": max(0, start - offset), "data": data.decode("utf-8", "replace")}
        rec = self._find_run(run_id)
        if rec is None:
            raise HTTPError(404, f"run {run_id[:80]!r}: no such run on {self.name}")
        task = self.core.tasks.get(rec.get("task_id"))
        if task is not None and task.output and task.output.get("keep") == "file":
            path = self._output_path(task.id, str(rec["run_id"]))
            try:
                with open(path, "rb") as fh:
                    fh.seek(max(0, offset))
                    data = fh.read(LOGS_CHUNK_BYTES)
                return {"run_id": rec["run_id"], "node": self.name, "running": rec.get("status") == "running",
                        "offset": offset, "next_offset": offset + len(data), "skipped": 0,
                        "data": data.decode("utf-8", "replace"), "source": "file"}
            except OSError:
                pass
        return _logs_from_record(self.store.with_output(rec), offset, self.name)

    def _cancel_local(self, run_id: str, by: str) -> dict:
        found, effects = self.core.cancel_run(run_id, by, _wall())
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
            slots = self.core.backfill(task_id, int(start), int(end), _wall(), bool(dry_run))
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
