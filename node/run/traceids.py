"""Trace ids of runs (sans-IO, pure): deterministic from the claim run id,
so every node, the run record and the tracer agree without coordination.
``node/run/tracing_shell.py`` builds spans on them; ``node/core.py`` writes
``trace_id`` into every run record."""
from __future__ import annotations

import hashlib
import re

__all__ = ["claim_run_id", "root_span_id_for", "trace_id_for", "traceparent"]

#: An attempt run id is ``<claim run id>.<n>`` (node/facade_shell.py RUN_ID_RE).
_ATTEMPT_SUFFIX = re.compile(r"(.*-[0-9a-f]{8})\.[0-9]{1,4}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def claim_run_id(run_id: str) -> str:
    """The claim run id of a run id: ``<slot>-<node>-<8 hex>``, without an
    attempt's ``.<n>`` (returned as is when there is none)."""
    m = _ATTEMPT_SUFFIX.fullmatch(run_id)
    return m.group(1) if m else run_id


def _digest(run_id: str, size: int, person: bytes) -> int:
    h = hashlib.blake2b(claim_run_id(run_id).encode("utf-8", "surrogatepass"),
                        digest_size=size, person=person)
    return int.from_bytes(h.digest(), "big") or 1   # all zeros is invalid in W3C


def trace_id_for(run_id: str) -> str:
    """The trace id (32 lowercase hex) of a run: the first 16 bytes of
    blake2b of its claim run id. An attempt run id (``....<n>``) gives its
    claim's trace id."""
    return f"{_digest(run_id, 16, b'peerd-trace'):032x}"


def root_span_id_for(run_id: str) -> str:
    """The span id (16 lowercase hex) of a run's root span ``run <task>``."""
    return f"{_digest(run_id, 8, b'peerd-root'):016x}"


def traceparent(trace_id: str, span_id: str) -> str:
    """A W3C ``traceparent`` value, sampled: ``00-<trace id>-<span id>-01``.

    Raises:
        ValueError: the ids are not 32 / 16 lowercase hex digits, or all zeros.
    """
    if not isinstance(trace_id, str) or not _HEX32.fullmatch(trace_id) or int(trace_id, 16) == 0:
        raise ValueError(f"trace id must be 32 lowercase hex digits, not all zero: {trace_id!r}")
    if not isinstance(span_id, str) or not _HEX16.fullmatch(span_id) or int(span_id, 16) == 0:
        raise ValueError(f"span id must be 16 lowercase hex digits, not all zero: {span_id!r}")
    return f"00-{trace_id}-{span_id}-01"


