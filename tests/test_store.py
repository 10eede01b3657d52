"""Store core: tasks, control, runs, merge, anti-entropy, persistence rows."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.state.digest import BUCKETS
from node.state.exchange import RemoteProtocolError
from node.state.store import Store


def exchange(a: Store, b: Store, scope="catalogue", tasks=None):
    """Drive one anti-entropy exchange a -> b; return (messages, entries shipped)."""
    msgs = [a.start_exchange(scope, tasks)]
    shipped = 0
    sides = [b, a]
    for i in range(10):
        res = sides[i % 2].handle_exchange(msgs[-1], tasks)
        shipped += res.shipped
        if res.reply is None:
            return msgs, shipped
        msgs.append(res.reply)
    raise AssertionError("exchange did not end")


def run(tid, rid, slot, status="running", attempt=1, **kw):
    r = {"task_id": tid, "run_id": rid, "slot": slot, "node": "a", "attempt": attempt, "status": status,
         "exit_code": None, "started": float(slot), "finished": None, "fencing_token": None, "output": ""}
    r.update(kw)
    return r


def test_put_get_context_and_conflict_visible():
    a, b = Store("a"), Store("b")
    b.merge(a.put_task("t", {"v": 1}, None, 10.0))
    ctx = b.get_task("t").context
    # concurrent edits on two nodes with the same read context: siblings
    ea = a.put_task("t", {"v": 2}, ctx, 11.0)
    eb = b.put_task("t", {"v": 3}, ctx, 12.0)
    a.merge(eb)
    b.merge(ea)
    va, vb = a.get_task("t"), b.get_task("t")
    assert va == vb
    assert va.conflict and len(va.siblings) == 2
    assert va.value == {"v": 3}  # greatest updated_at
    # a write with the merged context resolves the conflict
    a.put_task("t", {"v": 4}, va.context, 13.0)
    assert not a.get_task("t").conflict and a.get_task("t").value == {"v": 4}


def test_blind_write_is_concurrent_and_delete_is_tombstone():
    s = Store("a")
    s.put_task("t", {"v": 1}, None, 1.0)
    s.put_task("t", {"v": 2}, None, 2.0)
    assert len(s.get_task("t").siblings) == 2
    s.delete_task("t", s.get_task("t").context, 3.0)
    v = s.get_task("t")
    assert v.deleted and v.value is None
    assert s.tasks() == [] and len(s.tasks(include_deleted=True)) == 1
    assert s.gc_tombstones(now=3.0 + 100, horizon_s=1000) == []
    assert s.gc_tombstones(now=3.0 + 2000, horizon_s=1000) == ["task/t"]
    assert s.get_task("t") is None


def test_bad_context_and_definition_raise_valueerror():
    s = Store("a")
    with pytest.raises(ValueError):
        s.put_task("t", {"v": 1}, b"\xc1garbage", 1.0)
    with pytest.raises(ValueError):
        s.put_task("t", {"v": object()}, None, 1.0)
    assert s.get_task("t") is None


def test_control_registers():
    a, b = Store("a"), Store("b")
    assert a.control("t").paused is False and a.control("t").last_fired_slot is None
    b.merge(a.set_paused("t", True, 5.0))
    assert b.control("t").paused
    assert a.advance_fired("t", 100) and a.advance_fired("t", 50) == []
    b.merge(b.advance_fired("t", 200) + a.advance_fired("t", 150))
    a.merge(b.entries(["ctl/t"]))
    assert a.control("t") == b.control("t")
    assert a.control("t").last_fired_slot == 200
    b.merge(a.set_control_extra("t", "misfire", {"n": 1}, 7.0))
    a.merge(b.set_control_extra("t", "misfire", {"n": 2}, 8.0))
    assert a.control("t").extra == b.control("t").extra == {"misfire": {"n": 2}}


def test_run_lattice_and_trim():
    s = Store("a")
    s.put_task("t", {"history": 3}, None, 1.0)
    assert s.put_run(run("t", "r1", 10, "running"))
    assert s.put_run(run("t", "r1", 10, "pending")) == []  # less progress: no change
    assert s.put_run(run("t", "r1", 10, "succeeded", exit_code=0, finished=11.0))
    assert s.runs("t")[0]["status"] == "succeeded"
    for i in range(2, 7):
        s.put_run(run("t", f"r{i}", 10 * i))
    assert [r["run_id"] for r in s.runs("t")] == ["r4", "r5", "r6"]
    assert s.put_run(run("t", "r0", 1)) == []  # older than the kept window
    other = Store("b")
    other.merge(s.entries(s.keys()))
    assert other.runs("t") == s.runs("t")


def test_merge_rejects_bad_entries_without_applying_any():
    s = Store("a")
    good = Store("b").put_task("t", {"v": 1}, None, 1.0)
    bad_inputs = [
        [("task/x", b"\xc1")],
        [("nope/x", good[0][1])],
        [("task/x", msgpack.packb([[["a", 1, [{"def": 1}]]], []]))],
        [("run/t/r", msgpack.packb({"task_id": "t", "run_id": "other", "status": "running"}))],
        [("ctl/t", msgpack.packb({"p": [[], []], "f": "x", "x": {}}))],
        ["notapair"],
    ]
    for bad in bad_inputs:
        with pytest.raises(RemoteProtocolError):
            s.merge(list(good) + bad)
        assert s.keys() == []


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_handle_exchange_fuzz_only_remote_errors(data):
    s = Store("a")
    s.put_task("t", {"v": 1}, None, 1.0)
    before = s.entries(s.keys())
    try:
        s.handle_exchange(data)
    except RemoteProtocolError:
        pass
    assert s.entries(s.keys()) == before


def test_in_sync_exchange_is_one_small_message_each_way():
    a, b = Store("a"), Store("b")
    for i in range(300):
        b.merge(a.put_task(f"t{i}", {"i": i}, None, 1.0))
        b.merge(a.advance_fired(f"t{i}", 60 * i))
    msgs, shipped = exchange(a, b)
    assert len(msgs) == 2 and shipped == 0
    assert all(len(m) < 64 for m in msgs), [len(m) for m in msgs]


@pytest.mark.parametrize("k", [1, 5, 40])
def test_k_differences_converge_in_one_exchange_shipping_only_them(k):
    a, b = Store("a"), Store("b")
    for i in range(500):
        b.merge(a.put_task(f"t{i}", {"i": i}, None, 1.0))
    diff_keys = set()
    for i in range(k):
        if i % 2:
            a.put_task(f"t{i}", {"i": -i}, a.get_task(f"t{i}").context, 2.0)
        else:
            b.put_task(f"new{i}", {"i": i}, None, 2.0)
            diff_keys.add(f"task/new{i}")
        diff_keys.add(f"task/t{i}") if i % 2 else None
    msgs, shipped = exchange(a, b)
    assert shipped == len(diff_keys)
    assert a.entries(a.keys()) == b.entries(b.keys())
    assert a.digest_root() == b.digest_root()


def test_runs_scope_only_for_shared_tasks():
    a, b = Store("a"), Store("b")
    for i in range(10):
        a.put_run(run(f"t{i}", "r1", 60))
    b.put_run(run("t1", "r2", 120))
    msgs, shipped = exchange(a, b, "runs", tasks=["t1", "t2"])
    assert shipped == 3  # t1/r1 and t2/r1 to b, t1/r2 to a
    assert b.run_tasks() == ["t1", "t2"]
    assert [r["run_id"] for r in a.runs("t1")] == ["r1", "r2"]
    assert a.digest_root("runs", ["t1", "t2"]) == b.digest_root("runs", ["t1", "t2"])
    assert a.digest_root("runs") != b.digest_root("runs")


def test_drain_dirty_and_load_round_trip():
    a = Store("a")
    a.put_task("t", {"history": 1}, None, 1.0)
    a.put_run(run("t", "r1", 1))
    a.set_paused("t", True, 2.0)
    rows = a.drain_dirty()
    assert a.drain_dirty() == []
    a.put_run(run("t", "r2", 2))  # trims r1
    rows2 = a.drain_dirty()
    assert ("run/t/r1", None) in rows2
    disk = dict(rows)
    for k, v in rows2:
        if v is None:
            disk.pop(k, None)
        else:
            disk[k] = v
    b = Store("a")
    b.load(sorted(disk.items()))
    assert b.entries(b.keys()) == a.entries(a.keys())
    assert b.drain_dirty() == []
    assert b.statistics().runs == 1 and b.statistics().controls == 1
    with pytest.raises(ValueError):
        Store("c").load([("task/x", b"\x00junk")])


def test_bucket_level_api():
    s = Store("a")
    s.put_task("t", {}, None, 1.0)
    hashes = s.bucket_hashes()
    assert len(hashes) == 8 * BUCKETS
    nz = [i for i in range(BUCKETS) if hashes[8 * i:8 * i + 8] != bytes(8)]
    assert len(nz) == 1
    assert [k for k, _ in s.keys_in_buckets(nz)] == ["task/t"]
    assert len(s.digest_root()) == 16


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.binary(max_size=20) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.integers(0, 7), st.integers(-1, 2), st.lists(_plain, max_size=4))
def test_handle_exchange_structured_fuzz(t, scope, rest):
    s = Store("a")
    s.put_task("t", {"v": 1}, None, 1.0)
    s.put_run(run("t", "r", 1))
    before = s.entries(s.keys())
    try:
        s.handle_exchange(msgpack.packb([t, scope, *rest]))
    except RemoteProtocolError:
        pass
    assert s.entries(s.keys()) == before


def test_anti_entropy_ships_large_differences_in_bounded_pages():
    """A wiped replica refills 30 MiB of run records over several exchanges,
    no message over the page bound, and a broken exchange loses nothing
    (the next one goes on from what was applied)."""
    import node.state.exchange as exchange_mod
    from node.state.exchange import PAGE_BYTES
    from node.state.store import Store

    full, empty = Store("a"), Store("b")
    pad = "x" * 12_000
    for t in range(25):
        tid = f"t{t:02d}"
        full.put_task(tid, {"id": tid, "n": t}, None, 1.0)
        for r in range(100):
            full.put_run({"task_id": tid, "run_id": f"{r}-a-{r:08x}.1", "slot": r, "status": "succeeded",
                          "attempt": 1, "output": pad})
    disk = dict(full.drain_dirty())        # outputs go to the shell's output store
    full.set_output_reader(disk.get)
    total = sum(len(v) for v in disk.values())
    assert total > 28 * 1024 * 1024
    tasks = [f"t{t:02d}" for t in range(25)]
    biggest, rounds = 0, 0
    while empty.digest_root("runs", tasks) != full.digest_root("runs", tasks) and rounds < 200:
        rounds += 1
        msg = empty.start_exchange("runs", tasks)
        side = [full, empty]
        i = 0
        while msg is not None:
            biggest = max(biggest, len(msg))
            res = side[i % 2].handle_exchange(msg, tasks)
            msg = res.reply
            i += 1
            if rounds == 3 and i == 3:
                break                               # a stream broken mid-exchange
    assert empty.digest_root("runs", tasks) == full.digest_root("runs", tasks)
    assert biggest <= PAGE_BYTES + 64 * 1024 and rounds > 20
    assert exchange_mod.PAGE_BYTES < 4 * 1024 * 1024
