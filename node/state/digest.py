"""Digest tree (pure core): the TicTac-style XOR hash tree over a replica's keys, kept up to date per key.

TicTac-style XOR buckets, maintained incrementally:
    Each key hashes to ``h(key, version_hash)`` (64 bits); a bucket (1024,
    by hash of the key; run records by hash of their task ID), and each of its
    64 sub-buckets, holds the XOR of its keys' hashes. The root is
    blake2b-128 of the bucket array. Two scopes:
    ``catalogue`` (task/ and ctl/, every node holds all) and ``runs``
    restricted to a task set both sides replicate (the lead passes the set
    from its ring; a differing view only costs extra shipped records).

XOR is order-free, so nothing here depends on the order keys were added in
or tasks are given in; key lists come out sorted. The store
(:mod:`node.state.store`) calls :meth:`DigestTree.put` / :meth:`DigestTree.drop`
whenever a key's encoded bytes change; the exchange
(:mod:`node.state.exchange`) reads the levels to find what differs.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["DigestTree", "BUCKETS", "SUBS", "SCOPES", "version_hash", "key_hash", "cell", "bucket"]

BUCKETS = 1024
SUBS = 64  # level 3: sub-buckets per bucket; a cell is bucket * SUBS + sub
SCOPES = ("catalogue", "runs")


def version_hash(data: bytes) -> bytes:
    """8-byte version hash of an encoded entry (as used by anti-entropy)."""
    return hashlib.blake2b(data, digest_size=8).digest()


def key_hash(key: str, vh: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode() + b"\0" + vh, digest_size=8).digest(), "little")


def cell(s: str) -> int:
    h = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
    return (h % BUCKETS) * SUBS + (h // BUCKETS) % SUBS


def bucket(s: str) -> int:
    return cell(s) // SUBS


class DigestTree:
    """The XOR hash tree of one replica's keys, both scopes.

    Catalogue keys are filed by their own hash; run keys by their task's
    (``task_id`` given to :meth:`put` / :meth:`drop`), so a task's run
    records share one cell and ``run_keys`` indexes them per task.
    """

    def __init__(self) -> None:
        self._vh: dict[str, bytes] = {}
        self._kh: dict[str, int] = {}
        self._cat = [0] * BUCKETS             # catalogue buckets (task/, ctl/)
        self._cat_keys: list[set[str]] = [set() for _ in range(BUCKETS)]
        self._runagg: dict[str, int] = {}     # task -> XOR of its run keys' hashes
        #: task -> its run keys (read by the store as its run map; change it
        #: only through put / drop)
        self.run_keys: dict[str, set[str]] = {}

    # ------------------------------------------------------------ updates
    def put(self, key: str, task_id: str | None, data: bytes) -> None:
        """Hash ``key`` at its new encoded bytes ``data`` (added or changed).
        ``task_id``: the task of a run key, None for a catalogue key."""
        old = self._kh.get(key)
        vh = version_hash(data)
        kh = key_hash(key, vh)
        if task_id is not None:
            self._runagg[task_id] = self._runagg.get(task_id, 0) ^ (old or 0) ^ kh
            self.run_keys.setdefault(task_id, set()).add(key)
        else:
            b = bucket(key)
            self._cat[b] ^= (old or 0) ^ kh
            self._cat_keys[b].add(key)
        self._vh[key] = vh
        self._kh[key] = kh

    def drop(self, key: str, task_id: str | None) -> None:
        """Take ``key`` (held) out of the tree; ``task_id`` as for :meth:`put`."""
        kh = self._kh.pop(key)
        if task_id is not None:
            self._runagg[task_id] ^= kh
            self.run_keys[task_id].discard(key)
            if not self.run_keys[task_id]:
                del self.run_keys[task_id]
                del self._runagg[task_id]
        else:
            b = bucket(key)
            self._cat[b] ^= kh
            self._cat_keys[b].discard(key)
        del self._vh[key]

    # ------------------------------------------------------------ levels
    def scope_buckets(self, scope: str, tasks: Iterable[str] | None) -> list[int]:
        """Level 2 of a scope: ``BUCKETS`` XOR hashes (the catalogue's is
        the tree's own list: read it, do not change it)."""
        if scope == "catalogue":
            return self._cat
        out = [0] * BUCKETS
        for tid in (self._runagg if tasks is None else set(tasks)):
            agg = self._runagg.get(tid)
            if agg:
                out[bucket(tid)] ^= agg
        return out

    @staticmethod
    def root(buckets: list[int]) -> bytes:
        return hashlib.blake2b(b"".join(b.to_bytes(8, "little") for b in buckets), digest_size=16).digest()

    def digest_root(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """16-byte root of a scope."""
        return self.root(self.scope_buckets(scope, tasks))

    def bucket_hashes(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """Level 2: ``BUCKETS`` x 8-byte little-endian XOR hashes."""
        return b"".join(b.to_bytes(8, "little") for b in self.scope_buckets(scope, tasks))

    def keys_in_buckets(self, buckets: Iterable[int], scope: str = "catalogue",
                        tasks: Iterable[str] | None = None) -> list[tuple[str, bytes]]:
        """``(key, version_hash)`` of the scope's keys in the given buckets."""
        return self.keys_in(set(buckets), None, scope, tasks)

    def keys_in(self, buckets: set[int], cells: set[int] | None, scope: str,
                tasks: Iterable[str] | None) -> list[tuple[str, bytes]]:
        """``(key, version_hash)`` of the scope's keys in ``buckets`` (and,
        unless None, in ``cells``), sorted."""
        out = []
        if scope == "catalogue":
            for b in sorted(buckets):
                if isinstance(b, int) and 0 <= b < BUCKETS:
                    out.extend((k, self._vh[k]) for k in self._cat_keys[b]
                               if cells is None or cell(k) in cells)
        else:
            allowed = set(self.run_keys) if tasks is None else set(tasks)
            for tid in allowed:  # order-free: output sorted below
                if tid in self.run_keys:
                    c = cell(tid)
                    if (c // SUBS in buckets) and (cells is None or c in cells):
                        out.extend((k, self._vh[k]) for k in self.run_keys[tid])
        return sorted(out)

    def sub_hashes(self, buckets: list[int], scope: str, tasks: Iterable[str] | None) -> list[int]:
        """Level 3: SUBS hashes per given bucket, concatenated."""
        pos = {b: i for i, b in enumerate(buckets)}
        out = [0] * (len(buckets) * SUBS)
        if scope == "catalogue":
            for b in buckets:
                for k in self._cat_keys[b]:
                    out[pos[b] * SUBS + cell(k) % SUBS] ^= self._kh[k]
        else:
            for tid in (self._runagg if tasks is None else tasks):
                agg = self._runagg.get(tid)
                if agg:
                    c = cell(tid)
                    i = pos.get(c // SUBS)
                    if i is not None:
                        out[i * SUBS + c % SUBS] ^= agg
        return out
