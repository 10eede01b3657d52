"""DVVSet: merge laws, context semantics, sibling bounds, convergence, codec."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.state import versions as dv

ACTORS = ["a", "b", "c", "d", "e"]


def run_history(ops, n_replicas=3):
    """Replay ops on replicas; values are unique ints so dots map to one value.

    ops: ("w", replica, ctx_from_replica or None) | ("s", src, dst)
    """
    reps = [((), ()) for _ in range(n_replicas)]
    seq = 0
    for op in ops:
        if op[0] == "w":
            _, r, ctx_from = op
            seq += 1
            ctx = () if ctx_from is None else dv.join(reps[ctx_from % n_replicas])
            reps[r] = dv.update(dv.new_with_context(ctx, seq), reps[r], ACTORS[r])
        else:
            _, a, b = op
            reps[b] = dv.sync(reps[a], reps[b])
    return reps


op_st = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 2))),
    st.tuples(st.just("s"), st.integers(0, 2), st.integers(0, 2)),
)
clocks_st = st.lists(op_st, max_size=25).map(run_history)


@given(clocks_st)
def test_sync_commutative_associative_idempotent(reps):
    a, b, c = reps
    assert dv.sync(a, b) == dv.sync(b, a)
    assert dv.sync(dv.sync(a, b), c) == dv.sync(a, dv.sync(b, c))
    assert dv.sync(a, a) == a
    ab = dv.sync(a, b)
    assert dv.sync(ab, a) == ab  # absorbs its inputs
    assert not dv.less(ab, a) and not dv.less(ab, b)


@given(clocks_st)
def test_codec_roundtrip_and_hash(reps):
    for c in reps:
        wire = msgpack.unpackb(msgpack.packb(dv.to_wire(c)), raw=False)
        back = dv.from_wire(wire)
        assert back == c
        assert dv.clock_hash(back) == dv.clock_hash(c)


def test_covering_context_drops_seen_and_keeps_unseen():
    s = dv.update(dv.new(1), ((), ()), "a")
    ctx = dv.join(s)                      # client read {1}
    s = dv.update(dv.new(2), s, "b")      # concurrent blind write: {1, 2}
    s = dv.update(dv.new_with_context(ctx, 3), s, "a")
    assert sorted(dv.values(s)) == [2, 3]  # 1 covered -> dropped; 2 unseen -> kept
    s = dv.update(dv.new_with_context(dv.join(s), 4), s, "c")
    assert dv.values(s) == [4]


@given(st.lists(op_st, max_size=20), st.integers(0, 2), st.integers(0, 2))
def test_write_with_full_context_leaves_one_value(ops, r, actor):
    reps = run_history(ops)
    s = reps[r]
    out = dv.update(dv.new_with_context(dv.join(s), "new"), s, ACTORS[actor])
    assert dv.values(out) == ["new"]
    assert dv.less(s, out)


@pytest.mark.parametrize("server_actor_per_client", [False, True])
def test_two_clients_alternating_leave_at_most_two_siblings(server_actor_per_client):
    s: dv.Clock = ((), ())
    ctx = {"x": (), "y": ()}
    for i in range(100):
        who = "x" if i % 2 == 0 else "y"
        actor = ("s" + who) if server_actor_per_client else "s"
        s = dv.update(dv.new_with_context(ctx[who], f"{who}{i}"), s, actor)
        ctx[who] = dv.join(s)
        assert dv.size(s) <= 2
    assert sorted(dv.values(s)) == ["x98", "y99"]


@settings(max_examples=60)
@given(
    st.integers(3, 5),
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=30),
    st.lists(st.integers(0, 4), max_size=10),
    st.randoms(use_true_random=False),
)
def test_any_order_of_pairwise_syncs_converges(n, early, writers, rnd):
    reps = [((), ()) for _ in range(n)]
    for k, w in enumerate(writers):
        w %= n
        ctx = dv.join(reps[w]) if k % 2 else ()
        reps[w] = dv.update(dv.new_with_context(ctx, k), reps[w], ACTORS[w])
    for a, b in early:
        reps[b % n] = dv.sync(reps[a % n], reps[b % n])
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    rnd.shuffle(pairs)
    for _ in range(2):  # two full rounds in a random order reach everyone
        for a, b in pairs:
            reps[b] = dv.sync(reps[a], reps[b])
    for r in reps[1:]:
        assert r == reps[0]
    assert dv.sync_all(reps) == reps[0]


def test_resolve_rule_is_documented_order():
    v1 = {"updated_at": 10, "writer": "b", "x": 1}
    v2 = {"updated_at": 10, "writer": "c", "x": 0}
    v3 = {"updated_at": 9, "writer": "z", "x": 2}
    assert dv.resolve([v1, v2, v3]) == v2
    assert dv.resolve([v3, v2, v1]) == v2
    assert dv.resolve([]) is None
    # full tie: sha256 decides, the same in any order
    t1, t2 = {"updated_at": 1, "writer": "a", "x": 1}, {"updated_at": 1, "writer": "a", "x": 2}
    assert dv.resolve([t1, t2]) == dv.resolve([t2, t1])


@given(st.binary(max_size=200))
def test_from_wire_rejects_garbage_with_valueerror(data):
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:
        return
    try:
        dv.from_wire(obj)
    except ValueError:
        pass


@pytest.mark.parametrize(
    "bad",
    [
        None, [], [[], 5], [[["a", 0, []]], []], [[["a", 1, [1, 2]]], []],
        [[["b", 1, []], ["a", 1, []]], []], [[[1, 1, []]], []], [[["a", True, []]], []],
    ],
)
def test_from_wire_table(bad):
    with pytest.raises(ValueError):
        dv.from_wire(bad)


def test_two_arg_update_equal_and_less():
    c = dv.update(dv.new("v1"), "a")           # server-side: clock already the server's
    assert dv.values(c) == ["v1"] and dv.join(c) == (("a", 1),)
    c2 = dv.update(dv.new_with_context(dv.join(c), "v2"), c, "b")
    assert dv.less(c, c2) and not dv.less(c2, c) and not dv.equal(c, c2)
    assert dv.equal(c2, dv.sync(c2, c)) and dv.size(c2) == 1
    with pytest.raises(ValueError):
        dv.update(c2, "a")                      # no single new value to record
