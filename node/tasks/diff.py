"""What applying a task file would change (sans-IO): ``apply --dry-run``.

``diff_tasks(current, wanted, prune)`` compares the cluster's definitions
(``Task.to_dict()`` of every live task, as this node holds them) with the
definitions in a request, the way ``PUT /v1/tasks`` would write them:

- ``added``: ids in ``wanted`` that the cluster does not hold;
- ``changed``: ids in both whose definitions differ, each with the fields
  that differ (``{"field": "timeout_s", "from": 60, "to": 120}``); nested
  mappings are compared key by key (``command.argv``, ``env.HOME``) so a
  diff names the innermost field that changed, lists are compared whole;
- ``removed``: with ``prune``, ids the cluster holds that ``wanted`` does
  not name (without ``prune`` they are left alone and listed nowhere);
- ``unchanged``: ids in both with equal definitions (an apply writes no new
  version for them).

Every list is sorted by id; the function reads nothing but its arguments.
"""
from __future__ import annotations

from typing import Any

__all__ = ["diff_tasks", "field_diff"]

_MISSING = object()


def field_diff(old: Any, new: Any, prefix: str = "") -> list[dict]:
    """Fields that differ between two definitions (dicts compared per key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[dict] = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            a = old.get(k, _MISSING)
            b = new.get(k, _MISSING)
            if a is _MISSING:
                out.append({"field": name, "from": None, "to": b, "added": True})
            elif b is _MISSING:
                out.append({"field": name, "from": a, "to": None, "removed": True})
            else:
                out.extend(field_diff(a, b, name))
        return out
    if old == new and type(old) is type(new):
        return []
    return [{"field": prefix or "(definition)", "from": old, "to": new}]


def diff_tasks(current: dict[str, dict], wanted: list[dict], *, prune: bool = False) -> dict:
    """The change an apply of ``wanted`` would make to ``current``.

    Args:
        current: task id -> definition the cluster holds (live tasks only).
        wanted: definitions in the request, each with an ``id``.
        prune: also list the cluster's tasks that ``wanted`` does not name
            as ``removed``.
    """
    seen: dict[str, dict] = {}
    for d in wanted:
        seen[d["id"]] = d
    added, changed, unchanged = [], [], []
    for tid in sorted(seen):
        new = seen[tid]
        old = current.get(tid)
        if old is None:
            added.append(tid)
            continue
        fields = field_diff(old, new)
        if fields:
            changed.append({"id": tid, "fields": fields})
        else:
            unchanged.append(tid)
    removed = sorted(t for t in current if t not in seen) if prune else []
    return {"added": added, "changed": changed, "removed": removed, "unchanged": unchanged}
