"""Retry backoff: exponential growth capped at a maximum, with jitter (pure).

Theory of operation
-------------------
A failed run is retried after a delay. The delay grows exponentially with
the retry number so a broken dependency is not hammered, is capped so a task
does not wait for hours, and is *jittered* so that many tasks which failed
together (a database restart at the top of the hour) do not retry together
in lock-step.

For retry ``attempt`` (1 = the first retry, i.e. the second run) the
un-jittered ceiling is::

    ceiling(attempt) = min(max_s, base_s * multiplier ** (attempt - 1))

and the delay follows one of the two schemes of Marc Brooker, "Exponential
Backoff And Jitter", AWS Architecture Blog, 2015-03-04
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/):

* ``"equal"`` (the default): ``ceiling / 2 + uniform(0, ceiling / 2)``. It
  always waits at least half the ceiling. We pick it because a task that just
  failed (a service down, a lock held) rarely succeeds if retried at once,
  and our contention is small (one owner per task, not thousands of clients
  on one resource).
* ``"full"``: ``uniform(0, ceiling)``. The blog measured it as the best at
  spreading many contending clients (least total work); its drawback is that
  a retry can come almost at once.

Rules: ``0 <= delay <= max_s`` always; the ceiling is monotone non-decreasing
in ``attempt``; with an injected ``random.Random`` the result is
deterministic. This module is a core: no clock, no I/O, no module-level
random.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["JITTER_MODES", "MAX_RETRIES", "RetryPolicy", "backoff_ceiling_s", "backoff_delay_s"]

#: Upper bound on ``retries.max`` (every retry loop is bounded).
MAX_RETRIES = 100

#: Jitter schemes understood by :func:`backoff_delay_s`.
JITTER_MODES = ("full", "equal")


def _check(attempt: int, base_s: float, multiplier: float, max_s: float) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an int >= 1 (1 = first retry), got {attempt!r}")
    for name, value in (("base_s", base_s), ("max_s", max_s)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier) or multiplier < 1:
        raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")


def backoff_ceiling_s(attempt: int, *, base_s: float, multiplier: float, max_s: float) -> float:
    """The un-jittered delay before retry ``attempt``.

    Args:
        attempt: retry number, 1 for the first retry.
        base_s: delay ceiling of the first retry (seconds, >= 0).
        multiplier: growth factor per retry (>= 1).
        max_s: cap on the ceiling (seconds, >= 0).

    Returns:
        ``min(max_s, base_s * multiplier ** (attempt - 1))``, computed without
        overflow for any attempt.

    Raises:
        ValueError: an argument is out of range.
    """
    _check(attempt, base_s, multiplier, max_s)
    if base_s == 0 or max_s == 0:
        return 0.0
    # Compare in log space so multiplier ** 10_000 never overflows a float.
    exponent = attempt - 1
    if multiplier > 1 and exponent * math.log(multiplier) >= math.log(max_s) - math.log(base_s):
        return float(max_s)
    try:
        value = base_s * multiplier**exponent
    except OverflowError:  # tiny base, huge power: the product itself is finite
        value = math.exp(math.log(base_s) + exponent * math.log(multiplier))
    return float(min(max_s, value))


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float,
    multiplier: float,
    max_s: float,
    rng: random.Random,
    jitter: str = "equal",
) -> float:
    """The jittered delay to sleep before retry ``attempt``.

    Args:
        attempt: retry number, 1 for the first retry (the run's second attempt).
        base_s: delay ceiling of the first retry (seconds, >= 0).
        multiplier: growth factor per retry (>= 1; 2 doubles the ceiling).
        max_s: cap (seconds, >= 0); the delay never exceeds it.
        rng: source of randomness (inject a seeded ``random.Random``).
        jitter: ``"equal"`` (default, ``ceiling/2 + uniform(0, ceiling/2)``)
            or ``"full"`` (``uniform(0, ceiling)``); see the module docstring.

    Returns:
        A delay in seconds with ``0 <= delay <= min(max_s, ceiling)``.

    Raises:
        ValueError: an argument is out of range or ``jitter`` is unknown.
    """
    if jitter not in JITTER_MODES:
        raise ValueError(f"jitter must be one of {JITTER_MODES}, got {jitter!r}")
    ceiling = backoff_ceiling_s(attempt, base_s=base_s, multiplier=multiplier, max_s=max_s)
    if jitter == "full":
        delay = rng.uniform(0.0, ceiling)
    else:
        half = ceiling / 2.0
        delay = half + rng.uniform(0.0, half)
    # uniform(a, b) may return b (or b + ulp through rounding); clamp.
    return min(max(delay, 0.0), ceiling)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed run is retried: the one policy type of peerd (tasks,
    executor, node core and simulator all use it).

    Attributes:
        max: retries after the first attempt (0-:data:`MAX_RETRIES`).
        backoff_s: delay ceiling of the first retry (task field ``backoff``).
        max_backoff_s: cap on the ceiling (task field ``max_backoff``);
            default 60 s: a task retried hourly is better served by its own
            schedule than by a retry an hour later.
        multiplier: growth of the ceiling per retry (>= 1).
        jitter: ``"equal"`` (default) or ``"full"``; see the module docstring.
    """

    max: int = 0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    multiplier: float = 2.0
    jitter: str = "equal"

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """Delay before retry number ``retry`` (1 = first retry)."""
        return backoff_delay_s(retry, base_s=self.backoff_s, multiplier=self.multiplier,
                               max_s=self.max_backoff_s, rng=rng, jitter=self.jitter)

    def to_dict(self) -> dict:
        """The task-file spelling (``backoff``, ``max_backoff``)."""
        d = {"max": self.max, "backoff": self.backoff_s,
             "max_backoff": self.max_backoff_s, "multiplier": self.multiplier}
        if self.jitter != "equal":
            d["jitter"] = self.jitter
        return d
