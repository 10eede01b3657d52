"""SQLite shell: real files in tmp_path."""
from __future__ import annotations

import os
import sqlite3

import pytest

from node.state.sqlite_shell import CorruptDatabase, SchemaTooNew, SqliteStore
from node.state.store import Store


async def test_write_close_reopen_load(tmp_path):
    path = tmp_path / "node.db"
    db = SqliteStore(path)
    await db.open()
    await db.write([("task/a", b"1"), ("task/b", b"2"), ("run/a/r", b"3")])
    await db.write([("task/b", None), ("task/a", b"1x")])
    await db.close()
    db2 = SqliteStore(path)
    await db2.open()
    assert await db2.load() == [("run/a/r", b"3"), ("task/a", b"1x")]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    await db2.close()


async def test_store_round_trip_through_sqlite(tmp_path):
    s = Store("a")
    s.put_task("t", {"cmd": "echo"}, None, 1.0)
    s.advance_fired("t", 60)
    s.put_run({"task_id": "t", "run_id": "r1", "slot": 60, "node": "a", "attempt": 1, "status": "running",
               "exit_code": None, "started": 60.0, "finished": None, "fencing_token": None, "output": ""})
    async with SqliteStore(tmp_path / "n.db") as db:
        await db.write(s.drain_dirty())
    async with SqliteStore(tmp_path / "n.db") as db:
        rows = await db.load()
    s2 = Store("a")
    s2.load(rows)
    assert s2.entries(s2.keys()) == s.entries(s.keys())


@pytest.mark.parametrize("content", [b"this is not sqlite at all" * 100, b"SQLite format 3\x00" + b"\xff" * 600])
async def test_corrupt_file_raises_clear_error(tmp_path, content):
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    db = SqliteStore(path)
    with pytest.raises(CorruptDatabase) as ei:
        await db.open()
    assert str(path) in str(ei.value) and ei.value.reason
    assert path.read_bytes() == content  # untouched


async def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE users(x)")
    c.commit()
    c.close()
    with pytest.raises(CorruptDatabase, match="not a peerd database"):
        await SqliteStore(path).open()


async def test_start_empty_moves_aside(tmp_path):
    path = tmp_path / "bad.db"
    path.write_bytes(b"garbage" * 200)
    (tmp_path / "bad.db.corrupt-1").write_bytes(b"older")
    db = SqliteStore(path, start_empty=True)
    await db.open()
    assert db.moved_aside == str(path) + ".corrupt-2"
    assert (tmp_path / "bad.db.corrupt-2").read_bytes() == b"garbage" * 200
    assert await db.load() == []
    await db.write([("task/x", b"v")])
    await db.close()


async def test_newer_schema_is_not_moved_aside(tmp_path):
    path = tmp_path / "n.db"
    async with SqliteStore(path):
        pass
    c = sqlite3.connect(path)
    c.execute("UPDATE meta SET v='99' WHERE k='schema_version'")
    c.commit()
    c.close()
    with pytest.raises(SchemaTooNew):
        await SqliteStore(path, start_empty=True).open()
    assert os.path.exists(path) and not os.path.exists(str(path) + ".corrupt-1")


async def test_use_before_open_is_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        await SqliteStore(tmp_path / "x.db").load()
