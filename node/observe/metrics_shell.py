"""Prometheus metrics of one node (all named ``peerd_*``, each with help).

Each node owns a private ``CollectorRegistry`` (several nodes may share a
process in tests). Event counters and histograms are updated by the node
shell as things happen; counters that the cores already keep (gossip
statistics, store statistics) are read at scrape time by a collector, so
there is one source of truth for them.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def _streams_rejected(g: dict, snapshot: Callable) -> dict:
    """Stream refusals from the gossip transport statistics: the snapshot's
    ``streams_rejected`` if it carries one, else read from the node that
    owns the snapshot (``node.gossip.statistics().transport``)."""
    rej = g.get("streams_rejected")
    if rej is None:
        gossip = getattr(getattr(snapshot, "__self__", None), "gossip", None)
        try:
            rej = gossip.statistics().transport.streams_rejected if gossip is not None else {}
        except Exception:  # a scrape must never take the node down
            rej = {}
    return dict(rej)


class _CoreCollector:
    """Reads cumulative counters from the node's cores at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        try:
            s = self.snapshot()
        except Exception:  # a scrape must never take the node down
            return
        g = s.get("gossip") or {}
        fam = GaugeMetricFamily("peerd_members", "Members this node knows, by state.", labels=["state"])
        for state in ("alive", "suspect", "dead", "left"):
            fam.add_metric([state], float((g.get("members_by_state") or {}).get(state, 0)))
        yield fam
        for key, name, help_ in (
            ("probes_sent", "peerd_gossip_probes_total", "Direct probes (pings) sent."),
            ("indirect_probes", "peerd_gossip_indirect_probes_total", "Indirect probes (ping-req) sent."),
            ("suspicions_raised", "peerd_gossip_suspicions_total", "Members this node started to suspect."),
            ("refutes", "peerd_gossip_refutes_total", "Times this node refuted a suspicion about itself."),
            ("deaths_declared", "peerd_gossip_deaths_total", "Members this node declared dead."),
            ("stale_corrections", "peerd_gossip_stale_corrections_total",
             "Stale suspect/dead messages about this node answered with its current alive, sent straight "
             "to the member that was behind."),
            ("push_pulls", "peerd_gossip_push_pulls_total", "Full-state TCP push-pull exchanges."),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], float(g.get(key, 0)))
            yield c
        c = CounterMetricFamily("peerd_gossip_packets_total", "Gossip datagrams, by direction.", labels=["direction"])
        c.add_metric(["in"], float(g.get("packets_in", 0)))
        c.add_metric(["out"], float(g.get("packets_out", 0)))
        yield c
        c = CounterMetricFamily("peerd_gossip_bytes_total", "Gossip datagram bytes (sealed), by direction.", labels=["direction"])
        c.add_metric(["in"], float(g.get("bytes_in", 0)))
        c.add_metric(["out"], float(g.get("bytes_out", 0)))
        yield c
        c = CounterMetricFamily(
            "peerd_gossip_packets_rejected_total", "Gossip packets dropped, by reason.", labels=["reason"]
        )
        for reason, n in sorted((g.get("rejected") or {}).items()):
            c.add_metric([reason], float(n))
        yield c
        c = CounterMetricFamily(
            "peerd_gossip_streams_rejected_total",
            "Inbound gossip streams closed before or while reading their message, by reason "
            "(gossip/streams.py: caps, oversized, timeout, unauthenticated, malformed, buffer_budget).",
            labels=["reason"],
        )
        for reason, n in sorted(_streams_rejected(g, self.snapshot).items()):
            c.add_metric([reason], float(n))
        yield c
        a = GaugeMetricFamily("peerd_gossip_awareness", "Lifeguard local health score (0 = healthy).")
        a.add_metric([], float(g.get("awareness", 0)))
        yield a
        skew = GaugeMetricFamily(
            "peerd_clock_skew_seconds", "Estimated clock offset of each member relative to this node.", labels=["member"]
        )
        for member, off in sorted((s.get("skew") or {}).items()):
            skew.add_metric([member], float(off))
        yield skew
        st = s.get("store") or {}
        for key, name, help_ in (
            ("tasks", "peerd_tasks", "Tasks in the replicated catalogue (not deleted)."),
            ("conflicts", "peerd_store_conflicts", "Tasks whose definition has concurrent versions (siblings)."),
            ("tombstones", "peerd_store_tombstones", "Deleted-task tombstones not yet collected."),
            ("run_records", "peerd_store_run_records", "Run records held by this node."),
        ):
            gg = GaugeMetricFamily(name, help_)
            # the store's statistics call the run-record count ``runs``
            gg.add_metric([], float(st.get("runs", 0) if key == "run_records" else st.get(key, 0)))
            yield gg
        c = CounterMetricFamily(
            "peerd_run_records_trimmed_total",
            "Run-record data dropped by this node: what=output (the oldest outputs, over "
            "run_records_max_bytes), what=record (records beyond their task's history).",
            labels=["what"],
        )
        c.add_metric(["output"], float(st.get("trimmed_outputs", 0)))
        c.add_metric(["record"], float(st.get("trimmed_records", 0)))
        yield c
        gb = GaugeMetricFamily(
            "peerd_run_record_bytes",
            "Run-record bytes this node holds: kind=records (encoded, in memory), kind=outputs (texts, "
            "in SQLite); their sum stays under run_records_max_bytes once outputs are trimmed.",
            labels=["kind"],
        )
        gb.add_metric(["records"], float(st.get("run_record_bytes", 0)))
        gb.add_metric(["outputs"], float(st.get("output_bytes", 0)))
        yield gb
        bud = GaugeMetricFamily("peerd_run_records_budget_bytes", "The run_records_max_bytes budget.")
        bud.add_metric([], float(st.get("max_bytes", 0)))
        yield bud
        owned = GaugeMetricFamily("peerd_tasks_owned", "Tasks this node owns (first in the preference list).")
        owned.add_metric([], float(s.get("owned", 0)))
        yield owned


class NodeMetrics:
    """The metric objects of one node, in its own registry."""

    def __init__(self, snapshot: Callable[[], dict] | None = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        if snapshot is not None:
            r.register(_CoreCollector(snapshot))
        self.replication_updates = Counter(
            "peerd_replication_updates_total", "Replicated entries sent or merged, by direction.", ["direction"], registry=r
        )
        self.antientropy_rounds = Counter(
            "peerd_antientropy_rounds_total", "Anti-entropy exchanges, by result.", ["result"], registry=r
        )
        self.antientropy_bytes = Counter(
            "peerd_antientropy_bytes_total", "Bytes of anti-entropy exchanges (both directions).", registry=r
        )
        self.handoff_timeouts = Counter(
            "peerd_handoff_timeouts_total",
            "Tasks taken over without a confirmed handoff from a previous replica (no replica answered, "
            "or the handoff timeout passed).",
            registry=r,
        )
        self.fire_lateness = Histogram(
            "peerd_fire_lateness_seconds", "Run start minus scheduled fire time.", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.slots = Counter(
            "peerd_slots_total", "Slots by outcome (fired, missed, coalesced, overlap_skipped, ...).", ["outcome"], registry=r
        )
        self.runs = Counter("peerd_runs_total", "Run attempts by final status.", ["status"], registry=r)
        self.run_duration = Histogram(
            "peerd_run_duration_seconds", "Run attempt duration.", buckets=DURATION_BUCKETS_S, registry=r
        )
        self.retries = Counter("peerd_retries_total", "Retry attempts started.", registry=r)
        self.running = Gauge("peerd_runs_running", "Runs in progress on this node.", registry=r)
        self.misfires = Counter("peerd_misfires_total", "Late slots handled by misfire policy.", ["policy"], registry=r)
        self.fencing_claims = Counter(
            "peerd_fencing_claims_total", "etcd slot claims by result (won, lost, unavailable, ...).", ["result"], registry=r
        )
        self.api = Counter(
            "peerd_api_requests_total",
            "HTTP API requests, by method (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS or other) and route "
            "template (/v1/tasks/{id}/runs; unknown for any other path): a closed set of labels.",
            ["method", "route"], registry=r,
        )
        self.api_refusals = Counter(
            "peerd_api_refusals_total",
            "API requests refused before a handler ran, by reason (unauthorized, protocol, too_large, "
            "timeout, internal); logged at most 5 lines a minute, the rest summarised.",
            ["reason"], registry=r,
        )
        self.notifications = Counter(
            "peerd_notifications_total",
            "Notifications (webhooks) by result: sent, failed (every try failed), retried (a try "
            "failed, another follows).",
            ["result"], registry=r,
        )
        self.chained = Counter(
            "peerd_chain_triggers_total", "Chained runs triggered by an upstream run's end (after:).",
            registry=r,
        )
        self.store_failing = Gauge(
            "peerd_store_write_failing",
            "1 while writes to the node's SQLite file fail (disk full, read-only data dir): the node serves "
            "reads and gossip and refuses writes with 507 until a retry succeeds.", registry=r,
        )
        self.store_write_errors = Counter(
            "peerd_store_write_errors_total", "Failed writes of the node's SQLite file, by reason.", ["reason"],
            registry=r,
        )
        self.store_writes = Counter("peerd_store_persist_rows_total", "Rows written to the local SQLite store.", registry=r)

    def api_requests(self, method: str, route: str) -> None:
        self.api.labels(method, route).inc()  # labels from node/api/routes_shell.py's closed sets

    def text(self) -> bytes:
        return generate_latest(self.registry)
