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

The rest of the node is in its shell modules: ``node/effects_shell.py``
(carrying out effects), ``node/peers_shell.py`` (membership and peer
messages), ``node/facade_shell.py`` (the methods the HTTP API calls),
``node/run_output_shell.py`` (live output and logs) and
``node/clock_shell.py`` (the wall clock and its test hook).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
import secrets
import sqlite3
from functools import partial

import msgpack
import trio

from gossip.config import Config as GossipConfig
from gossip.seal import Keyring, KeyringError
from gossip.seal_shell import read_keyring
from gossip.addr import format_addr
from gossip.udp import GossipNode

from node.cli.settings import NodeConfig
from node.core import NodeCore
from node.fencing.fencer_shell import Fencer
from node.api.routes_shell import Api
from node.api.http_shell import serve_http
from node.api.messages import HTTPError
from node.knobs import NodeKnobs
from node.observe.metrics_shell import NodeMetrics
from node.state.sqlite_shell import CorruptDatabase, SqliteStore
from node.state.store import Store
from node.tasks.model import Task, TaskError

from node.clock_shell import wall_clock

from node.effects_shell import EffectsMixin
from node.facade_shell import AUDIT_KEEP, FacadeMixin
from node.peers_shell import PeersMixin
from node.run_output_shell import LiveOutput, RunOutputMixin

log = logging.getLogger("peerd.node")


#: ``write_ack: replica``: how long a write waits for a replica's ack.
REPLICA_ACK_S = 5.0
_GONE = object()


class StartupError(Exception):
    """The node cannot start; the message says why."""


class Node(EffectsMixin, PeersMixin, FacadeMixin, RunOutputMixin):
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
        self._started_wall = wall_clock()
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
            self._do(self.core.start(wall_clock(), joined=joined))
            self._do(self.core.members_changed(self._view(), wall_clock()))
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
        self._do(self.core.begin_shutdown(wall_clock()))
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
        self._do(self.core.close_runs(wall_clock()))
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
            self._do(self.core.tick(wall_clock()), wake=False)
            nd = self.core.next_deadline()
            timeout = 1.0 if nd is None else max(0.0, min(1.0, nd - wall_clock()))
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0)
