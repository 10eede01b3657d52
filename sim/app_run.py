"""Building, running and checking a simulated scheduler cluster: tasks, fire metrics, invariants, reports (a core).

``build_app_cluster`` / ``simulate_app`` set up an :class:`sim.app.AppCluster`
(tasks written to the seeds' disks, the due window, the etcd model when
fencing) and run it; the rest turns what the run recorded (the cluster-wide
ledger of fires, the notification receiver, every live node's store) into
the report: ``fire_metrics`` counts due, fired, duplicate and missed slots;
``check_app_invariants`` states the invariants; ``app_report``,
``followup_report`` and ``shard_report`` fill the ``--json`` document.
The node app and its cluster are in ``sim/app.py``.
"""
from __future__ import annotations

import math
from dataclasses import replace

from node.state.store import Store
from node.tasks.model import Task
from sim.app import EPOCH_BASE, AppCluster, AppOptions
from sim.cluster import ClusterOptions, node_names
from sim.etcd_model import EtcdModel
from sim.loop import child_rng
from sim.network import NetworkOptions

__all__ = ["simulate_app", "build_app_cluster", "app_report", "followup_report", "shard_report",
           "default_tasks", "fire_metrics", "check_app_invariants"]


# ---------------------------------------------------------------------- tasks, metrics

def default_tasks(n: int = 5, *, every_s: tuple[int, ...] = (1, 5), catchup_window_s: float = 30.0,
                  misfire: str = "run_all", overlap: str = "allow",
                  on_owner_loss: str = "rerun") -> list[dict]:
    """``n`` exec tasks cycling over ``@every {every_s}s`` schedules."""
    out = []
    for i in range(n):
        out.append({"id": f"t{i:02d}", "schedule": f"@every {every_s[i % len(every_s)]}s",
                    "command": {"type": "exec", "argv": ["true"]}, "misfire": misfire,
                    "overlap": overlap, "catchup_window": f"{int(catchup_window_s)}s",
                    "on_owner_loss": on_owner_loss})
    return out


def _every_s(schedule: str) -> float | None:
    if not schedule.startswith("@every "):
        return None
    spec = schedule[len("@every "):].strip()
    units = {"s": 1, "m": 60, "h": 3600}
    if spec and spec[-1] in units and spec[:-1].isdigit():
        return float(int(spec[:-1]) * units[spec[-1]])
    return None


def fire_metrics(ledger: list[tuple], tasks: list[dict], start_epoch: float, end_epoch: float,
                 crashed_at: dict[tuple[str, int], float] | None = None) -> dict:
    """Count due, fired, duplicate and missed slots.

    A slot is due when it lies in ``[start_epoch, end_epoch]``. A fire of an
    already fired slot is a duplicate, unless it is a ``rerun_owner_loss``
    fire after every earlier firer of that slot had crashed or left
    (``crashed_at[(node, boots)]`` before this fire): that is the documented
    rerun of a lost run, counted as ``owner_loss_reruns``. Duplicates that are
    ``rerun_owner_loss`` fires (a run re-claimed from a claimer declared dead
    that was in fact alive: partition, loss) are also counted apart as
    ``reclaim_duplicates`` (included in ``duplicate_fires``). Slots before
    ``start_epoch`` count only in ``duplicate_fires_warmup``.
    """
    crashed_at = crashed_at or {}
    due = set()
    for d in tasks:
        step = _every_s(d.get("schedule") or "")
        if step is None:
            continue
        s = math.ceil(start_epoch / step) * step
        while s <= end_epoch:
            due.add((d["id"], int(s)))
            s += step
    by_slot: dict[tuple[str, int], list[tuple]] = {}
    for rec in ledger:
        by_slot.setdefault((rec[0], rec[1]), []).append(rec)
    dup = reruns = warm = false_death = 0
    dup_max = 0
    examples = []
    for key in sorted(by_slot):
        if key[1] < start_epoch:
            warm += len(by_slot[key]) - 1
            continue
        fires = by_slot[key]
        extra = 0
        for i, rec in enumerate(fires[1:], 1):
            earlier = fires[:i]
            if rec[6] == "rerun_owner_loss" and all(
                    crashed_at.get((e[2], e[3]), math.inf) <= rec[4] for e in earlier):
                reruns += 1
            else:
                extra += 1
                if rec[6] == "rerun_owner_loss":
                    false_death += 1
                if len(examples) < 5:
                    examples.append([list(e) for e in fires])
        dup += extra
        dup_max = max(dup_max, extra)
    fired = set(by_slot)
    return {
        "slots_due": len(due),
        "slots_fired": len(fired & due),
        "slots_fired_total": len(fired),
        "duplicate_fires": dup,
        "duplicate_fires_max_per_slot": dup_max,
        "owner_loss_reruns": reruns,
        "reclaim_duplicates": false_death,
        "duplicate_fires_warmup": warm,
        "missed_slots": len(due - fired),
        "missed": sorted(due - fired),
        "duplicate_examples": examples,
    }


class _DownTracker:
    """Records when each (node, boots) incarnation of a process went down."""

    def __init__(self, cluster: AppCluster) -> None:
        self.down: dict[tuple[str, int], float] = {}
        orig = cluster._kill

        def kill(node, t_s, *, crashed):
            if node.up:
                self.down[(node.name, node.boots)] = t_s
            orig(node, t_s, crashed=crashed)
        cluster._kill = kill


def check_app_invariants(rep: dict, *, fencing: bool) -> list[str]:
    """Fenced: no duplicate fire (reclaim duplicates reported on their own
    line). Always: replicas equal, no acknowledged write lost. With
    ``expect_no_missed`` (every task ``misfire: run_all`` and every outage
    shorter than its ``catchup_window``): no slot missed."""
    out = []
    if rep.get("expect_no_missed") and rep.get("missed_slots"):
        out.append(f"{rep['missed_slots']} slot(s) missed with run_all inside the window: "
                   f"{rep.get('missed_examples')}")
    if fencing and rep.get("duplicate_fires_warmup"):
        out.append(f"{rep['duplicate_fires_warmup']} duplicate fire(s) with fencing before the window")
    if fencing and rep.get("duplicate_fires"):
        out.append(f"{rep['duplicate_fires']} duplicate fire(s) with fencing: {rep.get('duplicate_examples')}")
    if not rep.get("replicas_equal"):
        out.append(f"catalogue digests differ after heal: {rep.get('digests')}")
    if rep.get("lost_tasks"):
        out.append(f"acknowledged tasks missing on live nodes: {rep['lost_tasks']}")
    return out


def build_app_cluster(config, options: ClusterOptions, schedule, *, duration_s: float,
                      tasks: list[dict] | int = 5, fencing: bool = False,
                      etcd_outages: list[tuple[float, float]] = (), app_options: AppOptions | None = None,
                      catchup_margin_s: float = 10.0, start_s: float = 10.0,
                      clock_offset_max_s: float | None = 0.05,
                      expect_no_missed: bool = False) -> AppCluster:
    """An :class:`AppCluster` ready to ``run(duration_s)``; then call
    ``cluster.app_report(report)``.

    Tasks are applied at ``n000`` at t=0 and acknowledged once written on the
    first three nodes (the seeds; modelled by writing them to their disks
    before start). Slots are due in ``[start_s, duration_s - catchup_margin_s]``
    of virtual time (epoch ``EPOCH_BASE`` + t). Scheduler ticks stop at
    ``duration_s - 0.6 * catchup_margin_s`` so the final replica check sees
    a quiet catalogue.

    Args:
        clock_offset_max_s: overrides ``options.clock_offset_max_s`` (node
            wall clocks within 50 ms, as NTP keeps them; None keeps it).
    """
    if isinstance(tasks, int):
        tasks = default_tasks(tasks)
    if clock_offset_max_s is not None:
        options = replace(options, clock_offset_max_s=clock_offset_max_s)
    ao = replace(app_options or AppOptions(), fencing=fencing)
    etcd = EtcdModel(list(etcd_outages)) if fencing else None
    cluster = AppCluster(config, options, schedule, app_options=ao, etcd=etcd)
    cluster.downs = _DownTracker(cluster)
    cluster.tasks_applied = list(tasks)
    cluster.expect_no_missed = expect_no_missed
    cluster.window_s = (start_s, duration_s - catchup_margin_s)
    cluster.quiesce_s = duration_s - 0.6 * catchup_margin_s
    names = node_names(options.nodes)
    writer = Store(names[0])
    for d in tasks:
        t = Task.from_dict(d)
        writer.put_task(t.id, t.to_dict(), None, EPOCH_BASE)
    rows = dict(writer.drain_dirty())
    for name in names[:min(3, options.nodes)]:
        cluster.disks[name] = dict(rows)
    return cluster


def app_report(cluster: AppCluster, report: dict) -> dict:
    """Fill ``report`` (from ``cluster.run``) with the fire metrics and checks."""
    tasks = cluster.tasks_applied
    start_s, end_s = cluster.window_s
    # broadcast tasks fire per shard unit (shard_report checks them)
    report.update(fire_metrics(cluster.ledger, [d for d in tasks if not d.get("target")],
                               EPOCH_BASE + start_s, EPOCH_BASE + end_s, cluster.downs.down))
    # every missed slot with its reason (the first node that decided not to
    # run it), or "undecided" (no owner decided it: it was never due anywhere)
    missed = report.pop("missed")
    by_reason: dict[str, int] = {}
    examples = []
    for tid, slot in missed:
        why = cluster.skipped.get((tid, slot), "undecided")
        key = why.split(" at ")[0]
        by_reason[key] = by_reason.get(key, 0) + 1
        if len(examples) < 10:
            examples.append([tid, slot, why])
    report["missed_by_reason"] = dict(sorted(by_reason.items()))
    report["missed_examples"] = examples
    fencing = cluster.etcd is not None
    report["fencing"] = fencing
    report["expect_no_missed"] = cluster.expect_no_missed
    report["ledger_hash"] = cluster.ledger_hash()
    report["fires"] = len(cluster.ledger)
    live = [n for n in cluster.nodes if n.up and n.apps]
    digests = {n.name: n.apps[0].store.digest_root("catalogue").hex() for n in live}
    report["digests"] = digests
    report["replicas_equal"] = len(set(digests.values())) <= 1
    want = sorted(d["id"] for d in tasks)
    lost = {}
    for n in live:
        have = {v.task_id for v in n.apps[0].store.tasks()}
        miss = [t for t in want if t not in have]
        if miss:
            lost[n.name] = miss
    report["lost_tasks"] = lost
    agg: dict[str, int] = {}
    for n in live:
        for k, v in sorted(n.apps[0].core.stats.items()):
            agg[k] = agg.get(k, 0) + v
    report["app"] = {**cluster.app_stats, "live_nodes": agg}
    if cluster.etcd is not None:
        report["etcd"] = {"writes": cluster.etcd.writes, "rejected_unavailable": cluster.etcd.rejected_unavailable}
    report["violations"] = check_app_invariants(report, fencing=fencing)
    return report


def followup_report(cluster: AppCluster, *, grace_s: float = 15.0) -> dict:
    """Notifications and chained runs against what the runs' records say
    (``node/run/followups.py``), over every live node's records.

    - ``notify_missing``: a run of a task with ``notify`` targets whose
      final record was written more than ``grace_s`` before the end and
      whose notification never reached the receiver;
    - ``notify_duplicates``: notifications delivered more than once, and
      ``notify_duplicates_unexplained``: those where no sender died within
      ``notify_latency_s`` after delivering it (rule 2's window);
    - ``chain_missing``: an upstream run (ended as its downstream's ``on``
      asks, more than ``grace_s`` before the end) whose downstream never
      fired at its slot; ``chain_duplicates``: downstream slots fired more
      than once.
    """
    end_epoch = EPOCH_BASE + cluster.loop.now_s
    tasks = {d["id"]: Task.from_dict(d) for d in cluster.tasks_applied}
    finals: dict[tuple[str, str], dict] = {}
    for n in cluster.nodes:
        if not (n.up and n.apps):
            continue
        st = n.apps[0].store
        for tid in st.run_tasks():
            for rec in st.runs(tid):
                if rec.get("status") in ("pending", "running", "cancelled", "skipped"):
                    continue
                key = (tid, rec["run_id"])
                old = finals.get(key)
                if old is None or len(old.get("notify") or {}) < len(rec.get("notify") or {}):
                    finals[key] = rec
    delivered: dict[tuple[str, str], list[tuple]] = {}
    for x in cluster.notifications:
        if x[1] is not None:
            delivered.setdefault((x[0], x[1]), []).append(x)
    lat = cluster.app_options.notify_latency_s
    missing, dup, unexplained, expected = [], 0, [], 0
    for (tid, rid), rec in sorted(finals.items()):
        t = tasks.get(tid)
        if t is None or not t.notify:
            continue
        subs = set().union(*(set(x["on"]) for x in t.notify))
        if rec["status"] == "succeeded" and not subs & {"success", "recovery"}:
            continue
        if rec["status"] == "lost" and "lost" not in subs:
            continue
        if rec["status"] in ("failed", "timeout", "error") and "failure" not in subs:
            continue
        if (rec.get("finished") or end_epoch) > end_epoch - grace_s:
            continue
        expected += 1
        got = delivered.get((tid, rid), [])
        if not got:
            missing.append([tid, rid, rec.get("notify")])
        elif len(got) > 1:
            dup += len(got) - 1
            for x in got[:-1]:
                down = cluster.downs.down.get((x[4], x[5]))
                if down is None or not x[6] <= down <= x[6] + lat:
                    unexplained.append([tid, rid, x[4], x[6]])
    # chains
    fires: dict[tuple[str, int], int] = {}
    for tid, slot, _node, _boots, _t, _tok, reason in cluster.ledger:
        if reason == "chain":
            fires[(tid, slot)] = fires.get((tid, slot), 0) + 1
    from node.run.followups import chain_matches
    chain_expected, chain_missing = 0, []
    ups: dict[str, set[int]] = {}
    for (tid, rid), rec in finals.items():
        ups.setdefault(tid, set())
        if rec["status"] in ("succeeded", "failed", "timeout", "error") \
                and (rec.get("finished") or end_epoch) <= end_epoch - grace_s:
            ups[tid].add((rec["slot"], rec["status"]))
    for d, t in sorted(tasks.items()):
        if not t.after:
            continue
        for slot, status in sorted(ups.get(t.after["task"], ())):
            if not chain_matches(t.after["on"], status):
                continue
            chain_expected += 1
            if fires.get((d, slot), 0) == 0:
                chain_missing.append([d, slot])
    chain_dups = sorted([d, s, n] for (d, s), n in fires.items() if n > 1)
    return {
        "notify_expected": expected, "notify_missing": len(missing), "notify_missing_examples": missing[:5],
        "notify_duplicates": dup, "notify_duplicates_unexplained": unexplained[:5],
        "notifications": len(cluster.notifications),
        "chain_expected": chain_expected, "chain_missing": len(chain_missing),
        "chain_missing_examples": chain_missing[:5], "chain_duplicates": chain_dups[:5],
    }


def shard_report(cluster: AppCluster) -> dict:
    """Broadcast tasks with ``target: {mode: count, count: N}`` (node/ownership/shards.py):
    every due slot of the window fired once on each of its N shards.
    ``shard_missed``: (task, slot, shard) never fired; ``shard_duplicates``:
    fired more than once other than a documented rerun of a lost run."""
    start_s, end_s = cluster.window_s
    fires: dict[tuple[str, int, int], list[str]] = {}
    for unit, slot, _node, _boots, _t, _tok, reason in cluster.ledger:
        tid, sep, idx = unit.rpartition("#")
        if sep and idx.isdigit():
            fires.setdefault((tid, int(slot), int(idx)), []).append(reason)
    missed, dups, due_n = [], [], 0
    for d in cluster.tasks_applied:
        tgt = d.get("target") or {}
        step = _every_s(d.get("schedule") or "")
        if tgt.get("mode") != "count" or step is None:
            continue
        s = math.ceil((EPOCH_BASE + start_s) / step) * step
        while s <= EPOCH_BASE + end_s:
            for i in range(int(tgt["count"])):
                due_n += 1
                got = fires.get((d["id"], int(s), i), [])
                if not got:
                    missed.append([d["id"], int(s), i])
                elif len([r for r in got if r != "rerun_owner_loss"]) > 1:
                    dups.append([d["id"], int(s), i, got])
            s += step
    return {"shard_slots_due": due_n, "shard_missed": len(missed), "shard_missed_examples": missed[:5],
            "shard_duplicates": len(dups), "shard_duplicate_examples": dups[:5]}


def simulate_app(*, nodes: int, duration_s: float, seed: int, scenario: str = "steady",
                 tasks: list[dict] | int = 5, fencing: bool = False, loss: float | None = None,
                 etcd_outages: list[tuple[float, float]] = (), app_options: AppOptions | None = None,
                 profile: str = "lan", start_s: float = 10.0, catchup_margin_s: float = 10.0,
                 schedule=None, expect_no_missed: bool = False, **cluster_kw) -> tuple[dict, AppCluster]:
    """Run ``scenario`` with the scheduler app on every node (see
    :func:`build_app_cluster` for the task write and the due window).

    Args:
        tasks: task dicts, or a count for :func:`default_tasks`.
        fencing: use a shared ``EtcdModel`` (with ``etcd_outages``).
        schedule: explicit faults instead of ``scenario``.
        cluster_kw: other ``ClusterOptions`` fields.
    Returns:
        ``(report, cluster)``: the cluster's report with ``slots_due``,
        ``slots_fired``, ``duplicate_fires``, ``missed_slots`` filled, plus
        ``fencing``, ``ledger_hash``, ``replicas_equal``, ``lost_tasks``,
        ``app`` counters and ``violations`` (invariant failures).
    """
    from gossip.config import Config
    from sim import scenarios as _sc
    config = Config.lan() if profile == "lan" else Config.local()
    net = cluster_kw.pop("network", None) or NetworkOptions()
    offset = cluster_kw.pop("clock_offset_max_s", 0.05)
    opts = ClusterOptions(nodes=nodes, seed=seed, network=net, **cluster_kw)
    if schedule is None:
        schedule = _sc.build(scenario, node_names(nodes), duration_s, child_rng(seed, "scenario"), loss=loss)
    cluster = build_app_cluster(config, opts, schedule, duration_s=duration_s, tasks=tasks, fencing=fencing,
                                etcd_outages=etcd_outages, app_options=app_options,
                                catchup_margin_s=catchup_margin_s, start_s=start_s,
                                clock_offset_max_s=offset, expect_no_missed=expect_no_missed)
    report = cluster.run(duration_s)
    report["scenario"] = scenario
    return app_report(cluster, report), cluster
