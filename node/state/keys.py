"""Store key layout (pure core): ``task/<id>``, ``ctl/<id>`` and ``run/<task>/<run>`` keys, and entries.

The replicated store (:mod:`node.state.store`) keeps one state per key; the
digest tree (:mod:`node.state.digest`) files catalogue keys (``task/``,
``ctl/``) by their own hash and run keys by their task's; the exchange
(:mod:`node.state.exchange`) ships entries: ``(key, encoded state)``.
"""
from __future__ import annotations

__all__ = ["Entry", "MAX_KEY_LEN", "split_key"]

MAX_KEY_LEN = 512

Entry = tuple[str, bytes]


def split_key(key: str) -> tuple[str, str, str]:
    """(kind, task_id, run_id) for a valid key, else ValueError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
        raise ValueError(f"bad key {key!r}")
    kind, _, rest = key.partition("/")
    if kind in ("task", "ctl") and rest:
        return kind, rest, ""
    if kind == "run":
        tid, sep, rid = rest.rpartition("/")
        if tid and sep and rid:
            return kind, tid, rid
    raise ValueError(f"bad key {key!r}: expected task/<id>, ctl/<id> or run/<task>/<run>")
