"""Ring lanes: the big-integer lane arithmetic of the ownership ring (pure core, no I/O).

node/ownership/ring.py keeps each task's ranking in 16-byte lanes and works
on many tasks at once by packing lanes into one Python big integer: a few
big-integer operations then act on every lane at C speed. This module holds
that arithmetic and the storage of lanes:

- the score mix (two rounds of the wyhash "folded multiply"), one at a time
  (:func:`_mix`) and for every lane of a packed integer (:func:`_mix_vec`,
  :func:`_mix_many`);
- :class:`_Lanes`, the per-lane constants (masks, compare guards) for n
  lanes, memoised by :func:`_lanes_for`;
- lane-wise compares (:func:`_ge64`, :func:`_ge96`: a guard bit per lane
  turns a subtraction into a compare) and flag conversions
  (:func:`_wide`, :func:`_flag_bytes`, :func:`_ones`, :func:`_count_flagged`);
- :class:`_LaneArray`, an array of lanes in chunks of :data:`_CHUNK_LANES`
  (``1 << _CHUNK_SHIFT``), each chunk a big integer, a bytearray or both.

The lane layout (which bits hold what) is ring.py's: see its docstring,
"Incremental maintenance". The names keep their leading underscore: they are
the ring's internals, not an API.
"""
from __future__ import annotations

from collections import Counter
from itertools import compress


_M64 = (1 << 64) - 1
_C1 = 0xA0761D6478BD642F  # wyhash primes
_C2 = 0xE7037ED1A0B428DB


def _mix(h: int, s: int) -> int:
    """One lane of the score: two folded multiplies of ``h ^ s`` (64-bit result)."""
    p = (h ^ s) * _C1
    y = (p & _M64) ^ (p >> 64)
    return (y * _C2) >> 64


class _Lanes:
    """Constants for n 128-bit lanes: ``rep`` 1 per lane, ``lo`` bits 0..63
    (score), ``mem`` bits 64..95 (member field), ``g64``/``g96``/``g100`` one bit
    per lane (compare guards; a flag "at bit k" is that bit set in a lane)."""

    __slots__ = ("n", "rep", "lo", "mem", "g64", "g96", "g100")

    def __init__(self, n: int) -> None:
        rep = int.from_bytes((b"\x01" + b"\x00" * 15) * n, "little") if n else 0
        self.n = n
        self.rep = rep
        self.lo = rep * _M64
        self.mem = rep * (0xFFFFFFFF << 64)
        self.g64 = rep << 64
        self.g96 = rep << 96
        self.g100 = rep << 100


_lane_cache: dict[int, _Lanes] = {}


def _lanes_for(n: int) -> _Lanes:
    got = _lane_cache.get(n)
    if got is None:
        got = _Lanes(n)
        if len(_lane_cache) < 64:
            _lane_cache[n] = got
    return got


def _pack(values: list[int]) -> int:
    """Pack 64-bit values into 128-bit lanes (value in the low half)."""
    return int.from_bytes(b"".join(v.to_bytes(8, "little") + b"\x00" * 8 for v in values), "little")


def _mix_vec(h: int, packed: int, c: _Lanes) -> int:
    """Lane i of the result = ``_mix(h, lane i of packed)`` (a few big-int ops)."""
    p = ((h * c.rep) ^ packed) * _C1
    y = (p & c.lo) ^ ((p >> 64) & c.lo)
    return ((y * _C2) >> 64) & c.lo


def _mix_many(h: int, packed: int, n: int) -> list[int]:
    """``[_mix(h, s_i) for s_i in packed lanes]`` in a handful of big-int ops."""
    if n == 0:
        return []
    r = _mix_vec(h, packed, _lanes_for(n))
    return memoryview(r.to_bytes(n * 16, "little")).cast("Q")[::2].tolist()


def _ge64(a: int, b: int, c: _Lanes) -> int:
    """Flag at bit 64 where a >= b (per lane a < 2**64, b <= 2**64)."""
    return ((a | c.g64) - b) & c.g64


def _ge96(a: int, b: int, c: _Lanes) -> int:
    """Flag at bit 96 where a >= b (per lane a, b < 2**100: counts in units of 2**96)."""
    return (((a | c.g100) - b) & c.g100) >> 4


def _wide(f: int) -> int:
    """Flags at bit 96 -> masks of lane bits 0..95 (all a level lane uses)."""
    return f - (f >> 96)


def _flag_bytes(f: int, n: int) -> bytes:
    """Flags at bit 0 -> one byte per lane."""
    return f.to_bytes(16 * n, "little")[::16]


_CHUNK_SHIFT = 13
_ZERO16 = bytes(16)
# lanes per chunk: vector passes work chunk by chunk (cache-sized ints)
_CHUNK_LANES = 1 << _CHUNK_SHIFT


class _LaneArray:
    """An array of 16-byte lanes in chunks of ``_CHUNK_LANES`` lanes. Each chunk is held
    as a big integer (for vector passes), as a bytearray (for per-task reads
    and writes), or both; a side is rebuilt from the other on demand."""

    __slots__ = ("ints", "bufs", "ids")

    def __init__(self) -> None:
        self.ints: list[int | None] = []
        self.bufs: list[bytearray | None] = []
        self.ids: list[list[int] | None] = []  # read cache: member field per lane

    def reset(self, chunks: int) -> None:
        self.ints = [0] * chunks
        self.bufs = [None] * chunks
        self.ids = [None] * chunks

    def get_ids(self, c: int, n: int) -> list[int]:
        v = self.ids[c]
        if v is None:
            v = self.ids[c] = memoryview(bytes(self.rbuf(c, n))).cast("I")[2::4].tolist()
        return v

    def get_int(self, c: int) -> int:
        v = self.ints[c]
        if v is None:
            v = self.ints[c] = int.from_bytes(self.bufs[c], "little")  # type: ignore[arg-type]
        return v

    def set_int(self, c: int, v: int) -> None:
        self.ints[c] = v
        self.bufs[c] = None
        self.ids[c] = None

    def rbuf(self, c: int, n: int) -> bytearray:
        b = self.bufs[c]
        if b is None:
            b = self.bufs[c] = bytearray(self.ints[c].to_bytes(16 * n, "little"))  # type: ignore[union-attr]
        return b

    def wbuf(self, c: int, n: int) -> bytearray:
        b = self.rbuf(c, n)
        self.ints[c] = None
        self.ids[c] = None
        return b


def _count_flagged(into: Counter[int], ids: memoryview, fb: bytes) -> None:
    """Count ``ids[k]`` for every k with ``fb[k]`` set (sparse or dense)."""
    if fb.count(1) * 16 < len(fb):
        for k in _ones(fb):
            into[ids[k]] += 1
    else:
        into.update(compress(ids, fb))


def _ones(fb: bytes) -> list[int]:
    """Indexes of the non-zero bytes of a 0/1 byte string (sparse)."""
    out = []
    i = fb.find(1)
    while i >= 0:
        out.append(i)
        i = fb.find(1, i + 1)
    return out
