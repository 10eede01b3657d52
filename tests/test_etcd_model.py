"""sim/etcd_model.py: the pure etcd register used by the simulator."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from node.fencing.rules import make_token, split_token
from sim.etcd_model import EtcdModel, EtcdModelUnavailable


def test_create_if_absent_and_token_order():
    m = EtcdModel()
    t1 = m.txn_create_if_absent("k1", "a", 0.0)
    assert m.txn_create_if_absent("k1", "b", 0.0) is None
    t2 = m.txn_create_if_absent("k2", "b", 1.0)
    assert t1 < t2 and split_token(t2) == (0, m.revision)
    kv = m.get("k1", 2.0)
    assert (kv.value, kv.version, kv.mod_revision) == ("a", 1, t1)


@pytest.mark.parametrize("now_s,up", [(0.0, True), (9.99, True), (10.0, False), (15.0, False),
                                      (19.99, False), (20.0, False), (24.9, False), (25.0, True),
                                      (1e9, True)])
def test_outage_windows(now_s, up):
    m = EtcdModel([(20.0, 25.0), (10.0, 20.0)])  # unsorted, touching: merged
    assert m.available(now_s) is up
    assert m.next_available_s(now_s) == (now_s if up else 25.0)


def test_outage_changes_nothing():
    m = EtcdModel([(5.0, 6.0)])
    rev = m.revision
    with pytest.raises(EtcdModelUnavailable):
        m.txn_create_if_absent("k", "a", 5.5)
    with pytest.raises(EtcdModelUnavailable):
        m.get("k", 5.0)
    assert m.revision == rev and m.rejected_unavailable == 2
    assert m.txn_create_if_absent("k", "a", 6.0) is not None


@pytest.mark.parametrize("win", [(2.0, 1.0), (1.0, 1.0), (math.nan, 2.0), (1.0, math.nan),
                                 (-math.inf, 1.0)])
def test_bad_outage_windows(win):
    with pytest.raises(ValueError, match="outage window"):
        EtcdModel([win])


def test_forever_outage():
    m = EtcdModel([(1.0, math.inf)])
    assert m.available(0.5) and not m.available(1e12)


def test_lease_expiry_frees_the_key_and_costs_a_revision():
    m = EtcdModel()
    m.txn_create_if_absent("k", "a", 0.0, ttl_s=10.0)
    rev = m.revision
    assert m.get("k", 9.99) is not None
    assert m.get("k", 10.0) is None
    assert m.revision == rev + 1
    assert m.txn_create_if_absent("k", "b", 10.0) > make_token(0, rev)


def test_reclaim_compare_mod_revision():
    m = EtcdModel()
    t0 = m.txn_create_if_absent("k", "a", 0.0, ttl_s=10.0)
    mod = m.get("k", 0.0).mod_revision
    assert m.reclaim("k", mod - 1, "b", 1.0) is None
    t1 = m.reclaim("k", mod, "b", 1.0, ttl_s=100.0)
    assert t1 > t0
    assert m.reclaim("k", mod, "c", 1.0) is None  # once: mod_revision moved on
    assert m.reclaim("nope", 0, "c", 1.0) is None
    # the old lease's expiry does not delete the reclaimed value
    assert m.get("k", 50.0).value == "b"
    assert m.get("k", 101.0) is None


def test_claim_recovers_own_write_after_lost_reply():
    m = EtcdModel()
    with pytest.raises(EtcdModelUnavailable):
        m.claim("k", ("a", "r1"), 0.0, lost_reply=True)
    again = m.claim("k", ("a", "r1"), 0.5)
    assert again.won and again.token == make_token(0, m.get("k", 0.5).mod_revision)
    other = m.claim("k", ("b", "r2"), 0.6)
    assert (other.won, other.holder) == (False, ("a", "r1"))


def test_restore_and_epoch_raise():
    m = EtcdModel()
    m.txn_create_if_absent("a", 1, 0.0)
    snap = m.snapshot()
    late = [m.txn_create_if_absent(f"k{i}", i, 1.0) for i in range(3)]
    m.restore(snap, 2.0)
    assert m.get("k0", 2.0) is None
    stale = m.txn_create_if_absent("x", 0, 2.0)
    assert stale <= max(late)  # revisions went back: why the epoch exists
    m.raise_epoch()
    fresh = m.txn_create_if_absent("y", 0, 3.0)
    assert fresh > max(late) and split_token(fresh)[0] == 1
    with pytest.raises(ValueError):
        m.raise_epoch(0)


_ops = st.lists(st.tuples(st.sampled_from(["create", "reclaim", "advance"]),
                          st.integers(0, 3), st.floats(0.0, 5.0)), max_size=60)


@given(_ops, st.lists(st.tuples(st.floats(0, 50), st.floats(0.1, 10)), max_size=3))
def test_tokens_strictly_increase_and_one_holder(ops, outages):
    """Without restores every granted token is greater than all before it,
    and a key has one holder until it expires or is reclaimed."""
    m = EtcdModel([(a, a + d) for a, d in outages])
    now = 0.0
    tokens: list[int] = []
    for op, k, x in ops:
        key = f"k{k}"
        if op == "advance":
            now += x
            continue
        try:
            if op == "create":
                before = m.peek(key) if key in m.keys(now) else None
                t = m.txn_create_if_absent(key, (k, now), now, ttl_s=7.0)
                assert (t is None) == (before is not None)
            else:
                kv = m.get(key, now)
                t = m.reclaim(key, kv.mod_revision if kv else 0, (k, now), now, ttl_s=7.0)
                assert (t is None) == (kv is None)
        except EtcdModelUnavailable:
            assert not m.available(now)
            continue
        if t is not None:
            assert not tokens or t > tokens[-1]
            tokens.append(t)
            assert m.get(key, now).mod_revision == split_token(t)[1]


def test_sessions_expire_are_refreshed_and_survive_outages():
    m = EtcdModel(outages=[(20.0, 30.0)])
    m.session_refresh("alive/a/1", 10.0, 0.0)
    assert m.session_alive("alive/a/1", 9.9) and not m.session_alive("alive/a/1", 10.0)
    m.session_refresh("alive/a/1", 10.0, 15.0)  # keeps it to 25 -> outage from 20: renewed to 40
    assert m.session_alive("alive/a/1", 39.0) and not m.session_alive("alive/a/1", 40.0)
    m.session_refresh("alive/b/1", 10.0, 5.0)  # ran out at 15, before the outage: stays dead
    assert not m.session_alive("alive/b/1", 35.0)
    with pytest.raises(EtcdModelUnavailable):
        m.session_refresh("alive/a/1", 10.0, 25.0)
    m.session_close("alive/a/1", 31.0)
    assert not m.session_alive("alive/a/1", 31.0)
    assert not m.session_alive("never", 0.0)


def test_reclaim_waits_for_the_dead_claimers_session():
    m = EtcdModel()
    m.session_refresh("alive/a/1", 10.0, 0.0)
    assert m.claim("k", "a", 1.0).won
    mod = m.peek("k").mod_revision
    assert m.reclaim("k", mod, "b", 5.0, dead_alive="alive/a/1") is None  # a still alive
    t = m.reclaim("k", mod, "b", 10.0, dead_alive="alive/a/1")  # session ran out
    assert t is not None and m.peek("k").value == "b"
