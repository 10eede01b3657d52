"""The node core's replication with peers (sans-IO core): serving a peer's
push or anti-entropy request, pushing local writes, anti-entropy rounds and
handoff exchanges, and installing the task definitions that arrive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from node import peerwire
from node.tasks.model import Task, TaskError
from node.core_effects import Effect, Request

#: An anti-entropy exchange that moved at least this many bytes (a page of
#: node/state/exchange.py is 1 MiB of entries) is followed at once by another with
#: the same peer, so a refill goes page after page rather than a page per
#: round.
PAGE_FOLLOW_BYTES = 512 * 1024
#: Stream timeouts (seconds) of the requests the core sends.
PUSH_TIMEOUT_S = 5.0
EXCHANGE_TIMEOUT_S = 10.0


@dataclass(slots=True)
class _Exchange:
    peer: str
    kind: str                       # "ae" | "handoff"
    scopes: list[str]
    scope: str | None = None
    shared: list[str] | None = None
    rounds: int = 0
    sent_at: float = 0.0
    nbytes: int = 0


class ReplicationMixin:
    """Peer messages, pushes and exchanges: a mixin of
    :class:`node.core.NodeCore`, whose constructor holds the state it uses."""

    # --------------------------------------------------------- peer messages

    def serve(self, sender: str, data: bytes, now: float) -> tuple[bytes, list[Effect]]:
        """Answer a peer's stream request (``push`` or ``ae``) or a gossip
        broadcast (its reply is then dropped). Other message types are the
        shell's (API forwarding); they get an error reply here."""
        try:
            msg = peerwire.decode(data)
        except peerwire.PeerProtocolError as e:
            self._note("bad_message", peer=sender, error=str(e))
            return peerwire.reply(False, now, error=str(e)), self._take()
        t = msg["t"]
        if t == "push":
            self._merge(msg["entries"], sender, now)
            return peerwire.reply(True, now), self._take()
        if t == "ae":
            shared = self._shared_tasks(sender)
            try:
                res = self.store.handle_exchange(msg["msg"], tasks=shared)
            except ValueError as e:
                self._note("bad_message", peer=sender, error=str(e))
                return peerwire.reply(False, now, error=str(e)), self._take()
            if res.changed:
                self._note("replication_in", n=len(res.changed))
                self._after_change(res.changed, now)
            self._note("ae_round", result="served", peer=sender, bytes=len(data) + len(res.reply or b""))
            return peerwire.reply(True, now, body=res.reply), self._take()
        return peerwire.reply(False, now, error=f"unexpected message type {t}"), self._take()

    def request_answered(self, xid: int, raw: bytes, now: float) -> list[Effect]:
        """A :class:`Request`'s reply arrived."""
        if xid in self._pushes:
            self._pushes.discard(xid)
            held = self._hand_on_xids.pop(xid, None)
            if held is not None:
                self._held_triggers.discard(held)
            return self._take()
        ex = self._exchanges.get(xid)
        if ex is None:
            return self._take()
        try:
            rep = peerwire.decode(raw)
            if rep["t"] != "reply":
                raise peerwire.PeerProtocolError(f"answered with {rep['t']}")
            if not rep["ok"]:
                raise peerwire.PeerProtocolError(str(rep.get("error")))
            body = rep.get("body")
            if body is not None and not isinstance(body, bytes):
                raise peerwire.PeerProtocolError("reply body must be bytes")
        except peerwire.PeerProtocolError as e:
            self._exchange_over(xid, now, ok=False, why=f"{ex.peer} answered badly: {e}")
            return self._take()
        self.skew.observe(ex.peer, ex.sent_at, float(rep["wall"]), now)
        ex.nbytes += len(raw)
        msg = None
        if body is not None:
            try:
                res = self.store.handle_exchange(body, tasks=ex.shared)
            except ValueError as e:
                self._exchange_over(xid, now, ok=False, why=f"{ex.peer}: {e}")
                return self._take()
            if res.changed:
                self._note("replication_in", n=len(res.changed))
                self._after_change(res.changed, now)
            msg = res.reply
        if msg is not None and ex.rounds < self.knobs.ae_rounds_max:
            self._exchange_send(xid, ex, msg, now)
        else:
            self._next_scope(xid, ex, now)
        return self._take()

    def request_failed(self, xid: int, now: float, why: str = "") -> list[Effect]:
        """A :class:`Request` got no answer (peer down, stream cut, timeout)."""
        if xid in self._pushes:
            self._pushes.discard(xid)
            self._hand_on_xids.pop(xid, None)
            return self._take()
        if xid in self._exchanges:
            self._exchange_over(xid, now, ok=False, why=why or "no answer")
        return self._take()

    # ---------------------------------------------------------- replication

    def _merge(self, entries: list, sender: str, now: float) -> None:
        try:
            changed = self.store.merge(entries)
        except ValueError as e:
            self._note("rejected_entries", peer=sender, error=str(e))
            return
        self._note("replication_in", n=len(entries))
        if changed:
            self._after_change(changed, now)

    def _commit(self, entries: list, now: float, *, run_task: str | None = None) -> None:
        """A local change: react, then push the entries to the peers that
        keep them (run records: the task's preference list)."""
        if not entries:
            return
        self._after_change([e[0] for e in entries], now)
        if run_task is not None:
            owners = self.ring.owners(run_task)
            if run_task in self._broadcast:
                owners = owners + [m for m in self.shard_list(run_task) if m not in owners]
            targets = [o for o in owners if o != self.name]
        else:
            targets = [n for n in sorted(self._view) if n != self.name
                       and self._view[n][0] in ("alive", "suspect")]
        if not targets:
            return
        data = peerwire.encode({"t": "push", "entries": [list(e) for e in entries]})
        self._note("replication_out", n=len(entries) * len(targets))
        for peer in targets:
            self._xid += 1
            self._pushes.add(self._xid)
            self.stats["pushes"] += 1
            self._out.append(Request(peer, self._xid, data, PUSH_TIMEOUT_S, "push"))

    def _after_change(self, keys: Iterable[str], now: float) -> None:
        touched = set()
        runs = []
        for key in keys:
            kind, _, rest = key.partition("/")
            if kind in ("task", "ctl"):
                touched.add(rest)
            elif kind == "run":
                runs.append(rest)
        for rest in runs:
            tid, _, rid = rest.rpartition("/")
            rec = self.store.run_record(tid, rid)
            if rec is not None:
                self._followup(tid, rec, now)
        moved: set[str] = set()
        for tid in sorted(touched):
            view = self.store.get_task(tid)
            if view is None or view.deleted or view.value is None:
                if tid in self.tasks:
                    del self.tasks[tid]
                    self._defs.pop(tid, None)
                    self.owned.discard(tid)
                    self.handoff_pending.pop(tid, None)
                    self._shared_cache.clear()
                    moved |= self.ring.remove_task(tid)
                    self.scheduler.remove_task(tid)
                    self._index_after(tid, None)
                    self._broadcast.discard(tid)
                    self._drop_shards(tid)
                    for c in self._lines.pop(tid, []):
                        self.stats["abandoned"] += 1
                continue
            moved |= self._install(view, now)
            moved.add(tid)
        self._apply_ownership(sorted(moved), now)

    def _install(self, view, now: float) -> set[str]:
        """Install or refresh a task; returns the task ids whose preference
        list changed (the task itself, and others the load cap moved)."""
        tid = view.task_id
        task = self.tasks.get(tid)
        ctl = self.store.control(tid)
        if task is not None and self._defs.get(tid) == view.value:
            self.scheduler.update_control(tid, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot)
            return set()
        try:
            task = Task.from_dict(view.value)
        except (TaskError, ValueError, TypeError) as e:
            self._note("task_invalid", task_id=tid, error=str(e))
            return set()
        if task.id != tid:  # a peer's entry whose definition names another task
            self._note("task_invalid", task_id=tid, error=f"definition of task {task.id!r} stored as {tid!r}")
            return set()
        self.tasks[tid] = task
        self._defs[tid] = view.value
        self._index_after(tid, task.after["task"] if task.after else None)
        if task.target:
            self._broadcast.add(tid)
        elif tid in self._broadcast:
            self._broadcast.discard(tid)
            self._drop_shards(tid)
        self._shared_cache.clear()
        moved = self.ring.set_tasks({tid: dict(task.tags) if task.tags else None})
        self.scheduler.set_task(task, paused=bool(ctl.paused), last_fired_slot=ctl.last_fired_slot, now=now)
        return set(moved)

    def _shared_tasks(self, peer: str) -> list[str]:
        """Tasks whose run records both we and ``peer`` replicate (cached
        until the ring changes)."""
        shared = self._shared_cache.get(peer)
        if shared is None:
            shared = [t for t in self.ring.tasks_of(self.name) if peer in self.ring.owners(t)]
            self._shared_cache[peer] = shared
        return shared

    # --------------------------------------------------------- anti-entropy

    def _ae_round(self, now: float) -> None:
        if self.stopping:
            return
        gc = self.store.gc_tombstones(now, self.knobs.tombstone_horizon_s)
        if gc:
            self._after_change(gc, now)
        if self._ae_xid is not None:
            return
        if self.handoff_pending:
            self._start_handoffs(now)
        peers = [n for n in sorted(self._view) if n != self.name and self._view[n][0] == "alive"]
        if peers:
            self._ae_xid = self._start_exchange(peers[self.rng.randrange(len(peers))], "ae", now)

    def _start_exchange(self, peer: str, kind: str, now: float) -> int:
        self._xid += 1
        xid = self._xid
        ex = _Exchange(peer, kind, ["catalogue", "runs"])
        self._exchanges[xid] = ex
        self._next_scope(xid, ex, now)
        return xid

    def _next_scope(self, xid: int, ex: _Exchange, now: float) -> None:
        while ex.scopes:
            ex.scope = ex.scopes.pop(0)
            ex.shared = self._shared_tasks(ex.peer) if ex.scope == "runs" else None
            if ex.scope == "runs" and not ex.shared:
                continue
            ex.rounds = 0
            self._exchange_send(xid, ex, self.store.start_exchange(ex.scope, ex.shared), now)
            return
        self._exchange_over(xid, now, ok=True)

    def _exchange_send(self, xid: int, ex: _Exchange, msg: bytes, now: float) -> None:
        ex.rounds += 1
        ex.sent_at = now
        data = peerwire.encode({"t": "ae", "wall": now, "msg": msg})
        ex.nbytes += len(data)
        self._out.append(Request(ex.peer, xid, data, EXCHANGE_TIMEOUT_S, ex.kind))

    def _exchange_over(self, xid: int, now: float, *, ok: bool, why: str = "") -> None:
        ex = self._exchanges.pop(xid)
        if self._ae_xid == xid:
            self._ae_xid = None
        if self._handoff_by_peer.get(ex.peer) == xid:
            del self._handoff_by_peer[ex.peer]
        self.stats["ae_ok" if ok else "ae_failed"] += 1
        self._note("ae_round", result="ok" if ok else "failed", peer=ex.peer, kind=ex.kind,
                   bytes=ex.nbytes, why=why)
        if ok:
            skewed = frozenset(self.skew.skewed(self.knobs.max_skew_s))
            if skewed != self._skewed:
                self._skewed = skewed
                self._recompute(now)
            for tid in sorted(self.handoff_pending):
                if ex.peer in self.ring.owners(tid):
                    self._handoff_done(tid, now, why=None)
            if ex.kind == "ae" and ex.nbytes >= PAGE_FOLLOW_BYTES and self._ae_xid is None \
                    and not self.stopping and self._view.get(ex.peer, ("dead", {}))[0] == "alive":
                # a full page went by: more is likely to differ (a refill):
                # the next page now, not a whole round later
                self._ae_xid = self._start_exchange(ex.peer, "ae", now)
        else:
            for tid in sorted(self.handoff_pending):
                if ex.peer in self.ring.owners(tid):
                    self._handoff_asked.setdefault(tid, []).append(ex.peer)
                    others = [o for o in self.ring.owners(tid) if o != self.name]
                    if set(others) <= set(self._handoff_asked[tid]):
                        self._handoff_done(tid, now, why="failed: no replica answered")
        if self.handoff_pending:
            self._start_handoffs(now)
