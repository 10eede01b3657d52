"""Rate-limited log lines for refusals (pure: time comes in as ``now``).

A flood of refused API requests (no token, malformed, oversized) must not
become a flood of log lines: each refusal is counted (by the caller, in a
metric) and at most ``burst`` lines are logged per ``window_s``; the rest are
counted here by reason and summarised in one line when the window ends::

    suppressed 4,997 more API refusals in the last 60 s (unauthorized: 4,990, protocol: 7)

Defaults: 5 lines per 60 s (a first few lines show what is going on; the
summary shows how much). Lines are cut to ``max_line`` characters so a
hostile path or header cannot make one long line either.
"""
from __future__ import annotations

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Decides which refusal lines to log; the caller logs what it returns."""

    def __init__(self, *, burst: int = 5, window_s: float = 60.0, max_line: int = 200) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_line = max_line
        self._window_start: float | None = None
        self._emitted = 0
        self._suppressed: dict[str, int] = {}

    def note(self, now: float, reason: str, line: str) -> list[str]:
        """One refusal at ``now``: the lines to log now (maybe none)."""
        out = self.flush(now)
        if self._window_start is None:
            self._window_start = now
            self._emitted = 0
        if self._emitted < self.burst:
            self._emitted += 1
            out.append(line if len(line) <= self.max_line else line[: self.max_line - 3] + "...")
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
        return out

    def flush(self, now: float) -> list[str]:
        """Close the window if it has ended: its summary line, if any."""
        if self._window_start is None or now - self._window_start < self.window_s:
            return []
        out = []
        total = sum(self._suppressed.values())
        if total:
            parts = ", ".join(f"{r}: {n:,}" for r, n in sorted(self._suppressed.items()))
            out.append(f"suppressed {total:,} more API refusals in the last "
                       f"{now - self._window_start:.0f} s ({parts})")
        self._window_start = None
        self._emitted = 0
        self._suppressed = {}
        return out

    @property
    def suppressed(self) -> int:
        """Refusals counted but not logged in the current window."""
        return sum(self._suppressed.values())
