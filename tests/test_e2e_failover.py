"""Failover and durability with real processes.

- An every-second task keeps firing once per slot after its owner is killed
  with SIGKILL: the new owner catches up the missed slots by the task's
  misfire policy (run_all), no slot is lost.
- A restarted node keeps its tasks and run records (SQLite); a node whose
  data dir was deleted refills from its peers.
"""
from __future__ import annotations

import shutil
import signal
import textwrap
import time

import pytest

from tests.cluster_util import alive_names as _alive, api, running_cluster, wait_for


def _ledger(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path, 3) as c:
        yield c


def test_every_second_task_survives_owner_kill(cluster, tmp_path):
    procs = {p.name: p for p in cluster.procs}
    for p in cluster.procs:
        wait_for(lambda p=p: len(_alive(p.api_addr)) == 3, timeout=60, what="3 alive", cluster=cluster)
    ledger = tmp_path / "ledger.txt"
    a = cluster.procs[0]
    st, body = api(a.api_addr, "PUT", "/v1/tasks", [{
        "id": "tick",
        "schedule": "@every 1s",
        "misfire": "run_all",
        "catchup_window": "60s",
        "overlap": "allow",
        "timeout": "10s",
        "command": {"type": "shell", "run": f'echo "$PEERD_TASK_ID $PEERD_SLOT $PEERD_NODE" >> {ledger}'},
    }])
    assert st == 200, body
    wait_for(lambda: len(_ledger(ledger)) >= 4, timeout=30, what="4 fires", cluster=cluster)
    st, o = api(a.api_addr, "GET", "/v1/owner/tick")
    owner = o["owner"]
    victim = procs[owner]
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(timeout=10)
    kill_wall = time.time()
    survivor = next(p for p in cluster.procs if p.name != owner)

    def new_owner_fired_after_kill():
        rows = _ledger(ledger)
        return [r for r in rows if r[2] != owner and _epoch(r[1]) >= kill_wall + 5]

    wait_for(new_owner_fired_after_kill, timeout=60, what="the new owner fires 5s past the kill", cluster=cluster)
    rows = _ledger(ledger)
    slots = [_epoch(r[1]) for r in rows]
    first, last = min(slots), max(slots)
    missing = sorted(set(range(first, last + 1)) - set(slots))
    assert not missing, f"slots lost: {missing}\n" + cluster.logs()
    dupes = sorted({s for s in slots if slots.count(s) > 1})
    # Without etcd, a slot fired by the victim just before SIGKILL whose
    # last-fired update had not left the process may fire again on the new
    # owner (the window is the push latency). That is the documented limit
    # of hashing without fencing; nothing else may repeat.
    assert all(abs(s - kill_wall) <= 3 for s in dupes), f"duplicate slots away from the kill: {dupes}"
    assert len(dupes) <= 1, dupes
    st, o2 = api(survivor.api_addr, "GET", "/v1/owner/tick")
    assert o2["owner"] != owner and owner not in o2["replicas"]


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def test_restart_keeps_state_and_wiped_node_refills(cluster, tmp_path):
    for p in cluster.procs:
        wait_for(lambda p=p: len(_alive(p.api_addr)) == 3, timeout=60, what="3 alive", cluster=cluster)
    a, b, c = cluster.procs
    tasks = [
        {"id": f"keep-{i}", "schedule": "0 4 * * *", "command": {"type": "exec", "argv": ["true"]}}
        for i in range(20)
    ]
    st, _ = api(a.api_addr, "PUT", "/v1/tasks", tasks)
    assert st == 200
    ids = {t["id"] for t in tasks}

    def has_all(p):
        st, ts = api(p.api_addr, "GET", "/v1/tasks")
        return st == 200 and {t["id"] for t in ts} == ids

    for p in cluster.procs:
        wait_for(lambda p=p: has_all(p), timeout=30, what=f"{p.name} has all tasks", cluster=cluster)
    # run one so there is a run record to keep
    st, r = api(a.api_addr, "POST", "/v1/tasks/keep-0/run")
    assert st == 200, r

    def done_everywhere():
        for p in cluster.procs:
            st, runs = api(p.api_addr, "GET", "/v1/tasks/keep-0/runs")
            if st != 200 or not any(x["status"] == "succeeded" for x in runs):
                return False
        return True

    wait_for(done_everywhere, timeout=30, what="run record on all 3 replicas", cluster=cluster)

    # 1. restart c with its data dir: everything is there before it hears a peer
    c.popen.send_signal(signal.SIGTERM)
    assert c.popen.wait(timeout=30) == 0
    c.args = [x for x in c.args]
    seeds_i = c.args.index("--seeds")
    c.args[seeds_i + 1] = "127.0.0.1:1"  # nobody there: state must come from disk
    c.start()
    wait_for(lambda: has_all(c), timeout=30, what="restarted node has its tasks from disk", cluster=cluster)
    st, runs = api(c.api_addr, "GET", "/v1/tasks/keep-0/runs")
    assert st == 200 and any(x["status"] == "succeeded" for x in runs)

    # 2. wipe b's data dir: it refills from its peers
    b.popen.send_signal(signal.SIGKILL)
    b.popen.wait(timeout=10)
    shutil.rmtree(b.data_dir)
    b.start()
    wait_for(lambda: has_all(b), timeout=60, what="wiped node refilled from peers", cluster=cluster)
