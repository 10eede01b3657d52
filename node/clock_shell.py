"""The node's wall clock (shell): epoch seconds, with a test hook.

Test hook: ``PEERD_CLOCK_OFFSET_S`` (seconds, may be negative) is added to
this process's wall clock, to test clock skew between real nodes. Never set
it in production.
"""
from __future__ import annotations

import os
import time


def _clock_offset_s() -> float:
    raw = os.environ.get("PEERD_CLOCK_OFFSET_S", "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


_OFFSET_S = _clock_offset_s()


def wall_clock() -> float:
    """Epoch seconds of this node's clock (with the test offset)."""
    return time.time() + _OFFSET_S
