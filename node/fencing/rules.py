"""Fencing with etcd (pure core): key layout, tokens, claim values and the decision rules.

No I/O here: the trio shells are ``node/fencing/etcd_shell.py`` (HTTP client) and
``node/fencing/fencer_shell.py`` (claims, lease rotation).

Theory of operation
-------------------
Before firing slot ``S`` of task ``T`` the owner runs ONE etcd transaction::

    if version(<prefix>/fire/<T>/<S>) == 0:
        put <prefix>/fire/<T>/<S> = claim-json (lease = the node's current lease)
        range <prefix>/epoch
    else:
        range <prefix>/fire/<T>/<S>
        range <prefix>/epoch

Rule 1 (one winner): etcd transactions are linearizable, so at most one
    claimer sees ``succeeded``. Only the winner fires.
Rule 2 (token): the winner's token is ``make_token(epoch, revision)`` where
    ``revision`` is the transaction's ``header.revision`` (the revision its
    put created; etcd revisions strictly increase) and ``epoch`` is the value
    of ``<prefix>/epoch`` read in the SAME transaction (absent = 0).
Rule 3 (token encoding): ``token = epoch * 2**48 + revision`` (an int).
    Plain integer comparison orders tokens: first by epoch, then by revision.
    ``revision < 2**48`` (2.8e14 writes) and ``0 <= epoch < 2**15``, so a
    token always fits a signed 64-bit integer (SQLite, JSON, Java longs).
    ``split_token(t) == (t >> 48, t & (2**48 - 1))``.
Rule 4 (epoch, for restores): etcd 3.4 cannot raise revisions when a cluster
    is restored from a backup, so revisions may go back. The operator then
    raises the epoch, which makes every later token greater than any earlier
    one::

        ETCDCTL_API=3 etcdctl put /peerd/epoch 1     # then 2, 3, ... per restore

    (replace ``/peerd`` with the configured prefix; the value is a decimal
    integer in ``[0, 2**15)``; never lower it). Nothing needs restarting:
    every claim reads the epoch inside its own transaction.
Rule 5 (stale detection): each fencer keeps a high-water mark: the greatest
    ``make_token(epoch, header.revision)`` of any claim response. A claim
    whose response token is LOWER than the high-water mark taken before the
    request was sent means etcd went backwards (a restore without an epoch
    raise): the claim is refused (reason ``stale_epoch``) and logged loudly.
    (Comparing against the mark from BEFORE sending keeps concurrent claims
    whose responses arrive out of order from tripping it.)
Rule 6 (own claim after a lost reply): a request that timed out may still
    have been applied. If a retry finds the key held by this node with this
    run id, the claim is ours: token from the key's ``mod_revision``.
Rule 7 (reclaim, once per death): a claimed slot whose claimer ``D`` was
    declared dead may be re-claimed by reading the key (value names ``D``,
    run id ``r``, mod revision ``m``) and running ``if mod_revision(key) == m
    and version(<prefix>/alive/D/<boot>) == 0: put new``. The new value names
    the new claimer, so a second reclaim for the same death finds a claimer
    other than ``D`` and is refused; the reclaimer also names the run it saw
    lost (``expected_run_id``), so a claim that ``D`` itself re-took after a
    restart is not taken again for the same death. The put creates a new
    revision, so the new token is greater. A key that has been reclaimed
    ``max_reclaims`` times is never reclaimed again (bound).
Rule 8 (sessions: a false death is not a death): SWIM may declare a member
    dead that is only cut off from its peers (partition, loss). So every
    fencer process keeps a short etcd *session*: a lease with TTL
    ``session_ttl_s`` (default 10 s) refreshed every ``session_ttl_s / 3``,
    holding ``<prefix>/alive/<node>/<boot>`` (``boot``: a random id per
    process start, written into every claim as ``session``). When the
    session lease is lost (etcd outage, long stall) the fencer grants a new
    one and puts the SAME key under it. A reclaim compares that key's
    version to 0 in its transaction: while the claimer's process still
    reaches etcd the reclaim fails (reason ``claimer_alive``) and is retried
    with backoff until its deadline, so a rerun happens only once the
    claimer has really stopped (or been cut off from etcd for longer than
    the TTL: then its run may still be going, and only the token, which is
    greater for the rerun, tells them apart downstream). A node re-claiming
    its own slot after a restart (``dead == node``) skips the alive check:
    it knows its previous process is gone (its boot id differs).
Rule 9 (started mark: a claim whose claimer never ran it is re-claimed): a
    claim is written with ``started: false``. Before it starts the run, the
    winner runs ``if mod_revision(key) == <its claim's revision>: put
    <the same value with started: true>`` and starts the run only if that
    succeeds (its own earlier mark, found after a lost reply, counts). So a
    claim still ``started: false`` whose claimer's session is gone (Rule 8)
    or that an earlier boot of the same node wrote was never run: the next
    owner that finds it when its own claim is lost re-claims it
    (``plan_reclaim(..., unstarted_only=True)``) and runs the slot. A mark
    and such a re-claim race on the key's mod revision, so at most one of
    them succeeds. A claim marked ``started`` is never re-claimed this way
    (its run may have happened: only a run record seen ``lost`` re-claims it,
    Rule 7). Claims written without the field (older releases) count as
    started.

Keys: ``<prefix>/fire/<T>/<S>`` and ``<prefix>/alive/<node>/<boot hex>``;
``T`` and ``node`` are percent-encoded (``/`` and other
unsafe characters, ``urllib.parse.quote(T, safe="")``) so that task ids with
``/`` cannot collide; ``S`` is the slot as a decimal integer.

The transactions are built from, and their results read as, the gateway shapes
of :mod:`node.fencing.codec`.
"""
from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from node.fencing.codec import (
    Compare, EtcdProtocolError, KeyValue, Op, Put, Range, RangeResponse, TxnResult,
)

__all__ = [
    "EPOCH_MAX", "REVISION_BITS", "TOKEN_MAX",
    "fire_key", "epoch_key", "alive_key", "make_token", "split_token", "parse_epoch",
    "ClaimValue", "encode_claim", "decode_claim", "claim_txn", "reclaim_txn",
    "start_txn", "decide_start",
    "ClaimDecision", "decide_claim", "fold_decision", "ReclaimPlan", "plan_reclaim",
    "decide_reclaim",
]

REVISION_BITS = 48
REVISION_MAX = (1 << REVISION_BITS) - 1
EPOCH_MAX = (1 << 15) - 1
TOKEN_MAX = (EPOCH_MAX << REVISION_BITS) | REVISION_MAX  # < 2**63


# ------------------------------------------------------- key layout, tokens

def _check_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
        raise ValueError(f"fencing prefix {prefix!r}: must start with '/' and not end with '/'")
    return prefix


def fire_key(prefix: str, task_id: str, slot: int) -> bytes:
    """``<prefix>/fire/<quoted task id>/<slot>``."""
    if not task_id:
        raise ValueError("task id is empty")
    if not isinstance(slot, int) or isinstance(slot, bool):
        raise ValueError(f"slot {slot!r}: must be an int")
    return f"{_check_prefix(prefix)}/fire/{urllib.parse.quote(task_id, safe='')}/{slot}".encode()


def epoch_key(prefix: str) -> bytes:
    return f"{_check_prefix(prefix)}/epoch".encode()


def alive_key(prefix: str, node: str, boot: int) -> bytes:
    """``<prefix>/alive/<quoted node>/<boot as 16 hex digits>`` (Rule 8)."""
    if not node:
        raise ValueError("node name is empty")
    if not isinstance(boot, int) or isinstance(boot, bool) or not 0 < boot < 2 ** 64:
        raise ValueError(f"boot id {boot!r}: must be an int in (0, 2**64)")
    return f"{_check_prefix(prefix)}/alive/{urllib.parse.quote(node, safe='')}/{boot:016x}".encode()


def make_token(epoch: int, revision: int) -> int:
    """``epoch * 2**48 + revision`` (Rule 3)."""
    if not 0 <= epoch <= EPOCH_MAX:
        raise ValueError(f"epoch {epoch} outside [0, {EPOCH_MAX}]")
    if not 0 <= revision <= REVISION_MAX:
        raise ValueError(f"revision {revision} outside [0, 2**48)")
    return (epoch << REVISION_BITS) | revision


def split_token(token: int) -> tuple[int, int]:
    """Inverse of ``make_token``: ``(epoch, revision)``."""
    if not 0 <= token <= TOKEN_MAX:
        raise ValueError(f"token {token} outside [0, {TOKEN_MAX}]")
    return token >> REVISION_BITS, token & REVISION_MAX


def parse_epoch(value: bytes | None) -> int:
    """The epoch key's value: absent = 0, else a decimal integer in
    ``[0, EPOCH_MAX]``. Raises ValueError naming the key's content."""
    if value is None:
        return 0
    text = value.decode("utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit()) or int(text) > EPOCH_MAX:
        raise ValueError(f"epoch key holds {text[:40]!r}: expected a decimal integer in [0, {EPOCH_MAX}]")
    return int(text)


# ----------------------------------------------------------------- claims

@dataclass(frozen=True, slots=True)
class ClaimValue:
    """What a fire key holds (JSON). ``dead`` lists the claimers whose death
    caused a reclaim, oldest first; ``reclaims == len(dead)``. ``session`` is
    the claimer's boot id (Rule 8; 0 = written without a session).
    ``started``: the claimer marked it before starting the run (Rule 9);
    ``revision``: set by the mark, the revision the claim was written at
    (its token's), which the mark's own write moved on."""

    node: str
    run_id: str
    epoch: int
    reclaims: int = 0
    dead: tuple[str, ...] = field(default=())
    session: int = 0
    started: bool = False
    revision: int = 0


def encode_claim(v: ClaimValue) -> bytes:
    return json.dumps({"v": 1, "node": v.node, "run_id": v.run_id, "epoch": v.epoch,
                       "reclaims": v.reclaims, "dead": list(v.dead), "session": v.session,
                       "started": v.started, "revision": v.revision},
                      sort_keys=True, separators=(",", ":")).encode()


def decode_claim(raw: bytes) -> ClaimValue:
    """Raises ValueError (naming the field) on a value we did not write."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"claim value is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError("claim value is not a JSON object")
    node, run_id, epoch = d.get("node"), d.get("run_id"), d.get("epoch", 0)
    reclaims, dead, session = d.get("reclaims", 0), d.get("dead", []), d.get("session", 0)
    started = d.get("started", True)       # written before Rule 9: taken as started
    revision = d.get("revision", 0)
    if not isinstance(node, str) or not node:
        raise ValueError("claim value: field 'node' missing or not a string")
    if not isinstance(run_id, str):
        raise ValueError("claim value: field 'run_id' not a string")
    for name, x in (("epoch", epoch), ("reclaims", reclaims), ("session", session),
                    ("revision", revision)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"claim value: field {name!r} not a non-negative int")
    if not isinstance(dead, list) or not all(isinstance(x, str) for x in dead):
        raise ValueError("claim value: field 'dead' not a list of strings")
    if session >= 2 ** 64:
        raise ValueError("claim value: field 'session' above 2**64")
    if not isinstance(started, bool):
        raise ValueError("claim value: field 'started' not a boolean")
    return ClaimValue(node, run_id, epoch, reclaims, tuple(dead), session, started, revision)


def claim_txn(prefix: str, task_id: str, slot: int, value: ClaimValue,
              lease_id: int) -> tuple[list[Compare], list[Op], list[Op]]:
    """The claim transaction (see the module header)."""
    k, ek = fire_key(prefix, task_id, slot), epoch_key(prefix)
    return ([Compare.version(k, "=", 0)],
            [Put(k, encode_claim(value), lease_id), Range(ek)],
            [Range(k), Range(ek)])


def reclaim_txn(prefix: str, task_id: str, slot: int, value: ClaimValue,
                lease_id: int, mod_revision: int,
                dead_alive: bytes | None = None) -> tuple[list[Compare], list[Op], list[Op]]:
    """Rule 7/8: replace the claim if unchanged since read and (when
    ``dead_alive`` is given) the dead claimer's alive key is gone. The
    failure branch reads both, so the caller can tell a race from a claimer
    that is still alive."""
    k, ek = fire_key(prefix, task_id, slot), epoch_key(prefix)
    cmp = [Compare.mod_revision(k, "=", mod_revision)]
    fail: list[Op] = [Range(k), Range(ek)]
    if dead_alive is not None:
        cmp.append(Compare.version(dead_alive, "=", 0))
        fail.append(Range(dead_alive))
    return cmp, [Put(k, encode_claim(value), lease_id), Range(ek)], fail


def start_txn(prefix: str, task_id: str, slot: int, value: ClaimValue, lease_id: int,
              mod_revision: int) -> tuple[list[Compare], list[Op], list[Op]]:
    """Rule 9: mark the claim written as ``value`` at ``mod_revision`` started
    (the same value with ``started: true``, under ``lease_id``) unless it
    changed since; the failure branch reads the key."""
    k = fire_key(prefix, task_id, slot)
    marked = ClaimValue(value.node, value.run_id, value.epoch, value.reclaims, value.dead,
                        value.session, True, mod_revision)
    return ([Compare.mod_revision(k, "=", mod_revision)],
            [Put(k, encode_claim(marked), lease_id)], [Range(k)])


def decide_start(res: TxnResult, *, node: str, run_id: str) -> tuple[bool, str]:
    """Rule 9: may the claimer start its run after ``start_txn``? True when
    the mark was written, or is found already ours (an earlier reply lost);
    False when the claim changed hands (re-claimed) or is gone."""
    if res.succeeded:
        return True, "marked started"
    rr = _range_at(res, 0)
    if not rr.kvs:
        return False, "the claim is gone (expired) before the run started"
    try:
        cur = decode_claim(rr.kvs[0].value)
    except ValueError as exc:
        return False, f"the claim became unreadable before the run started ({exc})"
    if cur.node == node and cur.run_id == run_id and cur.started:
        return True, "marked started (earlier reply lost)"
    return False, f"re-claimed by {cur.node} run {cur.run_id} before the run started"


Reason = Literal["won", "lost", "unavailable", "fire_without_token", "stale_epoch"]


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """Outcome of one claim/reclaim txn. ``token`` only when ``won``;
    ``high_water`` is the fencer's new high-water mark (Rule 5);
    ``holder`` is the current claim when lost (None if unreadable)."""

    won: bool
    token: int | None
    reason: Reason
    detail: str
    high_water: int
    holder: ClaimValue | None = None
    mod_revision: int = 0
    claimer_alive: bool = False  # reclaim refused because the claimer's session holds


def _range_at(res: TxnResult, i: int) -> RangeResponse:
    if len(res.responses) <= i or not isinstance(res.responses[i], RangeResponse):
        raise EtcdProtocolError(f"txn response {i}: expected a range response")
    return res.responses[i]  # type: ignore[return-value]


def decide_claim(res: TxnResult, *, node: str, run_id: str,
                 high_water_before: int, high_water_now: int) -> ClaimDecision:
    """Decide a claim (or reclaim) from its transaction result.

    Args:
        res: the decoded txn (shape of ``claim_txn``/``reclaim_txn``).
        node, run_id: who claimed (Rule 6 recognises our own earlier write).
        high_water_before: the fencer's mark when the request was sent.
        high_water_now: the mark now (other claims may have raised it).
    Returns:
        ClaimDecision. Never raises on a well-formed txn; a malformed epoch
        value refuses the claim (``stale_epoch``, detail says why).
    """
    epoch_rr = _range_at(res, 1)
    try:
        epoch = parse_epoch(epoch_rr.kvs[0].value if epoch_rr.kvs else None)
    except ValueError as exc:
        return ClaimDecision(False, None, "stale_epoch", f"refusing to fire: {exc}",
                             high_water_now)
    try:
        header_token = make_token(epoch, res.revision)
    except ValueError as exc:
        return ClaimDecision(False, None, "stale_epoch", f"refusing to fire: {exc}", high_water_now)
    if header_token < high_water_before:
        e0, r0 = split_token(high_water_before)
        return ClaimDecision(
            False, None, "stale_epoch",
            f"etcd went backwards: epoch {epoch} revision {res.revision} < epoch {e0} "
            f"revision {r0} seen before; was etcd restored from a backup? raise the epoch "
            f"(etcdctl put <prefix>/epoch {e0 + 1}); refusing to fire",
            high_water_now)
    hw = max(high_water_now, header_token)
    if res.succeeded:
        return ClaimDecision(True, header_token, "won", "claimed", hw, mod_revision=res.revision)
    rr = _range_at(res, 0)
    if not rr.kvs:
        # compare failed yet the key is gone: it expired or was reclaimed and
        # deleted between compare and range -- impossible within one txn for
        # version==0; for a reclaim it means the claim expired.
        return ClaimDecision(False, None, "lost", "claim key absent", hw)
    kv = rr.kvs[0]
    try:
        holder = decode_claim(kv.value)
    except ValueError as exc:
        return ClaimDecision(False, None, "lost", f"held by an unreadable claim ({exc})", hw,
                             mod_revision=kv.mod_revision)
    if holder.node == node and holder.run_id == run_id:
        # a mark (Rule 9) moved the key on: its token is the claim's revision
        rev = holder.revision if holder.started and holder.revision else kv.mod_revision
        return ClaimDecision(True, make_token(epoch, rev), "won",
                             "recovered own claim (earlier reply lost)", hw, holder,
                             kv.mod_revision)
    return ClaimDecision(False, None, "lost", f"held by {holder.node} run {holder.run_id}",
                         hw, holder, kv.mod_revision)


def fold_decision(d: ClaimDecision, high_water: int, epoch: int) -> tuple[int, int]:
    """Rule 5 after an answered claim or re-claim: the fencer's new
    ``(high_water, epoch)``. A re-claim refused because the claimer is alive
    only raises the mark."""
    if d.claimer_alive:
        return max(high_water, d.high_water), epoch
    hw = d.high_water if d.token is None else max(d.high_water, d.token)
    return hw, max(epoch, split_token(hw)[0])


@dataclass(frozen=True, slots=True)
class ReclaimPlan:
    """Either ``value``+``mod_revision`` to write (and ``dead_alive``, the
    alive key that must be absent), or a refusal ``reason``."""

    value: ClaimValue | None
    mod_revision: int
    refusal: str = ""
    dead_alive: bytes | None = None


def plan_reclaim(kv: KeyValue | None, *, node: str, run_id: str, dead_node: str,
                 epoch: int, max_reclaims: int, expected_run_id: str | None = None,
                 session: int = 0, prefix: str = "/peerd",
                 unstarted_only: bool = False) -> ReclaimPlan:
    """Rules 7 and 8: may ``node`` (process ``session``) reclaim a slot whose
    claimer ``dead_node`` died, and under which alive check?

    Args:
        kv: the fire key as read (None: absent).
        expected_run_id: the run id (claim run id, without the attempt
            suffix) of the run seen lost; None skips that check.
        session: our boot id, written into the new claim.
        unstarted_only: Rule 9: only a claim its claimer never marked
            started (the caller found it when its own claim was lost).
    """
    if kv is None:
        return ReclaimPlan(None, 0, "no claim to reclaim (never claimed or expired)")
    try:
        cur = decode_claim(kv.value)
    except ValueError as exc:
        return ReclaimPlan(None, kv.mod_revision, f"unreadable claim ({exc})")
    if cur.node != dead_node:
        return ReclaimPlan(None, kv.mod_revision,
                           f"claimer is {cur.node}, not the dead node {dead_node} "
                           f"(already reclaimed for this death?)")
    if expected_run_id is not None and cur.run_id != expected_run_id:
        return ReclaimPlan(None, kv.mod_revision,
                           f"claim is run {cur.run_id}, not the lost run {expected_run_id} "
                           f"(already re-taken for this death)")
    if unstarted_only and cur.started:
        return ReclaimPlan(None, kv.mod_revision,
                           f"{cur.node} started run {cur.run_id}: only its record can tell it lost")
    if cur.reclaims >= max_reclaims:
        return ReclaimPlan(None, kv.mod_revision,
                           f"already reclaimed {cur.reclaims} times (max {max_reclaims})")
    dead_alive = None
    if dead_node == node:
        if session and cur.session == session:
            return ReclaimPlan(None, kv.mod_revision,
                               "the claim belongs to this process (its run is not lost)")
    elif cur.session:
        dead_alive = alive_key(prefix, dead_node, cur.session)
    new = ClaimValue(node, run_id, epoch, cur.reclaims + 1, cur.dead + (dead_node,), session)
    return ReclaimPlan(new, kv.mod_revision, dead_alive=dead_alive)


def decide_reclaim(res: TxnResult, *, node: str, run_id: str,
                   high_water_before: int, high_water_now: int,
                   mod_revision: int = 0) -> ClaimDecision:
    """Same as ``decide_claim``; a failed compare means someone else moved
    first, or (claim unchanged at ``mod_revision`` and the dead claimer's
    alive key present) the claimer is alive: ``claimer_alive`` is set."""
    d = decide_claim(res, node=node, run_id=run_id, high_water_before=high_water_before,
                     high_water_now=high_water_now)
    if not d.won and d.reason == "lost":
        alive_rr = res.responses[2] if len(res.responses) > 2 else None
        if (isinstance(alive_rr, RangeResponse) and alive_rr.kvs and mod_revision
                and d.mod_revision == mod_revision):
            return ClaimDecision(False, None, "lost",
                                 "claimer alive: its etcd session still holds", d.high_water,
                                 d.holder, d.mod_revision, claimer_alive=True)
        return ClaimDecision(False, None, "lost", "reclaim raced: " + d.detail, d.high_water,
                             d.holder, d.mod_revision)
    return d
