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
