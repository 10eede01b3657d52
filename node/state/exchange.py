"""Anti-entropy exchange (pure core): the messages two replicas trade to find and ship their differences, in pages.

The levels compared are those of the store's digest tree
(:mod:`node.state.digest`); what is shipped is the store's entries
(:mod:`node.state.store`), merged there. ``Store.start_exchange`` and
``Store.handle_exchange`` call :func:`start` and :func:`handle`. This module
is the store's own protocol, kept apart for size: it works on a
:class:`Store`'s internals (its digest tree, encoded entries, ``_decode_entry``,
``_apply``, ``_entry``, ``_progress`` and merge counters).

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

Pages: one ENTRIES message carries at most ``PAGE_BYTES`` of entries and a
KEYS message at most ``PAGE_KEYS`` keys; a larger difference is repaired over
several exchanges, each finding what is still different.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack

from node.state import versions as dv
from node.state.digest import BUCKETS, SCOPES, SUBS, cell
from node.state.keys import Entry, split_key

if TYPE_CHECKING:
    from node.state.store import Store

__all__ = [
    "ExchangeResult", "RemoteProtocolError", "start", "handle",
    "MAX_MSG_ENTRIES", "PAGE_BYTES", "PAGE_KEYS",
]

MAX_MSG_ENTRIES = 100_000
#: One exchange message carries at most this many bytes of entries, and a
#: KEYS message at most ``PAGE_KEYS`` keys: a larger difference is shipped
#: a page per exchange, the next exchange finding what is still different
#: (the request frame limit is 4 MiB; a page stays well under it).
PAGE_BYTES = 1 << 20
PAGE_KEYS = 20_000

# message types (append only)
M_ROOT, M_OK, M_BUCKETS, M_KEYS, M_ENTRIES, M_SUBS = 1, 2, 3, 4, 5, 6


class RemoteProtocolError(ValueError):
    """A peer sent something malformed; nothing was applied."""


@dataclass(frozen=True, slots=True)
class ExchangeResult:
    reply: bytes | None           # send this back to the peer (None: exchange over)
    changed: list[str]            # keys this message changed locally
    shipped: int = 0              # entries in the reply


def _paged(store: Store, keys: Iterable[str]) -> list[Entry]:
    """Entries of ``keys`` (sorted) that fit in a page, built one by
    one so outputs beyond the page are never read."""
    out, n = [], 0
    for k in sorted(set(keys)):
        if k not in store._bytes:
            continue
        e = store._entry(k)
        size = len(e[0]) + len(e[1]) + 16
        if out and n + size > PAGE_BYTES:
            break
        out.append(e)
        n += size
    return out


def start(store: Store, scope: str = "catalogue", tasks: Iterable[str] | None = None) -> bytes:
    """First message of an anti-entropy exchange (send to one peer)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    return msgpack.packb([M_ROOT, SCOPES.index(scope), store._tree.digest_root(scope, tasks)])


def handle(store: Store, msg: bytes, tasks: Iterable[str] | None = None) -> ExchangeResult:
    """Handle one exchange message; send ``reply`` back if not None.

    Args:
        tasks: for the ``runs`` scope, the task IDs this node replicates
            together with the peer (same on both sides ideally).
    Raises:
        RemoteProtocolError: malformed message (nothing applied).
    """
    tree = store._tree
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
        buckets = tree.scope_buckets(scope, tasks)
        if tree.root(buckets) == obj[2]:
            return ExchangeResult(msgpack.packb([M_OK, si]), [])
        hashes = b"".join(b.to_bytes(8, "little") for b in buckets)
        return ExchangeResult(msgpack.packb([M_BUCKETS, si, hashes]), [])
    if t == M_OK:
        return ExchangeResult(None, [])
    if t == M_BUCKETS:
        if len(obj) != 3 or not isinstance(obj[2], bytes) or len(obj[2]) != 8 * BUCKETS:
            raise RemoteProtocolError(f"exchange BUCKETS: expected {8 * BUCKETS} bytes of hashes")
        mine = tree.scope_buckets(scope, tasks)
        theirs = memoryview(obj[2]).cast("Q").tolist()
        diff = [i for i in range(BUCKETS) if mine[i] != theirs[i]]
        if not diff:
            return ExchangeResult(None, [])
        subs = b"".join(h.to_bytes(8, "little") for h in tree.sub_hashes(diff, scope, tasks))
        return ExchangeResult(msgpack.packb([M_SUBS, si, diff, subs]), [])
    if t == M_SUBS:
        if (len(obj) != 4 or not isinstance(obj[2], list) or not isinstance(obj[3], bytes)
                or len(obj[2]) > BUCKETS or len(obj[3]) != 8 * SUBS * len(obj[2])):
            raise RemoteProtocolError("exchange SUBS: expected [6, scope, [bucket], SUBS x 8 bytes each]")
        diff = obj[2]
        if not all(isinstance(b, int) and 0 <= b < BUCKETS for b in diff) or len(set(diff)) != len(diff):
            raise RemoteProtocolError("exchange SUBS: bad bucket list")
        mine = tree.sub_hashes(diff, scope, tasks)
        theirs = memoryview(obj[3]).cast("Q").tolist()
        cells = [diff[i // SUBS] * SUBS + i % SUBS for i in range(len(mine)) if mine[i] != theirs[i]]
        if not cells:
            return ExchangeResult(None, [])
        kv = tree.keys_in({c // SUBS for c in cells}, set(cells), scope, tasks)
        if len(kv) > PAGE_KEYS:
            # a page of cells whose keys fit; the rest in later exchanges
            counts: dict[int, int] = {}
            for k, _ in kv:
                c = cell(k) if scope == "catalogue" else cell(split_key(k)[1])
                counts[c] = counts.get(c, 0) + 1
            page, n = [], 0
            for c in cells:
                if page and n + counts.get(c, 0) > PAGE_KEYS:
                    break
                page.append(c)
                n += counts.get(c, 0)
            cells = page
            kv = tree.keys_in({c // SUBS for c in cells}, set(cells), scope, tasks)
        items = [[k, v, store._progress(k)] for k, v in kv]
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
        mine = dict(tree.keys_in({c // SUBS for c in cells}, set(cells), scope, tasks))
        # differing on both sides: the side with more progress ships; on a
        # tie we pull theirs and the ENTRIES rule sends back our merge
        send = [k for k in sorted(mine) if k not in theirs
                or (theirs[k] != mine[k] and store._progress(k) > prog[k])]
        want = [k for k in sorted(theirs) if mine.get(k) != theirs[k]
                and (k not in mine or store._progress(k) <= prog[k])]
        ents = [list(e) for e in _paged(store, send)]
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
                decoded.append((e[0], *store._decode_entry(e[0], e[1])))
            except ValueError as err:
                store._rejected += 1
                raise RemoteProtocolError(f"exchange ENTRIES: {err}") from None
        changed = sorted({k for k, st, text in decoded if store._apply(k, st, text)})
        store._applied += len(decoded)
        # what the peer sent lacks something we had (concurrent versions):
        # send the merged result back, so both sides end equal (a run
        # record is compared without its output text)
        sent = {k: dv.canonical(st) if text is not None else bytes(e[1])
                for (k, st, text), e in zip(decoded, obj[2])}
        back = [k for k in sorted(sent) if k in store._bytes and store._bytes[k] != sent[k]]
        keys = sorted(set(back) | set(want))
        if not keys:
            return ExchangeResult(None, changed)
        ents = [list(e) for e in _paged(store, keys)]
        if not ents:
            return ExchangeResult(None, changed)
        return ExchangeResult(msgpack.packb([M_ENTRIES, si, ents, []]), changed, len(ents))
    raise RemoteProtocolError(f"exchange: unknown message type {t}")
