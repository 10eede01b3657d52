"""TransmitLimitedQueue: retransmit limit, invalidation, ordering, cap."""
from gossip.broadcast import TransmitLimitedQueue


def test_retransmit_limit_then_gone():
    q = TransmitLimitedQueue()
    q.queue("m:a", b"A" * 10)
    for _ in range(3):
        assert q.take(1000, limit=3) == [b"A" * 10]
    assert q.take(1000, limit=3) == []
    assert len(q) == 0


def test_invalidation_by_key():
    q = TransmitLimitedQueue()
    q.queue("m:a", b"old")
    q.take(1000, limit=5)
    q.queue("m:a", b"new")
    q.queue("u:x", b"user")
    assert len(q) == 2
    assert sorted(q.take(1000, limit=5)) == [b"new", b"user"]


def test_least_transmitted_first_then_newest():
    q = TransmitLimitedQueue()
    q.queue("a", b"a" * 10)
    q.take(1000, limit=10)           # a: 1 transmit
    q.queue("b", b"b" * 10)
    q.queue("c", b"c" * 10)
    # room for one: the newest of the never-sent
    assert q.take(10, limit=10) == [b"c" * 10]
    assert q.take(10, limit=10) == [b"b" * 10]
    assert sorted(q.pending()) == [("a", 1), ("b", 1), ("c", 1)]


def test_respects_space_and_skips_large():
    q = TransmitLimitedQueue()
    q.queue("big", b"x" * 500)
    q.queue("small", b"y" * 20)
    out = q.take(100, limit=5, per_item_overhead=2)
    assert out == [b"y" * 20]
    out = q.take(1000, limit=5)
    assert out == [b"x" * 500, b"y" * 20]      # never-sent first
    q.reset()
    for i in range(50):
        q.queue(f"k{i}", b"z" * 37)
    out = q.take(300, limit=5)
    total = sum(len(x) for x in out)
    assert total <= 300 and len(out) == 300 // 37


def test_cap_drops_most_transmitted_oldest():
    q = TransmitLimitedQueue(max_len=3)
    q.queue("a", b"a")
    q.queue("b", b"b")
    q.take(2, limit=10)              # b and a sent once
    q.queue("c", b"c")
    q.queue("d", b"d")               # over cap: drop oldest most-transmitted
    assert len(q) == 3
    assert q.dropped == 1
    assert q.contains("c") and q.contains("d")


def test_shrinking_limit_retires_old():
    q = TransmitLimitedQueue()
    q.queue("a", b"a")
    for _ in range(4):
        q.take(10, limit=8)
    assert q.take(10, limit=2) == []
    assert len(q) == 0


def test_pre_aged_broadcast_goes_last_and_less_often():
    q = TransmitLimitedQueue()
    q.queue("weak", b"w", transmits=2)
    q.queue("fresh", b"f")
    assert q.take(1, limit=4) == [b"f"]
    assert q.take(10, limit=4) == [b"f", b"w"]
    assert q.take(10, limit=4) == [b"f", b"w"]   # w: 2 + 2 = limit, gone
    assert q.take(10, limit=4) == [b"f"]
    assert len(q) == 0


# -- differential test against the previous (dict-per-level) implementation ----
# The list-per-level queue must select exactly what the old one selected, in
# the same order, for any sequence of operations (the simulator's trace hash
# depends on it).

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from gossip.broadcast import Broadcast  # noqa: F401  (public name still exported)


@dataclass(slots=True, eq=False)
class _RefBroadcast:
    key: str
    data: bytes
    transmits: int = 0
    id: int = field(default=0)


class _RefQueue:
    """Broadcast queue bucketed by transmit count.

    Args:
        max_len: cap on queued broadcasts (rule 4).
    """

    __slots__ = ("_levels", "_holes", "_by_key", "_next_id", "max_len", "dropped", "scan_max")

    def __init__(self, max_len: int = 1024, scan_max: int = 256) -> None:
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        # _levels[t] = {id: Broadcast} in insertion order (oldest first)
        self._levels: list = []
        # deletions per level since its last compaction: CPython dicts keep
        # deleted slots until resized, and a reversed walk pays for each one
        self._holes: list[int] = []
        self._by_key: dict = {}
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
        b = _RefBroadcast(key, data, transmits, self._next_id)
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

    def get(self, key: str) -> object:
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
        picked: list = []
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


_OPS = st.lists(st.one_of(
    st.tuples(st.just("q"), st.integers(0, 40), st.integers(1, 120), st.integers(0, 6)),
    st.tuples(st.just("t"), st.integers(-5, 1500), st.integers(1, 8), st.integers(0, 3)),
    st.tuples(st.just("d"), st.integers(0, 40), st.just(0), st.just(0)),
), max_size=300)


@given(ops=_OPS, max_len=st.integers(1, 60), scan_max=st.integers(1, 300))
def test_same_selection_as_reference(ops, max_len, scan_max):
    q = TransmitLimitedQueue(max_len=max_len, scan_max=scan_max)
    r = _RefQueue(max_len=max_len, scan_max=scan_max)
    for i, (op, a, b, c) in enumerate(ops):
        if op == "q":
            data = bytes([i % 256]) * b
            q.queue(f"k{a}", data, c)
            r.queue(f"k{a}", data, c)
        elif op == "t":
            assert q.take(a, b, c) == r.take(a, b, c), (i, ops[: i + 1])
        else:
            q.discard(f"k{a}")
            r.discard(f"k{a}")
        assert len(q) == len(r)
        assert q.dropped == r.dropped
        assert q.pending() == r.pending()
        assert q.has_fresh(2) == r.has_fresh(2)


def test_many_takes_stay_linear():
    # 1000 queued, taken 30 at a time: every broadcast leaves after `limit` sends
    q = TransmitLimitedQueue(max_len=2000)
    r = _RefQueue(max_len=2000)
    for i in range(1000):
        q.queue(f"k{i}", b"x" * 40, 14)
        r.queue(f"k{i}", b"x" * 40, 14)
    n = 0
    while q:
        out = q.take(1300, 16)
        assert out == r.take(1300, 16)
        n += len(out)
    assert n == 2000 and not r
