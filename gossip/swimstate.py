"""The membership core's state and the primitives every rule uses (core):
construction, counters, timers, state changes, events, broadcasting, sending
with piggybacked broadcasts and random peer picks (``_SwimState``).

``_SwimState`` is the base of the layers (:mod:`gossip.merge`,
:mod:`gossip.probe`, :mod:`gossip.pushpull`) and of :class:`gossip.swim.Swim`,
which documents the constructor's arguments. Every field is set in ``__init__`` here, so
compiled by mypyc (sim/accel.py) they are native slots of one layout.
"""
from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping
from typing import Final

from . import wire
from .broadcast import TransmitLimitedQueue
from .config import Config
from .effects import Addr, EventKind
from .fastnew import _new_event, _new_send, _pack
from .members import ALIVE, SUSPECT, MemberState, _LIVE, _rank
from .records import _Node, _Probe, _freeze_tags
from .wire import COMPOUND_HEADER_MAX_BYTES, Alive, LocalProtocolError

_SEQ_MASK = 2**64 - 1

# timer kinds of the heap ``_timers`` (``_push_timer``; run by Swim._run_timers)
_T_SUSP: Final = 0
_T_REAP: Final = 1
_T_RELAY: Final = 2
_T_JOIN: Final = 3
_FIXARRAY: Final = tuple(bytes((0x90 | i,)) for i in range(16))


# retransmit limits by (config, live N), shared by the cores of one config
# (a pure function of both; bounded)
_RT_MEMOS: dict = {}


def _rt_memo(config: Config) -> dict:
    try:
        memo = _RT_MEMOS.get(config)
    except TypeError:  # an unhashable config: private memo
        return {}
    if memo is None:
        if len(_RT_MEMOS) >= 64:
            _RT_MEMOS.clear()
        memo = _RT_MEMOS[config] = {}
    return memo


class _SwimState:
    """State and primitives of the membership core (see :class:`gossip.swim.Swim`)."""

    def __init__(self, config: Config, name: str, addr: Addr, *, rng: random.Random, now: float,
                 tags: Mapping[str, str] | None = None, meta: bytes = b"",
                 incarnation: int = 0) -> None:
        self.config = config
        self._rng = rng
        self._name = name
        addr = (addr[0], int(addr[1]))
        self._addr = addr
        tags_f = _freeze_tags(tags)
        meta = bytes(meta)
        self._check_alive(name, addr, tags_f, meta, incarnation)
        self._payload = config.payload_budget_bytes - COMPOUND_HEADER_MAX_BYTES
        self._budget = config.payload_budget_bytes
        self._me = _Node(name, addr, ALIVE, incarnation, tags_f, meta, now)
        self._nodes: dict[str, _Node] = {name: self._me}
        self._peers: list[str] = []          # every member but us, for O(1) random picks
        self._peer_pos: dict[str, int] = {}
        self._counts = [1, 0, 0, 0]          # by rank: alive, suspect, dead, left
        self._suspects: dict[str, None] = {}  # suspect members, in suspicion order
        self._queue = TransmitLimitedQueue(config.broadcast_queue_max)
        self._rt_limit: dict[int, int] = _rt_memo(config)  # live N -> retransmit_limit(N)
        self._seq = rng.getrandbits(32)
        self._awareness = 0
        self._probe_order: list[str] = []
        self._probe_idx = 0
        self._probe: _Probe | None = None
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._relays: dict[int, tuple[Addr, int, bool]] = {}
        self._timers: list[tuple] = []       # (at, seq, kind, key, token)
        self._timer_seq = 0
        self._next_gossip_at = now
        self._last_gossip_at = -math.inf
        self._gossip_tokens = float(config.gossip_fresh_burst)  # round budget
        self._gossip_tokens_at = now
        pp = config.push_pull_interval_s
        self._next_push_pull_at = now + rng.uniform(0.5, 1.0) * pp if pp > 0 else math.inf
        rc = config.reconnect_interval_s
        self._next_reconnect_at = now + rng.uniform(0.5, 1.0) * rc if rc > 0 else math.inf
        self._seeds: list[Addr] = []
        self._join_pending: dict[Addr, float] = {}
        self._join_ok = False
        self._join_backoff_s = config.join_retry_initial_s
        self._join_retry_at: float | None = None
        self._leaving = False
        self._weak = False                   # re-broadcast weakly (join reply merge)
        # between start_settle() and settle(): names whose membership news
        # was not queued (it would be dropped unsent); None otherwise
        self._settling: set[str] | None = None
        self._now = now                      # latest time seen (for next_deadline only)
        # counters
        self._c = dict.fromkeys(
            ("probes_sent", "acks_received", "indirect_probes", "nacks", "suspicions_raised",
             "refutes", "deaths_declared", "push_pulls", "reconnects"), 0)
        self._corrected: dict[Addr, float] = {}  # addr -> last stale-accusation answer
        self._stale_corrections = 0
        # the per-packet counters are attributes: compiled by mypyc, native
        # int adds instead of a dict update and a new int object each
        self._packets_in = 0
        self._packets_out = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._rejected: dict[str, int] = {}

    # -- validation ------------------------------------------------------------
    def _check_alive(self, name, addr, tags, meta, incarnation) -> None:
        if len(meta) > self.config.meta_max_bytes:
            raise ValueError(f"meta is {len(meta)} bytes, more than meta_max_bytes="
                             f"{self.config.meta_max_bytes}")
        try:
            msg = Alive(incarnation, name, addr[0], addr[1], tags, meta)
        except LocalProtocolError as exc:
            raise ValueError(f"invalid member identity: {exc}") from None
        size = len(wire.encode_msg(msg))
        if size > self.config.payload_budget_bytes - COMPOUND_HEADER_MAX_BYTES - 32:
            raise ValueError(f"our alive message would be {size} bytes; tags and meta "
                             "must fit one datagram")

    # -- helpers ---------------------------------------------------------------
    def _reject(self, reason: str, n: int = 1) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + n

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _push_timer(self, at: float, kind: int, key, token) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, key, token))

    def _live_n(self) -> int:
        """Members alive or suspect, us included (N in every formula)."""
        c = self._counts
        return max(1, c[0] + c[1])

    def _retransmit_limit(self) -> int:
        """``config.retransmit_limit(_live_n())``, memoized (Config is frozen)."""
        c = self._counts
        n = c[0] + c[1]
        r = self._rt_limit.get(n)
        if r is None:
            r = self.config.retransmit_limit(n if n > 1 else 1)
            if len(self._rt_limit) < 100_000:
                self._rt_limit[n] = r
        return r

    def _live_peers(self) -> int:
        c = self._counts
        n = c[0] + c[1]
        if self._me.state in _LIVE:
            n -= 1
        return n

    def _set_state(self, n: _Node, state: MemberState, now: float) -> None:
        if n.state is not state:
            self._counts[_rank(n.state)] -= 1
            self._counts[_rank(state)] += 1
            if n.state is SUSPECT:
                del self._suspects[n.name]
            elif state is SUSPECT:
                self._suspects[n.name] = None
            n.state = state
            n.state_change = now
        n.snap = n.row = None

    def _event(self, out: list, kind: EventKind, n: _Node) -> None:
        s = n.snap
        if s is None:
            # not cached in n.snap: a 1000-core simulation would keep 10^6
            # snapshots nobody reads again (~110 MB); member() caches its own
            s = n.new_snapshot()
        out.append(_new_event(kind, s))

    def _alive_fields(self, n: _Node) -> list:
        # 5 = MsgType.ALIVE (msgpack packs an IntEnum as its int: same bytes)
        tags = n.tags
        return [5, n.incarnation, n.name, n.addr[0], n.addr[1], dict(tags) if tags else {},
                n.meta]

    def _broadcast_alive(self, n: _Node, weak: bool = False) -> None:
        """Queue ``n``'s ALIVE; while settling, not even packed (settle()
        would drop it unsent)."""
        if self._settling is not None:
            self._settling.add(n.name)
            return
        self._broadcast(n.name, _pack(self._alive_fields(n)), weak)

    def _broadcast(self, name: str, data: bytes, weak: bool = False) -> None:
        if self._settling is not None:
            self._settling.add(name)
            return
        if weak:
            # probably not news to the cluster: queue as already sent so it
            # goes out twice, after fresher news
            limit = self._retransmit_limit()
            self._queue.queue("m:" + name, data, max(0, limit - 2))
        else:
            self._queue.queue("m:" + name, data)

    def _send(self, out: list, addr: Addr, msgs: list[bytes]) -> None:
        """Emit one datagram with ``msgs`` and as many broadcasts as fit."""
        used = 0
        for m in msgs:
            used += len(m)
        space = self._payload - used
        if space > 0 and self._queue:
            extra = self._queue.take(space, self._retransmit_limit())
            if extra:
                msgs = msgs + extra
        k = len(msgs)
        # wire.join_compound, inlined: fixarray header for < 16 messages
        data = (_FIXARRAY[k] if k < 16 else wire._array_header(k)) + b"".join(msgs)
        size = len(data)
        # invariant: never over the budget (each msg fits; take() respects space)
        if size > self._budget:  # pragma: no cover - bug guard
            raise LocalProtocolError("oversized", f"datagram of {size} bytes")
        self._packets_out += 1
        self._bytes_out += size
        out.append(_new_send(addr, data))

    def _add_peer(self, name: str) -> None:
        self._peer_pos[name] = len(self._peers)
        self._peers.append(name)
        # memberlist: a new member goes to a random spot of the current round
        order = self._probe_order
        lo = min(self._probe_idx, len(order))
        order.insert(lo + int(self._rng.random() * (len(order) - lo + 1)), name)

    def _remove_peer(self, name: str) -> None:
        pos = self._peer_pos.pop(name)
        last = self._peers.pop()
        if last != name:
            self._peers[pos] = last
            self._peer_pos[last] = pos

    def _k_random(self, k: int, accept) -> list[_Node]:
        """Up to ``k`` distinct peers satisfying ``accept`` (random)."""
        peers = self._peers
        n = len(peers)
        if n == 0 or k <= 0:
            return []
        nodes = self._nodes
        chosen: list[_Node] = []
        seen: set[str] = set()
        rnd = self._rng.random
        for _ in range(min(3 * n, 8 * k + 16)):
            name = peers[int(rnd() * n)]
            if name in seen:
                continue
            seen.add(name)
            node = nodes[name]
            if accept(node):
                chosen.append(node)
                if len(chosen) >= k:
                    return chosen
        if len(seen) < n:
            # few eligible members: finish with a scan from a random offset
            start = int(rnd() * n)
            for i in range(n):
                name = peers[(start + i) % n]
                if name in seen:
                    continue
                node = nodes[name]
                if accept(node):
                    chosen.append(node)
                    if len(chosen) >= k:
                        break
        return chosen

    def _apply_awareness(self, delta: int) -> None:
        a = self._awareness + delta
        hi = self.config.awareness_max_multiplier - 1
        self._awareness = 0 if a < 0 else (hi if a > hi else a)
