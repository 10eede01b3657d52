"""etcd as the simulator sees it: a linearizable register with outages (pure).

Theory of operation
-------------------
The real fencer (``node/fencing/fencer_shell.py``) needs four things from etcd: a global
revision counter, per-key ``version``/``mod_revision``, an atomic
"create if absent" and "replace if mod_revision == m", and leases that delete
keys after a TTL. This model keeps exactly those, in one process, with no
clock of its own: every call takes the virtual time ``now_s``.

Rule 1 (linearizable): calls are applied in the order the simulator makes
    them; each write bumps ``revision`` by one and stamps the key with it.
Rule 2 (outages): ``outages`` is a list of ``(start_s, end_s)`` windows; at
    ``start_s <= now_s < end_s`` every call raises ``EtcdModelUnavailable``
    and changes nothing (a real client sees a timeout). ``lost_reply=True``
    on a write models the nastier case: applied, but the caller gets
    ``EtcdModelUnavailable`` anyway (a reply lost in flight).
Rule 3 (leases): a key written with ``ttl_s`` disappears at ``now_s + ttl_s``.
    Expiry happens lazily before each call, in ``(expires_at_s, key)`` order,
    and each expired key costs one revision (etcd deletes via a revision too).
Rule 4b (sessions, node/fencing/rules.py Rule 8): ``session_refresh(key, ttl_s,
    now_s)`` puts or refreshes a process's alive key, which lives ``ttl_s``
    after its last refresh. etcd keeps leases across a restart and renews
    their TTL when a leader takes office, so an outage that begins before a
    session runs out extends it to ``outage end + ttl_s``; one that begins
    after it ran out does not revive it. ``session_alive(key, now_s)``
    answers from that (no availability check: it is what a txn compare would
    see). ``reclaim(..., dead_alive=key)`` fails while that key is alive.
Rule 4 (tokens): ``token = node.fencing.rules.make_token(epoch, revision)`` exactly
    as the real fencer computes it; ``restore(snapshot)`` puts revisions back
    (a restore from backup), ``raise_epoch()`` is the operator's fix.

Rule 5 (the real transaction shapes): ``txn(compare, success, failure,
    now_s)`` takes the very ``node.fencing.rules`` ops the daemon's fencer sends
    (``claim_txn``, ``reclaim_txn``), encodes them with ``encode_txn`` into
    the gateway's JSON, applies them in ``txn_json`` and answers in the
    gateway's JSON (int64 as strings, base64 keys and values, ``succeeded``
    omitted when false), which ``decode_txn`` reads back. So the simulator's
    claims go through the same codec and the same ``decide_claim`` /
    ``decide_reclaim`` as a real one. A process's alive key (Rule 4b) reads
    as present (version 1) while its session holds; the epoch key reads as
    ``epoch`` when it is above 0. A txn's writes share one new revision, as
    in etcd.

Determinism: no randomness here; dict iteration only after sorting.
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass

from node.fencing.codec import (
    Compare,
    KeyValue,
    Op,
    TxnResult,
    b64,
    decode_range,
    decode_txn,
    encode_txn,
    unb64,
)
from node.fencing.rules import (
    epoch_key,
    make_token,
)

__all__ = ["EtcdModel", "EtcdModelUnavailable", "ModelKV", "ModelClaim", "ModelSnapshot"]


class EtcdModelUnavailable(Exception):
    """etcd is in an outage window at this time (or the reply was lost)."""


@dataclass(frozen=True, slots=True)
class ModelKV:
    value: object
    create_revision: int
    mod_revision: int
    version: int
    expires_at_s: float | None


@dataclass(frozen=True, slots=True)
class ModelClaim:
    """``won`` -> fire with ``token``; ``holder`` is the current value when lost."""

    won: bool
    token: int | None
    holder: object = None
    mod_revision: int = 0


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    revision: int
    keys: tuple[tuple[str, ModelKV], ...]


class EtcdModel:
    """Args:
        outages: ``(start_s, end_s)`` windows, ``start_s < end_s``; may overlap.
    Raises:
        ValueError: a window with ``end_s <= start_s`` or a non-finite start
            (``end_s`` may be ``inf``: etcd never comes back).
    """

    def __init__(self, outages: list[tuple[float, float]] | tuple = (), prefix: str = "/peerd"):
        wins = sorted((float(a), float(b)) for a, b in outages)
        for a, b in wins:
            if not math.isfinite(a) or math.isnan(b) or not a < b:
                raise ValueError(f"outage window ({a}, {b}): need start_s < end_s")
        # merge overlaps so available() is one bisect
        merged: list[list[float]] = []
        for a, b in wins:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self._starts = [a for a, _ in merged]
        self._ends = [b for _, b in merged]
        self.revision = 1  # a fresh etcd answers revision 1
        self.epoch = 0
        self._kv: dict[str, ModelKV] = {}
        self._sessions: dict[str, tuple[float, float]] = {}  # alive key -> (last refresh, ttl)
        self._expiry: list[tuple[float, str, int]] = []  # (expires_at_s, key, mod_revision)
        self.writes = 0
        self.rejected_unavailable = 0
        self._epoch_key = epoch_key(prefix).decode()
        self.txns = 0

    # -------------------------------------------------------------- outages

    def available(self, now_s: float) -> bool:
        i = bisect.bisect_right(self._starts, now_s) - 1
        return not (i >= 0 and now_s < self._ends[i])

    def next_available_s(self, now_s: float) -> float:
        """The first time ``>= now_s`` at which etcd is available."""
        i = bisect.bisect_right(self._starts, now_s) - 1
        if i >= 0 and now_s < self._ends[i]:
            return self._ends[i]
        return now_s

    def _enter(self, now_s: float) -> None:
        if not self.available(now_s):
            self.rejected_unavailable += 1
            raise EtcdModelUnavailable(f"etcd down at t={now_s}")
        self._expire(now_s)

    def _expire(self, now_s: float) -> None:
        while self._expiry and self._expiry[0][0] <= now_s:
            _, key, mod = heapq.heappop(self._expiry)
            kv = self._kv.get(key)
            if kv is not None and kv.mod_revision == mod:  # not overwritten since
                del self._kv[key]
                self.revision += 1

    # ----------------------------------------------------------------- ops

    def get(self, key: str, now_s: float) -> ModelKV | None:
        self._enter(now_s)
        return self._kv.get(key)

    def _write(self, key: str, value: object, now_s: float, ttl_s: float | None) -> int:
        self.revision += 1
        self.writes += 1
        old = self._kv.get(key)
        exp = None if ttl_s is None else now_s + ttl_s
        self._kv[key] = ModelKV(value, old.create_revision if old else self.revision,
                                self.revision, (old.version if old else 0) + 1, exp)
        if exp is not None:
            heapq.heappush(self._expiry, (exp, key, self.revision))
        return self.revision

    def txn_create_if_absent(self, key: str, value: object, now_s: float, *,
                             ttl_s: float | None = None, lost_reply: bool = False) -> int | None:
        """``if version(key) == 0: put``. Returns the token, or None if the
        key exists. Raises EtcdModelUnavailable in an outage (nothing done)
        or, with ``lost_reply``, after applying the write."""
        self._enter(now_s)
        if key in self._kv:
            return None
        rev = self._write(key, value, now_s, ttl_s)
        if lost_reply:
            raise EtcdModelUnavailable("reply lost (write applied)")
        return make_token(self.epoch, rev)

    def session_refresh(self, key: str, ttl_s: float, now_s: float) -> None:
        """Keep-alive (or re-grant and re-put) of a process's alive key."""
        self._enter(now_s)
        self._sessions[key] = (now_s, float(ttl_s))

    def session_close(self, key: str, now_s: float) -> None:
        """Revoke (graceful shutdown)."""
        self._enter(now_s)
        self._sessions.pop(key, None)

    def session_alive(self, key: str, now_s: float) -> bool:
        s = self._sessions.get(key)
        if s is None:
            return False
        last, ttl = s
        exp = last + ttl
        i = bisect.bisect_right(self._ends, last)  # outages ending after the refresh
        while i < len(self._starts) and self._starts[i] < now_s:
            if exp <= self._starts[i]:
                break  # ran out before this outage began
            exp = max(exp, self._ends[i] + ttl)  # renewed when etcd came back
            i += 1
        return now_s < exp

    def reclaim(self, key: str, expected_mod_rev: int, value: object, now_s: float, *,
                ttl_s: float | None = None, lost_reply: bool = False,
                dead_alive: str | None = None) -> int | None:
        """``if mod_revision(key) == expected and not alive(dead_alive): put``;
        token or None."""
        self._enter(now_s)
        kv = self._kv.get(key)
        if kv is None or kv.mod_revision != expected_mod_rev:
            return None
        if dead_alive is not None and self.session_alive(dead_alive, now_s):
            return None
        rev = self._write(key, value, now_s, ttl_s)
        if lost_reply:
            raise EtcdModelUnavailable("reply lost (write applied)")
        return make_token(self.epoch, rev)

    def claim(self, key: str, value: object, now_s: float, *, ttl_s: float | None = None,
              lost_reply: bool = False) -> ModelClaim:
        """What the real fencer does in one txn: create if absent; if present
        and equal to ``value`` (our own write whose reply was lost) we won
        with that write's token; else lost."""
        self._enter(now_s)
        kv = self._kv.get(key)
        if kv is None:
            token = self.txn_create_if_absent(key, value, now_s, ttl_s=ttl_s, lost_reply=lost_reply)
            return ModelClaim(True, token, value, self.revision)
        if kv.value == value:
            return ModelClaim(True, make_token(self.epoch, kv.mod_revision), kv.value, kv.mod_revision)
        return ModelClaim(False, None, kv.value, kv.mod_revision)

    # ------------------------------------------- the gateway's txn (Rule 5)

    def txn(self, compare: list[Compare], success: list[Op], failure: list[Op], now_s: float, *,
            lost_reply: bool = False) -> TxnResult:
        """One transaction in ``node.fencing.codec``'s shapes, through the gateway's
        JSON both ways. Raises EtcdModelUnavailable in an outage (nothing
        done) or, with ``lost_reply``, after applying it."""
        return decode_txn(self.txn_json(encode_txn(compare, success, failure), now_s,
                                        lost_reply=lost_reply))

    def range(self, key: bytes, now_s: float) -> KeyValue | None:
        """``GET key`` as the real client decodes it (None: absent)."""
        self._enter(now_s)
        rr = decode_range(self._range_json(key.decode("utf-8", "surrogateescape"), now_s))
        return rr.kvs[0] if rr.kvs else None

    def txn_json(self, body: dict, now_s: float, *, lost_reply: bool = False) -> dict:
        """``POST /v3/kv/txn``: the gateway's request body in, its reply out."""
        self._enter(now_s)
        self.txns += 1
        ok = all(self._compare_json(c, now_s) for c in body.get("compare", []))
        ops = body.get("success" if ok else "failure", [])
        out: list[dict] = []
        rev = None
        for op in ops:
            if "requestPut" in op:
                d = op["requestPut"]
                key = unb64(d["key"], "key").decode("utf-8", "surrogateescape")
                if rev is None:
                    self.revision += 1
                    rev = self.revision
                self._put_at(key, unb64(d.get("value", ""), "value"), rev, int(d.get("lease", 0)))
                out.append({"response_put": {"header": {"revision": str(self.revision)}}})
            elif "requestRange" in op:
                key = unb64(op["requestRange"]["key"], "key").decode("utf-8", "surrogateescape")
                out.append({"response_range": self._range_json(key, now_s)})
            else:
                raise ValueError(f"op {sorted(op)} is not modelled")
        reply: dict = {"header": {"revision": str(self.revision)}, "responses": out}
        if ok:
            reply["succeeded"] = True  # the gateway omits it when false
        if lost_reply and rev is not None:
            raise EtcdModelUnavailable("reply lost (write applied)")
        return reply

    def _put_at(self, key: str, value: bytes, rev: int, lease: int) -> None:
        if lease:
            raise ValueError("leases are not modelled in txn (claims are written with lease 0)")
        self.writes += 1
        old = self._kv.get(key)
        self._kv[key] = ModelKV(value, old.create_revision if old else rev, rev,
                                (old.version if old else 0) + 1, None)

    def _view(self, key: str, now_s: float) -> ModelKV | None:
        """A key as a txn sees it: stored keys, live alive keys, the epoch."""
        kv = self._kv.get(key)
        if kv is not None:
            return kv
        if key in self._sessions and self.session_alive(key, now_s):
            return ModelKV(b"alive", 1, 1, 1, None)
        if key == self._epoch_key and self.epoch > 0:
            return ModelKV(str(self.epoch).encode(), 1, 1, 1, None)
        return None

    def _compare_json(self, c: dict, now_s: float) -> bool:
        kv = self._view(unb64(c["key"], "key").decode("utf-8", "surrogateescape"), now_s)
        target = c["target"]
        if target == "VALUE":
            have: int | bytes = b"" if kv is None else _as_bytes(kv.value)
            want: int | bytes = unb64(c.get("value", ""), "value")
        else:
            field = {"VERSION": "version", "CREATE": "createRevision", "MOD": "modRevision"}[target]
            have = 0 if kv is None else {"VERSION": kv.version, "CREATE": kv.create_revision,
                                         "MOD": kv.mod_revision}[target]
            want = int(c.get(field, 0))
        result = c["result"]
        if result == "EQUAL":
            return have == want
        if result == "NOT_EQUAL":
            return have != want
        if result == "GREATER":
            return have > want  # type: ignore[operator]
        return have < want  # type: ignore[operator]

    def _range_json(self, key: str, now_s: float) -> dict:
        kv = self._view(key, now_s)
        kvs = [] if kv is None else [{
            "key": b64(key.encode("utf-8", "surrogateescape")), "value": b64(_as_bytes(kv.value)),
            "create_revision": str(kv.create_revision), "mod_revision": str(kv.mod_revision),
            "version": str(kv.version)}]
        d: dict = {"header": {"revision": str(self.revision)}, "count": str(len(kvs))}
        if kvs:
            d["kvs"] = kvs
        return d

    # ------------------------------------------------------- backup/restore

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(self.revision, tuple(sorted(self._kv.items())))

    def restore(self, snap: ModelSnapshot, now_s: float) -> None:
        """Replace the state with ``snap`` (revisions go BACK). Lease expiry
        times are kept. The epoch is not part of the data: it stays."""
        self.revision = snap.revision
        self._kv = dict(snap.keys)
        self._expiry = [(kv.expires_at_s, k, kv.mod_revision)
                        for k, kv in sorted(self._kv.items()) if kv.expires_at_s is not None]
        heapq.heapify(self._expiry)
        self._expire(now_s)

    def raise_epoch(self, epoch: int | None = None) -> int:
        """The operator's ``etcdctl put <prefix>/epoch N`` (default: +1)."""
        new = self.epoch + 1 if epoch is None else epoch
        if new < self.epoch:
            raise ValueError(f"epoch must not go down ({self.epoch} -> {new})")
        make_token(new, 0)  # validates the range
        self.epoch = new
        return new

    def keys(self, now_s: float) -> list[str]:
        """Live keys, sorted (no availability check: for checkers)."""
        self._expire(now_s)
        return sorted(self._kv)

    def peek(self, key: str) -> ModelKV | None:
        """The stored value without availability or expiry (for checkers)."""
        return self._kv.get(key)


def _as_bytes(v: object) -> bytes:
    """A stored value as etcd would hold it (the older tuple API stores reprs)."""
    return v if isinstance(v, bytes) else repr(v).encode()
