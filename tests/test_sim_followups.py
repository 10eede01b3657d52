"""Notifications and chained runs across owner deaths in the simulator
(the daemon's node core; sim/followup_bench.py runs the same over 200
seeds per scenario)."""
from __future__ import annotations

import pytest

from sim.followup_bench import run_one


@pytest.mark.parametrize("scenario", ["crash", "churn", "partition"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_run_notified_and_chained_once_with_fencing(scenario, seed):
    fr = run_one(scenario, seed, fencing=True)
    assert fr["violations"] == [], (f"replay: python -m sim.followup_bench --scenarios {scenario} "
                                    f"--first-seed {seed} --seeds 1")
    assert fr["notify_expected"] > 20 and fr["chain_expected"] > 10
    if scenario == "crash":
        assert fr["notify_duplicates"] == 0


def test_without_fencing_nothing_is_missed():
    fr = run_one("crash", 3, fencing=False)
    assert fr["notify_missing"] == 0 and fr["chain_missing"] == 0


@pytest.mark.parametrize("scenario", ["crash", "churn", "partition"])
def test_every_shard_of_every_slot_fires_once_with_fencing(scenario):
    from sim.app_run import shard_report, simulate_app

    tasks = [{"id": "bc", "schedule": "@every 2s", "command": {"type": "exec", "argv": ["true"]},
              "misfire": "run_all", "overlap": "allow", "catchup_window": "60s",
              "target": {"mode": "count", "count": 3}}]
    for seed in (0, 1):
        rep, cl = simulate_app(nodes=5, duration_s=90, seed=seed, scenario=scenario, tasks=tasks, fencing=True)
        sr = shard_report(cl)
        assert sr["shard_slots_due"] > 90
        assert sr["shard_missed"] == 0 and sr["shard_duplicates"] == 0, (seed, sr)
        assert rep["violations"] == [], (seed, rep["violations"])
