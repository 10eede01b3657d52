"""The node layer's knobs: one frozen config read by the daemon and the
simulator alike (as ``gossip/config.py`` is for membership).

Each knob says what it does, its default, its formula where it has one, and
its trade-off. Profiles: :meth:`NodeKnobs.lan` (the daemon's default) and
:meth:`NodeKnobs.local` (loopback clusters, ``peerd demo``, tests, the
simulator's default).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["NodeKnobs"]


@dataclass(frozen=True, slots=True)
class NodeKnobs:
    #: Mean interval between two anti-entropy rounds of a node with one random
    #: alive member; each wait is ``ae_interval_s * U(0.5, 1.5)`` so rounds of
    #: different nodes do not line up. Default 10 s (LAN), 1 s (local). Bytes
    #: in sync do not grow with the task count (digests), so a shorter
    #: interval costs messages, not bandwidth; a longer one leaves a missed
    #: push unrepaired for longer.
    ae_interval_s: float = 10.0
    #: Exchange steps in one anti-entropy round (catalogue and run records
    #: each descend root -> buckets -> keys -> entries: 4-5 steps). A peer
    #: that keeps answering beyond it is cut off; the next round resumes.
    ae_rounds_max: int = 8
    #: A task newly owned with other replicas is held (fires nothing) until
    #: one anti-entropy exchange with one of them completes, or this timeout
    #: passes. Default 15 s (LAN), 3 s (local). Longer: fewer fires on stale
    #: state after a takeover; shorter: a dead replica set delays the task
    #: less. Its missed slots go by the misfire policy when the hold ends.
    handoff_timeout_s: float = 15.0
    #: A node whose seeds all stay silent owns nothing for this long, then
    #: owns alone (a restarted node alone would otherwise fire catch-ups the
    #: real owners already fired). Default 15 s (LAN), 3 s (local).
    boot_grace_s: float = 15.0
    #: Pause between two attempts of a fencing claim that found etcd
    #: unavailable (each attempt itself retries briefly inside
    #: ``claim_attempt_s``). The slot waits until the end of its catch-up
    #: window; later slots of the task wait behind it (scheduler rule 4a).
    claim_retry_s: float = 0.5
    #: Longest one claim attempt may take before the core hears "unavailable"
    #: and schedules the next one.
    claim_attempt_s: float = 2.0
    #: etcd session TTL of a node (fencing Rule 8). A re-claim of a slot whose
    #: claimer was declared dead waits at most ``1.5 * session_ttl_s + 2`` s
    #: for that claimer's session to expire (a claimer that really died has
    #: lost it by then; one that did not is still running the slot).
    session_ttl_s: float = 10.0
    #: Re-claims of one slot at most (one per death; node/fencing/fencer_shell.py).
    max_reclaims: int = 3
    #: Deleted tasks stay as tombstones this long before they are collected
    #: (a member down longer than this could resurrect a deleted task when it
    #: comes back; 7 days, as Cassandra's gc_grace_seconds is 10 days).
    tombstone_horizon_s: float = 7 * 86400.0
    #: (task, slot) pairs whose lost run is remembered for a re-claim, and
    #: lost run ids remembered so one loss is acted on once. Bounded memory.
    lost_runs_max: int = 4096
    #: Scheduler decisions per core tick: with more due, the shell yields and
    #: calls again, so a burst of 10,000 fires never blocks the node.
    tick_limit: int = 1000
    #: Skew (estimated from anti-entropy round trips) beyond which a member
    #: stops being eligible to own tasks.
    max_skew_s: float = 2.0

    @classmethod
    def lan(cls) -> "NodeKnobs":
        return cls()

    @classmethod
    def local(cls) -> "NodeKnobs":
        return cls(ae_interval_s=1.0, handoff_timeout_s=3.0, boot_grace_s=3.0)

    def replace(self, **kw) -> "NodeKnobs":
        return replace(self, **kw)
