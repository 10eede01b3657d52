"""End to end: no slot lost across a takeover or an etcd outage, with three
real ``peerd`` processes on loopback.

The task is the one an operator would write first::

    id: tick
    schedule: "@every 1s"
    misfire: run_all
    catchup_window: 60s
    command: {type: shell, run: 'echo "$PEERD_SLOT ..." >> ledger'}

(``overlap`` is left at its default, ``forbid``.) The owner is SIGKILLed
after about 12 s; with ``--etcd``, etcd itself is then SIGKILLed for 6 s and
restarted. The ledger the task writes must hold every slot from the first to
the end exactly once: the slots missed while the death went unnoticed and
while etcd was down are caught up by ``run_all``, one at a time. A slot may
appear twice only if the killed owner's run of it was unfinished (its record
``lost``): ``on_owner_loss: rerun`` runs it again, by design; with fencing
that second run carries a greater token. Tokens grow with the slot.

The kill is sent once the owner's last run is replicated as ``succeeded``,
so the killed node rarely leaves a run unfinished. Waiting is always on a
condition with a deadline; the only "time must pass" steps are the scenario's
own (12 s of steady firing, the 6 s outage).
"""
from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest

from tests.cluster_util import Cluster, api, wait_converged, wait_for
from tests.etcd_server import etcd_server  # noqa: F401  (module-scoped fixture)

TASK = "tick"
STARTUP_TIMEOUT_S = 90
FIRE_TIMEOUT_S = 60
#: memberlist LAN timers: the owner's death is noticed ~4 s after the kill
PROFILE = "lan"


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _task(ledger) -> dict:
    return {
        "id": TASK,
        "schedule": "@every 1s",
        "misfire": "run_all",
        "catchup_window": "60s",
        "command": {"type": "shell",
                    "run": f'echo "$PEERD_SLOT $PEERD_RUN_ID $PEERD_ATTEMPT ${{PEERD_FENCING_TOKEN:--}} '
                           f'$PEERD_NODE" >> {ledger}'},
    }


def _ledger(path) -> list[tuple[int, str, str, str, str]]:
    """(slot, run id, attempt, token, node) of every complete line."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().split("\n")[:-1]:
        slot, run_id, attempt, token, node = raw.split(" ")
        out.append((_epoch(slot), run_id, attempt, token, node))
    return out


def _runs(cluster, names) -> list[dict]:
    recs = {}
    for p in cluster.procs:
        if p.name in names and p.alive():
            st, runs = api(p.api_addr, "GET", f"/v1/tasks/{TASK}/runs")
            if st == 200:
                recs.update({r["run_id"]: r for r in runs})
    return list(recs.values())


def _scenario(tmp_path, etcd=None) -> None:
    ledger = tmp_path / "ledger.txt"
    extra = []
    if etcd is not None:
        extra = ["--etcd", etcd.url, "--etcd-prefix", f"/peerd-slots-{time.time_ns()}"]
    cluster = Cluster(tmp_path, 3, profile=PROFILE, extra_args=extra)
    cluster.start()
    procs = {p.name: p for p in cluster.procs}
    try:
        wait_converged(cluster, STARTUP_TIMEOUT_S)
        a = cluster.procs[0]
        st, body = api(a.api_addr, "PUT", "/v1/tasks", [_task(ledger)])
        assert st == 200, body
        wait_for(lambda: len(_ledger(ledger)) >= 1, timeout=FIRE_TIMEOUT_S, what="a first fire", cluster=cluster)
        first = min(s for s, *_ in _ledger(ledger))
        st, o = api(a.api_addr, "GET", f"/v1/owner/{TASK}")
        owner = o["owner"]
        victim = procs[owner]
        others = {n for n in procs if n != owner}

        # ~12 s of steady firing, then the owner's last run replicated as
        # succeeded, then SIGKILL
        wait_for(lambda: max(s for s, *_ in _ledger(ledger)) >= first + 12, timeout=FIRE_TIMEOUT_S,
                 what="12 s of fires", cluster=cluster)

        def last_run_replicated():
            lines = _ledger(ledger)
            slot = lines[-1][0]
            return any(r["slot"] == slot and r["status"] == "succeeded" for r in _runs(cluster, others))

        wait_for(last_run_replicated, timeout=FIRE_TIMEOUT_S, what="the owner's last run replicated",
                 cluster=cluster, interval=0.02)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(timeout=10)
        kill_slot = int(time.time())

        # a survivor takes over and fires slots after the kill
        wait_for(lambda: any(s > kill_slot + 2 and n != owner for s, *_, n in _ledger(ledger)),
                 timeout=FIRE_TIMEOUT_S, what="a survivor fires after the takeover", cluster=cluster)
        if etcd is not None:
            etcd.kill()
            down_from = time.time()
            wait_for(lambda: time.time() >= down_from + 6.0, timeout=12, what="6 s of etcd outage")
            etcd.restart()
        end = int(time.time()) + 5
        wait_for(lambda: max(s for s, *_ in _ledger(ledger)) >= end, timeout=FIRE_TIMEOUT_S,
                 what="5 fires after the last fault", cluster=cluster)

        def missing():
            have = {s for s, *_ in _ledger(ledger)}
            return [s for s in range(first, end + 1) if s not in have]

        try:
            wait_for(lambda: not missing(), timeout=75, what="every slot in the ledger", cluster=cluster)
        except AssertionError:
            pytest.fail(f"slots missed: {missing()}\nledger: {_ledger(ledger)}\n{cluster.logs()}")
        runs = _runs(cluster, others)
    finally:
        cluster.stop()
    lines = _ledger(ledger)
    counts: dict[int, int] = {}
    for s, *_ in lines:
        counts[s] = counts.get(s, 0) + 1
    lost = {r["slot"] for r in runs if r["status"] == "lost" and r["node"] == owner}
    twice = sorted(s for s, n in counts.items() if n > 1)
    assert set(twice) <= lost, f"slots run twice without a lost run: {sorted(set(twice) - lost)} {lines}"
    assert all(counts[s] <= 2 for s in twice), lines
    if etcd is not None:
        assert all(t != "-" for _, _, _, t, _ in lines), f"a fire without a token: {lines}"
        by_slot = sorted(lines, key=lambda x: (x[0], int(x[3])))
        tokens = [int(t) for _, _, _, t, _ in by_slot]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), \
            f"tokens not strictly increasing with the slot: {by_slot}"


def test_takeover_loses_no_slot(tmp_path):
    _scenario(tmp_path)


@pytest.fixture
def etcd(etcd_server):  # noqa: F811
    etcd_server.start()
    yield etcd_server
    etcd_server.start()


def test_takeover_and_etcd_outage_lose_no_slot(etcd, tmp_path):
    _scenario(tmp_path, etcd)
