"""Clock-skew estimation from timestamps piggybacked on gossip (pure core).

Theory (NTP, RFC 5905 section 8, with the peer's processing time taken as
zero): a probe leaves at local wall time ``t0``, the peer stamps its wall time
``t1`` when it answers, the answer arrives at local ``t3``. Then

    rtt    = t3 - t0
    offset = t1 - (t0 + t3) / 2        (peer clock minus ours)

and the true offset lies within ``offset +- rtt / 2``. The sample with the
smallest RTT carries the least queueing noise, so each peer keeps a small
window of recent samples (``window``, default 8, like NTP's clock filter) and
reports the offset of its min-RTT sample.

Rule: a peer is *skewed* when ``|offset| - rtt/2 > bound_s`` for its
min-RTT sample, i.e. only when the skew is certain beyond the measurement
error; such members are not given ownership. Samples with negative
RTT (local clock stepped back) or RTT above ``max_rtt_s`` are ignored.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["SkewEstimator", "Sample", "offset_of"]


@dataclass(frozen=True, slots=True)
class Sample:
    offset_s: float
    rtt_s: float


def offset_of(local_send_wall: float, remote_wall: float, local_recv_wall: float) -> Sample:
    """One NTP-style sample (peer minus local)."""
    rtt = local_recv_wall - local_send_wall
    return Sample(offset_s=remote_wall - (local_send_wall + local_recv_wall) / 2.0, rtt_s=rtt)


class SkewEstimator:
    """Per-peer clock offset from a window of samples (min-RTT filter).

    Args:
        window: samples kept per peer (bounded).
        max_rtt_s: samples with a longer round trip are ignored.
        max_peers: peers tracked at most (oldest-inserted forgotten first).
    """

    def __init__(self, window: int = 8, max_rtt_s: float = 5.0, max_peers: int = 10_000) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._window = window
        self._max_rtt_s = max_rtt_s
        self._max_peers = max_peers
        self._samples: dict[str, deque[Sample]] = {}
        self.ignored = 0

    def observe(self, peer: str, local_send_wall: float, remote_wall: float, local_recv_wall: float) -> bool:
        """Record one exchange. Returns False if the sample was ignored."""
        vals = (local_send_wall, remote_wall, local_recv_wall)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            self.ignored += 1
            return False
        s = offset_of(*vals)
        if s.rtt_s < 0 or s.rtt_s > self._max_rtt_s:
            self.ignored += 1
            return False
        q = self._samples.get(peer)
        if q is None:
            if len(self._samples) >= self._max_peers:
                del self._samples[next(iter(self._samples))]
            q = self._samples[peer] = deque(maxlen=self._window)
        q.append(s)
        return True

    def best(self, peer: str) -> Sample | None:
        """The min-RTT sample in the window (ties: the latest)."""
        q = self._samples.get(peer)
        if not q:
            return None
        best = q[0]
        for s in q:
            if s.rtt_s <= best.rtt_s:
                best = s
        return best

    def offset_s(self, peer: str) -> float | None:
        """Estimated offset (peer clock minus local clock), None if unknown."""
        b = self.best(peer)
        return None if b is None else b.offset_s

    def skewed(self, bound_s: float) -> set[str]:
        """Peers whose offset certainly exceeds ``bound_s`` (beyond rtt/2)."""
        out = set()
        for peer in sorted(self._samples):
            b = self.best(peer)
            if b is not None and abs(b.offset_s) - b.rtt_s / 2.0 > bound_s:
                out.add(peer)
        return out

    def forget(self, peer: str) -> None:
        self._samples.pop(peer, None)

    def offsets(self) -> dict[str, float]:
        """peer -> offset, for the ``peerd_clock_skew_seconds`` metric."""
        return {p: b.offset_s for p in sorted(self._samples) if (b := self.best(p)) is not None}
