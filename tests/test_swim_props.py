"""Property tests of the Swim core: merge order, no resurrection, no crash."""
import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.config import Config
from gossip.swim import MemberState, Swim

RANK = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 3}
BY_RANK = {v: k for k, v in RANK.items()}
X_ADDR = ("10.0.0.2", 7000)

# a claim about member "x": (kind, incarnation, sender)
claims = st.tuples(st.sampled_from(["alive", "suspect", "dead", "left"]), st.integers(0, 6),
                   st.sampled_from(["a", "b", "c"]))


def _msg(kind, inc, sender):
    if kind == "alive":
        return wire.Alive(inc, "x", X_ADDR[0], X_ADDR[1], {}, b"")
    if kind == "suspect":
        return wire.Suspect(inc, "x", sender)
    if kind == "dead":
        return wire.Dead(inc, "x", sender)
    return wire.Dead(inc, "x", "x")


def _rank(kind):
    return {"alive": 0, "suspect": 1, "dead": 2, "left": 3}[kind]


def _core(seed=0):
    core = Swim(Config.local(), "me", ("10.0.0.1", 7000), rng=random.Random(seed), now=0.0)
    core.handle_packet(X_ADDR, wire.encode_compound([_msg("alive", 0, "x")]), 0.0)
    assert core.member("x").state is MemberState.ALIVE
    return core


def _deliver(core, seq, t=1.0, batch=False):
    if batch:
        core.handle_packet(X_ADDR, wire.encode_compound([_msg(*c) for c in seq]), t)
    else:
        for c in seq:
            core.handle_packet(X_ADDR, wire.encode_compound([_msg(*c)]), t)


@given(st.lists(claims, max_size=20), st.booleans())
def test_merge_is_max_of_incarnation_then_rank(seq, batch):
    core = _core()
    _deliver(core, seq, batch=batch)
    expected = max([(0, 0)] + [(inc, _rank(k)) for k, inc, _ in seq])
    m = core.member("x")
    assert (m.incarnation, RANK[m.state]) == expected, (seq, m)
    if not batch:
        # (within one datagram, known ALIVEs are screened against the state at
        # arrival, so the count may differ there; the state may not)
        stale = sum(1 for i, (k, inc, _) in enumerate(seq)
                    if inc < max([0] + [p[1] for p in seq[:i]]))
        assert core.statistics().rejected.get("stale_incarnation", 0) == stale


@given(st.lists(claims, max_size=15), st.randoms(use_true_random=False))
def test_order_does_not_matter(seq, rnd):
    a, b = _core(), _core()
    _deliver(a, seq)
    shuffled = list(seq)
    rnd.shuffle(shuffled)
    _deliver(b, shuffled)
    ma, mb = a.member("x"), b.member("x")
    assert (ma.state, ma.incarnation) == (mb.state, mb.incarnation)


@given(st.lists(claims, min_size=1, max_size=15), st.randoms(use_true_random=False))
def test_replay_never_resurrects_dead_or_left(seq, rnd):
    core = _core()
    _deliver(core, seq)
    m = core.member("x")
    if m.state not in (MemberState.DEAD, MemberState.LEFT):
        # make it dead at the highest incarnation seen, then replay everything
        _deliver(core, [("dead", m.incarnation, "a")])
        m = core.member("x")
        assert m.state in (MemberState.DEAD, MemberState.LEFT)
    replay = list(seq) * 2
    rnd.shuffle(replay)
    _deliver(core, replay, t=2.0)
    after = core.member("x")
    assert (after.state, after.incarnation) == (m.state, m.incarnation)
    # and a push-pull carrying old states cannot either
    rec = [wire.MemberRecord("x", X_ADDR[0], X_ADDR[1], inc, {}, b"", st_)
           for _, inc, _ in seq[:5] for st_ in wire.WireState if inc <= m.incarnation]
    core.handle_push_pull(X_ADDR, wire.encode_push_pull(rec, False, "b"), 3.0)
    after = core.member("x")
    # (a LEFT record may upgrade DEAD to LEFT at the same incarnation)
    assert after.state in (MemberState.DEAD, MemberState.LEFT)
    assert after.incarnation == m.incarnation and RANK[after.state] >= RANK[m.state]


@given(st.lists(claims, max_size=10))
def test_claims_about_self_are_refuted(seq):
    core = Swim(Config.local(), "x", X_ADDR, rng=random.Random(0), now=0.0)
    for kind, inc, sender in seq:
        before = core.incarnation
        core.handle_packet(("10.0.0.3", 1), wire.encode_compound([_msg(kind, inc, sender)]), 1.0)
        m = core.member("x")
        assert m.state is MemberState.ALIVE
        if kind != "alive" and inc >= before:
            assert core.incarnation == max(before, inc) + 1
        if kind == "alive" and inc > before:
            assert core.incarnation == inc + 1


@settings(max_examples=200)
@given(st.binary(max_size=1500))
def test_handle_packet_never_raises(data):
    core = _core()
    effs = core.handle_packet(("10.0.0.9", 1), data, 1.0)
    assert isinstance(effs, list)
    reply, effs = core.handle_push_pull(("10.0.0.9", 1), data, 1.0)
    assert reply is None or isinstance(reply, bytes)
    core.handle_push_pull_reply(("10.0.0.9", 1), data, 1.0)
    assert "internal_error" not in core.statistics().rejected


@given(st.lists(st.one_of(claims.map(lambda c: _msg(*c)),
                          st.builds(wire.Ping, st.integers(0, 5), st.sampled_from(["me", "x"]),
                                    st.just("x")),
                          st.builds(wire.Ack, st.integers(0, 2**64 - 1)),
                          st.builds(wire.IndirectPing, st.integers(0, 9), st.just("x"),
                                    st.just("10.0.0.2"), st.just(7000), st.booleans(),
                                    st.just("y"))), max_size=30),
       st.lists(st.floats(0, 5), max_size=10))
def test_random_valid_traffic_keeps_invariants(msgs, ticks):
    core = _core()
    t = 1.0
    budget = core.config.payload_budget_bytes
    for i, m in enumerate(msgs):
        effs = core.handle_packet(X_ADDR, wire.encode_compound([m]), t)
        if i < len(ticks):
            t += ticks[i]
            effs += core.tick(t)
        for e in effs:
            if hasattr(e, "data") and hasattr(e, "addr") and not hasattr(e, "join"):
                assert len(e.data) <= budget
    st_ = core.statistics()
    assert "internal_error" not in st_.rejected
    assert sum(st_.members_by_state.values()) == len(core.members())
    assert core.member("me").state is MemberState.ALIVE
    core.tick(t)
    assert core.next_deadline() > t  # tick() ran everything due: no busy loop


# -- push-pull row screening: the inline fast path accepts exactly what
# wire.check_row accepts (it only skips the call for the common shape) ------

_field = st.one_of(
    st.text(max_size=70), st.text(alphabet="ab\x00\n", min_size=1, max_size=3),
    st.integers(-2, 70000), st.just(2**64), st.just(2**64 - 1), st.booleans(),
    st.binary(max_size=3), st.just(b"m" * 513), st.just({}), st.just({"k": "v"}),
    st.just({"k": 1}), st.none(), st.lists(st.integers(), max_size=1),
)
_good_row = st.tuples(
    st.text(alphabet="abcé\t", min_size=0, max_size=40), st.text(alphabet="10.é", min_size=0, max_size=70),
    st.integers(-1, 65536), st.integers(-1, 3), st.sampled_from([{}, {"a": "b"}]),
    st.sampled_from([b"", b"m" * 512, b"m" * 513]), st.integers(-1, 4)).map(list)
_rows = st.lists(st.one_of(_good_row, st.lists(_field, min_size=6, max_size=8)), max_size=6)


@given(rows=_rows)
def test_screen_rows_accepts_what_check_row_accepts(rows):
    core = Swim(Config.local(), "me", ("10.0.0.1", 7000), rng=random.Random(0), now=0.0)
    try:
        for r in rows:
            wire.check_row(r)
        ok = True
    except wire.RemoteProtocolError:
        ok = False
    try:
        todo = core._screen_rows(rows)
    except wire.RemoteProtocolError:
        assert not ok, rows
    else:
        assert ok, rows
        # nothing is known but "me" (whose rows are never skipped): all kept
        assert todo == rows


# -- the shared memo of packed push-pull rows ----------------------------------

_STATES = [MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT]


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "n042"]), st.sampled_from(["10.0.0.1", "h"]),
                          st.integers(0, 65535), st.integers(0, 2**64 - 1), st.sampled_from(_STATES),
                          st.sampled_from([{}, {"role": "x"}]), st.sampled_from([b"", b"m"])),
                min_size=1, max_size=30))
def test_packed_rows_from_the_memo_equal_fresh_packing(nodes):
    """Whatever the memo holds (it is shared by every core of the process),
    a row is the record packed afresh."""
    from gossip import records
    for name, host, port, inc, state, tags, meta in nodes:
        n = records._Node(name, (host, port), state, inc, records._freeze_tags(tags), meta, 0.0)
        fresh = records._pack([name, host, port, inc, dict(tags), meta, records._rank(state)])
        assert n.packed_row() == fresh
        assert n.packed_row() is n.row  # cached on the record too
        again = records._Node(name, (host, port), state, inc, records._freeze_tags(tags), meta, 1.0)
        assert again.packed_row() == fresh
    assert len(records._ROWS) <= records.ROW_MEMO_MAX


def test_row_memo_is_bounded(monkeypatch):
    import msgpack

    from gossip import records
    monkeypatch.setattr(records, "ROW_MEMO_MAX", 8)
    records._ROWS.clear()
    for inc in range(20):
        n = records._Node("m", ("h", 1), MemberState.ALIVE, inc, records._freeze_tags({}), b"", 0.0)
        assert msgpack.unpackb(n.packed_row()) == ["m", "h", 1, inc, {}, b"", 0]
        assert len(records._ROWS) <= 8
    records._ROWS.clear()


def test_events_do_not_keep_member_snapshots():
    """A member event carries a snapshot, but the core does not keep it: a
    1000-member simulation would hold 10^6 of them (~110 MB at N=1000).
    ``member()`` still builds an equal one on demand."""
    core = Swim(Config.local(), "me", ("10.0.0.1", 7000), rng=random.Random(0), now=0.0)
    effs = core.handle_packet(X_ADDR, wire.encode_compound([_msg("alive", 0, "x")]), 0.0)
    joined = [e.member for e in effs if getattr(e, "kind", None) is not None and e.member.name == "x"]
    assert len(joined) == 1
    assert core._nodes["x"].snap is None
    assert core.member("x") == joined[0]
    assert core._nodes["x"].snap is not None  # member() caches until the next change


# a message about one of a few members (and about "me": a refutation queues
# our own alive), for start_settle
_members = st.sampled_from(["me", "p", "q", "r", "s"])
_news = st.tuples(st.sampled_from(["alive", "suspect", "dead"]), _members, st.integers(0, 4),
                  st.sampled_from(["p", "q", "z"]))


def _news_msg(kind, name, inc, sender):
    if kind == "alive":
        return wire.Alive(inc, name, "10.0.0.3", 7000 + ord(name[0]), {}, b"")
    if kind == "suspect":
        return wire.Suspect(inc, name, sender)
    return wire.Dead(inc, name, sender)


@given(before=st.lists(_news, max_size=8), during=st.lists(_news, max_size=20),
       user=st.booleans(), join_reply=st.booleans())
def test_start_settle_equals_queue_then_settle(before, during, user, join_reply):
    """News held back after start_settle() (never queued, never packed) ends
    as queued-then-settled news: the same members, the same count dropped,
    the same queue (user broadcasts stay), the same next deadline; provided
    no datagram goes out in between (one would piggyback the queued news:
    the settled bootstrap only merges push-pull state)."""
    from gossip.effects import SendPacket
    cores = []
    sent = False
    for held in (False, True):
        core = Swim(Config.local(), "me", ("10.0.0.1", 7000), rng=random.Random(3), now=0.0)
        for i, m in enumerate(before):
            core.handle_packet(X_ADDR, wire.encode_compound([_news_msg(*m)]), 0.1 * i)
        if user:
            core.queue_user_broadcast("app", b"payload")
        if held:
            core.start_settle()
            core.start_settle()  # idempotent
        if join_reply:  # the settled bootstrap's case: a join reply merged weakly
            core.join([X_ADDR], 1.0)
            recs = [wire.MemberRecord(n, "10.0.0.4", 7100 + i, 1, {}, b"", wire.WireState.ALIVE)
                    for i, n in enumerate(["x", "p", "j1", "j2"])]
            core.handle_push_pull_reply(X_ADDR, wire.encode_push_pull(recs, False, "x"), 1.0)
        for i, m in enumerate(during):
            fx = core.handle_packet(X_ADDR, wire.encode_compound([_news_msg(*m)]), 1.0 + 0.1 * i)
            sent = sent or any(type(e) is SendPacket for e in fx)
        dropped = core.settle()
        cores.append((core, dropped))
    assume(not sent)
    (plain, n_plain), (held_core, n_held) = cores
    assert n_held == n_plain, (before, during)
    assert plain.members() == held_core.members()
    assert plain._queue.pending() == held_core._queue.pending()
    assert plain.next_deadline() == held_core.next_deadline()
    assert held_core._settling is None and held_core.settle() == 0
