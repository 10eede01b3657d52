"""The node shell: wires membership, ownership, replicated state, scheduler,
executors, fencing, persistence and the HTTP API into one trio process.

No protocol decision is made here (DESIGN.md §1): the cores decide
(``gossip.swim``, ``node.ring``, ``node.store``, ``node.scheduler``,
``node.fencing``); this module feeds them real time, sockets, processes,
etcd and SQLite, and carries out what they return.

Flows:
- membership events -> eligible members (alive or suspect, clock skew within
  ``max_skew_s``) -> ``Ring.set_members`` -> changed task ids ->
  ``Scheduler.set_owned`` (a task newly owned is held until a handoff
  anti-entropy with another replica completes, or ``handoff_timeout_s``).
- a local write (API apply/delete/pause, a fire, a run record) -> store
  entries -> pushed at once to peers (catalogue: every alive member; run
  records: the task's preference list) -> persisted to SQLite.
- anti-entropy every ``ae_interval_s`` with one random alive member repairs
  whatever a push missed, and measures clock offsets.
- scheduler effects -> fencing claim (if etcd) -> executor with retries ->
  run records.
"""
from __future__ import annotations

import heapq
import logging
import os
import random
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio

from gossip.config import Config as GossipConfig
from gossip.effects import EventKind, MemberEvent, UserMessage
from gossip.seal import Keyring, KeyringError
from gossip.transport import format_addr
from gossip.udp import GossipNode

from . import peerwire
from .config import NodeConfig
from .fencer import Fencer, FencerClosed
from .http_api import Api
from .http_server import HTTPError, serve_http
from .metrics import NodeMetrics
from .ring import Ring
from .scheduler import Scheduler
from .skew import SkewEstimator
from .sqlite_store import CorruptDatabase, SqliteStore
from .store import Store
from .tasks import Task, TaskError, parse_tasks

log = logging.getLogger("peerd.node")

TERMINAL = ("succeeded", "failed", "timeout", "cancelled", "lost", "error", "skipped")


class StartupError(Exception):
    """The node cannot start; the message says why."""


@dataclass
class _Running:
    task_id: str
    slot: int
    run_id: str
    cancel: trio.CancelScope
    started: float


def _claim_run_id(rec: dict) -> str | None:
    """Run records carry ``<claim run id>.<attempt>``; claims carry the former."""
    rid = rec.get("run_id")
    return rid.rsplit(".", 1)[0] if isinstance(rid, str) and "." in rid else None


def _wall() -> float:
    return time.time()


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
        gcfg = gcfg.replace(reap_interval_s=cfg.reap_interval_s)
        self.gossip_config = gcfg
        local = cfg.profile == "local"
        self.ae_interval_s = 1.0 if local else 10.0
        self.handoff_timeout_s = 3.0 if local else 15.0
        self.ring = Ring(replicas=3)
        self.scheduler = Scheduler(self.name)
        self.skew = SkewEstimator()
        self.metrics = NodeMetrics(self._snapshot)
        self.api_addr: tuple[str, int] | None = None
        self.gossip: GossipNode | None = None
        self.fencer = None
        self._wake = trio.Event()
        self._dirty = trio.Event()
        self._running: dict[str, _Running] = {}
        self._tasks: dict[str, Task] = {}
        self._members_api: dict[str, str] = {}
        self._handoff_pending: dict[str, float] = {}
        # no seeds (a one-node cluster) = joined at once
        self._joined = not any(s != cfg.advertise_addr() and s != cfg.bind for s in cfg.seeds)
        self.boot_grace_s = 3.0 if cfg.profile == "local" else 15.0
        self._owned: set[str] = set()
        self._claims: dict[str, list[int]] = {}
        # (task, slot) -> (dead claimer, claim run id of the run seen lost)
        self._lost_claimers: dict[tuple[str, int], tuple[str, str | None]] = {}
        self._shared_cache: dict[str, list[str]] = {}  # peer -> shared tasks (cleared on ring change)
        self._claim_events: dict[str, trio.Event] = {}
        self._stopping = False
        # claims sent to etcd and not yet answered; shutdown waits for them
        # like for runs, and a claim answered after that wait does not run
        self._claims_in_flight = 0
        self._runs_closed = False
        self._nursery: trio.Nursery | None = None
        self._started_wall = _wall()
        self._applied_startup_tasks = False

    # ------------------------------------------------------------------ setup
    @classmethod
    async def create(cls, cfg: NodeConfig) -> "Node":
        keyring = None
        if not cfg.insecure:
            try:
                keyring = Keyring.from_file(cfg.key_file)
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
        store = Store(cfg.name)
        store.load(rows)
        node = cls(cfg, keyring, db, store)
        for view in store.tasks():
            node._install_task_view(view)
        return node

    def _meta(self) -> bytes:
        api = format_addr(self.api_addr) if self.api_addr else ""
        return msgpack.packb({"api": api, "v": 1}, use_bin_type=True)

    # -------------------------------------------------------------------- run
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            api = Api(self, token=cfg.api_token, open_reads=cfg.open_reads)
            try:
                self.api_addr = await nursery.start(serve_http, api, cfg.api[0], cfg.api[1])
            except OSError as e:
                raise StartupError(f"api {format_addr(cfg.api)}: cannot listen: {e.strerror or e}") from None
            self.gossip = GossipNode(
                self.gossip_config,
                self.name,
                bind=cfg.bind,
                advertise=cfg.advertise,
                seeds=list(cfg.seeds),
                keyring=self.keyring,
                insecure=cfg.insecure,
                tags=dict(cfg.tags),
                meta=self._meta(),
            )
            self.gossip.set_stream_handler(self._handle_request)
            events = self.gossip.subscribe(max_buffer=10000)
            try:
                await nursery.start(self.gossip.run)
            except OSError as e:
                raise StartupError(f"bind {format_addr(cfg.bind)}: {e.strerror or e}") from None
            if cfg.etcd:
                await self._start_fencing(nursery)
            log.info(
                "node %s up: gossip %s, api %s, %d tasks known",
                self.name, format_addr(self.gossip.bound_addr), format_addr(self.api_addr), len(self._tasks),
            )
            nursery.start_soon(self._event_loop, events)
            nursery.start_soon(self._scheduler_loop)
            nursery.start_soon(self._persist_loop)
            nursery.start_soon(self._ae_loop)
            nursery.start_soon(self._boot_grace)
            self._recompute_ownership()
            self._recover_own_runs()
            if cfg.tasks and not self._applied_startup_tasks:
                self._applied_startup_tasks = True
                try:
                    from .tasks import load_task_file

                    tasks = load_task_file(cfg.tasks)
                    await self.apply_tasks([t.to_dict() for t in tasks], source=os.path.basename(cfg.tasks))
                except (TaskError, OSError) as e:
                    log.error("tasks file not applied: %s", e)
            task_status.started(self)

    async def _boot_grace(self) -> None:
        """Seeds all down: after the grace, run alone (and keep retrying seeds)."""
        if self._joined:
            return
        await trio.sleep(self.boot_grace_s)
        if not self._joined:
            log.warning("no seed answered within %.0fs; owning tasks alone until one does", self.boot_grace_s)
            self._joined = True
            self._recompute_ownership()

    async def _start_fencing(self, nursery: trio.Nursery) -> None:
        from .etcd import EtcdClient

        client = EtcdClient(
            list(self.cfg.etcd),
            username=self.cfg.etcd_user or None,
            password=self.cfg.etcd_password or None,
            ca_file=self.cfg.etcd_ca_file or None,
        )
        self.fencer = Fencer(
            client,
            self.name,
            prefix=self.cfg.etcd_prefix,
            retention_s=self.cfg.fencing_retention_s,
            on_unavailable=self.cfg.fencing_on_unavailable,
            session_ttl_s=self.cfg.fencing_session_ttl_s,
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
        self._wake.set()
        grace = self.cfg.shutdown_grace_s
        if self._running or self._claims_in_flight:
            log.info("waiting up to %.0fs for %d running run(s) and %d claim(s) in flight",
                     grace, len(self._running), self._claims_in_flight)
            with trio.move_on_after(grace):
                # a claim answered in time becomes a run, and is waited for too
                while self._running or self._claims_in_flight:
                    await trio.sleep(0.05)
        # From here no claim starts a run: the session is about to be revoked
        # and a run started now could not be waited for (a peer may take the
        # slot over once our session is gone).
        self._runs_closed = True
        if self._running:
            for r in list(self._running.values()):
                log.warning("run still going at shutdown; cancelling and handing back",
                            extra={"task_id": r.task_id, "run_id": r.run_id})
                r.cancel.cancel()
            with trio.move_on_after(5):
                while self._running:
                    await trio.sleep(0.05)
        if self.gossip is not None:
            with trio.move_on_after(5):
                await self.gossip.leave(timeout_s=3.0)
        if self.fencer is not None:
            await self.fencer.aclose()  # end our session: reclaimers need not wait its TTL
        await self._flush()
        await self.db.close()
        log.info("node %s stopped", self.name)

    # ------------------------------------------------------------ membership
    async def _event_loop(self, events) -> None:
        async for ev in events:
            try:
                if isinstance(ev, MemberEvent):
                    self._on_member_event(ev)
                elif isinstance(ev, UserMessage):
                    self._on_user_message(ev)
            except Exception:
                log.exception("failed to handle %s", type(ev).__name__)

    def _on_member_event(self, ev: MemberEvent) -> None:
        m = ev.member
        if m.name != self.name and ev.kind is EventKind.JOIN and not self._joined:
            self._joined = True
            log.info("joined the cluster through %s", m.name, extra={"member": m.name})
        if ev.kind in (EventKind.JOIN, EventKind.UPDATE):
            try:
                meta = msgpack.unpackb(m.meta, raw=False) if m.meta else {}
                if isinstance(meta, dict) and isinstance(meta.get("api"), str):
                    self._members_api[m.name] = meta["api"]
            except Exception:
                log.warning("member %s has unreadable metadata", m.name, extra={"member": m.name})
        log.info("member %s %s (incarnation %d)", m.name, ev.kind.value, m.incarnation, extra={"member": m.name})
        self._recompute_ownership()
        if ev.kind in (EventKind.DEAD, EventKind.LEFT) and m.name != self.name:
            self._handle_owner_loss(m.name)

    def _eligible(self) -> dict[str, dict[str, str]]:
        if self.gossip is None:
            return {self.name: dict(self.cfg.tags)}
        if not self._joined:
            # Until we have heard from the cluster (or the boot grace passed),
            # own nothing: a restarted node alone would otherwise own every
            # task and fire catch-ups the real owners are already firing.
            return {}
        skewed = self.skew.skewed(self.cfg.max_skew_s)
        out = {}
        for m in self.gossip.members():
            if m.state.value in ("alive", "suspect") and m.name not in skewed:
                out[m.name] = dict(m.tags)
        out.setdefault(self.name, dict(self.cfg.tags))
        return out

    def _recompute_ownership(self) -> None:
        self._shared_cache.clear()
        changed = self.ring.set_members(self._eligible())
        self._apply_ownership(sorted(changed))

    def _apply_ownership(self, task_ids) -> None:
        now = _wall()
        for tid in task_ids:
            if tid not in self._tasks:
                continue
            owners = self.ring.owners(tid)
            owned = bool(owners) and owners[0] == self.name
            others = [o for o in owners if o != self.name]
            was_owned = tid in self._owned
            if owned:
                self._owned.add(tid)
            else:
                self._owned.discard(tid)
            if was_owned and owned:
                continue
            if owned and others and tid not in self._handoff_pending:
                # new owner: hold until a handoff exchange with another replica
                self._handoff_pending[tid] = now + self.handoff_timeout_s
                self.scheduler.set_owned(tid, True, now, handoff_ready=False)
                if self._nursery is not None:
                    self._nursery.start_soon(self._handoff, tid, others)
            else:
                self.scheduler.set_owned(tid, owned, now, handoff_ready=True)
                if not owned:
                    self._handoff_pending.pop(tid, None)
        self._wake.set()

    def scheduler_owned(self, tid: str) -> bool:
        return tid in self._owned

    async def _handoff(self, task_id: str, others: list[str]) -> None:
        deadline = self._handoff_pending.get(task_id, _wall())
        ok = False
        with trio.move_on_after(max(0.0, deadline - _wall())) as scope:
            for peer in others:
                if await self._anti_entropy_with(peer):
                    ok = True
                    break
        self._handoff_pending.pop(task_id, None)
        if self._stopping:
            return  # leaving: nothing to take over (and nothing to log about it)
        if not ok:
            self.metrics.handoff_timeouts.inc()
            why = (f"timed out after {self.handoff_timeout_s:g} s" if scope.cancelled_caught
                   else "failed: no replica answered")
            log.info("handoff for %s %s (asked %s); taking over with the state we have", task_id, why,
                     ", ".join(others), extra={"task_id": task_id})
        if self.ring.owner(task_id) == self.name:
            self._sync_control(task_id)
            self.scheduler.set_owned(task_id, True, _wall(), handoff_ready=True)
            self._wake.set()

    def _handle_owner_loss(self, dead: str) -> None:
        """A member died or left: unfinished runs it owned that we now own."""
        now = _wall()
        for tid in self.ring.tasks_of(self.name):
            if self.ring.owner(tid) != self.name or tid not in self._tasks:
                continue
            for rec in self.store.runs(tid):
                if rec.get("node") == dead and rec.get("status") == "running":
                    lost = dict(rec, status="lost", finished=now)
                    self._commit(self.store.put_run(lost), run_task=tid)
                    log.warning("run of dead member %s was unfinished", dead,
                                extra={"task_id": tid, "run_id": rec.get("run_id")})
                    if isinstance(rec.get("slot"), int):
                        self._lost_claimers[(tid, rec["slot"])] = (dead, _claim_run_id(rec))
                        while len(self._lost_claimers) > 4096:
                            self._lost_claimers.pop(next(iter(self._lost_claimers)))
                    for eff in self.scheduler.unfinished_run(tid, rec, now):
                        self._carry_out(eff, now)
        self._wake.set()

    def _recover_own_runs(self) -> None:
        """Records of ours left 'running' by a previous life of this node."""
        now = _wall()
        for tid in sorted(self._tasks):
            for rec in self.store.runs(tid):
                if rec.get("node") == self.name and rec.get("status") == "running" and rec.get("run_id") not in self._running:
                    self._commit(self.store.put_run(dict(rec, status="lost", finished=now)), run_task=tid)
                    if isinstance(rec.get("slot"), int):
                        self._lost_claimers[(tid, rec["slot"])] = (self.name, _claim_run_id(rec))
                    if self.ring.owner(tid) == self.name:
                        for eff in self.scheduler.unfinished_run(tid, rec, now):
                            self._carry_out(eff, now)

    # ------------------------------------------------------------ replication
    def _on_user_message(self, ev: UserMessage) -> None:
        try:
            msg = peerwire.decode(ev.data)
        except peerwire.PeerProtocolError as e:
            log.warning("bad broadcast from %s: %s", ev.sender, e, extra={"peer": ev.sender})
            return
        if msg["t"] == "push":
            self._merge_remote(msg["entries"], ev.sender)

    def _merge_remote(self, entries, sender: str) -> None:
        try:
            changed = self.store.merge(entries)
        except ValueError as e:
            log.warning("rejected entries from %s: %s", sender, e, extra={"peer": sender})
            return
        self.metrics.replication_updates.labels("in").inc(len(entries))
        if changed:
            self._after_change(changed)

    def _after_change(self, keys) -> None:
        """React to changed store keys (local or merged)."""
        touched = set()
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind in ("task", "ctl"):
                touched.add(rest)
            elif kind == "run":
                pass
        moved: set[str] = set()
        for tid in sorted(touched):
            view = self.store.get_task(tid)
            if view is None or view.deleted or view.value is None:
                if tid in self._tasks:
                    del self._tasks[tid]
                    self._owned.discard(tid)
                    # the load cap may move other tasks when one goes away
                    self._shared_cache.clear()
                    moved |= self.ring.remove_task(tid)
                    self.scheduler.remove_task(tid)
                continue
            moved |= self._install_task_view(view)
            moved.add(tid)
        self._apply_ownership(sorted(moved))
        self._dirty.set()
        self._wake.set()

    def _install_task_view(self, view) -> set[str]:
        """Install a task definition; returns the task ids whose preference
        list changed (the task itself, and others the load cap moved)."""
        try:
            task = Task.from_dict(view.value)
        except (TaskError, ValueError, TypeError) as e:
            log.error("task %s in the store is invalid here: %s", view.task_id, e, extra={"task_id": view.task_id})
            return set()
        self._tasks[task.id] = task
        ctl = self.store.control(task.id)
        self._shared_cache.clear()
        moved = self.ring.set_tasks({task.id: dict(task.tags) if task.tags else None})
        self.scheduler.set_task(task, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot, now=_wall())
        return set(moved)

    def _sync_control(self, tid: str) -> None:
        ctl = self.store.control(tid)
        self.scheduler.update_control(tid, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot)

    def _commit(self, entries, *, run_task: str | None = None) -> None:
        """Local change: push entries to peers, persist, react."""
        if not entries:
            return
        keys = [e.key if hasattr(e, "key") else e[0] for e in entries]
        self._after_change(keys)
        if self.gossip is None or self._nursery is None:
            return
        wire = [self.store.encode_entry(e) for e in entries] if hasattr(self.store, "encode_entry") else list(entries)
        data = peerwire.encode({"t": "push", "entries": wire})
        if run_task is not None:
            targets = [o for o in self.ring.owners(run_task) if o != self.name]
        else:
            targets = [m.name for m in self.gossip.members() if m.state.value in ("alive", "suspect") and m.name != self.name]
        self.metrics.replication_updates.labels("out").inc(len(entries) * max(1, len(targets)))
        for name in targets:
            self._nursery.start_soon(self._push_to, name, data)

    async def _push_to(self, name: str, data: bytes) -> None:
        m = self.gossip.core.member(name) if self.gossip else None
        if m is None:
            return
        try:
            with trio.move_on_after(5):
                await self.gossip.request(m.addr, data, timeout_s=5.0)
        except Exception as e:
            log.debug("push to %s failed: %s", name, e, extra={"peer": name})

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
            if t == "push":
                self._merge_remote(msg["entries"], sender)
                return peerwire.reply(True, wall)
            if t == "ae":
                res = self.store.handle_exchange(msg["msg"], tasks=self._shared_tasks(sender))
                if res.changed:
                    self.metrics.replication_updates.labels("in").inc(len(res.changed))
                    self._after_change(res.changed)
                self.metrics.antientropy_bytes.inc(len(data) + len(res.reply or b""))
                return peerwire.reply(True, _wall(), body=res.reply)
            if t == "run_now":
                return peerwire.reply(True, wall, body=await self._run_now_local(msg["task_id"]))
            if t == "backfill":
                body = await self._backfill_local(msg["task_id"], msg["start"], msg["end"], msg["dry_run"])
                return peerwire.reply(True, wall, body=body)
            if t == "key":
                return peerwire.reply(True, wall, body=self._key_op_local(msg["op"], msg["key"]))
        except HTTPError as e:
            return peerwire.reply(False, wall, error=e.message)
        except Exception as e:
            log.exception("request %s from %s failed", t, sender)
            return peerwire.reply(False, wall, error=f"{type(e).__name__}: {e}")
        return peerwire.reply(False, wall, error=f"unexpected message type {t}")

    async def _request(self, name: str, msg: dict, timeout_s: float = 10.0) -> dict:
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

    async def _ae_loop(self) -> None:
        while True:
            await trio.sleep(self.ae_interval_s * (0.5 + self.rng.random()))
            if self.gossip is None or self._stopping:
                continue
            peers = sorted(m.name for m in self.gossip.members() if m.state.value == "alive" and m.name != self.name)
            if peers:
                await self._anti_entropy_with(self.rng.choice(peers))
            gc = self.store.gc_tombstones(_wall(), 7 * 86400.0)
            if gc:
                self._dirty.set()

    def _shared_tasks(self, peer: str) -> list[str]:
        """Tasks whose run records both we and ``peer`` replicate (cached
        until the ring changes: every anti-entropy message asks)."""
        shared = self._shared_cache.get(peer)
        if shared is None:
            shared = [t for t in self.ring.tasks_of(self.name) if peer in self.ring.owners(t)]
            self._shared_cache[peer] = shared
        return shared

    async def _anti_entropy_with(self, peer: str) -> bool:
        """Run the store's exchange protocol with one peer (catalogue, then
        the run records we both replicate); True if it completed."""
        try:
            for scope in ("catalogue", "runs"):
                shared = self._shared_tasks(peer) if scope == "runs" else None
                if scope == "runs" and not shared:
                    continue
                msg = self.store.start_exchange(scope, shared)
                rounds = 0
                while msg is not None and rounds < 8:
                    rounds += 1
                    t0 = _wall()
                    rep = await self._request(peer, {"t": "ae", "wall": t0, "msg": msg}, timeout_s=10.0)
                    t1 = _wall()
                    self.skew.observe(peer, t0, float(rep["wall"]), t1)
                    body = rep.get("body")
                    self.metrics.antientropy_bytes.inc(len(msg) + len(body or b""))
                    if body is None:
                        break
                    res = self.store.handle_exchange(body, tasks=shared)
                    if res.changed:
                        self.metrics.replication_updates.labels("in").inc(len(res.changed))
                        self._after_change(res.changed)
                    msg = res.reply
            self.metrics.antientropy_rounds.labels("ok").inc()
            if self.skew.skewed(self.cfg.max_skew_s) != getattr(self, "_last_skewed", set()):
                self._last_skewed = self.skew.skewed(self.cfg.max_skew_s)
                self._recompute_ownership()
            return True
        except (HTTPError, ValueError) as e:
            self.metrics.antientropy_rounds.labels("failed").inc()
            log.debug("anti-entropy with %s failed: %s", peer, getattr(e, "message", e), extra={"peer": peer})
            return False

    # ------------------------------------------------------------ persistence
    async def _persist_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self._flush()
            await trio.sleep(0.05)  # batch bursts of changes into one transaction

    async def _flush(self) -> None:
        rows = self.store.drain_dirty()
        if rows:
            await self.db.write(rows)
            self.metrics.store_writes.inc(len(rows))

    # -------------------------------------------------------------- scheduler
    async def _scheduler_loop(self) -> None:
        while True:
            if self._stopping:
                return
            now = _wall()
            # at most 1000 decisions per pass: with more due, next_deadline()
            # is already past and the loop yields (move_on_after(0)) before
            # the next batch, so a burst of 10,000 fires never blocks the node
            for eff in self.scheduler.tick(now, limit=1000):
                self._carry_out(eff, now)
            nd = self.scheduler.next_deadline()
            timeout = 1.0 if nd is None else max(0.0, min(1.0, nd - _wall()))
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()

    def _carry_out(self, eff, now: float) -> None:
        kind = type(eff).__name__
        if kind == "Fire":
            if self._stopping:
                return
            if eff.reason == "catchup":
                self._count_misfire(eff.task_id)
            if self.fencer is not None and not self._is_reclaim(eff):
                # register the claim turn now, in effect order, before the
                # concurrently started _fire tasks race each other (a
                # re-claim takes no turn: it may wait for the dead claimer's
                # session and must not hold back the task's next slots)
                heapq.heappush(self._claims.setdefault(eff.task_id, []), eff.slot)
            self._nursery.start_soon(self._fire, eff)
        elif kind == "SlotSkipped":
            self.metrics.slots.labels(eff.reason).inc()
            if eff.reason in ("misfire_skip", "coalesced", "expired", "catchup_limit"):
                self._count_misfire(eff.task_id)
            log.info("slot skipped: %s", eff.reason, extra={"task_id": eff.task_id, "slot": eff.slot})
        elif kind == "Cancel":
            r = self._running.get(eff.run_id)
            if r is not None:
                r.cancel.cancel()
        elif kind == "Advance":
            self._commit(self.store.advance_fired(eff.task_id, eff.slot))

    def _count_misfire(self, task_id: str) -> None:
        t = self._tasks.get(task_id)
        self.metrics.misfires.labels(t.misfire if t else "unknown").inc()

    async def _fire(self, fire) -> None:
        from .executor import RunContext, execute_with_retries

        task = self._tasks.get(fire.task_id)
        if task is None:
            if self.fencer is not None and not self._is_reclaim(fire):
                async with self._claim_turn(fire.task_id, fire.slot):
                    pass  # release the registered turn
            return
        base = f"{fire.slot}-{self.name}-{self.rng.getrandbits(32):08x}"
        token = None
        if self.fencer is not None:
            window = float(getattr(task, "catchup_window_s", 3600.0) or 3600.0)
            # Claims of one task go to etcd one at a time in slot order, so
            # tokens (etcd revisions) grow with the slot even when a catch-up
            # fires many slots at once.
            deadline = trio.current_time() + max(0.0, fire.slot + window - _wall())
            lost = self._lost_claimers.pop((task.id, fire.slot), None) if self._is_reclaim(fire) else None
            self._claims_in_flight += 1
            try:
                if lost:
                    # the dead owner's claim stands in etcd: take it over once,
                    # when its etcd session is gone too (a false death waits
                    # 1.5 session TTLs, then leaves the run to its owner)
                    self._check_not_stopping()
                    res = await self.fencer.reclaim(
                        task.id, fire.slot, base, lost[0],
                        deadline=max(deadline, trio.current_time() + 2.0), expected_run_id=lost[1],
                    )
                else:
                    async with self._claim_turn(task.id, fire.slot):
                        self._check_not_stopping()
                        res = await self.fencer.claim(task.id, fire.slot, base, deadline=deadline)
            except FencerClosed:
                # shutting down: the fencer's session is revoked; this
                # process must not claim (a peer takes the slot over)
                self.scheduler.fire_abandoned(task.id, fire.slot, _wall())
                log.info("slot not claimed: shutting down", extra={"task_id": task.id, "slot": fire.slot})
                return
            finally:
                self._claims_in_flight -= 1
            self.metrics.fencing_claims.labels(res.reason).inc()
            if self._runs_closed:
                # answered after shutdown's wait: running now would race the
                # peer that takes the slot over once our session is revoked
                self.metrics.slots.labels("claim_after_shutdown").inc()
                self.scheduler.fire_abandoned(task.id, fire.slot, _wall())
                log.warning("slot claimed after the shutdown wait; not run (the claim stands "
                            "in etcd under our ending session)", extra={"task_id": task.id, "slot": fire.slot})
                return
            if not res.won and res.reason != "fire_without_token":
                self.metrics.slots.labels("claim_" + res.reason).inc()
                self.scheduler.fire_abandoned(task.id, fire.slot, _wall())
                self._wake.set()
                log.info("slot not claimed (%s)", res.reason, extra={"task_id": task.id, "slot": fire.slot})
                return
            token = res.token
        self.metrics.slots.labels("fired").inc()
        self.metrics.fire_lateness.observe(max(0.0, _wall() - fire.fire_at))
        cancel = trio.CancelScope()
        self._running[base] = _Running(task.id, fire.slot, base, cancel, _wall())
        self.metrics.running.inc()
        self.scheduler.run_started(task.id, fire.slot, base, _wall())

        def ctx(attempt: int) -> RunContext:
            return RunContext(
                task_id=task.id,
                slot=fire.slot,
                run_id=f"{base}.{attempt}",
                attempt=attempt,
                node=self.name,
                fencing_token=token,
                env=dict(task.env or {}),
                cwd=task.cwd or None,
                timeout_s=float(task.timeout_s),
            )

        async def on_attempt_start(c: RunContext) -> None:
            rec = self._record(task.id, fire.slot, c.run_id, c.attempt, "running", None, _wall(), None, token, "")
            self._commit(self.store.put_run(rec), run_task=task.id)
            if c.attempt > 1:
                self.metrics.retries.inc()
            log.info("run started", extra={"task_id": task.id, "run_id": c.run_id, "attempt": c.attempt})

        async def on_attempt(c: RunContext, r) -> None:
            rec = self._record(task.id, fire.slot, c.run_id, c.attempt, r.status, r.exit_code, r.started, r.finished, token, r.output)
            if r.error:
                rec["error"] = r.error
            self._commit(self.store.put_run(rec), run_task=task.id)
            self.metrics.runs.labels(r.status).inc()
            self.metrics.run_duration.observe(max(0.0, r.finished - r.started))
            log.info("run finished: %s (exit %s)", r.status, r.exit_code,
                     extra={"task_id": task.id, "run_id": c.run_id, "status": r.status})

        current: list[RunContext] = []

        async def on_start(c: RunContext) -> None:
            current[:] = [c]
            await on_attempt_start(c)

        async def on_done(c: RunContext, r) -> None:
            current.clear()
            await on_attempt(c, r)

        try:
            with cancel:
                await execute_with_retries(task.command, ctx, task.retries, self.rng, on_done, on_start=on_start)
            if cancel.cancelled_caught and current:
                c = current[0]
                now = _wall()
                rec = self._record(task.id, fire.slot, c.run_id, c.attempt, "cancelled", None, now, now, token, "")
                rec["error"] = "cancelled (overlap replace or shutdown)"
                self._commit(self.store.put_run(rec), run_task=task.id)
                self.metrics.runs.labels("cancelled").inc()
        except Exception:
            log.exception("executor failed", extra={"task_id": task.id, "run_id": base})
        finally:
            self._running.pop(base, None)
            self.metrics.running.dec()
            self.scheduler.run_finished(task.id, base, _wall())
            self._wake.set()

    def _check_not_stopping(self) -> None:
        """No new claim once shutdown began (one already sent is waited for)."""
        if self._stopping:
            raise FencerClosed("shutting down: no new claims")

    def _is_reclaim(self, fire) -> bool:
        return fire.reason == "rerun_owner_loss" and (fire.task_id, fire.slot) in self._lost_claimers

    @asynccontextmanager
    async def _claim_turn(self, task_id: str, slot: int):
        """Wait until ``slot`` is the smallest pending claim of ``task_id``."""
        pending = self._claims.setdefault(task_id, [])
        if slot not in pending:  # normally registered in _carry_out already
            heapq.heappush(pending, slot)
        try:
            while pending[0] != slot:
                ev = self._claim_events.setdefault(task_id, trio.Event())
                await ev.wait()
            yield
        finally:
            pending.remove(slot)
            heapq.heapify(pending)
            if not pending:
                self._claims.pop(task_id, None)
            ev = self._claim_events.pop(task_id, None)
            if ev is not None:
                ev.set()

    def _record(self, task_id, slot, run_id, attempt, status, exit_code, started, finished, token, output) -> dict:
        return {
            "task_id": task_id,
            "slot": int(slot),
            "run_id": run_id,
            "node": self.name,
            "attempt": int(attempt),
            "status": status,
            "exit_code": exit_code,
            "started": started,
            "finished": finished,
            "fencing_token": token,
            "output": output or "",
        }

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
        st_store = self.store.statistics() if hasattr(self.store, "statistics") else {}
        if not isinstance(st_store, dict):
            st_store = {k: getattr(st_store, k) for k in getattr(st_store, "__dataclass_fields__", {})}
        owned = sum(1 for t in self._tasks if self.ring.owner(t) == self.name)
        skew = {p: self.skew.offset_s(p) for p in self._members_api if self.skew.offset_s(p) is not None}
        return {"gossip": g, "store": st_store, "owned": owned, "skew": skew}

    def metrics_text(self) -> bytes:
        return self.metrics.text()

    def status(self) -> dict:
        members = self.gossip.members() if self.gossip else []
        by_state: dict[str, int] = {}
        for m in members:
            by_state[m.state.value] = by_state.get(m.state.value, 0) + 1
        return {
            "name": self.name,
            "gossip": format_addr(self.gossip.advertise_addr) if self.gossip else None,
            "api": format_addr(self.api_addr) if self.api_addr else None,
            "incarnation": self.gossip.core.incarnation if self.gossip else 0,
            "members": by_state,
            "tasks": len(self._tasks),
            "tasks_owned": sum(1 for t in self._tasks if self.ring.owner(t) == self.name),
            "runs_running": len(self._running),
            "fencing": bool(self.fencer),
            "uptime_s": round(_wall() - self._started_wall, 1),
            "version": "0.1.0",
        }

    def members_json(self) -> list[dict]:
        out = []
        now_mono = trio.current_time()
        for m in self.gossip.members() if self.gossip else []:
            out.append({
                "name": m.name,
                "addr": format_addr(m.addr),
                "state": m.state.value,
                "incarnation": m.incarnation,
                "tags": dict(m.tags),
                "api": self._members_api.get(m.name) or (format_addr(self.api_addr) if m.name == self.name and self.api_addr else None),
                "since": f"{max(0.0, now_mono - m.state_change):.0f}s ago",
            })
        return out

    def ring_json(self) -> dict:
        load = self.ring.load()
        eligible = self._eligible()
        rows = []
        for m in self.gossip.members() if self.gossip else []:
            off = self.skew.offset_s(m.name)
            rows.append({
                "name": m.name,
                "state": m.state.value,
                "eligible": m.name in eligible,
                "owned": load.get(m.name, 0),
                "replica_of": len(self.ring.tasks_of(m.name)),
                "skew_ms": None if off is None else round(off * 1000, 1),
            })
        return {"replicas": 3, "members": rows, "tasks": len(self._tasks)}

    def _task_or_404(self, task_id: str) -> Task:
        t = self._tasks.get(task_id)
        if t is None:
            raise HTTPError(404, f"unknown task {task_id!r}")
        return t

    def tasks_json(self) -> list[dict]:
        out = []
        for tid in sorted(self._tasks):
            t = self._tasks[tid]
            ctl = self.store.control(tid)
            view = self.store.get_task(tid)
            out.append({
                "id": tid,
                "schedule": t.schedule,
                "type": t.command.to_dict().get("type"),
                "owner": self.ring.owner(tid),
                "paused": bool(ctl.paused),
                "last_fired": ctl.last_fired_slot,
                "conflict": bool(view and len(view.siblings) > 1),
            })
        return out

    def task_json(self, task_id: str) -> dict:
        t = self._task_or_404(task_id)
        view = self.store.get_task(task_id)
        ctl = self.store.control(task_id)
        return {
            "task": t.to_dict(),
            "owner": self.ring.owner(task_id),
            "replicas": self.ring.owners(task_id),
            "paused": bool(ctl.paused),
            "last_fired": ctl.last_fired_slot,
            "conflict": bool(view and len(view.siblings) > 1),
            "siblings": list(view.siblings) if view and len(view.siblings) > 1 else [],
            "resolution": "greatest (updated_at, writer, content hash) wins; siblings kept until the next write",
        }

    def owner_json(self, task_id: str) -> dict:
        owners = self.ring.owners(task_id)
        return {"task_id": task_id, "owner": owners[0] if owners else None, "replicas": owners, "known": task_id in self._tasks}

    def runs_json(self, task_id: str) -> list[dict]:
        if task_id not in self._tasks and not self.store.runs(task_id):
            raise HTTPError(404, f"unknown task {task_id!r}")
        return [
            {k: r.get(k) for k in ("task_id", "slot", "run_id", "node", "attempt", "status", "exit_code",
                                    "started", "finished", "fencing_token", "output", "error")}
            for r in self.store.runs(task_id)
        ]

    def explain_json(self, task_id: str, n: int) -> dict:
        self._task_or_404(task_id)
        e = dict(self.scheduler.explain(task_id, _wall(), n))
        e.setdefault("task_id", task_id)
        e["owner"] = self.ring.owner(task_id)
        e["replicas"] = self.ring.owners(task_id)
        return e

    async def apply_tasks(self, items: list, *, source: str = "request") -> dict:
        try:
            tasks = parse_tasks(items, source=source)
        except TaskError as e:
            raise HTTPError(400, str(e)) from None
        entries = []
        now = _wall()
        for t in tasks:
            t = t.resolve_now(now)
            d = t.to_dict()
            view = self.store.get_task(t.id)
            ctx = view.context if view is not None else None
            if view is not None and not view.deleted and view.value == d and len(view.siblings) <= 1:
                continue  # unchanged: no new version, no churn
            entries.extend(self.store.put_task(t.id, d, ctx, now))
            if bool(self.store.control(t.id).paused) != bool(t.paused):
                entries.extend(self.store.set_paused(t.id, bool(t.paused), now))
        self._commit(entries)
        return {"applied": [t.id for t in tasks]}

    async def delete_task(self, task_id: str) -> dict:
        self._task_or_404(task_id)
        view = self.store.get_task(task_id)
        self._commit(self.store.delete_task(task_id, view.context if view else None, _wall()))
        return {"deleted": task_id}

    async def set_paused(self, task_id: str, paused: bool) -> dict:
        self._task_or_404(task_id)
        self._commit(self.store.set_paused(task_id, paused, _wall()))
        return {"task_id": task_id, "paused": paused}

    async def run_now(self, task_id: str) -> dict:
        self._task_or_404(task_id)
        owner = self.ring.owner(task_id)
        if owner is None:
            raise HTTPError(409, f"task {task_id!r} has no eligible member to run on")
        if owner == self.name:
            return await self._run_now_local(task_id)
        rep = await self._request(owner, {"t": "run_now", "task_id": task_id})
        return rep.get("body") or {}

    async def _run_now_local(self, task_id: str) -> dict:
        self._task_or_404(task_id)
        if self.ring.owner(task_id) != self.name:
            raise HTTPError(409, f"{self.name} does not own {task_id!r} (owner: {self.ring.owner(task_id)})")
        now = _wall()
        effects = self.scheduler.run_now(task_id, now)
        slot = None
        for eff in effects:
            if type(eff).__name__ == "Fire":
                slot = eff.slot
            self._carry_out(eff, now)
        self._wake.set()
        if slot is None:
            reasons = [getattr(e, "reason", "") for e in effects]
            raise HTTPError(409, f"{task_id}: not run now ({', '.join(reasons) or 'overlap policy'})")
        return {"task_id": task_id, "node": self.name, "slot": slot}

    async def backfill(self, task_id: str, start: int, end: int, dry_run: bool) -> dict:
        self._task_or_404(task_id)
        owner = self.ring.owner(task_id)
        if owner is None:
            raise HTTPError(409, f"task {task_id!r} has no eligible member")
        if owner == self.name:
            return await self._backfill_local(task_id, start, end, dry_run)
        rep = await self._request(owner, {"t": "backfill", "task_id": task_id, "start": start, "end": end, "dry_run": dry_run})
        return rep.get("body") or {}

    async def _backfill_local(self, task_id, start, end, dry_run) -> dict:
        self._task_or_404(task_id)
        try:
            slots = self.scheduler.backfill(task_id, int(start), int(end), _wall(), dry_run=dry_run)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        self._wake.set()
        return {"task_id": task_id, "node": self.name, "dry_run": dry_run, "slots": list(slots)}

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
