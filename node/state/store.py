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

Anti-entropy: every key is hashed into the digest tree
    (:mod:`node.state.digest`, TicTac-style XOR buckets kept up to date per
    key); replicas compare it and ship what differs with the exchange of
    :mod:`node.state.exchange` (``start_exchange`` / ``handle_exchange``).

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

from node.state import exchange
from node.state import versions as dv
from node.state.digest import DigestTree
from node.state.exchange import MAX_MSG_ENTRIES, ExchangeResult, RemoteProtocolError
from node.state.keys import Entry, split_key
from node.state.runstatus import LOST, PENDING, RUNNING, TERMINAL

__all__ = [
    "Store", "TaskView", "Control", "StoreStatistics",
    "DEFAULT_HISTORY", "TOMBSTONE_HORIZON_S", "RUN_FIELDS", "TERMINAL",
    "DEFAULT_RUN_RECORDS_MAX_BYTES", "TRIM_LOW_WATER", "output_digest", "OUTPUT_PREFIX",
]

DEFAULT_HISTORY = 100
TOMBSTONE_HORIZON_S = 7 * 86400.0
MAX_ENTRY_BYTES = 1 << 20

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


def _enc(obj: Any) -> bytes:
    return dv.canonical(obj)


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
        self._tree = DigestTree()             # anti-entropy hashes; its run_keys: task -> run keys
        self._dirty: set[str] = set()
        self._applied = 0
        self._rejected = 0

    # ------------------------------------------------------------ internals
    def _set(self, key: str, state: Any, data: bytes | None = None) -> bool:
        """Store ``state`` at ``key``; returns whether the bytes changed."""
        data = _enc(self._wire(key, state)) if data is None else data
        if self._bytes.get(key) == data:
            return False
        kind, tid, _ = split_key(key)
        self._tree.put(key, tid if kind == "run" else None, data)
        if kind == "run":
            self._rec_total += len(data) - len(self._bytes.get(key, b""))
            if key in self._out and state.get("output_digest") != self._state[key].get("output_digest"):
                self._drop_output(key)  # the held text belongs to the previous version
        self._state[key] = state
        self._bytes[key] = data
        self._dirty.add(key)
        if kind == "run" and self._out and self._rec_total + self._out_total > self.max_bytes:
            self._trim_outputs()  # a record that grew (or arrived) took the total over the budget
        return True

    def _drop(self, key: str) -> None:
        if key not in self._state:
            return
        kind, tid, _ = split_key(key)
        self._tree.drop(key, tid if kind == "run" else None)
        if kind == "run":
            self._rec_total -= len(self._bytes[key])
            self._drop_output(key)
        del self._state[key], self._bytes[key]
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
        kind, tid, rid = split_key(key)
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
        keys = self._tree.run_keys.get(task_id)
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
            if changed and key in self._trim(split_key(key)[1]):
                return False
            if text is not None and key not in self._out and new.get("output_digest") == remote.get("output_digest"):
                self._keep_output(key, text)
            return changed
        elif changed and key.startswith("task/"):
            self._trim(split_key(key)[1])  # history may have shrunk
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
        split_key(key)
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
        split_key(key)
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
        split_key(key)
        c = self._ctl(task_id)
        if c["f"] is not None and c["f"] >= slot:
            return []
        self._set(key, {"p": c["p"], "f": slot, "x": c["x"]})
        return [self._entry(key)]

    def set_control_extra(self, task_id: str, name: str, value: Any, now: float) -> list[Entry]:
        """Last-writer-wins bookkeeping register (DST, misfire notes)."""
        key = "ctl/" + task_id
        split_key(key)
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
        split_key(key)
        rec, text = _strip_output(rec, key)
        return [self._entry(key)] if self._apply(key, rec, text) else []

    def run_record(self, task_id: str, run_id: str) -> dict | None:
        """One run record (a copy), or None."""
        rec = self._state.get(f"run/{task_id}/{run_id}")
        return dict(rec) if isinstance(rec, dict) else None

    def runs(self, task_id: str) -> list[dict]:
        keys = self._tree.run_keys.get(task_id, ())
        return sorted((dict(self._state[k]) for k in keys), key=_run_order)

    def run_tasks(self) -> list[str]:
        """Task IDs this node holds run records for."""
        return sorted(self._tree.run_keys)

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
    def digest_root(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """16-byte root of a scope (:meth:`DigestTree.digest_root`)."""
        return self._tree.digest_root(scope, tasks)

    def bucket_hashes(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """Level 2: ``BUCKETS`` x 8-byte little-endian XOR hashes."""
        return self._tree.bucket_hashes(scope, tasks)

    def keys_in_buckets(self, buckets: Iterable[int], scope: str = "catalogue",
                        tasks: Iterable[str] | None = None) -> list[tuple[str, bytes]]:
        """``(key, version_hash)`` of the scope's keys in the given buckets."""
        return self._tree.keys_in_buckets(buckets, scope, tasks)

    def start_exchange(self, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
        """First message of an anti-entropy exchange (send to one peer);
        the protocol is :mod:`node.state.exchange`."""
        return exchange.start(self, scope, tasks)

    def handle_exchange(self, msg: bytes, tasks: Iterable[str] | None = None) -> ExchangeResult:
        """Handle one exchange message; send ``reply`` back if not None.

        Args:
            tasks: for the ``runs`` scope, the task IDs this node replicates
                together with the peer (same on both sides ideally).
        Raises:
            RemoteProtocolError: malformed message (nothing applied).
        """
        return exchange.handle(self, msg, tasks)

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
                for k in [key, "ctl/" + tid, *sorted(self._tree.run_keys.get(tid, ()))]:
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
            runs=sum(len(v) for v in self._tree.run_keys.values()), dirty=len(self._dirty),
            merges_applied=self._applied, merges_rejected=self._rejected,
            run_record_bytes=self._rec_total, output_bytes=self._out_total, outputs=len(self._out),
            max_bytes=self.max_bytes, trimmed_outputs=self._trimmed["output"],
            trimmed_records=self._trimmed["record"], trim_passes=self._trimmed["passes"],
        )
