"""Run outputs off the heap (node/state/store.py "Run outputs") and the
run-record budget (``run_records_max_bytes``): the core rules, their merges
(properties), the SQLite shell (real files) and one real node (real sockets,
real SQLite)."""
from __future__ import annotations

import json
import sqlite3

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from node.state.sqlite_shell import SqliteStore
from node.state.exchange import RemoteProtocolError
from node.state.store import OUTPUT_PREFIX, TRIM_LOW_WATER, Store, output_digest


def rec(tid: str, slot: int, output: str = "", status: str = "succeeded", attempt: int = 1) -> dict:
    return {"task_id": tid, "run_id": f"{tid}-{slot}.{attempt}", "slot": slot, "node": "a", "attempt": attempt,
            "status": status, "exit_code": 0, "started": float(slot), "finished": float(slot) + 1,
            "fencing_token": None, "output": output}


def disk_of(store: Store) -> dict:
    """A dict 'disk' the store's output rows are drained into and read from."""
    disk: dict = {}
    store.set_output_reader(disk.get)
    return disk


def drain(store: Store, disk: dict) -> None:
    for k, v in store.drain_dirty():
        if v is None:
            disk.pop(k, None)
        else:
            disk[k] = v


# ------------------------------------------------------------------ core rules

def test_record_in_memory_holds_no_output_text():
    s = Store("a")
    disk = disk_of(s)
    s.put_run(rec("t", 1, "x" * 5000))
    r = s.run_record("t", "t-1.1")
    assert r["output"] == "" and r["output_bytes"] == 5000
    assert r["output_digest"] == output_digest(b"x" * 5000)
    assert s.run_output("t", "t-1.1") == "x" * 5000          # not drained yet: from the pending write
    drain(s, disk)
    assert disk[OUTPUT_PREFIX + "t/t-1.1"] == b"x" * 5000
    assert len(disk["run/t/t-1.1"]) < 400                     # the record row is small
    assert s.run_output("t", "t-1.1") == "x" * 5000          # read back through the reader
    assert s.with_output(s.run_record("t", "t-1.1"))["output"] == "x" * 5000
    st_ = s.statistics()
    assert st_.outputs == 1 and st_.output_bytes == 5000 and 0 < st_.run_record_bytes < 400


def test_empty_output_keeps_the_record_shape():
    """Records without output are unchanged (the simulator's trace hashes
    of task runs do not move)."""
    s = Store("a")
    s.put_run(rec("t", 1, ""))
    assert s.run_record("t", "t-1.1") == rec("t", 1, "")
    assert [k for k, _ in s.drain_dirty()] == ["run/t/t-1.1"]
    assert s.run_output("t", "t-1.1") == ""


def test_entries_carry_the_output_and_the_replica_keeps_it():
    a, b = Store("a"), Store("b")
    da, db = disk_of(a), disk_of(b)
    a.put_run(rec("t", 1, "hello " * 100))
    drain(a, da)
    ents = a.entries(["run/t/t-1.1"])
    assert msgpack.unpackb(ents[0][1])["output"] == "hello " * 100
    assert b.merge(ents) == ["run/t/t-1.1"]
    drain(b, db)
    assert db[OUTPUT_PREFIX + "t/t-1.1"] == ("hello " * 100).encode()
    assert b.run_record("t", "t-1.1") == a.run_record("t", "t-1.1")
    assert b.digest_root("runs") == a.digest_root("runs")


def test_holding_an_output_or_not_does_not_change_the_version():
    a, b = Store("a"), Store("b", max_bytes=1)                # b keeps no output at all
    disk_of(a), disk_of(b)
    a.put_run(rec("t", 1, "y" * 1000))
    b.merge(a.entries(["run/t/t-1.1"]))
    assert b.run_output("t", "t-1.1") is None                 # not held here
    assert b.with_output(b.run_record("t", "t-1.1"))["output_trimmed"] is True
    assert b.digest_root("runs") == a.digest_root("runs")     # nothing to repair
    msg = a.start_exchange("runs")
    assert msgpack.unpackb(b.handle_exchange(msg).reply)[0] == 2  # OK: roots match


def test_anti_entropy_refills_an_empty_replica_with_outputs():
    full, empty = Store("a"), Store("b")
    df, de = disk_of(full), disk_of(empty)
    for slot in range(20):
        full.put_run(rec("t", slot, f"out {slot} " * 50))
    drain(full, df)
    for _ in range(10):
        msg = empty.start_exchange("runs")
        side, i = [full, empty], 0
        while msg is not None:
            msg = side[i % 2].handle_exchange(msg).reply
            i += 1
        if empty.digest_root("runs") == full.digest_root("runs"):
            break
    drain(empty, de)
    assert all(empty.run_output("t", f"t-{s}.1") == f"out {s} " * 50 for s in range(20))


def test_a_text_that_does_not_match_its_digest_is_refused():
    a = Store("a")
    r = dict(rec("t", 1, "abc"), output_digest=output_digest(b"other"))
    with pytest.raises(ValueError):
        a.put_run(r)
    b = Store("b")
    bad = msgpack.packb(dict(rec("t", 1, "abc"), output_digest=output_digest(b"other"), output_bytes=3))
    with pytest.raises(RemoteProtocolError):
        b.merge([("run/t/t-1.1", bad)])
    assert b.keys() == []


def test_records_with_inline_output_are_converted_on_load():
    """A file written before outputs moved off the heap."""
    legacy = msgpack.packb(rec("t", 1, "old output"))
    s = Store("a")
    disk = disk_of(s)
    s.load([("run/t/t-1.1", legacy)])
    drain(s, disk)
    assert disk[OUTPUT_PREFIX + "t/t-1.1"] == b"old output"
    assert msgpack.unpackb(disk["run/t/t-1.1"])["output"] == ""
    assert s.run_output("t", "t-1.1") == "old output"


def test_a_newer_version_of_a_record_replaces_its_output():
    s = Store("a")
    disk = disk_of(s)
    s.put_run(rec("t", 1, "first", status="running"))
    drain(s, disk)
    s.put_run(rec("t", 1, "second", status="failed"))
    drain(s, disk)
    assert disk[OUTPUT_PREFIX + "t/t-1.1"] == b"second"
    assert s.run_output("t", "t-1.1") == "second"


def _sized_store(budget: int) -> tuple[Store, dict]:
    s = Store("a", max_bytes=budget)
    return s, disk_of(s)


def _three_outputs_total() -> int:
    s, _ = _sized_store(1 << 30)
    for slot, tid in ((3, "a"), (1, "b"), (2, "c")):
        s.put_run(rec(tid, slot, "z" * 10_000))
    st_ = s.statistics()
    return st_.run_record_bytes + st_.output_bytes


def test_budget_edge_core():
    total = _three_outputs_total()
    # at the budget: nothing trimmed
    s, disk = _sized_store(total)
    for slot, tid in ((3, "a"), (1, "b"), (2, "c")):
        s.put_run(rec(tid, slot, "z" * 10_000))
    assert s.statistics().trimmed_outputs == 0 and s.statistics().outputs == 3
    assert s.take_trim_reports() == []
    # one byte under it: one pass drops the oldest outputs (slot order,
    # across tasks) down to the low water; the records stay
    s, disk = _sized_store(total - 1)
    for slot, tid in ((3, "a"), (1, "b"), (2, "c")):
        s.put_run(rec(tid, slot, "z" * 10_000))
    drain(s, disk)
    st_ = s.statistics()
    assert st_.trimmed_outputs == 1 and st_.outputs == 2 and st_.trim_passes == 1 and st_.runs == 3
    assert st_.run_record_bytes + st_.output_bytes <= (total - 1) * TRIM_LOW_WATER
    assert s.run_output("b", "b-1.1") is None                 # slot 1: the oldest
    assert s.run_output("c", "c-2.1") == s.run_output("a", "a-3.1") == "z" * 10_000
    assert sorted(k for k in disk if k.startswith(OUTPUT_PREFIX)) == [OUTPUT_PREFIX + "a/a-3.1",
                                                                       OUTPUT_PREFIX + "c/c-2.1"]
    [report] = s.take_trim_reports()
    assert report["outputs"] == 1 and report["budget"] == total - 1
    assert s.take_trim_reports() == []


def test_records_beyond_history_are_trimmed_and_counted():
    s = Store("a")
    disk = disk_of(s)
    s.put_task("t", {"id": "t", "history": 2}, None, 1.0)
    for slot in range(5):
        s.put_run(rec("t", slot, f"o{slot}"))
    drain(s, disk)
    assert [r["slot"] for r in s.runs("t")] == [3, 4]
    assert s.statistics().trimmed_records == 3
    assert sorted(k for k in disk if k.startswith(OUTPUT_PREFIX)) == [OUTPUT_PREFIX + "t/t-3.1",
                                                                       OUTPUT_PREFIX + "t/t-4.1"]


def test_records_alone_over_the_budget_keep_no_output_and_report_once():
    s = Store("a", max_bytes=64 * 1024)
    disk_of(s)
    for slot in range(100):                                   # ~100 KB of records
        for t in range(5):
            s.put_run(rec(f"t{t}", slot, "q" * 100))
    st_ = s.statistics()
    assert st_.runs == 500 and st_.run_record_bytes > 64 * 1024
    assert st_.outputs < 500 and st_.output_bytes <= 64 * 1024 * TRIM_LOW_WATER
    reports = s.take_trim_reports()
    assert len(reports) <= 3                                  # not one per output


# ------------------------------------------------------------------ merges (properties)

_texts = st.text(alphabet="ab\u00e9\n", max_size=40)
_recs = st.lists(st.tuples(st.sampled_from(["t", "u"]), st.integers(0, 3), _texts,
                           st.sampled_from(["running", "succeeded", "failed"])), min_size=1, max_size=12)


def _replica(entries, order) -> Store:
    s = Store("r")
    disk = disk_of(s)
    for i in order:
        s.merge([entries[i]])
        drain(s, disk)
    return s


@settings(max_examples=60, deadline=None)
@given(_recs, st.randoms(use_true_random=False))
def test_merge_with_outputs_converges_in_any_order(items, rnd):
    """Any delivery order (with duplicates) gives the same records, the same
    version hashes and the same held outputs."""
    src = []
    for tid, slot, text, status in items:
        w = Store("w")
        w.put_run(rec(tid, slot, text, status=status))
        src.extend(w.entries(w.keys()))                       # the output travels with the entry
    order1 = list(range(len(src)))
    order2 = order1[:] + order1[:]
    rnd.shuffle(order2)
    a, b = _replica(src, order1), _replica(src, order2)
    assert a.keys() == b.keys()
    assert a.digest_root("runs") == b.digest_root("runs")
    for k in a.keys():
        _, tid, rid = k.split("/")
        assert a.run_record(tid, rid) == b.run_record(tid, rid)
        assert a.run_output(tid, rid) == b.run_output(tid, rid)
        assert a.run_output(tid, rid) is not None             # the winner's text is held


def _sync(a: Store, b: Store, da: dict, db: dict) -> None:
    for lead, peer, dl, dp in ((a, b, da, db), (b, a, db, da)):
        msg = lead.start_exchange("runs")
        side, disks, i = [peer, lead], [dp, dl], 0
        while msg is not None:
            msg = side[i % 2].handle_exchange(msg).reply
            drain(side[i % 2], disks[i % 2])
            i += 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_recs.map(lambda x: x[0]), st.booleans()), min_size=1, max_size=8),
       st.sampled_from([1, 3000, 1 << 20]), st.sampled_from([1, 3000, 1 << 20]))
def test_anti_entropy_with_outputs_and_budgets_converges(items, budget_a, budget_b):
    """Two replicas with different budgets converge to the same records;
    each holds at most its budget of outputs, and every text it holds is
    the one its record's digest names."""
    a, b = Store("a", max_bytes=budget_a), Store("b", max_bytes=budget_b)
    da, db = disk_of(a), disk_of(b)
    for (tid, slot, text, status), to_a in items:
        (a if to_a else b).put_run(rec(tid, slot, text * 40, status=status))
    drain(a, da)
    drain(b, db)
    for _ in range(4):
        _sync(a, b, da, db)
    assert a.digest_root("runs") == b.digest_root("runs")
    assert a.keys() == b.keys()
    for s_ in (a, b):
        st_ = s_.statistics()
        assert st_.output_bytes <= max(0, s_.max_bytes - st_.run_record_bytes) or st_.outputs == 0
        for k in s_.keys():
            _, tid, rid = k.split("/")
            r, out = s_.run_record(tid, rid), s_.run_output(tid, rid)
            assert r == a.run_record(tid, rid)
            if out:
                assert output_digest(out.encode()) == r["output_digest"]


# ------------------------------------------------------------------ SQLite shell (real files)

async def _flush(store: Store, db: SqliteStore) -> None:
    await db.write(store.drain_dirty())


def _rows(path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in conn.execute(f"SELECT key FROM {table}"))
    finally:
        conn.close()


async def test_sqlite_outputs_table_reopen_and_read_on_demand(tmp_path):
    path = tmp_path / "state.db"
    async with SqliteStore(path) as db:
        s = Store("a")
        s.set_output_reader(db.read_output)
        s.put_run(rec("t", 1, "text on disk"))
        s.put_run(rec("t", 2, ""))
        await _flush(s, db)
    assert _rows(path, "outputs") == [OUTPUT_PREFIX + "t/t-1.1"]
    async with SqliteStore(path) as db:
        rows = await db.load()
        assert [k for k, _ in rows] == ["run/t/t-1.1", "run/t/t-2.1"]   # outputs are not loaded
        assert all(len(v) < 400 for _, v in rows)
        s = Store("a")
        s.load(rows)
        s.note_outputs(await db.output_index())
        s.set_output_reader(db.read_output)
        assert s.statistics().output_bytes == len(b"text on disk")
        assert s.run_output("t", "t-1.1") == "text on disk"
        assert s.run_output("t", "t-2.1") == ""


async def test_sqlite_budget_edge(tmp_path):
    """The budget over a real file: at it, every output row stays; one byte
    under it, the oldest rows are deleted from the file, also after a
    restart with a smaller budget."""
    total = _three_outputs_total()
    for budget, kept in ((total, 3), (total - 1, 2)):
        path = tmp_path / f"b{budget}.db"
        async with SqliteStore(path) as db:
            s = Store("a", max_bytes=budget)
            s.set_output_reader(db.read_output)
            for slot, tid in ((3, "a"), (1, "b"), (2, "c")):
                s.put_run(rec(tid, slot, "z" * 10_000))
                await _flush(s, db)
        assert len(_rows(path, "outputs")) == kept
        assert len(_rows(path, "kv")) == 3
    path = tmp_path / f"b{total}.db"
    async with SqliteStore(path) as db:                       # restart with a smaller budget
        s = Store("a", max_bytes=total - 1)
        s.load(await db.load())
        s.note_outputs(await db.output_index())
        await _flush(s, db)
    assert _rows(path, "outputs") == [OUTPUT_PREFIX + "a/a-3.1", OUTPUT_PREFIX + "c/c-2.1"]


async def test_sqlite_legacy_inline_output_migrates(tmp_path):
    path = tmp_path / "state.db"
    async with SqliteStore(path) as db:
        await db.write([("run/t/t-1.1", msgpack.packb(rec("t", 1, "legacy text")))])
    async with SqliteStore(path) as db:
        s = Store("a")
        s.load(await db.load())
        s.note_outputs(await db.output_index())
        await _flush(s, db)
        s.set_output_reader(db.read_output)
        assert s.run_output("t", "t-1.1") == "legacy text"
    assert _rows(path, "outputs") == [OUTPUT_PREFIX + "t/t-1.1"]


# ------------------------------------------------------------------ a real node

async def test_node_budget_over_real_sockets_and_sqlite(tmp_path, nursery, caplog):
    """A node whose task prints 64 KiB a second with a 200 KiB budget: the
    newest outputs read back through the API, the oldest are trimmed (rows
    deleted from its SQLite file), counted in /metrics, logged."""
    from node.run.http_client_shell import request
    from tests.cluster_util import start_solo_node

    caplog.set_level("INFO", logger="peerd")
    token = "outputs-token"
    blob = tmp_path / "blob.txt"
    blob.write_text(("0123456789abcdef" * 4096))              # 64 KiB
    budget = 200 * 1024
    node = await start_solo_node(tmp_path, nursery, token=token, run_records_max_bytes=str(budget))
    host, port = node.api_addr

    async def call(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        hdrs = [("Authorization", f"Bearer {token}")] + ([("Content-Type", "application/json")] if data else [])
        r = await request(method, f"http://{host}:{port}{path}", headers=hdrs, body=data, timeout_s=10,
                          max_body_bytes=16 << 20)
        return r.status, r.body_tail

    task = {"id": "big", "schedule": "@every 1s", "command": {"type": "exec", "argv": ["cat", str(blob)]}}
    assert (await call("PUT", "/v1/tasks", [task]))[0] in (200, 201)
    with trio.fail_after(40):
        while True:
            st_ = node.store.statistics()
            if st_.trimmed_outputs >= 2 and sum(r["status"] == "succeeded" for r in node.store.runs("big")) >= 5:
                break
            await trio.sleep(0.2)
    status, body = await call("GET", "/v1/tasks/big/runs")
    assert status == 200
    runs = [r for r in json.loads(body) if r["status"] == "succeeded"]
    assert runs[-1]["output"] == blob.read_text() and runs[-1]["output_bytes"] == 65536
    assert runs[0]["output"] == "" and runs[0]["output_trimmed"] is True and runs[0]["output_bytes"] == 65536
    st_ = node.store.statistics()
    assert st_.run_record_bytes + st_.output_bytes <= budget
    await node._flush()
    held = _rows(tmp_path / "solo" / "state.db", "outputs")
    assert 1 <= len(held) <= budget // 65536
    status, metrics = await call("GET", "/metrics")
    text = metrics.decode()
    assert 'peerd_run_records_trimmed_total{what="output"}' in text
    line = next(ln for ln in text.splitlines() if ln.startswith('peerd_run_records_trimmed_total{what="output"}'))
    assert float(line.rsplit(" ", 1)[1]) >= 2
    assert "run-record budget: dropped the" in caplog.text
    await node.shutdown()
    nursery.cancel_scope.cancel()


def test_config_budget_edge_and_environment():
    from node.cli.config import build_config
    from node.cli.settings import ConfigError
    from node.state.store import DEFAULT_RUN_RECORDS_MAX_BYTES

    base = {"name": "n", "insecure": True}
    assert build_config(flags=base, environ={}).run_records_max_bytes == DEFAULT_RUN_RECORDS_MAX_BYTES
    assert build_config(flags={**base, "run_records_max_bytes": "65536"}, environ={}).run_records_max_bytes == 65536
    with pytest.raises(ConfigError, match="run.records.max.bytes"):
        build_config(flags={**base, "run_records_max_bytes": "65535"}, environ={})
    with pytest.raises(ConfigError, match="run.records.max.bytes"):
        build_config(flags={**base, "run_records_max_bytes": "lots"}, environ={})
    env = {"PEERD_RUN_RECORDS_MAX_BYTES": str(1 << 30)}
    assert build_config(flags=base, environ=env).run_records_max_bytes == 1 << 30
