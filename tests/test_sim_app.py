"""Scheduler app in the simulator: determinism, exactly-once in steady state,
fencing safety over seeds, replica convergence (sim/app.py)."""
from __future__ import annotations

import pytest

from sim.app import EPOCH_BASE, AppOptions
from sim.app_run import default_tasks, fire_metrics, simulate_app
from sim.scenarios import Fault

N = 5
DUR = 40.0


def _replay(scenario, seed, fencing, tasks=None):
    return (f"python -m sim.fire_bench --replay {scenario} {seed} --nodes {N} --duration {DUR:g}"
            f" --mode {'fenced' if fencing else 'unfenced'}")


def test_same_seed_same_ledger_different_seed_differs():
    a, ca = simulate_app(nodes=N, duration_s=DUR, seed=7, scenario="crash", fencing=True)
    b, cb = simulate_app(nodes=N, duration_s=DUR, seed=7, scenario="crash", fencing=True)
    c, _ = simulate_app(nodes=N, duration_s=DUR, seed=8, scenario="crash", fencing=True)
    assert a["fires"] > 0
    assert a["ledger_hash"] == b["ledger_hash"], "seed 7: " + _replay("crash", 7, True)
    assert ca.ledger == cb.ledger
    assert a["trace_hash"] == b["trace_hash"]
    assert a["trace_hash"] != c["trace_hash"]


@pytest.mark.parametrize("fencing", [False, True])
def test_steady_fires_every_slot_exactly_once(fencing):
    rep, cluster = simulate_app(nodes=N, duration_s=DUR, seed=3, scenario="steady", fencing=fencing)
    msg = f"seed 3: {_replay('steady', 3, fencing)}"
    assert rep["slots_due"] > 50, msg
    assert rep["missed_slots"] == 0, msg
    assert rep["slots_fired"] == rep["slots_due"], msg
    assert rep["duplicate_fires"] == 0 and rep["duplicate_fires_warmup"] == 0, msg
    assert rep["replicas_equal"] and not rep["lost_tasks"], msg
    if fencing:
        tokens = [r[5] for r in cluster.ledger]
        assert all(isinstance(t, int) for t in tokens)
        assert len(set(tokens)) == len(tokens)


def test_fencing_no_duplicates_over_seeds():
    """The claim path never lets a slot fire twice. Tasks use
    ``on_owner_loss: skip`` so the reclaim rule (which re-fires the slot of
    a claimer declared dead, even a falsely dead one) is not in play; it is
    measured by sim/fire_bench.py."""
    bad = []
    for seed in range(1, 11):
        for scenario in ("crash", "partition"):
            rep, _ = simulate_app(nodes=N, duration_s=DUR, seed=seed, scenario=scenario, fencing=True,
                                  tasks=default_tasks(5, on_owner_loss="skip"))
            if rep["duplicate_fires"] or rep["duplicate_fires_warmup"]:
                bad.append(f"seed={seed} {scenario}: {rep['duplicate_examples']}"
                           f" replay: {_replay(scenario, seed, True)} (tasks on_owner_loss=skip)")
    assert not bad, "\n".join(bad)


def test_fencing_with_reruns_no_duplicates_over_seeds():
    """``on_owner_loss: rerun`` (the default) under partitions and churn:
    re-claims wait for the dead claimer's etcd session (a falsely dead
    claimer keeps it) and name the lost run, so no slot fires twice. Pinned:
    partition seed 1 (338 such duplicates in 125 seeds before sessions) and
    churn seed 76 (re-claimed twice for one death before the run-id check).
    The full table (500+ seeds) is sim/fire_bench.py's."""
    bad = []
    runs = [("partition", seed) for seed in range(1, 7)] + [("churn", seed) for seed in (1, 2, 3, 76)]
    for scenario, seed in runs:
        rep, _ = simulate_app(nodes=6, duration_s=60.0, seed=seed, scenario=scenario, fencing=True,
                              tasks=default_tasks(5, on_owner_loss="rerun"))
        if rep["duplicate_fires"] or rep["duplicate_fires_warmup"] or rep["missed_slots"]:
            bad.append(f"{scenario} seed={seed}: dup={rep['duplicate_fires']} missed={rep['missed_slots']} "
                       f"{rep['duplicate_examples']} replay: python -m sim.fire_bench --replay "
                       f"{scenario} {seed} --mode fenced")
    assert not bad, "\n".join(bad)


def test_unfenced_partition_duplicates_and_fenced_not():
    """Sanity of the measurement: a partition makes both halves fire unfenced."""
    dup = 0
    for seed in (1, 2):
        rep, _ = simulate_app(nodes=N, duration_s=DUR, seed=seed, scenario="partition", fencing=False)
        dup += rep["duplicate_fires"]
    assert dup > 0


def test_replicas_equal_after_heal_and_no_lost_write():
    for seed in range(1, 6):
        for scenario in ("partition", "churn", "crash"):
            rep, cluster = simulate_app(nodes=N, duration_s=DUR, seed=seed, scenario=scenario, fencing=False)
            msg = f"seed={seed} {scenario}: {_replay(scenario, seed, False)}"
            assert rep["replicas_equal"], msg + f" {rep['digests']}"
            assert not rep["lost_tasks"], msg
            assert rep["nodes_running_at_end"] >= 3


def test_restart_keeps_durable_state():
    """A crashed-and-restarted node reloads its store from its disk."""
    names = [f"n{i:03d}" for i in range(N)]
    sched = [Fault(12.0, "crash", names[4]), Fault(20.0, "restart", names[4]), Fault(32.0, "heal")]
    rep, cluster = simulate_app(nodes=N, duration_s=DUR, seed=4, scenario="custom", schedule=sched,
                                fencing=True)
    app = cluster.app(names[4])
    assert app is not None and cluster.by_name[names[4]].boots == 2
    assert sorted(v.task_id for v in app.store.tasks()) == [d["id"] for d in default_tasks(5)]
    assert rep["duplicate_fires"] == 0 and rep["replicas_equal"], "seed 4 custom crash/restart"


def test_etcd_outage_misses_instead_of_duplicating():
    rep, _ = simulate_app(nodes=N, duration_s=DUR, seed=2, scenario="crash", fencing=True,
                          etcd_outages=[(15.0, 20.0)],
                          tasks=default_tasks(5, catchup_window_s=2.0, on_owner_loss="skip"))
    assert rep["duplicate_fires"] == 0
    assert rep["missed_slots"] > 0
    assert rep["etcd"]["rejected_unavailable"] > 0


def test_fire_metrics_counts():
    tasks = [{"id": "a", "schedule": "@every 1s"}]
    b = EPOCH_BASE
    ledger = [("a", int(b) + 1, "n1", 1, 1.0, None, "due"),
              ("a", int(b) + 1, "n2", 1, 1.1, None, "due"),
              ("a", int(b) + 2, "n1", 1, 2.0, None, "due"),
              ("a", int(b) + 2, "n2", 1, 5.0, None, "rerun_owner_loss")]
    m = fire_metrics(ledger, tasks, b + 1, b + 3, {("n1", 1): 3.0})
    assert m["slots_due"] == 3 and m["slots_fired"] == 2 and m["missed_slots"] == 1
    assert m["duplicate_fires"] == 1 and m["owner_loss_reruns"] == 1


def test_peersim_cli_tasks_fencing(tmp_path, capsys):
    from sim.cli import main
    out = tmp_path / "r.json"
    rc = main(["run", "--nodes", "5", "--duration", "30", "--seed", "2", "--scenario", "crash",
               "--tasks", "3", "--fencing", "--quiet", "--json", str(out)])
    import json
    rep = json.loads(out.read_text())
    assert rc == 0, rep.get("invariants_failed")
    assert rep["slots_due"] > 0 and rep["duplicate_fires"] == 0
    assert rep["slots_fired"] + rep["missed_slots"] == rep["slots_due"]
    assert "--tasks 3 --fencing" in rep["replay"]


# Seeds on which the simulator lost slots before one node core drove it and
# the daemon alike (a pending claim or a catch-up run taken for an overlap):
# crash unfenced seed 6 missed 7 slots, crash fenced seed 7 missed 12, crash
# fenced with a 6 s etcd outage seed 1 missed 15. Each must now miss none.
PINNED_RUN_ALL = [
    pytest.param(6, False, (), id="takeover-unfenced-seed6"),
    pytest.param(7, True, (), id="takeover-fenced-seed7"),
    pytest.param(1, True, ((20.0, 26.0),), id="takeover-etcd-outage-seed1"),
]


@pytest.mark.parametrize("seed,fencing,outages", PINNED_RUN_ALL)
def test_run_all_misses_nothing_across_takeover_and_etcd_outage(seed, fencing, outages):
    tasks = default_tasks(5, overlap="forbid", misfire="run_all", catchup_window_s=60)
    rep, _ = simulate_app(nodes=5, duration_s=60.0, seed=seed, scenario="crash", tasks=tasks,
                          fencing=fencing, etcd_outages=list(outages), expect_no_missed=True)
    replay = (f"python -m sim.fire_bench --replay crash {seed} --nodes 5 --duration 60 "
              f"--misfire run_all --overlap forbid{' --mode fenced' if fencing else ' --mode unfenced'}"
              f"{' --etcd-outage 20:26' if outages else ''}")
    assert rep["missed_slots"] == 0, f"{rep['missed_examples']} ({replay})"
    assert not rep["violations"], f"{rep['violations']} ({replay})"
    if fencing:
        assert rep["duplicate_fires"] == 0, replay


# Seeds on which slots waiting behind a pending claim or rerun were lost when
# ownership moved (the old owner had already handed them out as fired, then
# dropped its line): churn seeds 89 and 95 missed 15 and 8 slots, partition
# seed 5 missed 8 (6 nodes, fenced, run_all). Rule 2a of node/schedule/scheduler.py.
@pytest.mark.parametrize("scenario,seed", [("churn", 89), ("churn", 95), ("partition", 5)])
def test_waiting_slots_survive_an_ownership_move(scenario, seed):
    tasks = default_tasks(5, on_owner_loss="rerun", misfire="run_all", overlap="forbid")
    rep, _ = simulate_app(nodes=6, duration_s=60.0, seed=seed, scenario=scenario, tasks=tasks,
                          fencing=True, expect_no_missed=True)
    replay = (f"python -m sim.fire_bench --replay {scenario} {seed} --nodes 6 --duration 60 "
              f"--tasks 5 --mode fenced --misfire run_all")
    assert rep["missed_slots"] == 0, f"{rep['missed_examples']} ({replay})"
    assert rep["duplicate_fires"] == 0, replay


# A node that crashes between winning a claim and marking it started (the
# fencer's second round trip, fencing Rule 9) leaves a claim nobody ran.
# With the mark 0.3 s after the claim, crash seed 7 crashes two claimers in
# that window: both slots must be re-claimed and run once, none skipped.
def test_claims_left_unstarted_by_a_crash_are_reclaimed_and_run_once():
    tasks = default_tasks(5, overlap="allow", misfire="run_all", catchup_window_s=60)
    rep, _ = simulate_app(nodes=5, duration_s=60.0, seed=7, scenario="crash", tasks=tasks, fencing=True,
                          expect_no_missed=True, app_options=AppOptions(mark_latency_s=0.3))
    replay = "simulate_app(nodes=5, duration_s=60, seed=7, scenario='crash', fencing=True, mark_latency_s=0.3)"
    assert rep["app"]["live_nodes"]["reclaims_unstarted"] >= 1, replay
    assert rep["missed_slots"] == 0, f"{rep['missed_examples']} ({replay})"
    assert rep["duplicate_fires"] == 0 and not rep["violations"], replay


@pytest.mark.slow
def test_chaos_seed1_schedule_in_the_simulator():
    """The 30-minute 9-node chaos schedule (seed 1) in the simulator: a run
    marked lost whose runner's own end came back before its rerun's
    re-claim won was run twice (chaos-0 slot 1354) until the runner's
    outcome ranked over ``lost`` and a waiting rerun was dropped."""
    import argparse

    from sim.chaos import simulate_same
    from sim.chaos_plan import plan

    args = argparse.Namespace(nodes=9, duration=1860.0, seed=1, tasks=5, etcd=True)
    rep = simulate_same(plan(1, 9, 1860.0, True, net=True), args)
    replay = "python -m sim.chaos --nodes 9 --duration 1860 --seed 1 --tasks 5 --etcd --net netns"
    assert rep["duplicate_fires"] == 0 and rep["missed_slots"] == 0, (rep["violations"], replay)
    assert not rep["violations"], replay
