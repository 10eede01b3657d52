"""Long chaos soak (``pytest -m slow``; not in CI): the fenced scheduler in
the simulator over many seeds of every fault scenario, with re-claims on.
The full table with unfenced figures is ``python -m sim.fire_bench``."""
from __future__ import annotations

import os

import pytest

from sim.app_run import default_tasks, simulate_app

SEEDS = int(os.environ.get("PEERD_SOAK_SEEDS", "50"))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["crash", "partition", "churn", "flaky"])
def test_fenced_soak_no_duplicate_fire(scenario):
    bad = []
    for seed in range(1000, 1000 + SEEDS):
        rep, _ = simulate_app(nodes=6, duration_s=60.0, seed=seed, scenario=scenario, fencing=True,
                              tasks=default_tasks(5, on_owner_loss="rerun"))
        if rep["duplicate_fires"] or rep["duplicate_fires_warmup"] or not rep["replicas_equal"] \
                or rep["lost_tasks"] or rep["violations"]:
            bad.append(f"{scenario} seed {seed}: dup={rep['duplicate_fires']} "
                       f"equal={rep['replicas_equal']} violations={rep['violations'][:2]}; replay: "
                       f"python -m sim.fire_bench --replay {scenario} {seed} --mode fenced")
    assert not bad, "\n".join(bad)
