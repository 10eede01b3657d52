"""Replicated store core: task catalogue, control state, run records.

Pure core: no I/O, no clock (``now`` comes in), no randomness. The trio
daemon moves bytes; :mod:`node.state.sqlite_shell` persists ``drain_dirty()``.

Keys and their merge (each a join-semilattice: merge is commutative,
associative and idempotent, so any order of deliveries converges):

``task/<id>``  DVVSet (:mod:`node.state.versions`) of wrapped values
    ``{"def": dict | None, "deleted": bool, "updated_at": float, "writer": str}``.
    A delete is a tombstone value. Concurrent writes are siblings; readers see
    ``versions.resolve`` (greatest ``(updated_at, writer, sha256)``), and
    ``TaskView.siblings`` lists them all (winner first) so a conflict shows.
``ctl/<id>``   map of registers: ``p`` paused flag (DVVSet, same rule),
    ``f`` last fired slot (max register, int epoch seconds), ``x`` extra
    bookkeeping (``name -> [ts, writer, value]``, last-writer-wins by
    ``(ts, writer, canonical value)``) for DST / misfire notes.
``run/<task_id>/<run_id>``  run record dict; merge keeps the record with
    more progress, by the lattice ``(status rank, attempt, finished,
    sha256(canonical))`` with status rank pending 0 < running 1 < lost 2 <
    the runner's own outcome 3 (succeeded, failed, timeout, cancelled): a
    run marked ``lost`` by the node that saw its runner die takes the
    outcome the runner recorded, should that arrive later. Per task the run map is
    add-only and trimmed to the task definition's ``history`` (default 100)
    newest by ``(slot, started, run_id)``; "top-H of the union" is itself a
    lattice join, so trimming does not stop convergence.

Run outputs (off the heap): a record's ``output`` text is not held in
    memory. The record keeps ``output: ""`` plus ``output_bytes`` (UTF-8
    length) and ``output_digest`` (blake2b-128 hex of the text) when the
    text is not empty; the text goes to an output store through the shell:
    ``drain_dirty()`` yields it as an ``out/<task_id>/<run_id>`` row, and an
    injected reader (``set_output_reader``) reads it back on demand. The
    version hash covers the digest, not the text, so holding an output or
    not is local: two replicas with the same record are equal whether or
    not they hold its text, and anti-entropy never ships an entry again
    only for its output. An entry sent to a peer carries the text when this
    node holds it (``_entry``); a receiver keeps it when its merged record
    has that digest. A received text whose digest differs from the
    record's is malformed. A record with an inline ``output`` and no digest
    (an older file or peer) is converted on decode.
    Budget: ``max_bytes`` bounds the run-record bytes a node holds (encoded
    records plus output texts). Over it, a trim pass drops the oldest
    outputs (by ``(slot, started, run_id)`` across all tasks) down to
    ``TRIM_LOW_WATER`` of the budget; records stay (per-task ``history``
    bounds them, a rule every replica applies alike: dropping records for
    a local budget would have peers ship them back at every exchange).
    Each pass is counted and reported once (``take_trim_reports``).

Anti-entropy (TicTac-style XOR buckets, maintained incrementally):
    Each key hashes to ``h(key, version_hash)`` (64 bits); a bucket (1024,
    by hash of the key; run records by hash of their task ID), and each of its
    64 sub-buckets, holds the XOR of its keys' hashes. The root is
    blake2b-128 of the bucket array. Two scopes:
    ``catalogue`` (task/ and ctl/, every node holds all) and ``runs``
    restricted to a task set both sides replicate (the lead passes the set
    from its ring; a differing view only costs extra shipped records).

    Protocol (every message is msgpack; the lead calls ``start_exchange()``,
    then hands each received message to ``handle_exchange()`` and sends back
    ``reply`` until it is None; bad input raises :class:`RemoteProtocolError`
    and changes nothing):
      1. A -> B  ``[ROOT, scope, root16]``                        (21 bytes)
      2. B -> A  ``[OK, scope]`` if roots match (done: 3 bytes) else
                 ``[BUCKETS, scope, 1024 x 8-byte bucket hashes]``
      3. A -> B  ``[SUBS, scope, [bucket...], 64 x 8-byte sub-hashes each]``
                 for the differing buckets (level 3: cell = bucket*64 + sub)
      4. B -> A  ``[KEYS, scope, [cell...], [[key, vhash, progress]...]]``
                 (B's keys in the differing cells; progress: sum of a
                 clock's counters, strictly larger when a state dominates)
      5. A -> B  ``[ENTRIES, scope, entries, keys A wants]``: A ships the keys
                 B lacks and those where A has more progress; wants the keys
                 it lacks and those where B has as much or more
      6. B -> A  ``[ENTRIES, scope, wanted entries, []]``
      7. A -> B  ``[ENTRIES, scope, merged entries, []]`` only for keys where
                 A's merge differs from what B sent (concurrent versions).
    Messages 3-7 only happen when out of sync; the cost of a repair is ~8 KiB
    of bucket hashes + 512 bytes per differing bucket + the keys of the
    differing cells (about keys/65536 each) + the entries.
    Rule: a receiver of ENTRIES merges, then returns its result for every
    received key whose merged bytes differ from the received bytes, plus the
    wanted keys. Only keys whose version hash differs (or that one side
    lacks) are shipped; a key one side dominates is shipped once.

Tombstones: ``gc_tombstones(now, horizon_s)`` drops a task whose resolved
value is a tombstone, with no live sibling, whose newest sibling is older
than ``horizon_s`` (default 7 days, like Cassandra's gc_grace_seconds of 10
days, shorter because anti-entropy runs every few seconds), together with
its ctl/ and run/ keys. A node partitioned for longer than the horizon can
resurrect a deleted task: the documented trade-off.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from node.state import versions as dv
from node.state.runstatus import LOST, PENDING, RUNNING, TERMINAL

__all__ = [
    "Store", "TaskView", "Control", "StoreStatistics", "ExchangeResult", "RemoteProtocolError",
    "BUCKETS", "DEFAULT_HISTORY", "TOMBSTONE_HORIZON_S", "RUN_FIELDS", "TERMINAL",
    "DEFAULT_RUN_RECORDS_MAX_BYTES", "TRIM_LOW_WATER", "output_digest", "OUTPUT_PREFIX",
]

BUCKETS = 1024
DEFAULT_HISTORY = 100
TOMBSTONE_HORIZON_S = 7 * 86400.0
MAX_KEY_LEN = 512
MAX_ENTRY_BYTES = 1 << 20
MAX_MSG_ENTRIES = 100_000
#: One exchange message carries at most this many bytes of entries, and a
#: KEYS message at most ``PAGE_KEYS`` keys: a larger difference is shipped
#: a page per exchange, the next exchange finding what is still different
#: (the request frame limit is 4 MiB; a page stays well under it).
PAGE_BYTES = 1 << 20
PAGE_KEYS = 20_000

Entry = tuple[str, bytes]

#: Default per-node budget of run-record bytes (records + output texts).
DEFAULT_RUN_RECORDS_MAX_BYTES = 256 << 20
#: A trim pass brings the run-record bytes down to this share of the budget,
#: so passes are rare (one per ~20 % of the budget of new output).
TRIM_LOW_WATER = 0.8
#: Prefix of the output rows in ``drain_dirty()`` (``out/<task>/<run>``).
OUTPUT_PREFIX = "out/"

# ``lost`` is an observer's verdict on a run whose node died; the outcome the
# runner itself recorded (arriving later, e.g. after its restart) wins over it
_STATUS_RANK = {PENDING: 0, RUNNING: 1} | {s: 3 for s in sorted(TERMINAL)} | {LOST: 2}
RUN_FIELDS = ("task_id", "run_id", "slot", "node", "attempt", "status", "exit_code",
              "started", "finished", "fencing_token", "output")

# message types (append only)
M_ROOT, M_OK, M_BUCKETS, M_KEYS, M_ENTRIES, M_SUBS = 1, 2, 3, 4, 5, 6
SUBS = 64  # level 3: sub-buckets per bucket; a cell is bucket * SUBS + sub
SCOPES = ("catalogue", "runs")


class RemoteProtocolError(ValueError):
    """A peer sent something malformed; nothing was applied."""


def _enc(obj: Any) -> bytes:
    return dv.canonical(obj)


def _vhash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _khash(key: str, vh: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode() + b"\0" + vh, digest_size=8).digest(), "little")


def _cell(s: str) -> int:
    h = int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
    return (h % BUCKETS) * SUBS + (h // BUCKETS) % SUBS


def _bucket(s: str) -> int:
    return _cell(s) // SUBS


def _split(key: str) -> tuple[str, str, str]:
    """(kind, task_id, run_id) for a valid key, else ValueError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise ValueError(f"bad key {key!r}")
    kind, _, rest = key.partition("/")
    if kind in ("task", "ctl") and rest:
        return kind, rest, ""
    if kind == "run":
        tid, sep, rid = rest.rpartition("/")
        if tid and sep and rid:
            return kind, tid, rid
    raise ValueError(f"bad key {key!r}: expected task/<id>, ctl/<id> or run/<task>/<run>")


def output_digest(text: bytes) -> str:
    """blake2b-128 hex of an output's UTF-8 bytes (kept in its record)."""
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _strip_output(r: dict, where: str) -> tuple[dict, bytes | None]:
    """A decoded run record without its output text, and the text (None
    when the record carries none). Raises ValueError on a digest mismatch."""
    out = r.get("output")
    if not isinstance(out, str) or not out:
        return r, None
    raw = out.encode("utf-8", "replace")
    dg = output_digest(raw)
    if "output_digest" in r and r["output_digest"] != dg:
        raise ValueError(f"{where}: output does not match output_digest")
    r = dict(r, output="", output_bytes=len(raw), output_digest=dg)
    return r, raw


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x else 0.0


def _settled(r: Mapping[str, Any]) -> int:
    """Progress of a record's follow-ups (node/run/followups.py): 0 without
    ``notify``, else 1 + the entries no longer pending; only grows."""
    n = r.get("notify")
    if not isinstance(n, dict):
        return 0
    return 1 + sum(1 for v in n.values() if v != "pending")


def _run_rank(r: Mapping[str, Any]) -> tuple:
    return (
        _STATUS_RANK.get(r.get("status"), 0),
        int(r.get("attempt") or 0) if isinstance(r.get("attempt"), int) else 0,
        _num(r.get("finished")),
        _settled(r),
        hashlib.sha256(_enc(r)).digest(),
    )


def _run_order(r: Mapping[str, Any]) -> tuple:
    return (_num(r.get("slot")), _num(r.get("started")), str(r.get("run_id")))


def _check_run(r: Any, where: str) -> dict:
    if not isinstance(r, dict):
        raise ValueError(f"{where}: run record must be a map")
    dv.check_plain(r, where)
    for f in ("task_id", "run_id"):
        if not isinstance(r.get(f), str) or not r[f] or "/" in r[f] and f == "run_id":
            raise ValueError(f"{where}.{f}: expected a non-empty string (run_id without '/')")
    if not isinstance(r.get("status"), str) or r["status"] not in _STATUS_RANK:
        raise ValueError(f"{where}.status: expected one of {sorted(_STATUS_RANK)}")
    for f in ("slot", "started", "finished"):
        if r.get(f) is not None and not isinstance(r[f], (int, float)):
            raise ValueError(f"{where}.{f}: expected a number or null")
    if not isinstance(r.get("attempt", 0), int):
        raise ValueError(f"{where}.attempt: expected an int")
    if "output" in r and not isinstance(r["output"], str):
        raise ValueError(f"{where}.output: expected a string")
    ob = r.get("output_bytes", 0)
    if not isinstance(ob, int) or isinstance(ob, bool) or not 0 <= ob <= MAX_ENTRY_BYTES:
        raise ValueError(f"{where}.output_bytes: expected an int in [0, {MAX_ENTRY_BYTES}]")
    dg = r.get("output_digest")
    if dg is not None and (not isinstance(dg, str) or len(dg) != 32):
        raise ValueError(f"{where}.output_digest: expected 32 hex digits")
    return r


@dataclass(frozen=True, slots=True)
class TaskView:
    task_id: str
    value: dict | None            # resolved definition, None if deleted
    siblings: list[dict]          # wrapped siblings, winner first; len > 1 = conflict
    context: bytes                # opaque, hand back on the next write
    deleted: bool
    updated_at: float

    @property
    def conflict(self) -> bool:
        return len(self.siblings) > 1


@dataclass(frozen=True, slots=True)
class Control:
    paused: bool
    last_fired_slot: int | None
    extra: dict = field(default_factory=dict)
    paused_conflict: bool = False


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    tasks: int
    tombstones: int
    conflicts: int
    controls: int
    runs: int
    dirty: int
    merges_applied: int
    merges_rejected: int
    run_record_bytes: int = 0      # encoded run records held in memory
    output_bytes: int = 0          # output texts held in the output store
    outputs: int = 0               # output texts held
    max_bytes: int = 0             # the budget (records + outputs)
    trimmed_outputs: int = 0       # outputs dropped by the budget
    trimmed_records: int = 0       # records dropped beyond their task's history
    trim_passes: int = 0


@dataclass(frozen=True, slots=True)
class ExchangeResult:
    reply: bytes | None           # send this back to the peer (None: exchange over)
    changed: list[str]            # keys this message changed locally
    shipped: int = 0              # entries in the reply


_EMPTY: dv.Clock = ((), ())
#: Reads an ``out/<task>/<run>`` row the shell wrote (None when absent).
OutputReader = Callable[[str], "bytes | None"]


class Store:
    """One node's replica of the catalogue, control state and its run records."""

    def __init__(self, node: str, *, max_bytes: int = DEFAULT_RUN_RECORDS_MAX_BYTES,
                 output_reader: OutputReader | None = None) -> None:
        if not node:
            raise ValueError("node name required")
        self.node = node
        self.max_bytes = int(max_bytes)
        self._reader: OutputReader = output_reader or (lambda key: None)
        self._out: dict[str, int] = {}        # run key -> bytes of the output held for it
        self._out_total = 0
        self._out_dirty: dict[str, bytes | None] = {}   # run key -> text to write (None: delete)
        self._rec_total = 0                   # bytes of encoded run records
        self._trimmed = {"output": 0, "record": 0, "passes": 0}
        self._trim_reports: list[dict] = []
        self._records_full = False            # records alone over the budget's low water
        self._state: dict[str, Any] = {}      # key -> decoded state
        self._bytes: dict[str, bytes] = {}    # key -> canonical encoding
        self._vh: dict[str, bytes] = {}
        self._kh: dict[str, int] = {}
        self._cat = [0] * BUCKETS             # catalogue buckets (task/, ctl/)
        self._cat_keys: list[set[str]] = [set() for _ in range(BUCKETS)]
        self._runagg: dict[str, int] = {}     # task -> XOR of its run keys' hashes
        self._runs: dict[str, set[str]] = {}  # task -> run keys
        self._dirty: set[str] = set()
        self._applied = 0
        self._rejected = 0

    # ------------------------------------------------------------ internals
    def _set(self, key: str, state: Any, data: bytes | None = None) -> bool:
        """Store ``state`` at ``key``; returns whether the bytes changed."""
        data = _enc(self._wire(key, state)) if data is None else data
        if self._bytes.get(key) == data:
            return False
        kind, tid, _ = _split(key)
        old = self._kh.get(key)
        vh = _vhash(data)
        kh = _khash(key, vh)
        if kind == "run":
            self._runagg[tid] = self._runagg.get(tid, 0) ^ (old or 0) ^ kh
            self._runs.setdefault(tid, set()).add(key)
            self._rec_total += len(data) - len(self._bytes.get(key, b""))
            if key in self._out and state.get("output_digest") != self._state[key].get("output_digest"):
                self._drop_output(key)  # the held text belongs to the previous version
        else:
            b = _bucket(key)
            self._cat[b] ^= (old or 0) ^ kh
            self._cat_keys[b].add(key)
        self._state[key] = state
        self._bytes[key] = data
        self._vh[key] = vh
        self._kh[key] = kh
        self._dirty.add(key)
        return True

    def _drop(self, key: str) -> None:
        if key not in self._state:
            return
        kind, tid, _ = _split(key)
        kh = self._kh.pop(key)
        if kind == "run":
            self._runagg[tid] ^= kh
            self._runs[tid].discard(key)
            self._rec_total -= len(self._bytes[key])
            self._drop_output(key)
            if not self._runs[tid]:
                del self._runs[tid]
                del self._runagg[tid]
        else:
            b = _bucket(key)
            self._cat[b] ^= kh
            self._cat_keys[b].discard(key)
        del self._state[key], self._bytes[key], self._vh[key]
        self._dirty.add(key)

    @staticmethod
    def _wire(key: str, state: Any) -> Any:
        kind = key.split("/", 1)[0]
        if kind == "task":
            return dv.to_wire(state)
        if kind == "ctl":
            return {"p": dv.to_wire(state["p"]), "f": state["f"], "x": state["x"]}
        return state

    @staticmethod
    def _decode(key: str, data: bytes) -> Any:
        """Validate and decode an entry. Raises ValueError naming the key."""
        kind, tid, rid = _split(key)
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_ENTRY_BYTES:
            raise ValueError(f"{key}: entry must be bytes <= {MAX_ENTRY_BYTES}")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:
            raise ValueError(f"{key}: undecodable entry ({e.__class__.__name__})") from None
        dv.check_plain(obj, key)
        if kind == "task":
            clock = dv.from_wire(obj, key)
            for i, v in enumerate(dv.values(clock)):
                if (not isinstance(v, dict) or not isinstance(v.get("deleted"), bool)
                        or not isinstance(v.get("writer"), str)
                        or not (v.get("def") is None or isinstance(v.get("def"), dict))):
                    raise ValueError(f"{key}: value {i} is not a task record")
            return clock
        if kind == "ctl":
            if not isinstance(obj, dict) or set(obj) != {"p", "f", "x"}:
                raise ValueError(f"{key}: expected {{p, f, x}}")
            p = dv.from_wire(obj["p"], f"{key}.p")
            f = obj["f"]
            if f is not None and (not isinstance(f, int) or isinstance(f, bool)):
                raise ValueError(f"{key}.f: expected an int or null")
            x = obj["x"]
            if not isinstance(x, dict):
                raise ValueError(f"{key}.x: expected a map")
            for name, reg in x.items():
                if (not isinstance(reg, list) or len(reg) != 3 or not isinstance(reg[0], (int, float))
                        or not isinstance(reg[1], str)):
                    raise ValueError(f"{key}.x.{name}: expected [ts, writer, value]")
            return {"p": p, "f": f, "x": x}
        r = _check_run(obj, key)
        if r["task_id"] != tid or r["run_id"] != rid:
            raise ValueError(f"{key}: record ids do not match the key")
        return r

    @classmethod
    def _decode_entry(cls, key: str, data: bytes) -> tuple[Any, bytes | None]:
        """``_decode``, with a run record's output text split off."""
        st = cls._decode(key, data)
        if key.startswith("run/"):
            return _strip_output(st, key)
        return st, None

    @staticmethod
    def _merge_state(key: str, a: Any, b: Any) -> Any:
        kind = key.split("/", 1)[0]
        if kind == "task":
            return dv.sync(a, b)
        if kind == "ctl":
            fa, fb = a["f"], b["f"]
            f = fb if fa is None else fa if fb is None else max(fa, fb)
            x = dict(a["x"])
            for name, reg in b["x"].items():
                cur = x.get(name)
                if cur is None or (cur[0], cur[1], _enc(cur[2])) < (reg[0], reg[1], _enc(reg[2])):
                    x[name] = reg
            return {"p": dv.sync(a["p"], b["p"]), "f": f, "x": {k: x[k] for k in sorted(x)}}
        return a if _run_rank(a) >= _run_rank(b) else b

    def _history(self, task_id: str) -> int:
        st = self._state.get("task/" + task_id)
        if st is not None:
            v = dv.resolve(dv.values(st))
            d = v.get("def") if isinstance(v, dict) else None
            h = d.get("history") if isinstance(d, dict) else None
            if isinstance(h, int) and not isinstance(h, bool) and h >= 0:
                return h
        return DEFAULT_HISTORY

    def _trim(self, task_id: str) -> list[str]:
        keys = self._runs.get(task_id)
        h = self._history(task_id)
        if not keys or len(keys) <= h:
            return []
        order = sorted(keys, key=lambda k: _run_order(self._state[k]), reverse=True)
        gone = order[h:]
        for k in gone:
            self._drop(k)
        self._trimmed["record"] += len(gone)
        return gone

    def _apply(self, key: str, remote: Any, text: bytes | None = None) -> bool:
        cur = self._state.get(key)
        new = remote if cur is None else self._merge_state(key, cur, remote)
        changed = self._set(key, new)
        if key.startswith("run/"):
            if changed and key in self._trim(_split(key)[1]):
                return False
            if text is not None and key not in self._out and new.get("output_digest") == remote.get("output_digest"):
                self._keep_output(key, text)
            return changed
        elif changed and key.startswith("task/"):
            self._trim(_split(key)[1])  # history may have shrunk
        return changed

    def _progress(self, key: str) -> float:
        """A number that strictly grows when a state strictly dominates another
        (ties and concurrency fall back to shipping both ways)."""
        st = self._state[key]
        kind = key.split("/", 1)[0]
        if kind == "task":
            return float(sum(n for _, n, _ in st[0]))
        if kind == "ctl":
            return float(sum(n for _, n, _ in st["p"][0]) + (st["f"] or 0)
                         + sum(_num(r[0]) for r in st["x"].values()))
        return _STATUS_RANK.get(st.get("status"), 0) * 1e6 + _num(st.get("attempt"))

    def _entry(self, key: str) -> Entry:
        """The entry to send: a run record carries its output when held."""
        if key in self._out:
            text = self._read_output(key)
            if text is not None:
                return (key, _enc(dict(self._state[key], output=text.decode("utf-8", "replace"))))
        return (key, self._bytes[key])

    def _paged(self, keys: Iterable[str]) -> list[Entry]:
        """Entries of ``keys`` (sorted) that fit in a page, built one by
        one so outputs beyond the page are never read."""
        out, n = [], 0
        for k in sorted(set(keys)):
            if k not in self._bytes:
                continue
            e = self._entry(k)
            size = len(e[0]) + len(e[1]) + 16
            if out and n + size > PAGE_BYTES:
                break
            out.append(e)
            n += size
        return out

    # ------------------------------------------------------------ outputs
    def set_output_reader(self, reader: OutputReader) -> None:
        """The shell's reader of ``out/<task>/<run>`` rows already drained."""
        self._reader = reader

    def _read_output(self, key: str) -> bytes | None:
        """The held text of run ``key`` whose digest matches its record."""
        if key not in self._out:
            return None
        text = self._out_dirty.get(key)
        if text is None:
            raw = self._reader(OUTPUT_PREFIX + key[4:])
            text = bytes(raw) if raw is not None else None
        if text is None or output_digest(text) != self._state[key].get("output_digest"):
            return None
        return text

    def _keep_output(self, key: str, text: bytes) -> None:
        self._drop_output(key)
        if self._rec_total + len(text) > self.max_bytes * TRIM_LOW_WATER:
            # the records alone fill the budget (history x tasks too large
            # for it): no output is kept, and no pass is run per output
            self._trimmed["output"] += 1
            if not self._records_full:
                self._records_full = True
                self._report(0, self._rec_total + self._out_total)
            return
        self._records_full = False
        self._out[key] = len(text)
        self._out_total += len(text)
        self._out_dirty[key] = text
        if self._rec_total + self._out_total > self.max_bytes:
            self._trim_outputs()

    def _drop_output(self, key: str) -> None:
        n = self._out.pop(key, None)
        if n is not None:
            self._out_total -= n
            self._out_dirty[key] = None

    def _trim_outputs(self) -> None:
        """One trim pass: the oldest outputs go until the run-record bytes
        are at most ``TRIM_LOW_WATER`` of the budget."""
        goal = int(self.max_bytes * TRIM_LOW_WATER)
        before = self._rec_total + self._out_total
        dropped = 0
        for key in sorted(self._out, key=lambda k: _run_order(self._state[k])):
            if self._rec_total + self._out_total <= goal:
                break
            self._drop_output(key)
            dropped += 1
        self._trimmed["output"] += dropped
        self._report(dropped, before)

    def _report(self, dropped: int, before: int) -> None:
        self._trimmed["passes"] += 1
        report = {"outputs": dropped, "before": before, "after": self._rec_total + self._out_total,
                  "budget": self.max_bytes, "records_bytes": self._rec_total}
        if len(self._trim_reports) < 64:
            self._trim_reports.append(report)

    def take_trim_reports(self) -> list[dict]:
        """Trim passes since the last call, one dict each (log one line each)."""
        out, self._trim_reports = self._trim_reports, []
        return out

    def note_outputs(self, index: Iterable[tuple[str, int]]) -> None:
        """At start: the ``(out/<task>/<run>, bytes)`` rows on disk. Rows of
        records no longer held (or without an output) are deleted."""
        for okey, size in index:
            key = "run/" + okey[len(OUTPUT_PREFIX):]
            st = self._state.get(key)
            if st is None or not st.get("output_digest") or key in self._out:
                if key not in self._out:
                    self._out_dirty[key] = None
                continue
            self._out[key] = int(size)
            self._out_total += int(size)
        if self._rec_total + self._out_total > self.max_bytes:
            self._trim_outputs()

    def run_output(self, task_id: str, run_id: str) -> str | None:
        """A run's output text: "" when it has none, None when this node
        does not hold it (trimmed by the budget, or never received)."""
        key = f"run/{task_id}/{run_id}"
        st = self._state.get(key)
        if not isinstance(st, dict) or not st.get("output_bytes"):
            return None if st is None else str(st.get("output") or "")
        text = self._read_output(key)
        return None if text is None else text.decode("utf-8", "replace")

    def with_output(self, rec: dict) -> dict:
        """``rec`` (a copy) with its output text read back; an output this
        node does not hold reads "" with ``output_trimmed: true``."""
        if rec.get("output") or not rec.get("output_bytes"):
            return dict(rec)
        text = self.run_output(str(rec.get("task_id")), str(rec.get("run_id")))
        if text is None:
            return dict(rec, output="", output_trimmed=True)
        return dict(rec, output=text)

    # ------------------------------------------------------------ tasks
    def _write_task(self, task_id: str, wrapped: dict, context: bytes | None) -> list[Entry]:
        key = "task/" + task_id
        _split(key)
        if context is None:
            vv: dv.VV = ()
        else:
            try:
                vv = dv.vv_from_wire(msgpack.unpackb(context, raw=False))
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"context for {task_id!r}: undecodable ({e.__class__.__name__})") from None
        dv.check_plain(wrapped, f"task {task_id}")
        cur = self._state.get(key, _EMPTY)
        new = dv.update(dv.new_with_context(vv, wrapped), cur, self.node)
        self._set(key, new)
        self._trim(task_id)
        return [self._entry(key)]

    def put_task(self, task_id: str, definition: dict, context: bytes | None, now: float) -> list[Entry]:
        """Write a task definition as this node.

        Args:
            context: the opaque ``TaskView.context`` the client read; ``None``
                is a blind write, concurrent with every value it has not seen.
        Returns:
            Entries to push to peers.
        Raises:
            ValueError: bad task ID, context or non-plain definition.
        """
        if not isinstance(definition, dict):
            raise ValueError("definition must be a dict")
        return self._write_task(
            task_id, {"def": definition, "deleted": False, "updated_at": float(now), "writer": self.node}, context
        )

    def delete_task(self, task_id: str, context: bytes | None, now: float) -> list[Entry]:
        """Write a tombstone (a sibling like any other value)."""
        return self._write_task(
            task_id, {"def": None, "deleted": True, "updated_at": float(now), "writer": self.node}, context
        )

    def get_task(self, task_id: str) -> TaskView | None:
        st = self._state.get("task/" + task_id)
        if st is None:
            return None
        vals = dv.values(st)
        win = dv.resolve(vals)
        sibs = [win] + sorted((v for v in vals if v is not win), key=dv._rank, reverse=True)
        return TaskView(
            task_id=task_id,
            value=None if win["deleted"] else win["def"],
            siblings=sibs,
            context=msgpack.packb(dv.vv_to_wire(dv.join(st))),
            deleted=bool(win["deleted"]),
            updated_at=max(_num(v.get("updated_at")) for v in vals),
        )

    def tasks(self, include_deleted: bool = False) -> list[TaskView]:
        out = []
        for key in sorted(k for k in self._state if k.startswith("task/")):
            v = self.get_task(key[5:])
            if v is not None and (include_deleted or not v.deleted):
                out.append(v)
        return out

    # ------------------------------------------------------------ control
    def _ctl(self, task_id: str) -> dict:
        return self._state.get("ctl/" + task_id) or {"p": _EMPTY, "f": None, "x": {}}

    def set_paused(self, task_id: str, paused: bool, now: float) -> list[Entry]:
        """Set the pause flag with this node's current context (drops what it saw)."""
        key = "ctl/" + task_id
        _split(key)
        c = self._ctl(task_id)
        val = {"paused": bool(paused), "updated_at": float(now), "writer": self.node}
        p = dv.update(dv.new_with_context(dv.join(c["p"]), val), c["p"], self.node)
        self._set(key, {"p": p, "f": c["f"], "x": c["x"]})
        return [self._entry(key)]

    def advance_fired(self, task_id: str, slot: int) -> list[Entry]:
        """Raise the last-fired-slot max register; ``[]`` if not advanced."""
        if not isinstance(slot, int) or isinstance(slot, bool):
            raise ValueError("slot must be int epoch seconds")
        key = "ctl/" + task_id
        _split(key)
        c = self._ctl(task_id)
        if c["f"] is not None and c["f"] >= slot:
            return []
        self._set(key, {"p": c["p"], "f": slot, "x": c["x"]})
        return [self._entry(key)]

    def set_control_extra(self, task_id: str, name: str, value: Any, now: float) -> list[Entry]:
        """Last-writer-wins bookkeeping register (DST, misfire notes)."""
        key = "ctl/" + task_id
        _split(key)
        dv.check_plain(value, f"ctl {task_id}.{name}")
        c = self._ctl(task_id)
        mine = {"p": _EMPTY, "f": None, "x": {name: [float(now), self.node, value]}}
        self._set(key, self._merge_state(key, c, mine))
        return [self._entry(key)]

    def control(self, task_id: str) -> Control:
        c = self._ctl(task_id)
        vals = dv.values(c["p"])
        win = dv.resolve(vals)
        return Control(
            paused=bool(win["paused"]) if isinstance(win, dict) else False,
            last_fired_slot=c["f"],
            extra={k: v[2] for k, v in sorted(c["x"].items())},
            paused_conflict=len(vals) > 1,
        )

    # ------------------------------------------------------------ runs
    def put_run(self, record: dict) -> list[Entry]:
        """Add or advance a run record; ``[]`` if it changed nothing (or was trimmed)."""
        rec = _check_run(dict(record), "run record")
        key = f"run/{rec['task_id']}/{rec['run_id']}"
        _split(key)
        rec, text = _strip_output(rec, key)
        return [self._entry(key)] if self._apply(key, rec, text) else []

    def run_record(self, task_id: str, run_id: str) -> dict | None:
        """One run record (a copy), or None."""
        rec = self._state.get(f"run/{task_id}/{run_id}")
        return dict(rec) if isinstance(rec, dict) else None

    def runs(self, task_id: str) -> list[dict]:
        keys = self._runs.get(task_id, ())
        return sorted((dict(self._state[k]) for k in keys), key=_run_order)

    def run_tasks(self) -> list[str]:
        """Task IDs this node holds run records for."""
        return sorted(self._runs)

    # ------------------------------------------------------------ replication
    def merge(self, entries: Iterable[Entry]) -> list[str]:
        """Merge remote entries. Returns changed keys (sorted).

        Raises:
            RemoteProtocolError: if any entry is malformed; then nothing is
            applied (all entries are validated first).
        """
        decoded = []
        for n, e in enumerate(entries):
            if n >= MAX_MSG_ENTRIES:
                raise RemoteProtocolError(f"more than {MAX_MSG_ENTRIES} entries")
            try:
                if not isinstance(e, (list, tuple)) or len(e) != 2:
                    raise ValueError(f"entry {n}: expected [key, bytes]")
                decoded.append((e[0], *self._decode_entry(e[0], e[1])))
            except ValueError as err:
                self._rejected += 1
                raise RemoteProtocolError(str(err)) from None
        changed = {key for key, state, text in decoded if self._apply(key, state, text)}
        self._applied += len(decoded)
        return sorted(changed)

    def entries(self, keys: Iterable[str]) -> list[Entry]:
        """Entries to send (run records with their output when held)."""
        return [self._entry(k) for k in sorted(set(keys)) if k in self._bytes]

    def keys(self) -> list[str]:
        return sorted(self._state)

    # ------------------------------------------------------------ anti-entropy
    def _scope_buckets(self, scope: str, tasks: Iterable[str] | None) -> list[int]:
        if scope == "catalogue":
            return self._cat
        out = [0] * BUCKETS
        for tid in (self._runagg if tasks is None else set(tasks)):
            agg = self._runagg.get(tid)
            if agg:
                out[_bucket(tid)] ^= agg
        return out

    @staticmethod
    def _root(buckets: list[int]) -> bytes:
        return hashlib.blake2b(b"".join(b.to_bytes(8, "little") for b in buckets), digest_size=16).digest()

    def digest_root(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """16-byte root of a scope."""
        return self._root(self._scope_buckets(scope, tasks))

    def bucket_hashes(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """Level 2: ``BUCKETS`` x 8-byte little-endian XOR hashes."""
        return b"".join(b.to_bytes(8, "little") for b in self._scope_buckets(scope, tasks))

    def keys_in_buckets(self, buckets: Iterable[int], scope: str = "catalogue",
                        tasks: Iterable[str] | None = None) -> list[tuple[str, bytes]]:
        """``(key, version_hash)`` of the scope's keys in the given buckets."""
        return self._keys_in(set(buckets), None, scope, tasks)

    def _keys_in(self, buckets: set[int], cells: set[int] | None, scope: str,
                 tasks: Iterable[str] | None) -> list[tuple[str, bytes]]:
        out = []
        if scope == "catalogue":
            for b in sorted(buckets):
                if isinstance(b, int) and 0 <= b < BUCKETS:
                    out.extend((k, self._vh[k]) for k in self._cat_keys[b]
                               if cells is None or _cell(k) in cells)
        else:
            allowed = set(self._runs) if tasks is None else set(tasks)
            for tid in allowed:  # order-free: output sorted below
                if tid in self._runs:
                    c = _cell(tid)
                    if (c // SUBS in buckets) and (cells is None or c in cells):
                        out.extend((k, self._vh[k]) for k in self._runs[tid])
        return sorted(out)

    def _sub_hashes(self, buckets: list[int], scope: str, tasks: Iterable[str] | None) -> list[int]:
        """Level 3: SUBS hashes per given bucket, concatenated."""
        pos = {b: i for i, b in enumerate(buckets)}
        out = [0] * (len(buckets) * SUBS)
        if scope == "catalogue":
            for b in buckets:
                for k in self._cat_keys[b]:
                    out[pos[b] * SUBS + _cell(k) % SUBS] ^= self._kh[k]
        else:
            for tid in (self._runagg if tasks is None else tasks):
                agg = self._runagg.get(tid)
                if agg:
                    c = _cell(tid)
                    i = pos.get(c // SUBS)
                    if i is not None:
                        out[i * SUBS + c % SUBS] ^= agg
        return out

    def start_exchange(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """First message of an anti-entropy exchange (send to one peer)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        return msgpack.packb([M_ROOT, SCOPES.index(scope), self.digest_root(scope, tasks)])

    def handle_exchange(self, msg: bytes, tasks: Iterable[str] | None = None) -> ExchangeResult:
        """Handle one exchange message; send ``reply`` back if not None.

        Args:
            tasks: for the ``runs`` scope, the task IDs this node replicates
                together with the peer (same on both sides ideally).
        Raises:
            RemoteProtocolError: malformed message (nothing applied).
        """
        try:
            obj = msgpack.unpackb(msg, raw=False, strict_map_key=True)
        except Exception as e:
            raise RemoteProtocolError(f"exchange: undecodable message ({e.__class__.__name__})") from None
        if not isinstance(obj, list) or len(obj) < 2 or not isinstance(obj[0], int) \
                or not isinstance(obj[1], int) or not 0 <= obj[1] < len(SCOPES):
            raise RemoteProtocolError("exchange: expected [type, scope, ...]")
        t, si = obj[0], obj[1]
        scope = SCOPES[si]
        tasks = None if tasks is None else set(tasks)  # XOR and sorted output: order-free
        if t == M_ROOT:
            if len(obj) != 3 or not isinstance(obj[2], bytes):
                raise RemoteProtocolError("exchange ROOT: expected [1, scope, root]")
            buckets = self._scope_buckets(scope, tasks)
            if self._root(buckets) == obj[2]:
                return ExchangeResult(msgpack.packb([M_OK, si]), [])
            hashes = b"".join(b.to_bytes(8, "little") for b in buckets)
            return ExchangeResult(msgpack.packb([M_BUCKETS, si, hashes]), [])
        if t == M_OK:
            return ExchangeResult(None, [])
        if t == M_BUCKETS:
            if len(obj) != 3 or not isinstance(obj[2], bytes) or len(obj[2]) != 8 * BUCKETS:
                raise RemoteProtocolError(f"exchange BUCKETS: expected {8 * BUCKETS} bytes of hashes")
            mine = self._scope_buckets(scope, tasks)
            theirs = memoryview(obj[2]).cast("Q").tolist()
            diff = [i for i in range(BUCKETS) if mine[i] != theirs[i]]
            if not diff:
                return ExchangeResult(None, [])
            subs = b"".join(h.to_bytes(8, "little") for h in self._sub_hashes(diff, scope, tasks))
            return ExchangeResult(msgpack.packb([M_SUBS, si, diff, subs]), [])
        if t == M_SUBS:
            if (len(obj) != 4 or not isinstance(obj[2], list) or not isinstance(obj[3], bytes)
                    or len(obj[2]) > BUCKETS or len(obj[3]) != 8 * SUBS * len(obj[2])):
                raise RemoteProtocolError("exchange SUBS: expected [6, scope, [bucket], SUBS x 8 bytes each]")
            diff = obj[2]
            if not all(isinstance(b, int) and 0 <= b < BUCKETS for b in diff) or len(set(diff)) != len(diff):
                raise RemoteProtocolError("exchange SUBS: bad bucket list")
            mine = self._sub_hashes(diff, scope, tasks)
            theirs = memoryview(obj[3]).cast("Q").tolist()
            cells = [diff[i // SUBS] * SUBS + i % SUBS for i in range(len(mine)) if mine[i] != theirs[i]]
            if not cells:
                return ExchangeResult(None, [])
            kv = self._keys_in({c // SUBS for c in cells}, set(cells), scope, tasks)
            if len(kv) > PAGE_KEYS:
                # a page of cells whose keys fit; the rest in later exchanges
                counts: dict[int, int] = {}
                for k, _ in kv:
                    c = _cell(k) if scope == "catalogue" else _cell(_split(k)[1])
                    counts[c] = counts.get(c, 0) + 1
                page, n = [], 0
                for c in cells:
                    if page and n + counts.get(c, 0) > PAGE_KEYS:
                        break
                    page.append(c)
                    n += counts.get(c, 0)
                cells = page
                kv = self._keys_in({c // SUBS for c in cells}, set(cells), scope, tasks)
            items = [[k, v, self._progress(k)] for k, v in kv]
            return ExchangeResult(msgpack.packb([M_KEYS, si, cells, items]), [])
        if t == M_KEYS:
            if (len(obj) != 4 or not isinstance(obj[2], list) or not isinstance(obj[3], list)
                    or len(obj[2]) > BUCKETS * SUBS or len(obj[3]) > MAX_MSG_ENTRIES):
                raise RemoteProtocolError("exchange KEYS: expected [4, scope, [cell], [[key, vhash]]]")
            cells = obj[2]
            if not all(isinstance(c, int) and 0 <= c < BUCKETS * SUBS for c in cells):
                raise RemoteProtocolError("exchange KEYS: cell out of range")
            theirs: dict[str, bytes] = {}
            prog: dict[str, float] = {}
            for i, kv in enumerate(obj[3]):
                if (not isinstance(kv, list) or len(kv) != 3 or not isinstance(kv[0], str)
                        or not isinstance(kv[1], bytes) or not isinstance(kv[2], (int, float))):
                    raise RemoteProtocolError(f"exchange KEYS: item {i} is not [key, vhash, progress]")
                theirs[kv[0]] = kv[1]
                prog[kv[0]] = kv[2]
            mine = dict(self._keys_in({c // SUBS for c in cells}, set(cells), scope, tasks))
            # differing on both sides: the side with more progress ships; on a
            # tie we pull theirs and the ENTRIES rule sends back our merge
            send = [k for k in sorted(mine) if k not in theirs
                    or (theirs[k] != mine[k] and self._progress(k) > prog[k])]
            want = [k for k in sorted(theirs) if mine.get(k) != theirs[k]
                    and (k not in mine or self._progress(k) <= prog[k])]
            ents = [list(e) for e in self._paged(send)]
            return ExchangeResult(msgpack.packb([M_ENTRIES, si, ents, want]), [], len(ents))
        if t == M_ENTRIES:
            if (len(obj) != 4 or not isinstance(obj[2], list) or not isinstance(obj[3], list)
                    or len(obj[2]) > MAX_MSG_ENTRIES):
                raise RemoteProtocolError("exchange ENTRIES: expected [5, scope, entries, want]")
            want = obj[3]
            if len(want) > MAX_MSG_ENTRIES or not all(isinstance(k, str) for k in want):
                raise RemoteProtocolError("exchange ENTRIES: want must be a list of keys")
            # validate everything before applying anything
            decoded = []
            for n, e in enumerate(obj[2]):
                if not isinstance(e, list) or len(e) != 2:
                    raise RemoteProtocolError(f"exchange ENTRIES: entry {n} is not [key, bytes]")
                try:
                    decoded.append((e[0], *self._decode_entry(e[0], e[1])))
                except ValueError as err:
                    self._rejected += 1
                    raise RemoteProtocolError(f"exchange ENTRIES: {err}") from None
            changed = sorted({k for k, st, text in decoded if self._apply(k, st, text)})
            self._applied += len(decoded)
            # what the peer sent lacks something we had (concurrent versions):
            # send the merged result back, so both sides end equal (a run
            # record is compared without its output text)
            sent = {k: _enc(st) if text is not None else bytes(e[1])
                    for (k, st, text), e in zip(decoded, obj[2])}
            back = [k for k in sorted(sent) if k in self._bytes and self._bytes[k] != sent[k]]
            keys = sorted(set(back) | set(want))
            if not keys:
                return ExchangeResult(None, changed)
            ents = [list(e) for e in self._paged(keys)]
            if not ents:
                return ExchangeResult(None, changed)
            return ExchangeResult(msgpack.packb([M_ENTRIES, si, ents, []]), changed, len(ents))
        raise RemoteProtocolError(f"exchange: unknown message type {t}")

    # ------------------------------------------------------------ persistence
    def drain_dirty(self) -> list[tuple[str, bytes | None]]:
        """Keys changed since the last drain, with their bytes (None: deleted).

        Persist these; a write acknowledged to a client must be drained and
        written before the acknowledgement.
        """
        out = [(k, self._bytes.get(k)) for k in sorted(self._dirty)]
        out += [(OUTPUT_PREFIX + k[4:], v) for k, v in sorted(self._out_dirty.items())]
        self._dirty.clear()
        self._out_dirty.clear()
        return out

    def load(self, rows: Iterable[tuple[str, bytes]]) -> list[str]:
        """Merge persisted rows at start. Bad rows raise ValueError naming the key."""
        changed = []
        loaded: dict[str, bytes] = {}
        outputs: list[tuple[str, int]] = []
        for key, data in rows:
            if data is None:
                continue
            data = bytes(data)
            if key.startswith(OUTPUT_PREFIX):
                # an output row (a shell that loads them with the records)
                outputs.append((key, len(data)))
                continue
            st, text = self._decode_entry(key, data)
            loaded[key] = data
            if self._apply(key, st, text):
                changed.append(key)
        if outputs:
            self.note_outputs(outputs)
        # rows already on disk as they are now need no rewrite
        self._dirty.difference_update(k for k, d in loaded.items() if self._bytes.get(k) == d)
        return changed

    def gc_tombstones(self, now: float, horizon_s: float = TOMBSTONE_HORIZON_S) -> list[str]:
        """Drop tasks deleted (every sibling a tombstone) longer than ``horizon_s``
        ago, with their ctl/ and run/ keys. Returns the dropped keys."""
        dropped: list[str] = []
        for key in sorted(k for k in self._state if k.startswith("task/")):
            vals = dv.values(self._state[key])
            if all(v["deleted"] for v in vals) and max(_num(v.get("updated_at")) for v in vals) < now - horizon_s:
                tid = key[5:]
                for k in [key, "ctl/" + tid, *sorted(self._runs.get(tid, ()))]:
                    if k in self._state:
                        self._drop(k)
                        dropped.append(k)
        return dropped

    def statistics(self) -> StoreStatistics:
        tasks = tomb = conf = ctl = 0
        for k, st in self._state.items():
            if k.startswith("task/"):
                vals = dv.values(st)
                tasks += 1
                conf += len(vals) > 1
                tomb += all(v["deleted"] for v in vals)
            elif k.startswith("ctl/"):
                ctl += 1
        return StoreStatistics(
            tasks=tasks - tomb, tombstones=tomb, conflicts=conf, controls=ctl,
            runs=sum(len(v) for v in self._runs.values()), dirty=len(self._dirty),
            merges_applied=self._applied, merges_rejected=self._rejected,
            run_record_bytes=self._rec_total, output_bytes=self._out_total, outputs=len(self._out),
            max_bytes=self.max_bytes, trimmed_outputs=self._trimmed["output"],
            trimmed_records=self._trimmed["record"], trim_passes=self._trimmed["passes"],
        )


def version_hash(data: bytes) -> bytes:
    """8-byte version hash of an encoded entry (as used by anti-entropy)."""
    return _vhash(data)

