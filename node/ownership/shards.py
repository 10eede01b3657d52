"""Broadcast and sharding (sans-IO): which members run a slot of a task.

A task's ``target`` says where each slot runs:

- ``one`` (the default): the task's owner (node/ownership/ring.py), once;
- ``all``: every eligible member (alive or suspect, tags matching, clock
  within ``max_skew_s``), each once;
- ``count: N``: the first N members of the task's preference list.

Rule 1 - the shard list is the task's preference list from the ring (owner
first, then its replicas) followed by the other eligible members in plain
rendezvous order (node/ownership/ring.py Rule 1), cut to N (``count``) or kept whole
(``all``). Every node with the same membership view computes the same list.

Rule 2 - shard ``i`` of a slot belongs to the list's ``i``-th member; it is
scheduled by that member as its own unit ``<task>#<i>`` (its own cursor,
last fired slot and, with etcd, its own fencing claim per slot), and the
run gets ``PEERD_SHARD_INDEX=i`` and ``PEERD_SHARD_COUNT=len(list)``.

Rule 3 - when a member dies or leaves, the list closes up: the member that
now stands at index ``i`` owns shard ``i`` from then on, so a shard whose
member died mid-run is handled by the next member by ``on_owner_loss``, and
a slot's shard is fired once however the list moved (the claim is per
``<task>#<i>`` and slot). With ``all`` the count follows the membership.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from node.ownership.ring import preference_list

__all__ = ["SEP", "shard_members", "shard_id", "split_shard_id"]

#: Separates a task id from its shard index in scheduling units (task ids
#: cannot contain it).
SEP = "#"


def shard_members(task_id: str, target: Mapping | None, owners: list[str],
                  eligible: Iterable[str]) -> list[str]:
    """Rule 1: the members that run each slot, in shard order."""
    if not target or target.get("mode") == "one":
        return owners[:1]
    others = sorted(m for m in set(eligible) if m not in owners)
    full = list(owners) + preference_list(task_id, others, len(others))
    if target.get("mode") == "count":
        return full[: int(target["count"])]
    return full


def shard_id(task_id: str, index: int) -> str:
    return f"{task_id}{SEP}{int(index)}"


def split_shard_id(unit: str) -> tuple[str, int] | None:
    """``(task id, index)`` for a shard unit id, else None."""
    tid, sep, idx = unit.rpartition(SEP)
    if not sep or not tid or not idx.isdigit():
        return None
    return tid, int(idx)
