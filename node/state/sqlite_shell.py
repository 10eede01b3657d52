"""SQLite persistence shell for the store core (``Store.drain_dirty`` / ``load``).

One file per node, WAL journal, ``synchronous=NORMAL`` (durable across process
crashes; a power loss may drop the last transactions, which peers refill by
anti-entropy). One connection, used only from worker threads through
``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)``, so calls are
serialised and the trio loop never blocks on disk.

Schema (version 1): ``meta(k TEXT PRIMARY KEY, v TEXT)`` holding
``schema_version``; ``kv(key TEXT PRIMARY KEY, value BLOB NOT NULL)``;
``outputs(key TEXT PRIMARY KEY, text BLOB NOT NULL)``: run outputs, the
``out/<task>/<run>`` rows of ``Store.drain_dirty``, written in the same
transaction as the records and never loaded at start (``output_index``
lists their sizes; ``read_output`` reads one on demand, from the trio
thread, through a second connection: WAL readers never wait for the writer).

A file that is not SQLite, fails ``PRAGMA quick_check`` or lacks our schema
raises :class:`CorruptDatabase` naming the path and the reason; the daemon
stops with that message unless started with ``start_empty=True``, which
renames the file (and its -wal/-shm) to ``<path>.corrupt-<n>`` and starts
empty (peers refill it). A schema newer than this code raises
:class:`SchemaTooNew` and is never moved aside.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

import trio

from node.state.store import OUTPUT_PREFIX

__all__ = ["SqliteStore", "CorruptDatabase", "SchemaTooNew", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


class CorruptDatabase(Exception):
    """The database file cannot be used."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"database {path} is unusable: {reason} "
            "(restore it, delete it to refill from peers, or start with start_empty to move it aside)"
        )


class SchemaTooNew(CorruptDatabase):
    def __init__(self, path: str, version: int) -> None:
        CorruptDatabase.__init__(self, path, f"schema version {version} is newer than this peerd ({SCHEMA_VERSION})")
        self.version = version


class SqliteStore:
    """Async key/bytes persistence.

    Args:
        path: database file (its directory must exist).
        start_empty: move a corrupt file aside instead of raising.
    """

    def __init__(self, path: str | os.PathLike, start_empty: bool = False) -> None:
        self.path = os.fspath(path)
        self.start_empty = start_empty
        self.moved_aside: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # ------------------------------------------------------------ thread side
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                raise CorruptDatabase(self.path, f"cannot enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            res = conn.execute("PRAGMA quick_check").fetchall()
            if res != [("ok",)]:
                raise CorruptDatabase(self.path, "integrity check failed: " + "; ".join(str(r[0]) for r in res[:3]))
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                conn.execute("BEGIN")
                conn.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT NOT NULL)")
                conn.execute("CREATE TABLE kv(key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
                conn.execute("INSERT INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("COMMIT")
            elif not {"meta", "kv"} <= tables:
                raise CorruptDatabase(self.path, f"not a peerd database (tables: {sorted(tables)})")
            row = conn.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            try:
                version = int(row[0]) if row else -1
            except ValueError:
                version = -1
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(self.path, version)
            if version < 1:
                raise CorruptDatabase(self.path, f"bad schema_version {row!r}")
            # the audit table came later; older files gain it (nothing else changes)
            conn.execute("CREATE TABLE IF NOT EXISTS audit(seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "entry TEXT NOT NULL)")
            # run outputs came later too (records held them inline before)
            conn.execute("CREATE TABLE IF NOT EXISTS outputs(key TEXT PRIMARY KEY, text BLOB NOT NULL)")
            return conn
        except sqlite3.DatabaseError as e:
            conn.close()
            raise CorruptDatabase(self.path, f"sqlite: {e}") from None
        except BaseException:
            conn.close()
            raise

    def _move_aside(self) -> str:
        n = 1
        while os.path.exists(f"{self.path}.corrupt-{n}"):
            n += 1
            if n > 10_000:
                raise CorruptDatabase(self.path, "too many .corrupt-<n> files beside it")
        dest = f"{self.path}.corrupt-{n}"
        os.replace(self.path, dest)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, dest + suffix)
        return dest

    def _open_sync(self) -> None:
        try:
            self._conn = self._connect()
        except SchemaTooNew:
            raise
        except CorruptDatabase:
            if not self.start_empty:
                raise
            self.moved_aside = self._move_aside()
            self._conn = self._connect()

    def _write_sync(self, rows: list[tuple[str, bytes | None]]) -> None:
        conn = self._require()
        kv = [(k, v) for k, v in rows if not k.startswith(OUTPUT_PREFIX)]
        out = [(k, v) for k, v in rows if k.startswith(OUTPUT_PREFIX)]
        conn.execute("BEGIN")
        try:
            conn.executemany("DELETE FROM kv WHERE key=?", [(k,) for k, v in kv if v is None])
            conn.executemany(
                "INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", [(k, bytes(v)) for k, v in kv if v is not None]
            )
            conn.executemany("DELETE FROM outputs WHERE key=?", [(k,) for k, v in out if v is None])
            conn.executemany("INSERT OR REPLACE INTO outputs(key, text) VALUES(?, ?)",
                             [(k, bytes(v)) for k, v in out if v is not None])
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _load_sync(self) -> list[tuple[str, bytes]]:
        conn = self._require()
        try:
            return [(k, bytes(v)) for k, v in conn.execute("SELECT key, value FROM kv ORDER BY key")]
        except sqlite3.DatabaseError as e:
            raise CorruptDatabase(self.path, f"sqlite while loading: {e}") from None

    def _output_index_sync(self) -> list[tuple[str, int]]:
        conn = self._require()
        try:
            return [(k, int(n)) for k, n in conn.execute("SELECT key, length(text) FROM outputs ORDER BY key")]
        except sqlite3.DatabaseError as e:
            raise CorruptDatabase(self.path, f"sqlite while loading: {e}") from None

    def read_output(self, key: str) -> bytes | None:
        """One ``out/<task>/<run>`` row, read now (blocking, about a page
        or a few: outputs are at most 64 KiB) on a reader connection of
        its own; None when absent or unreadable."""
        try:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._reader.execute("PRAGMA query_only=1")
            row = self._reader.execute("SELECT text FROM outputs WHERE key=?", (key,)).fetchone()
        except sqlite3.Error:
            return None
        return bytes(row[0]) if row else None

    def _audit_sync(self, entries: list[str], keep: int) -> None:
        conn = self._require()
        conn.execute("BEGIN")
        try:
            conn.executemany("INSERT INTO audit(entry) VALUES(?)", [(e,) for e in entries])
            conn.execute("DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?", (keep,))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _audit_load_sync(self, limit: int) -> list[str]:
        conn = self._require()
        rows = conn.execute("SELECT entry FROM audit ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in reversed(rows)]

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self.path}: not open")
        return self._conn

    def _close_sync(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ async API
    async def open(self) -> None:
        """Open (creating if absent). Raises CorruptDatabase / SchemaTooNew."""
        await self._run(self._open_sync)

    async def write(self, rows: Iterable[tuple[str, bytes | None]]) -> None:
        """Upsert rows in one transaction; a ``None`` value deletes the key."""
        batch = list(rows)
        if batch:
            await self._run(self._write_sync, batch)

    async def load(self) -> list[tuple[str, bytes]]:
        """Every row, sorted by key (feed to ``Store.load``)."""
        return await self._run(self._load_sync)

    async def output_index(self) -> list[tuple[str, int]]:
        """``(out/<task>/<run>, bytes)`` of every stored output (feed to
        ``Store.note_outputs``)."""
        return await self._run(self._output_index_sync)

    async def append_audit(self, entries: Iterable[str], keep: int) -> None:
        """Append audit lines (JSON text), keeping the newest ``keep``."""
        batch = list(entries)
        if batch:
            await self._run(self._audit_sync, batch, int(keep))

    async def load_audit(self, limit: int) -> list[str]:
        """The newest ``limit`` audit lines, oldest first."""
        return await self._run(self._audit_load_sync, int(limit))

    async def close(self) -> None:
        await self._run(self._close_sync)

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back after a failed write; SQLite may have rolled back already
    (a full disk does), and that second error must not hide the first."""
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
