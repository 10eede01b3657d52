"""Anti-entropy of the membership core (core): push-pull state exchange,
reconnects to dead members and the join through seeds (``_PushPull``).

Push-pull. Every ``Config.push_pull_interval_for(N)`` with one random live
member, every ``reconnect_interval_s`` with one random dead member (serf's
reconnect; heals partitions), and to every seed on ``join``. Join keeps retrying the seeds with
exponential backoff (``join_retry_initial_s`` doubling to
``join_retry_max_s``) until one push-pull succeeds, and again whenever we find
ourselves without any live peer.

The rows a push-pull brings are screened and merged by :mod:`gossip.merge`
(``_screen_rows``, ``_merge``); the shell carries out ``StartPushPull`` over a
reliable stream and hands the reply back (``handle_push_pull_reply``) or
reports the failure (``push_pull_failed``).
"""
from __future__ import annotations

from collections.abc import Sequence

from . import wire
from .effects import Addr, Effect, StartPushPull
from .members import ALIVE, DEAD, SUSPECT
from .probe import _Prober
from .swimstate import _T_JOIN
from .wire import RemoteProtocolError


class _PushPull(_Prober):
    """Push-pull, reconnect and join (module docstring); base of
    :class:`gossip.swim.Swim`."""

    def _tick_push_pull(self, out: list, now: float) -> None:
        if now < self._next_push_pull_at:
            return
        cfg = self.config
        self._next_push_pull_at = now + cfg.push_pull_interval_for(self._live_n())
        targets = self._k_random(1, lambda x: x.state is ALIVE)
        if targets:
            self._c["push_pulls"] += 1
            out.append(StartPushPull(targets[0].addr, self._encode_state(join=False), False))

    def _tick_reconnect(self, out: list, now: float) -> None:
        if now < self._next_reconnect_at:
            return
        self._next_reconnect_at = now + self.config.reconnect_interval_s
        if not self._counts[2]:
            return
        targets = self._k_random(1, lambda x: x.state is DEAD)
        if targets:
            self._c["push_pulls"] += 1
            self._c["reconnects"] += 1
            out.append(StartPushPull(targets[0].addr, self._encode_state(join=False), False))

    # -- join --------------------------------------------------------------------
    def join(self, seeds: Sequence[Addr], now: float) -> list[Effect]:
        """Start joining through ``seeds`` (our own address is skipped).

        Sends a join push-pull to every seed; while none succeeds (and later
        whenever no peer is alive) retries with exponential backoff.
        """
        seen = set()
        self._seeds = []
        for s in seeds:
            a = (s[0], int(s[1]))
            if a != self._addr and a not in seen:
                seen.add(a)
                self._seeds.append(a)
        self._join_ok = False
        self._join_backoff_s = self.config.join_retry_initial_s
        self._join_retry_at = None
        # memberlist setAlive: announce ourselves; rides on our first datagrams
        self._broadcast_alive(self._me)
        out: list = []
        self._join_attempt(out, now)
        return out

    def _join_attempt(self, out: list, now: float) -> None:
        if not self._seeds:
            return
        data = self._encode_state(join=True)
        self._join_retry_at = None
        for a in self._seeds:
            deadline = now + self.config.stream_timeout_s * 1.5
            self._join_pending[a] = deadline
            self._push_timer(deadline, _T_JOIN, a, deadline)
            self._c["push_pulls"] += 1
            out.append(StartPushPull(a, data, True))

    def _join_attempt_failed(self, addr: Addr, now: float) -> None:
        if self._join_pending.pop(addr, None) is None:
            return
        if not self._join_pending:
            self._join_retry_at = now + self._join_backoff_s
            self._join_backoff_s = min(self._join_backoff_s * 2, self.config.join_retry_max_s)

    def _tick_join(self, out: list, now: float) -> None:
        if not self._seeds or self._join_pending:
            return
        if self._join_ok and self._live_peers() > 0:
            self._join_retry_at = None
            return
        if self._join_retry_at is None:
            # we joined once but are alone again: start the backoff afresh
            self._join_backoff_s = self.config.join_retry_initial_s
            self._join_retry_at = now + self._join_backoff_s
            return
        if now >= self._join_retry_at:
            self._join_attempt(out, now)

    def push_pull_failed(self, addr: Addr, now: float) -> list[Effect]:
        """The shell could not complete a push-pull with ``addr``."""
        self._reject("push_pull_failed")
        if now > self._now:
            self._now = now
        a = (addr[0], int(addr[1]))
        self._join_attempt_failed(a, now)
        return []

    # -- push-pull ---------------------------------------------------------------
    def _encode_state(self, join: bool) -> bytes:
        return wire.encode_push_pull_packed(
            [n.row if n.row is not None else n.packed_row() for n in self._nodes.values()],
            join, self._name)

    def handle_push_pull(self, src: Addr, data: bytes, now: float) -> tuple[bytes | None, list[Effect]]:
        """Serve a peer's push-pull: merge its state, reply with ours.

        Returns:
            ``(reply, effects)``; ``reply`` is None when ``data`` was
            rejected (close the stream without answering).
        """
        out: list = []
        self._bytes_in += len(data)
        try:
            _join, sender, rows = wire.decode_push_pull_raw(data, check_rows=False)
            rows = self._screen_rows(rows)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            return None, out
        self._merge(out, sender, rows, now)
        reply = self._encode_state(join=False)
        self._bytes_out += len(reply)
        return reply, out

    def handle_push_pull_reply(self, src: Addr, data: bytes, now: float) -> list[Effect]:
        """Merge the reply to a push-pull we started with ``src``."""
        out: list = []
        a = (src[0], int(src[1]))
        self._bytes_in += len(data)
        try:
            _join, sender, rows = wire.decode_push_pull_raw(data, check_rows=False)
            rows = self._screen_rows(rows)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            self._join_attempt_failed(a, now)
            return out
        was_join = a in self._join_pending
        self._weak = was_join
        try:
            self._merge(out, sender, rows, now)
        finally:
            self._weak = False
        if was_join:
            # first periodic push-pull: spread over the interval scaled for
            # the cluster we just learned (not all members at once)
            pp = self.config.push_pull_interval_s
            if pp > 0:
                self._next_push_pull_at = now + self._rng.uniform(0.1, 1.0) * \
                    self.config.push_pull_interval_for(self._live_n())
            self._join_pending.clear()
            self._join_ok = True
            self._join_retry_at = None
            self._join_backoff_s = self.config.join_retry_initial_s
        return out

    def _join_retry_due(self) -> float | None:
        if not self._seeds or self._join_pending:
            return None
        if self._join_ok:
            # inline _live_peers() > 0
            c = self._counts
            n = c[0] + c[1]
            me_st = self._me.state
            if me_st is ALIVE or me_st is SUSPECT:
                n -= 1
            if n > 0:
                return None
        # None: alone again after a join; tick() at once starts the backoff
        return self._join_retry_at if self._join_retry_at is not None else self._now
