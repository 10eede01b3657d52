"""The simulated cluster's report: load marks, load per member and the ``--json`` document (a core).

The event loop (``sim/cluster.py``) takes a load mark when the cluster first
converges (the measurement starts there) and at the bounds of
``ClusterOptions.load_window_s``; ``cluster_report`` turns the marks and
``sim.metrics.Metrics.results`` into the run's figures. The wall time in the
report is measured by the loop; nothing here reads a clock.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.cluster import Cluster

__all__ = ["load_mark", "load_between", "cluster_report"]


def load_mark(cluster: Cluster, t_s: float) -> tuple[float, int, int, float]:
    """(t_s, datagrams and bytes sent so far, running node-seconds so far):
    the load between two marks is their difference (``load_between``)."""
    cluster._count_up(t_s, 0)
    return (t_s, sum(cluster.net.sent_msgs), sum(cluster.net.sent_bytes), cluster._up_node_s)


def load_between(a: tuple[float, int, int, float],
                  b: tuple[float, int, int, float]) -> tuple[float | None, float | None]:
    """msgs and bytes per running member per virtual s from mark a to b."""
    up_node_s = b[3] - a[3]
    if up_node_s <= 0:
        return None, None
    return round((b[1] - a[1]) / up_node_s, 3), round((b[2] - a[2]) / up_node_s, 1)


def cluster_report(cluster: Cluster) -> dict:
    """The run's figures (the ``--json`` document)."""
    end_s = cluster.end_s
    end = load_mark(cluster, end_s)
    res = cluster.metrics.results(end_s)
    start = cluster._measure_start or (0.0, 0, 0, 0.0)
    msgs_rate, bytes_rate = load_between(start, end)
    n = cluster.options.nodes
    out = {
        "seed": cluster.seed,
        "nodes": n,
        "virtual_seconds": end_s,
        "wall_seconds": round(cluster.wall_s, 3),
        "node_seconds_per_wall_second": round(n * end_s / cluster.wall_s, 1) if cluster.wall_s else None,
        "trace_hash": cluster.trace.hexdigest(),
        "trace_records": cluster.trace.count,
        **{k: res[k] for k in ("detection_latency_s",)},
        "false_positives": res["false_positives"],
        "dissemination_rounds": res["dissemination_rounds"],
        "msgs_per_node_per_s": msgs_rate,
        "bytes_per_node_per_s": bytes_rate,
        "converged": res["converged"],
        "convergence_s": res["convergence_s"],
        "slots_due": None,
        "slots_fired": None,
        "duplicate_fires": None,
        "missed_slots": None,
    }
    for k, v in res.items():
        out.setdefault(k, v)
    out["measure_start_s"] = start[0] if cluster._measure_start else None
    out["load_window"] = None
    if len(cluster._load_marks) == 2:
        a, b = cluster._load_marks
        w_msgs, w_bytes = load_between(a, b)
        if w_msgs is not None:
            out["load_window"] = {"from_s": round(a[0], 3), "to_s": round(b[0], 3),
                                  "msgs_per_node_per_s": w_msgs,
                                  "bytes_per_node_per_s": w_bytes}
    out["drops"] = {k: v for k, v in sorted(cluster.net.drops.items()) if v}
    out["stats"] = dict(sorted(cluster.stats.items()))
    out["nodes_running_at_end"] = sum(1 for n in cluster.nodes if n.up)
    out["disagreement"] = [] if res["converged"] else cluster.metrics.disagreement()
    return out

