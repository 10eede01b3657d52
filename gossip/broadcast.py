"""Transmit-limited broadcast queue (memberlist ``queue.go``), pure.

Rules
-----
1. Each broadcast is piggybacked at most ``limit(n)`` times, where the core
   passes ``Config.retransmit_limit(n)`` = ``retransmit_mult *
   ceil(log10(N+1))``; after its last transmission it leaves the queue.
2. Selection order: fewest transmissions first; among equals, newest first
   (memberlist orders its btree by transmits, then newest id).
3. A broadcast carries a ``key`` (``"m:<member>"`` for membership news,
   ``"u:<key>"`` for user broadcasts); queuing a new one with the same key
   removes the old one (memberlist ``Invalidates``).
4. The queue holds at most ``max_len`` broadcasts; beyond that the
   most-transmitted, then oldest, are dropped (memberlist ``Prune``).

Broadcasts are stored pre-encoded, so filling a datagram is a walk over
byte lengths: ``O(items examined)``, bounded by ``scan_max`` and by 16
consecutive items that do not fit. Each level is a list in insertion order;
removal only marks an entry stale (O(1)); the newest-first walk pops stale
entries off the tail, and a level is compacted when its stale entries
outnumber its valid ones (amortized O(1) per removal).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Broadcast", "TransmitLimitedQueue"]


@dataclass(slots=True, eq=False)
class Broadcast:
    """One queued message. ``data`` is an encoded wire message."""

    key: str
    data: bytes
    transmits: int = 0
    id: int = field(default=0)
    lvl: int = -1   # the level it is queued at; -1 once it left the queue


class TransmitLimitedQueue:
    """Broadcast queue bucketed by transmit count.

    Args:
        max_len: cap on queued broadcasts (rule 4).
    """

    __slots__ = ("_levels", "_live", "_stale", "_by_key", "_next_id", "max_len", "dropped",
                 "scan_max")

    def __init__(self, max_len: int = 1024, scan_max: int = 256) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        # _levels[t]: the broadcasts put at transmit count t, in insertion
        # order (oldest first). An entry is valid iff its ``lvl`` is still t;
        # removal only marks it (``lvl`` moves on), so removing is O(1) and
        # the newest-first walk of take() pops stale entries off the tail.
        self._levels: list[list[Broadcast]] = []
        self._live: list[int] = []    # valid entries per level
        self._stale: list[int] = []   # stale entries per level (compacted when many)
        self._by_key: dict[str, Broadcast] = {}
        self._next_id = 0
        self.max_len = max_len
        self.scan_max = scan_max
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def _level(self, t: int) -> list:
        levels = self._levels
        while len(levels) <= t:
            levels.append([])
            self._live.append(0)
            self._stale.append(0)
        return levels[t]

    def queue(self, key: str, data: bytes, transmits: int = 0) -> None:
        """Add a broadcast, superseding any queued one with the same key.

        ``transmits`` > 0 queues it as already sent that many times (fewer
        copies, lower priority: for news that is probably not news).
        """
        by_key = self._by_key
        old = by_key.pop(key, None)
        if old is not None:
            self._del(old)
        self._next_id += 1
        b = Broadcast(key, data, transmits, self._next_id, transmits)
        self._level(transmits).append(b)
        self._live[transmits] += 1
        by_key[key] = b
        while len(by_key) > self.max_len:
            self._drop_one()

    def _del(self, b: Broadcast) -> None:
        """Remove ``b`` from its level (not from ``_by_key``)."""
        t = b.lvl
        b.lvl = -1
        self._live[t] -= 1
        s = self._stale[t] + 1
        if s > 32 and s > self._live[t]:
            self._levels[t] = [x for x in self._levels[t] if x.lvl == t]
            s = 0
        self._stale[t] = s

    def _drop_one(self) -> None:
        live = self._live
        for t in range(len(live) - 1, -1, -1):
            if live[t]:
                for b in self._levels[t]:  # oldest valid entry at the highest count
                    if b.lvl == t:
                        self._del(b)
                        del self._by_key[b.key]
                        self.dropped += 1
                        return

    def has_fresh(self, below: int = 1) -> bool:
        """Is a broadcast transmitted fewer than ``below`` times queued?"""
        for n in self._live[:below]:
            if n:
                return True
        return False

    def contains(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> Broadcast | None:
        return self._by_key.get(key)

    def discard(self, key: str) -> None:
        b = self._by_key.pop(key, None)
        if b is not None:
            self._del(b)

    def reset(self) -> None:
        for b in self._by_key.values():
            b.lvl = -1
        self._levels = []
        self._live = []
        self._stale = []
        self._by_key = {}

    def take(self, space_bytes: int, limit: int, per_item_overhead: int = 0) -> list[bytes]:
        """Select broadcasts that fit in ``space_bytes`` and count one
        transmission for each.

        Args:
            space_bytes: bytes available.
            limit: retransmit limit; a broadcast transmitted ``limit`` times
                leaves the queue.
            per_item_overhead: extra bytes per selected item.
        Returns:
            Encoded messages, least transmitted (then newest) first.
        """
        by_key = self._by_key
        if not by_key or space_bytes <= 0:
            return []
        picked: list[Broadcast] = []
        scanned = 0
        misses = 0
        scan_max = self.scan_max
        levels = self._levels
        live = self._live
        stale = self._stale
        for t in range(len(levels)):
            if not live[t]:
                continue
            lst = levels[t]
            if t >= limit:
                # the limit shrank (fewer members): these are done
                for b in lst:
                    if b.lvl == t:
                        b.lvl = -1
                        del by_key[b.key]
                levels[t] = []
                live[t] = stale[t] = 0
                continue
            # drop stale entries off the tail (mostly the ones taken last time)
            while lst[-1].lvl != t:
                lst.pop()
                stale[t] -= 1
            i = len(lst)
            while i:
                i -= 1
                b = lst[i]
                if b.lvl != t:
                    continue
                scanned += 1
                need = len(b.data) + per_item_overhead
                if need <= space_bytes:
                    picked.append(b)
                    space_bytes -= need
                    misses = 0
                    if space_bytes < 8:
                        break
                else:
                    misses += 1
                    if misses >= 16:  # nearly full: stop looking for a small one
                        break
                if scanned >= scan_max:
                    break
            if space_bytes < 8 or misses >= 16 or scanned >= scan_max:
                break
        if not picked:
            return []
        # move the picked ones up one level, a run of equal levels at a time
        # (picked is in level order)
        k = len(picked)
        start = 0
        while start < k:
            t = picked[start].lvl
            end = start + 1
            while end < k and picked[end].lvl == t:
                end += 1
            run = picked[start:end] if start or end < k else picked
            n = end - start
            start = end
            nt = t + 1
            if nt >= limit:
                for b in run:
                    b.transmits = nt
                    b.lvl = -1
                    del by_key[b.key]
            else:
                for b in run:
                    b.transmits = nt
                    b.lvl = nt
                self._level(nt).extend(run)
                live[nt] += n
            live[t] -= n
            s = stale[t] + n
            if s > 32 and s > live[t]:
                levels[t] = [x for x in levels[t] if x.lvl == t]
                s = 0
            stale[t] = s
        return [b.data for b in picked]

    def pending(self) -> list[tuple[str, int]]:
        """(key, transmits) of every queued broadcast, in selection order."""
        res = []
        for t, lst in enumerate(self._levels):
            for b in reversed(lst):
                if b.lvl == t:
                    res.append((b.key, b.transmits))
        return res
