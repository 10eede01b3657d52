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
consecutive items that do not fit.
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


class TransmitLimitedQueue:
    """Broadcast queue bucketed by transmit count.

    Args:
        max_len: cap on queued broadcasts (rule 4).
    """

    __slots__ = ("_levels", "_holes", "_by_key", "_next_id", "max_len", "dropped", "scan_max")

    def __init__(self, max_len: int = 1024, scan_max: int = 256) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        # _levels[t] = {id: Broadcast} in insertion order (oldest first)
        self._levels: list[dict[int, Broadcast]] = []
        # deletions per level since its last compaction: CPython dicts keep
        # deleted slots until resized, and a reversed walk pays for each one
        self._holes: list[int] = []
        self._by_key: dict[str, Broadcast] = {}
        self._next_id = 0
        self.max_len = max_len
        self.scan_max = scan_max
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def queue(self, key: str, data: bytes, transmits: int = 0) -> None:
        """Add a broadcast, superseding any queued one with the same key.

        ``transmits`` > 0 queues it as already sent that many times (fewer
        copies, lower priority: for news that is probably not news).
        """
        old = self._by_key.pop(key, None)
        if old is not None:
            self._del(old)
        self._next_id += 1
        b = Broadcast(key, data, transmits, self._next_id)
        while len(self._levels) <= transmits:
            self._levels.append({})
            self._holes.append(0)
        self._levels[transmits][b.id] = b
        self._by_key[key] = b
        while len(self._by_key) > self.max_len:
            self._drop_one()

    def _del(self, b: Broadcast) -> None:
        t = b.transmits
        lvl = self._levels[t]
        del lvl[b.id]
        h = self._holes[t] + 1
        if h > 32 and h > len(lvl):
            self._levels[t] = dict(lvl)  # a copy is compact
            h = 0
        self._holes[t] = h

    def _drop_one(self) -> None:
        for t in range(len(self._levels) - 1, -1, -1):
            lvl = self._levels[t]
            if lvl:
                b = lvl[next(iter(lvl))]  # oldest at the highest transmit count
                self._del(b)
                del self._by_key[b.key]
                self.dropped += 1
                return

    def has_fresh(self, below: int = 1) -> bool:
        """Is a broadcast transmitted fewer than ``below`` times queued?"""
        for lvl in self._levels[:below]:
            if lvl:
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
        self._levels = []
        self._holes = []
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
        out: list[bytes] = []
        picked: list[Broadcast] = []
        scanned = 0
        misses = 0
        scan_max = self.scan_max
        levels = self._levels
        for t in range(len(levels)):
            lvl = levels[t]
            if not lvl:
                continue
            if t >= limit:
                # the limit shrank (fewer members): these are done
                for b in list(lvl.values()):
                    del by_key[b.key]
                levels[t] = {}
                self._holes[t] = 0
                continue
            for b in reversed(lvl.values()):
                scanned += 1
                data = b.data
                need = len(data) + per_item_overhead
                if need <= space_bytes:
                    out.append(data)
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
            return out
        holes = self._holes
        for b in picked:
            # inline _del(b)
            t = b.transmits
            lvl = levels[t]
            del lvl[b.id]
            h = holes[t] + 1
            if h > 32 and h > len(lvl):
                levels[t] = dict(lvl)  # a copy is compact
                h = 0
            holes[t] = h
            t += 1
            b.transmits = t
            if t >= limit:
                del by_key[b.key]
                continue
            while len(levels) <= t:
                levels.append({})
                holes.append(0)
            levels[t][b.id] = b
        return out

    def pending(self) -> list[tuple[str, int]]:
        """(key, transmits) of every queued broadcast, in selection order."""
        res = []
        for lvl in self._levels:
            for b in reversed(lvl.values()):
                res.append((b.key, b.transmits))
        return res
