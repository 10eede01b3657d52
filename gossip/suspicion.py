"""Lifeguard suspicion timeouts (memberlist ``suspicion.go``), pure.

Theory
------
When a member is first suspected we start a timer at ``max``. Every
*independent* confirmation (a SUSPECT about the same member from a member
we have not heard it from yet) is evidence that the member is really down,
so the timeout shrinks toward ``min`` on a log scale::

    frac    = log(n + 1) / log(k + 1)        n = confirmations so far
    timeout = max(min, max - frac * (max - min))

``k`` is the number of confirmations that bring it to ``min``
(``suspicion_mult - 2``, or 0 in tiny clusters, when it starts at ``min``).
The first suspecter does not count as a confirmation. The remaining time is
``timeout - elapsed`` (negative = overdue). The timeout is floored to whole
milliseconds, exactly as memberlist computes it in ``time.Duration``.
"""
from __future__ import annotations

import math

__all__ = ["remaining_suspicion_time", "Suspicion"]


def remaining_suspicion_time(n: int, k: int, elapsed_s: float, min_s: float,
                             max_s: float) -> float:
    """Seconds left on a suspicion with ``n`` confirmations out of ``k``.

    Args:
        n: independent confirmations received (>= 0).
        k: confirmations expected to reach ``min_s``.
        elapsed_s: time since the suspicion started.
        min_s, max_s: timeout bounds.
    Returns:
        ``timeout - elapsed_s``; may be negative.
    """
    if k < 1:
        return min_s - elapsed_s
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw_s = max_s - frac * (max_s - min_s)
    timeout_s = math.floor(raw_s * 1000.0 + 1e-9) / 1000.0
    if timeout_s < min_s:
        timeout_s = min_s
    return timeout_s - elapsed_s


class Suspicion:
    """One suspicion: start time, bounds and the distinct confirmers.

    ``deadline()`` is the absolute time the member should be declared dead;
    it only moves earlier as confirmations arrive (and never before
    ``start + min``).
    """

    __slots__ = ("start", "k", "min_s", "max_s", "confirmers", "_n")

    def __init__(self, first_from: str, start: float, k: int, min_s: float, max_s: float) -> None:
        self.start = start
        self.k = k
        self.min_s = min_s
        self.max_s = max_s
        # the accuser counts as "seen" but not as a confirmation (memberlist)
        self.confirmers: set[str] = {first_from}
        self._n = 0

    @property
    def confirmations(self) -> int:
        return self._n

    def confirm(self, sender: str) -> bool:
        """Record a confirmation. Returns True if it was new and counted."""
        if self._n >= self.k or sender in self.confirmers:
            return False
        self.confirmers.add(sender)
        self._n += 1
        return True

    def deadline(self) -> float:
        return self.start + remaining_suspicion_time(self._n, self.k, 0.0, self.min_s, self.max_s)
