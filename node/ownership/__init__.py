"""Ownership: rendezvous hashing with bounded loads (the ring and its lane
arithmetic), clock-skew estimation, and broadcast/sharding of a task's slots.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.ownership.lanes.<function>``):
    lanes          Ring lanes: the big-integer lane arithmetic of the ownership
    ring           Ownership: rendezvous hashing (HRW) with bounded loads, kept
    shards         Broadcast and sharding (sans-IO): which members run a slot o
    skew           Clock-skew estimation from timestamps piggybacked on gossip 
"""
from node.ownership.ring import (
    Ring, RingStatistics,
)
from node.ownership.shards import (
    SEP,
)
from node.ownership.skew import (
    SkewEstimator, Sample,
)

__all__ = ['Ring', 'RingStatistics', 'SEP', 'SkewEstimator', 'Sample']
