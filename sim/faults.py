"""Applying a fault to the simulated cluster: crash, restart, leave, pause, partition, loss, drift (a core).

``apply_fault`` carries out one ``sim.scenarios.Fault`` at its virtual time:
crash drops the core (state gone, datagrams to it are dropped as ``down``);
restart builds a new core at incarnation 0 with a greater sealer epoch and
joins through the seeds (the dead-reclaim path); pause stops the node from
handling anything until ``resume``: datagrams queue in its socket buffer
(bounded), timers wait, and at resume it drains the buffer and then runs its
timers (the Lifeguard case); leave calls ``core.leave`` and stops the process
``leave_linger_s`` later; partition, block, loss and heal change the
network; drift changes one node's clock rate, keeping its reading continuous.

The functions take the :class:`sim.cluster.Cluster` they act on (whose
``_apply_fault`` method calls ``apply_fault``, so ``sim/app.py``'s
``AppCluster`` can extend it). Faults are rare events: this code stays off
the compiled hot loop (sim/accel.py).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sim.kinds import K_RESUME, K_STOP
from sim.scenarios import Fault

if TYPE_CHECKING:
    from sim.cluster import Cluster, SimNode

__all__ = ["apply_fault", "resume"]

INF = math.inf


def apply_fault(cluster: Cluster, f: Fault, t_s: float) -> None:
    """Apply one fault. ``metrics.last_fault_s`` moves only when the
    fault changed something (a final ``heal`` of a healthy network is
    not a fault)."""
    cluster.trace.append((t_s, "fault", f.kind, f.node, repr(f.args)))
    net = cluster.net
    if f.kind != "heal" or (net.partitioned or net.blocked or net.link_loss
                            or net.options != cluster.base_network):
        cluster.metrics.fault(t_s)
    node: Any = cluster.by_name.get(f.node) if f.node is not None else None
    kind = f.kind
    if kind == "crash":
        cluster._kill(node, t_s, crashed=True)
    elif kind == "restart":
        if node.up:
            cluster._kill(node, t_s, crashed=False)
        cluster.metrics.node_restarting(node.name)
        cluster._boot(node, t_s, t_s)
    elif kind == "leave":
        if node.up and not node.leaving:
            if node.paused_until > t_s:
                resume(cluster, node, t_s)
            node.leaving = True
            cluster.metrics.node_leaving(node.name, t_s)
            cluster._effects(node, node.core.leave(node.local(t_s)), t_s)
            if node.up:
                cluster._arm(node, t_s)
            cluster.loop.schedule(t_s + cluster.options.leave_linger_s, K_STOP, node.idx, node.boots)
    elif kind == "pause":
        if node.up:
            until = t_s + float(f.args[0])
            if until > node.paused_until:
                node.paused_until = until
                node.pause_token += 1
                cluster.metrics.node_paused(node.name)
                cluster.loop.schedule(until, K_RESUME, node.idx, node.pause_token)
    elif kind == "partition":
        groups = f.args[0]
        net.partition([[cluster.by_name[n].idx for n in g] for g in groups])
    elif kind == "heal":
        net.heal()
        net.set_options(cluster.base_network)
    elif kind == "loss":
        net.set_options(replace(net.options, packet_loss_probability=float(f.args[0])))
    elif kind == "block":
        net.block(node.idx, cluster.by_name[f.args[0]].idx)
    elif kind == "unblock":
        net.unblock(node.idx, cluster.by_name[f.args[0]].idx)
    elif kind == "drift":
        rate = float(f.args[0])
        if not 0.5 <= rate <= 2.0:
            raise ValueError(f"drift rate {rate} out of range 0.5..2.0")
        # keep the clock continuous (monotonic): same reading at t_s
        node.offset = node.local(t_s) - rate * t_s
        node.rate = rate
        if node.up and node.paused_until <= t_s:
            node.timer_at = INF
            node.timer_gen += 1
            cluster._arm(node, t_s)


def resume(cluster: Cluster, node: SimNode, t_s: float) -> None:
    node.paused_until = 0.0
    pending, node.pending = node.pending, []
    cluster.trace.append((t_s, "resume", node.idx, len(pending)))
    for entry in pending:
        if not node.up:
            break
        cluster._dispatch_node(entry, node, t_s)
    if node.up:
        node.timer_at = INF
        node.timer_gen += 1
        cluster._arm(node, t_s)
