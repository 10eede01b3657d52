"""Fencer: claims slots in etcd before they fire (trio shell; the rules are in node/fencing/rules.py).

The decisions (who won, which token, may we reclaim, is etcd stale) are in
the pure ``node/fencing/rules.py``; this shell sends the transactions, retries,
and keeps the node's lease fresh.

Rules
-----
* ``claim()`` runs the claim txn (``fencing.claim_txn``). ``won`` -> fire with
  ``token``; ``lost`` -> someone else fired (or will); ``stale_epoch`` -> etcd
  went backwards (restore without an epoch raise: see ``node/fencing/rules.py``,
  Rule 4, for the operator's ``etcdctl put <prefix>/epoch N``): never fire.
* etcd unreachable (every endpoint failed, or the attempt exceeded
  ``request_timeout_s``, or etcd answered an error):
    - ``on_unavailable="skip"`` (default): retry with exponential backoff
      with full jitter (``node/run/retry.py``; 0.1 s doubling to 2 s) until
      ``deadline`` (``trio.current_time()`` clock: the end of the misfire
      window) and then return ``unavailable``: the slot is missed, never
      duplicated.
    - ``on_unavailable="fire"``: after the first failed attempt (which has
      already tried every endpoint) return ``fire_without_token``: fire now,
      with no token; logged at WARNING and counted.
* A retry after a timed-out attempt may find the key already written by us
  (the first attempt was applied, its reply lost): that is ``won`` with the
  token of that write (fencing Rule 6), so a lost reply does not lose a slot.
* Leases (claims expire after a retention): claims are attached to the
  node's current lease. A lease is granted with TTL = ``retention_s +
  rotation_s`` where ``rotation_s = retention_s / 2``, and a NEW lease is
  granted every ``rotation_s``; old leases are never refreshed and expire by
  themselves. So every claim is kept at least ``retention_s`` and at most
  ``1.5 * retention_s``. (A single lease kept alive forever would never let
  any claim of a live node expire.) If etcd reports the lease gone (restore,
  long outage), the next claim grants a new one and retries at once.
* Session (fencing Rule 8): ``boot`` is a random 64-bit id per Fencer (per
  process). A session lease with TTL ``session_ttl_s`` holds the key
  ``<prefix>/alive/<node>/<boot>``; ``run()`` refreshes it every
  ``session_ttl_s / 3``; if etcd says it expired (or it could not be
  refreshed for a whole TTL) a new session lease is granted and the same key
  put under it. Every claim carries ``session = boot``.
* ``reclaim()`` (fencing Rules 7 and 8): read the key; if its claimer is the
  dead node and its run id is the lost run's, txn ``mod_revision ==
  observed`` and ``version(alive key of the claimer's boot) == 0`` -> put a
  claim naming us, with ``reclaims + 1`` and the dead node appended. At most
  once per death. If the claimer's alive key is still there (a false death:
  partition, loss), retry with backoff until ``deadline``; then give up
  (``lost``, "claimer alive"): its run is still going.
* Started mark (fencing Rule 9): a claim or re-claim won is marked
  ``started`` in etcd (``start_txn``) before ``won`` is returned, and only
  then does the node start the run; a claim re-claimed in between returns
  ``lost``. Marking retries like a claim; etcd unreachable until the
  deadline -> ``unavailable`` (the slot is not run), or in ``fire`` mode the
  run starts with its token, unmarked (logged).
* A lost claim names its holder's claim (``holder_claim``): a holder that
  never marked it started may be re-claimed with ``reclaim(...,
  unstarted_only=True)`` once its session is gone.
* Everything is bounded: attempts by the deadline (and ``MAX_ATTEMPTS``),
  each attempt by ``request_timeout_s``.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import trio

from node.fencing.etcd_shell import EtcdClient
from node.fencing.codec import (
    EtcdClientError, EtcdError, EtcdProtocolError, EtcdUnavailable, is_lease_not_found,
)
from node.fencing.rules import (
    ClaimDecision, ClaimValue, Reason, alive_key, decide_claim, decide_reclaim, decide_start,
    epoch_key, fire_key, fold_decision, parse_epoch, plan_reclaim, reclaim_txn, claim_txn,
    split_token, start_txn,
)
from node.run.retry import backoff_delay_s

__all__ = ["Fencer", "FencerClosed", "ClaimResult", "FencerStats", "MAX_ATTEMPTS"]

log = logging.getLogger("peerd.fencer")

#: Hard cap on attempts of one claim, whatever the deadline.
MAX_ATTEMPTS = 1000
RETRY_BASE_S = 0.1
RETRY_MAX_S = 2.0


class FencerClosed(RuntimeError):
    """A claim or re-claim after ``aclose()``: the process is shutting down
    and its session is revoked, so it must not claim (nor open a new
    session that no one would refresh)."""


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """``won`` -> fire, with ``token`` (int, see ``fencing.make_token``) or,
    for ``fire_without_token``, ``token is None`` and ``won`` is True too.
    ``holder`` names the node holding the claim when lost, ``holder_claim``
    is that claim as read (None if unreadable)."""

    won: bool
    token: int | None
    reason: Reason
    detail: str = ""
    attempts: int = 1
    holder: str | None = None
    holder_claim: ClaimValue | None = None
    mod_revision: int = 0


@dataclass(frozen=True, slots=True)
class FencerStats:
    claims: int
    won: int
    lost: int
    unavailable: int          # slots missed because etcd was unreachable
    fired_without_token: int
    stale_epoch: int
    reclaims_won: int
    reclaims_refused: int
    reclaims_claimer_alive: int  # reclaims given up: the claimer's session held to the deadline
    lease_grants: int
    session_grants: int
    attempts_failed: int
    high_water_token: int
    epoch: int
    lease_id: int
    session_lease_id: int
    boot: int


class Fencer:
    """Claims slots in etcd for one node.

    Args:
        client: the etcd client (endpoints, TLS, auth already set).
        node: this node's name (written in every claim).
        prefix: key prefix, e.g. ``/peerd``.
        retention_s: minimum time a claim is kept (lease TTL, see Rules).
        on_unavailable: ``"skip"`` or ``"fire"``.
        request_timeout_s: bound on one claim attempt (all endpoints).
        max_reclaims: a slot is reclaimed at most this many times in all.
        session_ttl_s: TTL of the session lease that proves this process
            alive to reclaimers (Rule 8); >= 2.
        rng: jitter source for retry backoff and the boot id.
    """

    def __init__(self, client: EtcdClient, node: str, *, prefix: str = "/peerd",
                 retention_s: float = 86400.0, on_unavailable: str = "skip",
                 request_timeout_s: float = 2.0, max_reclaims: int = 3,
                 session_ttl_s: float = 10.0, rng: random.Random | None = None):
        if on_unavailable not in ("skip", "fire"):
            raise ValueError(f"on_unavailable: {on_unavailable!r} is not 'skip' or 'fire'")
        if retention_s < 2:
            raise ValueError("retention_s must be >= 2 (etcd's minimum lease TTL)")
        if not node:
            raise ValueError("node name is empty")
        if not session_ttl_s >= 2:
            raise ValueError("session_ttl_s must be >= 2 (etcd's minimum lease TTL)")
        epoch_key(prefix)  # validates the prefix
        self.client = client
        self.node = node
        self.prefix = prefix
        self.retention_s = float(retention_s)
        self.rotation_s = self.retention_s / 2
        self.lease_ttl_s = int(math.ceil(self.retention_s + self.rotation_s))
        self.on_unavailable = on_unavailable
        self.request_timeout_s = request_timeout_s
        self.max_reclaims = max_reclaims
        self._rng = rng or random.Random()
        self.boot = self._rng.getrandbits(64) or 1
        self.session_ttl_s = int(math.ceil(session_ttl_s))
        self._alive_key = alive_key(prefix, node, self.boot)
        self._session_id = 0
        self._session_ok_at = -math.inf  # last grant or successful refresh
        self._session_lock = trio.Lock()
        self._closed = False
        self._lease_id = 0
        self._lease_granted_at = -math.inf
        self._lease_lock = trio.Lock()
        self._high_water = 0
        self._epoch = 0
        self._c = dict(claims=0, won=0, lost=0, unavailable=0, fired_without_token=0,
                       stale_epoch=0, reclaims_won=0, reclaims_refused=0,
                       reclaims_claimer_alive=0, lease_grants=0, session_grants=0,
                       attempts_failed=0)

    # ---------------------------------------------------------------- running

    async def start(self) -> None:
        """Grant the first lease and read the epoch; tolerates etcd being
        down (claims then grant lazily)."""
        try:
            with trio.fail_after(self.request_timeout_s):
                await self._ensure_session()
                await self._ensure_lease(force=True)
                kv = await self.client.get(epoch_key(self.prefix))
            self._epoch = parse_epoch(kv.value if kv else None)
            log.info("fencer started: lease %x, epoch %d", self._lease_id, self._epoch)
        except (EtcdClientError, trio.TooSlowError) as exc:
            log.warning("fencer start: etcd not reachable yet (%s); will retry on claims", exc)
        except ValueError as exc:
            log.error("fencer start: %s", exc)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """``start()``, then keep the session alive (every ``session_ttl_s /
        3``) and rotate the claim lease every ``rotation_s``, forever.
        Run inside a nursery: ``await nursery.start(fencer.run)``."""
        await self.start()
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._session_loop)
            await self._rotation_loop()

    async def _session_loop(self) -> None:
        period_s = self.session_ttl_s / 3
        while True:
            await trio.sleep(period_s)
            try:
                with trio.fail_after(self.request_timeout_s):
                    await self._refresh_session()
            except (EtcdClientError, trio.TooSlowError) as exc:
                log.warning("fencer: session refresh failed (%s); retrying in %.1f s", exc,
                            period_s)

    async def _refresh_session(self) -> None:
        async with self._session_lock:
            if self._closed:
                return
            if self._session_id:
                ttl = await self.client.lease_keepalive(self._session_id)
                if ttl is not None:
                    self._session_ok_at = trio.current_time()
                    return
                log.warning("fencer: session lease %x expired; opening a new session",
                            self._session_id)
                self._session_id = 0
            await self._grant_session()

    async def _ensure_session(self) -> None:
        async with self._session_lock:
            self._check_open("no new session")  # aclose() may have won the lock
            stale = trio.current_time() - self._session_ok_at >= self.session_ttl_s
            if not self._session_id or stale:
                await self._grant_session()

    async def _grant_session(self) -> None:
        """New session lease; put our alive key (same key every time) under it."""
        g = await self.client.lease_grant_full(self.session_ttl_s)
        await self.client.put(self._alive_key, self.node.encode(), lease=g.lease_id)
        self._session_id = g.lease_id
        self._session_ok_at = trio.current_time()
        self._c["session_grants"] += 1

    async def _rotation_loop(self) -> None:
        failures = 0
        while True:
            due = self._lease_granted_at + self.rotation_s
            if failures:
                due = trio.current_time() + backoff_delay_s(
                    min(failures, 30), base_s=1.0, multiplier=2.0, max_s=60.0, rng=self._rng)
            await trio.sleep_until(due)
            try:
                with trio.fail_after(self.request_timeout_s):
                    await self._ensure_lease()  # rotates when due (a claim may have done it)
                failures = 0
            except (EtcdClientError, trio.TooSlowError) as exc:
                failures += 1
                log.warning("fencer: lease rotation failed (%s); retrying", exc)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise FencerClosed(f"fencer {self.node}: {what} after aclose()")

    async def aclose(self) -> None:
        """End the session (revoke its lease, best effort, bounded by
        ``request_timeout_s``) so reclaimers need not wait for its TTL.
        Claims are kept: they must outlive the process (retention). Call it
        only when no run of this process is still going."""
        self._closed = True
        sid, self._session_id = self._session_id, 0
        if not sid:
            return
        with trio.move_on_after(self.request_timeout_s):
            try:
                await self.client.lease_revoke(sid)
            except EtcdClientError as exc:
                log.info("fencer: could not revoke session lease %x (%s); it expires in %d s",
                         sid, exc, self.session_ttl_s)

    # ----------------------------------------------------------------- claims

    async def claim(self, task_id: str, slot: int, run_id: str, *, deadline: float) -> ClaimResult:
        """Claim slot ``slot`` of ``task_id`` for run ``run_id``.

        Args:
            deadline: ``trio.current_time()`` value after which an
                unavailable etcd gives up (end of the misfire window). At least
                one attempt is always made.
        Returns:
            ClaimResult; fire iff ``won``.
        Raises:
            ValueError: empty ``task_id`` or non-int ``slot`` (caller bug).
            FencerClosed: called after :meth:`aclose` (caller bug).
        """
        self._check_open("claim")
        self._c["claims"] += 1
        value = ClaimValue(self.node, run_id, self._epoch, session=self.boot)
        res = await self._attempt_loop(
            deadline,
            lambda lease: claim_txn(self.prefix, task_id, slot, value, lease),
            lambda r, hw0: decide_claim(r, node=self.node, run_id=run_id,
                                        high_water_before=hw0, high_water_now=self._high_water),
            what=f"claim {task_id}/{slot}")
        if res.reason == "won":
            res = await self._mark_started(task_id, slot, value, res, deadline)
        self._count(res, task_id, slot, run_id)
        return res

    async def reclaim(self, task_id: str, slot: int, run_id: str, dead_node: str, *,
                      deadline: float | None = None,
                      expected_run_id: str | None = None,
                      alive_wait_s: float | None = None,
                      unstarted_only: bool = False) -> ClaimResult:
        """Re-claim a slot whose claimer ``dead_node`` was declared dead.

        Args:
            expected_run_id: the claim run id of the run seen lost (Rule 7);
                None skips the check.
            deadline: ``trio.current_time()`` value until which an
                unavailable etcd is retried; default ``now +
                request_timeout_s``.
            alive_wait_s: while the dead claimer's session still holds
                (Rule 8) the reclaim is retried for this long (at most until
                ``deadline``); default ``1.5 * session_ttl_s + 2``: a
                claimer that really died has lost its session by then.
        Returns ``won`` with a token greater than the dead claimer's, or
        ``lost`` (not claimed by ``dead_node`` or not its lost run, already
        reclaimed for this death, reclaim cap reached, another node was
        faster, or the claimer stayed alive until ``deadline``).
        ``unstarted_only``: only a claim its claimer never marked started
        (Rule 9). etcd
        unreachable: as for ``claim`` (``unavailable`` after ``deadline``;
        ``fire_without_token`` in fire mode). Raises ``FencerClosed`` after
        :meth:`aclose`.
        """
        self._check_open("reclaim")
        now = trio.current_time()
        if deadline is None:
            deadline = now + self.request_timeout_s
        if alive_wait_s is None:
            alive_wait_s = 1.5 * self.session_ttl_s + 2.0
        alive_deadline = min(deadline, now + alive_wait_s)
        key = fire_key(self.prefix, task_id, slot)
        plan_holder: list = []

        def build(lease):
            plan = plan_holder[0]
            return reclaim_txn(self.prefix, task_id, slot, plan.value, lease, plan.mod_revision,
                               plan.dead_alive)

        async def prepare() -> ClaimResult | None:
            kv = await self.client.get(key)
            plan = plan_reclaim(kv, node=self.node, run_id=run_id, dead_node=dead_node,
                                epoch=self._epoch, max_reclaims=self.max_reclaims,
                                expected_run_id=expected_run_id, session=self.boot,
                                prefix=self.prefix, unstarted_only=unstarted_only)
            if plan.value is None:
                return ClaimResult(False, None, "lost", plan.refusal)
            plan_holder[:] = [plan]
            return None

        res = await self._attempt_loop(
            deadline, build,
            lambda r, hw0: decide_reclaim(r, node=self.node, run_id=run_id,
                                          high_water_before=hw0, high_water_now=self._high_water,
                                          mod_revision=plan_holder[0].mod_revision),
            what=f"reclaim {task_id}/{slot} from {dead_node}", prepare=prepare,
            alive_deadline=alive_deadline)
        if res.reason == "won":
            res = await self._mark_started(task_id, slot, plan_holder[0].value, res, deadline)
        if res.reason == "won":
            self._c["reclaims_won"] += 1
            log.warning("reclaimed %s/%s from dead %s, token %d", task_id, slot, dead_node,
                        res.token, extra={"task_id": task_id, "slot": slot, "token": res.token})
        elif res.reason == "lost":
            self._c["reclaims_refused"] += 1
            alive = res.detail.startswith("claimer alive")
            if alive:
                self._c["reclaims_claimer_alive"] += 1
            # one attempt of a caller that retries (alive_wait_s 0): the caller reports the outcome
            log.log(logging.DEBUG if alive and alive_wait_s <= 0 else logging.INFO,
                    "reclaim of %s/%s from %s refused: %s", task_id, slot, dead_node, res.detail)
        else:
            self._count(res, task_id, slot, run_id)
        return res

    def statistics(self) -> FencerStats:
        return FencerStats(**self._c, high_water_token=self._high_water, epoch=self._epoch,
                           lease_id=self._lease_id, session_lease_id=self._session_id,
                           boot=self.boot)

    # -------------------------------------------------------------- internals

    async def _attempt_loop(self, deadline: float, build, decide, *, what: str,
                            prepare=None, alive_deadline: float | None = None) -> ClaimResult:
        last_err = ""
        waited_alive = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            decision: ClaimDecision | None = None
            try:
                with trio.fail_after(self.request_timeout_s):
                    if prepare is not None:
                        early = await prepare()
                        if early is not None:
                            return ClaimResult(early.won, early.token, early.reason,
                                               early.detail, attempt)
                    await self._ensure_session()
                    lease = await self._ensure_lease()
                    hw0 = self._high_water
                    result = await self.client.txn(*build(lease))
                decision = decide(result, hw0)
            except EtcdError as exc:
                if is_lease_not_found(exc):
                    log.warning("%s: lease %x gone (%s); granting a new one", what,
                                self._lease_id, exc.message)
                    self._lease_id = 0
                    last_err = str(exc)
                    if attempt < 3:
                        continue  # at once: the lease is the only problem
                else:
                    log.error("%s: etcd error %s", what, exc)
                    last_err = str(exc)
            except EtcdUnavailable as exc:
                last_err = str(exc)
            except EtcdProtocolError as exc:
                log.error("%s: bad answer from etcd: %s", what, exc)
                last_err = str(exc)
            except trio.TooSlowError:
                last_err = f"attempt took longer than {self.request_timeout_s} s"
            if decision is not None and decision.claimer_alive:
                self._high_water, self._epoch = fold_decision(decision, self._high_water, self._epoch)
                now = trio.current_time()
                give_up_at = deadline if alive_deadline is None else alive_deadline
                if not waited_alive and now < give_up_at:
                    waited_alive = True
                    log.info("%s waits: the claimer's etcd session still holds (declared dead "
                             "but alive?); retrying until the deadline", what)
                if now >= give_up_at:
                    return ClaimResult(False, None, "lost", "claimer alive until the deadline: "
                                       "its etcd session still holds", attempt,
                                       decision.holder.node if decision.holder else None)
                await self._retry_pause(attempt, give_up_at - now)
                continue
            if decision is not None:
                self._high_water, self._epoch = fold_decision(decision, self._high_water, self._epoch)
                holder = decision.holder.node if decision.holder else None
                return ClaimResult(decision.won, decision.token, decision.reason,
                                   decision.detail, attempt, holder, decision.holder,
                                   decision.mod_revision)
            self._c["attempts_failed"] += 1
            if self.on_unavailable == "fire":
                return ClaimResult(True, None, "fire_without_token",
                                   f"etcd unavailable: {last_err}", attempt)
            now = trio.current_time()
            if now >= deadline:
                return ClaimResult(False, None, "unavailable",
                                   f"etcd unavailable until the deadline: {last_err}", attempt)
            await self._retry_pause(attempt, deadline - now)
        return ClaimResult(False, None, "unavailable", f"gave up after {MAX_ATTEMPTS} attempts",
                           MAX_ATTEMPTS)

    async def _mark_started(self, task_id: str, slot: int, value: ClaimValue, won: ClaimResult,
                            deadline: float) -> ClaimResult:
        """Rule 9: mark the claim just won started before the run starts.
        Returns ``won`` (marked), ``lost`` (re-claimed meanwhile) or, etcd
        unreachable until the deadline, ``unavailable`` (``won`` unmarked in
        fire mode)."""
        what = f"mark {task_id}/{slot} started"
        last_err = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with trio.fail_after(self.request_timeout_s):
                    lease = await self._ensure_lease()
                    r = await self.client.txn(*start_txn(self.prefix, task_id, slot, value, lease,
                                                         won.mod_revision))
                ok, detail = decide_start(r, node=self.node, run_id=value.run_id)
                if ok:
                    return won
                log.warning("%s: %s; not running it", what, detail,
                            extra={"task_id": task_id, "slot": slot, "run_id": value.run_id})
                return ClaimResult(False, None, "lost", detail, won.attempts + attempt)
            except EtcdError as exc:
                last_err = str(exc)
                if is_lease_not_found(exc):
                    self._lease_id = 0
                    if attempt < 3:
                        continue
                else:
                    log.error("%s: etcd error %s", what, exc)
            except (EtcdUnavailable, EtcdProtocolError) as exc:
                last_err = str(exc)
            except trio.TooSlowError:
                last_err = f"attempt took longer than {self.request_timeout_s} s"
            self._c["attempts_failed"] += 1
            if self.on_unavailable == "fire":
                log.warning("%s failed (%s): running with token %s, unmarked", what, last_err, won.token)
                return won
            now = trio.current_time()
            if now >= deadline:
                return ClaimResult(False, None, "unavailable",
                                   f"claimed, but etcd unavailable to mark it started: {last_err}",
                                   won.attempts + attempt)
            await self._retry_pause(attempt, deadline - now)
        return ClaimResult(False, None, "unavailable", f"gave up marking after {MAX_ATTEMPTS} attempts",
                           MAX_ATTEMPTS)

    async def _retry_pause(self, attempt: int, left_s: float) -> None:
        """Backoff with full jitter before the next attempt, never past the deadline."""
        delay = backoff_delay_s(min(attempt, 30), base_s=RETRY_BASE_S, multiplier=2.0,
                                max_s=RETRY_MAX_S, rng=self._rng)
        await trio.sleep(min(delay, left_s))

    async def _ensure_lease(self, force: bool = False) -> int:
        async with self._lease_lock:
            now = trio.current_time()
            if (force or not self._lease_id
                    or now >= self._lease_granted_at + self.rotation_s):
                g = await self.client.lease_grant_full(self.lease_ttl_s)
                self._lease_id = g.lease_id
                self._lease_granted_at = now
                self._c["lease_grants"] += 1
                if g.ttl_s < self.retention_s:
                    log.warning("etcd granted lease TTL %d s < retention %.0f s", g.ttl_s,
                                self.retention_s)
            return self._lease_id

    def _count(self, res: ClaimResult, task_id: str, slot: int, run_id: str) -> None:
        extra = {"task_id": task_id, "slot": slot, "run_id": run_id, "reason": res.reason,
                 "token": res.token}
        if res.reason == "won":
            self._c["won"] += 1
        elif res.reason == "lost":
            self._c["lost"] += 1
        elif res.reason == "unavailable":
            self._c["unavailable"] += 1
            log.warning("slot %s/%s missed: %s", task_id, slot, res.detail, extra=extra)
        elif res.reason == "fire_without_token":
            self._c["fired_without_token"] += 1
            log.warning("FIRING WITHOUT A FENCING TOKEN %s/%s: %s", task_id, slot, res.detail,
                        extra=extra)
        elif res.reason == "stale_epoch":
            self._c["stale_epoch"] += 1
            log.error("REFUSING TO FIRE %s/%s: %s", task_id, slot, res.detail, extra=extra)
