"""Dotted version vector sets (DVVSet), after riak_core's ``dvvset.erl``.

Pure core: immutable tuples, no I/O. A clock is ``(entries, anonymous)``:

- ``entries``: tuple of ``(actor, counter, values)`` sorted by actor; ``values``
  is a tuple of the values written by ``actor`` that are still current,
  newest first: the i-th value carries the dot ``(actor, counter - i)``.
- ``anonymous``: values with no dot yet (a client's ``new`` before the
  server's ``update``), kept sorted by canonical encoding.

Rules (Preguica, Baquero, Almeida, Fonte, Goncalves: "Dotted Version
Vectors: Logical Clocks for Optimistic Replication", 2010; riak_core dvvset):

Rule 1 (sync).  ``sync(a, b)`` merges entry by entry: the larger counter wins,
and a value survives iff the other side has not seen its dot (its dot is above
the other side's counter). Sync is commutative, associative and idempotent,
and the representation is canonical, so equal histories give equal bytes.

Rule 2 (update).  A write arrives with the context the client read
(``join(clock)``, a plain version vector). ``update(new_with_context(ctx, v),
server, actor)`` drops every value the context covers, keeps every value the
client had not seen (siblings), and adds ``v`` under a fresh dot of ``actor``.
A write with no context (``new(v)``) is concurrent with everything.

Rule 3 (resolve).  Siblings stay stored and visible; readers that need one
value take :func:`resolve`: the value with the greatest ``(updated_at,
writer, sha256(canonical(value)))`` where ``updated_at``/``writer`` are read
from a dict value's keys of those names (missing: 0 / ""). The SHA-256 of the
canonical msgpack encoding breaks every remaining tie, so all nodes pick the
same sibling without coordination.

Wire form: :func:`to_wire` / :func:`from_wire` (msgpack-able lists);
``from_wire`` validates and raises ``ValueError`` naming the field.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import msgpack

__all__ = [
    "Clock", "VV", "new", "new_with_context", "update", "sync", "sync_all", "join", "values",
    "size", "less", "equal", "resolve", "canonical", "to_wire", "from_wire", "vv_to_wire",
    "vv_from_wire", "clock_hash", "check_plain", "MAX_ACTORS", "MAX_SIBLINGS",
]

Entry = tuple[str, int, tuple[Any, ...]]
Clock = tuple[tuple[Entry, ...], tuple[Any, ...]]
VV = tuple[tuple[str, int], ...]

MAX_ACTORS = 4096      # a remote clock with more actors is rejected
MAX_SIBLINGS = 1024    # a remote clock with more values is rejected


def _canon(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canon(v[k]) for k in sorted(v)}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def canonical(value: Any) -> bytes:
    """Canonical msgpack bytes of a value (dict keys sorted, tuples as lists)."""
    return msgpack.packb(_canon(value), use_bin_type=True)


def _uniq_sorted(vals: Iterable[Any]) -> tuple[Any, ...]:
    seen: dict[bytes, Any] = {}
    for v in vals:
        seen.setdefault(canonical(v), v)
    return tuple(seen[k] for k in sorted(seen))


def new(value: Any) -> Clock:
    """A clock holding one anonymous value (a write with no context)."""
    return ((), (value,))


def new_with_context(vv: Iterable[tuple[str, int]], value: Any) -> Clock:
    """A client clock: the read context ``vv`` (no values) plus the new value."""
    entries = tuple((a, int(n), ()) for a, n in sorted(vv) if n > 0)
    return (entries, (value,))


def _merge(actor: str, n1: int, l1: tuple, n2: int, l2: tuple) -> Entry:
    if n1 >= n2:
        if n1 - len(l1) >= n2 - len(l2):
            return (actor, n1, l1)
        return (actor, n1, l1[: n1 - n2 + len(l2)])
    if n2 - len(l2) >= n1 - len(l1):
        return (actor, n2, l2)
    return (actor, n2, l2[: n2 - n1 + len(l1)])


def _sync_entries(c1: tuple[Entry, ...], c2: tuple[Entry, ...]) -> tuple[Entry, ...]:
    out: list[Entry] = []
    i = j = 0
    while i < len(c1) and j < len(c2):
        a1, a2 = c1[i][0], c2[j][0]
        if a1 < a2:
            out.append(c1[i])
            i += 1
        elif a1 > a2:
            out.append(c2[j])
            j += 1
        else:
            out.append(_merge(a1, c1[i][1], c1[i][2], c2[j][1], c2[j][2]))
            i += 1
            j += 1
    out.extend(c1[i:])
    out.extend(c2[j:])
    return tuple(out)


def _greater(c1: tuple[Entry, ...], c2: tuple[Entry, ...]) -> bool:
    """Strictly greater causal history (riak's ``greater/3``)."""
    strict = False
    i = j = 0
    while True:
        if i == len(c1) and j == len(c2):
            return strict
        if j == len(c2):
            return True
        if i == len(c1):
            return False
        a1, n1, _ = c1[i]
        a2, n2, _ = c2[j]
        if a1 == a2:
            if n1 < n2:
                return False
            if n1 > n2:
                strict = True
            i += 1
            j += 1
        elif a1 < a2:
            strict = True
            i += 1
        else:
            return False


def less(a: Clock, b: Clock) -> bool:
    """True iff ``a``'s causal history is strictly contained in ``b``'s."""
    return _greater(b[0], a[0])


def equal(a: Clock, b: Clock) -> bool:
    """Same causal history (same counters and value counts per actor)."""
    if len(a[0]) != len(b[0]):
        return False
    return all(x[0] == y[0] and x[1] == y[1] and len(x[2]) == len(y[2]) for x, y in zip(a[0], b[0]))


def sync(a: Clock, b: Clock) -> Clock:
    """Merge two clocks (Rule 1)."""
    if a == b:
        return a
    if less(a, b):
        anon = b[1]
    elif less(b, a):
        anon = a[1]
    else:
        anon = _uniq_sorted(a[1] + b[1])
    return (_sync_entries(a[0], b[0]), anon)


def sync_all(clocks: Iterable[Clock]) -> Clock:
    out: Clock = ((), ())
    for c in clocks:
        out = sync(out, c)
    return out


def _event(c: tuple[Entry, ...], actor: str, value: Any) -> tuple[Entry, ...]:
    out: list[Entry] = []
    for i, (a, n, vals) in enumerate(c):
        if a == actor:
            out.append((a, n + 1, (value, *vals)))
            out.extend(c[i + 1:])
            return tuple(out)
        if a > actor:
            out.append((actor, 1, (value,)))
            out.extend(c[i:])
            return tuple(out)
        out.append((a, n, vals))
    out.append((actor, 1, (value,)))
    return tuple(out)


def update(client: Clock, server_or_actor: Clock | str, actor: str | None = None) -> Clock:
    """Record the client's single new value under a fresh dot of ``actor``.

    ``update(clock, actor)``: the clock already holds the server state.
    ``update(client, server, actor)`` (Rule 2): sync the client's context (no
    values) with the server's clock, then add the new value.
    """
    if len(client[1]) != 1:
        raise ValueError("update needs a clock with exactly one new value (from new/new_with_context)")
    value = client[1][0]
    if actor is None:
        if not isinstance(server_or_actor, str):
            raise TypeError("update(clock, actor): actor must be a str")
        return (_event(client[0], server_or_actor, value), ())
    server = server_or_actor
    assert not isinstance(server, str)
    entries, anon = sync((client[0], ()), server)
    return (_event(entries, actor, value), anon)


def join(clock: Clock) -> VV:
    """The causal context of a clock: a version vector ``((actor, counter), ...)``."""
    return tuple((a, n) for a, n, _ in clock[0])


def values(clock: Clock) -> list[Any]:
    """All current values (siblings): anonymous first, then by actor, newest first."""
    out = list(clock[1])
    for _, _, vals in clock[0]:
        out.extend(vals)
    return out


def size(clock: Clock) -> int:
    return len(clock[1]) + sum(len(v) for _, _, v in clock[0])


def _rank(value: Any) -> tuple[float, str, bytes]:
    at: Any = 0.0
    by: Any = ""
    if isinstance(value, dict):
        at = value.get("updated_at", 0.0)
        by = value.get("writer", "")
    if not isinstance(at, (int, float)) or isinstance(at, bool) or at != at:
        at = 0.0
    return (float(at), str(by), hashlib.sha256(canonical(value)).digest())


def resolve(vals: Iterable[Any]) -> Any:
    """The winning sibling (Rule 3). ``None`` for no values."""
    best = None
    best_rank = None
    for v in vals:
        r = _rank(v)
        if best_rank is None or r > best_rank:
            best, best_rank = v, r
    return best


# ---------------------------------------------------------------- wire form
def to_wire(clock: Clock) -> list:
    return [[[a, n, list(vals)] for a, n, vals in clock[0]], list(clock[1])]


def from_wire(obj: Any, where: str = "clock") -> Clock:
    """Validate a decoded wire clock.

    Raises:
        ValueError: naming the offending field; nothing is partially applied.
    """
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        raise ValueError(f"{where}: expected [entries, anonymous]")
    ents, anon = obj
    if not isinstance(ents, (list, tuple)) or not isinstance(anon, (list, tuple)):
        raise ValueError(f"{where}: entries and anonymous must be arrays")
    if len(ents) > MAX_ACTORS:
        raise ValueError(f"{where}: {len(ents)} actors > {MAX_ACTORS}")
    out: list[Entry] = []
    total = len(anon)
    prev = None
    for i, e in enumerate(ents):
        if not isinstance(e, (list, tuple)) or len(e) != 3:
            raise ValueError(f"{where}.entries[{i}]: expected [actor, counter, values]")
        a, n, vals = e
        if not isinstance(a, str) or not a:
            raise ValueError(f"{where}.entries[{i}].actor: expected a non-empty string")
        if prev is not None and a <= prev:
            raise ValueError(f"{where}.entries[{i}]: actors not strictly sorted")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > 2**62:
            raise ValueError(f"{where}.entries[{i}].counter: expected an int >= 1")
        if not isinstance(vals, (list, tuple)) or len(vals) > n:
            raise ValueError(f"{where}.entries[{i}].values: expected at most counter values")
        total += len(vals)
        check_plain(vals, f"{where}.entries[{i}].values")
        prev = a
        out.append((a, n, tuple(vals)))
    if total > MAX_SIBLINGS:
        raise ValueError(f"{where}: {total} values > {MAX_SIBLINGS}")
    check_plain(anon, f"{where}.anonymous")
    return (tuple(out), _uniq_sorted(anon))


_SCALARS = (type(None), bool, int, float, str, bytes)


def check_plain(v: Any, where: str, depth: int = 0) -> None:
    """Raise ValueError unless ``v`` is a plain msgpack value with str dict keys."""
    if depth > 32:
        raise ValueError(f"{where}: nested too deep")
    if isinstance(v, _SCALARS):
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
            raise ValueError(f"{where}: integer out of range")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            check_plain(x, f"{where}[{i}]", depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: map key {k!r} is not a string")
            check_plain(x, f"{where}.{k}", depth + 1)
        return
    raise ValueError(f"{where}: unsupported type {type(v).__name__}")


def vv_to_wire(vv: VV) -> list:
    return [[a, n] for a, n in vv]


def vv_from_wire(obj: Any, where: str = "context") -> VV:
    if not isinstance(obj, (list, tuple)) or len(obj) > MAX_ACTORS:
        raise ValueError(f"{where}: expected an array of [actor, counter]")
    out = []
    for i, e in enumerate(obj):
        if (not isinstance(e, (list, tuple)) or len(e) != 2 or not isinstance(e[0], str)
                or not isinstance(e[1], int) or isinstance(e[1], bool) or e[1] < 0):
            raise ValueError(f"{where}[{i}]: expected [actor, counter >= 0]")
        out.append((e[0], e[1]))
    out.sort()
    for x, y in zip(out, out[1:]):
        if x[0] == y[0]:
            raise ValueError(f"{where}: actor {x[0]!r} twice")
    return tuple(out)


def clock_hash(clock: Clock) -> bytes:
    """8-byte hash of the canonical encoding (equal clocks, equal hash)."""
    return hashlib.blake2b(canonical(to_wire(clock)), digest_size=8).digest()
