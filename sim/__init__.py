"""Deterministic in-process cluster simulator for peerd (``peersim``).

Drives the real sans-IO cores (``gossip.swim.Swim``, ``gossip.seal.Sealer``)
from a discrete-event loop with a virtual clock and a virtual network; never
re-implements protocol logic. One seed and the same arguments give the same
trace, byte for byte (``trace_hash``).

Layout: ``loop`` (event heap, trace, seeded child RNGs), ``network`` (seeded
delay, loss, duplication, partitions, asymmetric links, size limit),
``cluster`` (simulated nodes and the hot event loop) with ``kinds`` (event
kinds), ``streams`` (simulated push-pull streams), ``faults`` (applying a
fault), ``bootstrap`` (join, warm, settled starts) and ``report``;
``app`` and ``app_run`` (the node core on every simulated node, with the
etcd model ``etcd_model``), ``scenarios`` (fault schedules by name,
invariant checkers), ``metrics`` (measurements), ``cli`` (``peersim``),
``bench``/``fire_bench``/``followup_bench`` (benchmark runners), ``chaos``
with ``chaos_plan``, ``chaos_harness_shell``, ``chaos_verdict`` and
``netns`` (real processes under a seeded fault schedule), ``fuzz`` (decoder
fuzzing), ``plot``, ``accel`` (the compiled build). The whole house is drawn
in docs/ARCHITECTURE.md.
"""
from sim.cluster import Cluster as Cluster
from sim.cluster import ClusterOptions as ClusterOptions
from sim.cluster import NodeApp as NodeApp
from sim.cluster import node_names as node_names
from sim.cluster import simulate as simulate
from sim.loop import EventLoop as EventLoop
from sim.loop import Trace as Trace
from sim.loop import child_rng as child_rng
from sim.network import Network as Network
from sim.network import NetworkOptions as NetworkOptions
from sim.scenarios import SCENARIOS as SCENARIOS
from sim.scenarios import Fault as Fault
from sim.scenarios import check_invariants as check_invariants

__all__ = [
    "Cluster", "ClusterOptions", "NodeApp", "node_names", "simulate", "EventLoop", "Trace",
    "child_rng", "Network", "NetworkOptions", "SCENARIOS", "Fault", "check_invariants",
]
