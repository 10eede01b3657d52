"""End to end: exactly-once triggers with etcd fencing tokens.

Three real ``peerd`` processes on loopback, started with ``--etcd`` against a
real etcd (``tests/etcd_server.py``), run an every-second task (``misfire:
run_all``, ``overlap: allow``) whose shell command appends
``task|slot|token|run_id|node`` to a ledger file. Over the run the task's
owner is killed with SIGKILL, and later etcd is stopped for ``OUTAGE_S`` and
restarted on the same data dir. The ledger must show:

- no slot twice (etcd claims: one winner per slot, even when the new owner
  re-offers a slot the dead one fired but whose advance it never heard of);
- every line carries a fencing token (``on_unavailable = skip``: nothing
  fires without a token while etcd is down; no slot after the stop fired
  before etcd came back);
- tokens unique, and strictly increasing with slot order, also inside the
  bursts where many slots are claimed at once (the catch-up after the
  takeover, the backlog retried when etcd returns);
- every slot from the first to the end is present, except slots inside the
  etcd outage (plus a margin): the slots missed while the owner's death went
  unnoticed are caught up by ``run_all`` (their lines appear late);
- the token a run saw is the one in its replicated run record.

Without ``--etcd`` the same ledger has empty tokens: nothing changes.

An owner killed mid-run: the new owner must reclaim the slot (greater token,
once) and rerun it (``on_owner_loss: rerun``). An owner only *declared* dead
(SIGSTOP until its peers see it dead, then SIGCONT) keeps its etcd session,
so its slot is not reclaimed and runs once.

Notes. The cluster uses the ``lan`` gossip profile so that the death is
noticed seconds after the kill (``local`` notices within one slot and no
catch-up happens). The kill is sent right after one of the owner's lines
lands, i.e. between slots: ``on_owner_loss: skip`` keeps "no slot twice" a
hard invariant there. Waiting is on ledger conditions with deadlines (``wait_for``); the
only "time must pass" step is the etcd outage itself (scenario time).
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from datetime import datetime

import pytest

from tests.cluster_util import Cluster, alive_names as _alive, api, wait_converged, wait_for
from tests.etcd_server import etcd_server  # noqa: F401  (module-scoped fixture)

TASK = "fence-tick"
#: How long etcd stays down (scenario time, not a wait for a condition).
OUTAGE_S = 4.0
#: Slots this close to the outage may be missing (skip: they may not fire).
OUTAGE_MARGIN_S = 2
#: Generous: the machine has 2 cores and other jobs run tests.
STARTUP_TIMEOUT_S = 90
FIRE_TIMEOUT_S = 60
#: memberlist's LAN timers (probe 1 s, suspicion ~4 s): the death of the
#: owner is noticed a few seconds after the kill, so a few slots are missed
#: and must be caught up (with "local" timers it is noticed within a slot).
PROFILE = "lan"


@dataclass(frozen=True)
class Line:
    task: str
    slot: int
    token: str
    run_id: str
    node: str


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _ledger(path) -> list[Line]:
    """Parse complete ledger lines (a line being written is ignored)."""
    if not path.exists():
        return []
    text = path.read_text()
    out = []
    for raw in text.split("\n")[:-1]:  # the last piece has no newline yet
        parts = raw.split("|")
        assert len(parts) == 5, f"malformed ledger line {raw!r}"
        out.append(Line(parts[0], _epoch(parts[1]), parts[2], parts[3], parts[4]))
    return out


def _task(ledger) -> dict:
    return {
        "id": TASK,
        "schedule": "@every 1s",
        "misfire": "run_all",
        # wide enough that a slow failover on a loaded machine is caught up
        "catchup_window": "60s",
        "overlap": "allow",
        # a run whose record was still "running" when its node was killed is
        # not rerun: the ledger's "no slot twice" stays a hard invariant
        "on_owner_loss": "skip",
        "timeout": "10s",
        "command": {
            "type": "shell",
            "run": f'echo "$PEERD_TASK_ID|$PEERD_SLOT|$PEERD_FENCING_TOKEN|$PEERD_RUN_ID|$PEERD_NODE" >> {ledger}',
        },
    }


def _slots(lines) -> set[int]:
    return {ln.slot for ln in lines}


def _dupes(lines) -> list[int]:
    seen: dict[int, int] = {}
    for ln in lines:
        seen[ln.slot] = seen.get(ln.slot, 0) + 1
    return sorted(s for s, n in seen.items() if n > 1)


def _start_cluster(tmp_path, n, extra_args=None, profile="local") -> Cluster:
    """Started and converged; the caller stops it (``cluster.stop()``)."""
    c = Cluster(tmp_path, n, profile=profile, extra_args=extra_args)
    c.start()
    try:
        wait_converged(c, STARTUP_TIMEOUT_S)
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture
def etcd(etcd_server):  # noqa: F811
    etcd_server.start()  # no-op when running; heals a test that stopped it
    yield etcd_server
    etcd_server.start()


def test_fencing_tokens_survive_owner_kill_and_etcd_outage(etcd, tmp_path):
    ledger = tmp_path / "ledger.txt"
    prefix = f"/peerd-e2e-{time.time_ns()}"
    cluster = _start_cluster(tmp_path, 3, ["--etcd", etcd.url, "--etcd-prefix", prefix,
                                                 "--fencing-on-unavailable", "skip"],
                             profile=PROFILE)
    procs = {p.name: p for p in cluster.procs}
    try:
        a = cluster.procs[0]
        st, body = api(a.api_addr, "PUT", "/v1/tasks", [_task(ledger)])
        assert st == 200, body

        # 1. steady firing
        wait_for(lambda: len(_ledger(ledger)) >= 4, timeout=FIRE_TIMEOUT_S, what="4 fires", cluster=cluster)
        first_slot = min(_slots(_ledger(ledger)))
        st, o = api(a.api_addr, "GET", f"/v1/owner/{TASK}")
        assert st == 200 and o["owner"] in procs, o
        owner = o["owner"]
        victim = procs[owner]
        survivors = [p for p in cluster.procs if p.name != owner]

        # 2. SIGKILL the owner just after one of its fires landed, so the
        #    kill falls between slots (see the module notes)
        n0 = len(_ledger(ledger))
        wait_for(lambda: len(_ledger(ledger)) > n0, timeout=FIRE_TIMEOUT_S, what="one more fire", cluster=cluster,
                 interval=0.01)
        assert _ledger(ledger)[-1].node == owner, _fmt(_ledger(ledger))
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(timeout=10)
        kill_wall = time.time()

        # 3. the others take over and fire again, well past the kill
        def new_owner_fired(after: float):
            return [ln for ln in _ledger(ledger) if ln.node != owner and ln.slot >= after]

        # when the first survivor line shows up, the catch-up burst is issued
        takeover_wall = wait_for(lambda: new_owner_fired(0) and time.time(), timeout=FIRE_TIMEOUT_S,
                                 what="a survivor fires", cluster=cluster, interval=0.05)
        # ... and fires on time for a couple of slots (failover over)
        steady_after = max(kill_wall + 3, takeover_wall + 2)
        wait_for(lambda: new_owner_fired(steady_after), timeout=FIRE_TIMEOUT_S,
                 what="a survivor fires steadily after the takeover", cluster=cluster)
        new_owner = new_owner_fired(steady_after)[0].node
        assert new_owner in {p.name for p in survivors}

        # 4. etcd outage: stopped for OUTAGE_S seconds (scenario time), then
        #    restarted on the same data dir
        outage_start = time.time()
        etcd.stop()
        stopped_wall = time.time()  # SIGTERM answered: no claim succeeds from here
        wait_for(lambda: time.time() >= outage_start + OUTAGE_S, timeout=OUTAGE_S + 5, what="the outage to last")
        lines_in_outage = _ledger(ledger)
        etcd.start()
        outage_end = time.time()

        # 5. it runs a few more seconds: slots past the outage keep firing
        end_slot = int(outage_end) + 5
        wait_for(lambda: max(_slots(_ledger(ledger))) >= end_slot, timeout=FIRE_TIMEOUT_S,
                 what="5 fires past the etcd restart", cluster=cluster)

        # every slot outside the outage (+ margin) is there, catch-ups included
        excused = set(range(int(outage_start) - OUTAGE_MARGIN_S, int(outage_end) + OUTAGE_MARGIN_S + 1))
        expected = set(range(first_slot, end_slot + 1)) - excused

        def missing():
            return sorted(expected - _slots(_ledger(ledger)))

        try:
            wait_for(lambda: not missing(), timeout=30, what="every slot outside the outage")
        except AssertionError:
            pytest.fail(f"slots lost (kill at {kill_wall:.1f}, outage {outage_start:.1f}-{outage_end:.1f}): "
                        f"{missing()}\n{_fmt(_ledger(ledger))}\n{cluster.logs()}")

        # run records: the token a run saw is the one replicated in its record
        recs = {}
        for p in survivors:
            st, runs = api(p.api_addr, "GET", f"/v1/tasks/{TASK}/runs")
            if st == 200:
                recs.update({r["run_id"]: r for r in runs})
        checked = 0
        for ln in _ledger(ledger):
            r = recs.get(ln.run_id)
            if r is not None and r.get("fencing_token") is not None:
                assert str(r["fencing_token"]) == ln.token, (ln, r)
                checked += 1
        assert checked >= 3, f"only {checked} run records matched ledger lines"
    finally:
        cluster.stop()
        etcd.start()

    lines = _ledger(ledger)
    report = (f"(kill of {owner} at {kill_wall:.1f}, first survivor line seen {takeover_wall:.1f}, "
              f"etcd outage {outage_start:.1f}-{outage_end:.1f})\n{_fmt(lines)}")
    print(report)  # shown with -s or on failure: the timeline of this run
    assert all(ln.task == TASK for ln in lines), report
    assert not _dupes(lines), f"slots fired twice: {_dupes(lines)} {report}"
    # on_unavailable=skip: nothing fired without a token, during the outage or ever
    assert all(ln.token for ln in lines), f"lines without a fencing token {report}"
    by_slot = sorted(lines, key=lambda ln: ln.slot)
    tokens = [int(ln.token) for ln in by_slot]
    assert len(tokens) == len(set(tokens)), f"a token given twice {report}"
    # the outage really held firing back: when etcd came back, no slot after
    # its stop had fired (lines written then are for slots claimed before)
    late = [ln.slot for ln in lines_in_outage if ln.slot > int(stopped_wall) + 1]
    assert not late, f"slots {late} fired while etcd was down {report}"

    # Token order follows slot order, also inside the bursts: the catch-up
    # after the takeover and the backlog retried when etcd comes back have
    # many slots of the task in flight at once, and node.py claims them one
    # at a time in slot order (``_claim_turn``).
    inverted = [(x.slot, int(x.token), y.slot, int(y.token)) for x, y in zip(by_slot, by_slot[1:])
                if int(y.token) <= int(x.token)]
    assert not inverted, f"tokens not increasing with slot order (slot, token, slot, token): {inverted} {report}"

    # the scenario did exercise the catch-up: slots of the failover were
    # fired by the new owner after their time (lines written late)
    late_caught_up = [ln.slot for ln in lines if ln.node != owner and ln.slot < int(takeover_wall) - 1]
    assert late_caught_up, f"no slot was caught up after the kill; the failover path was not exercised {report}"


def _fmt(lines) -> str:
    """The ledger by slot; ``@k`` is the line's position in the file (a
    caught-up slot is written after later slots)."""
    pos = {id(ln): i for i, ln in enumerate(lines)}
    return "ledger:\n" + "\n".join(f"  {ln.slot} tok={ln.token or '-'} {ln.node} @{pos[id(ln)]} {ln.run_id}"
                                   for ln in sorted(lines, key=lambda ln: ln.slot))


def test_without_etcd_tokens_are_empty(tmp_path):
    ledger = tmp_path / "ledger.txt"
    cluster = _start_cluster(tmp_path, 1)
    try:
        a = cluster.procs[0]
        st, body = api(a.api_addr, "PUT", "/v1/tasks", [_task(ledger)])
        assert st == 200, body
        wait_for(lambda: len(_ledger(ledger)) >= 3, timeout=FIRE_TIMEOUT_S, what="3 fires", cluster=cluster)
        st, status = api(a.api_addr, "GET", "/v1/status")
        assert st == 200 and status["fencing"] is False, status
        st, runs = api(a.api_addr, "GET", f"/v1/tasks/{TASK}/runs")
        assert st == 200 and runs
        assert all(r["fencing_token"] is None for r in runs), runs
    finally:
        cluster.stop()
    lines = _ledger(ledger)
    assert len(lines) >= 3
    assert all(ln.token == "" for ln in lines), _fmt(lines)
    assert not _dupes(lines), _fmt(lines)


def _start_long_run(cluster, ledger, tid: str, sleep_s: int, *, all_replicas: bool):
    """Put a task whose run writes a ledger line then sleeps, run it now,
    wait until it started and the replicas (all, or at least one) hold its
    'running' record. Returns (owner name, other procs, slot)."""
    line = f'echo "$PEERD_TASK_ID|$PEERD_SLOT|$PEERD_FENCING_TOKEN|$PEERD_RUN_ID|$PEERD_NODE" >> {ledger}'
    a = cluster.procs[0]
    st, body = api(a.api_addr, "PUT", "/v1/tasks", [{
        "id": tid, "schedule": "@every 3600s", "misfire": "skip", "on_owner_loss": "rerun",
        "timeout": "60s", "command": {"type": "shell", "run": f"{line}; sleep {sleep_s}"},
    }])
    assert st == 200, body
    wait_for(lambda: api(a.api_addr, "GET", f"/v1/owner/{tid}")[1]["owner"], timeout=30,
             what="an owner", cluster=cluster)
    owner = api(a.api_addr, "GET", f"/v1/owner/{tid}")[1]["owner"]
    others = [p for p in cluster.procs if p.name != owner]
    st, r = api(a.api_addr, "POST", f"/v1/tasks/{tid}/run")
    assert st == 200, r
    slot = r["slot"]

    def sees_running(p):
        st, runs = api(p.api_addr, "GET", f"/v1/tasks/{tid}/runs")
        return st == 200 and any(x["slot"] == slot and x["status"] == "running" for x in runs)

    agg = all if all_replicas else any
    wait_for(lambda: _ledger(ledger) and agg(sees_running(p) for p in others), timeout=30,
             what="the run started and the replicas hold its 'running' record", cluster=cluster)
    return owner, others, slot


def test_owner_killed_mid_run_slot_is_reclaimed_and_rerun(etcd, tmp_path):
    """A claimed slot whose claimer dies before the run finished is
    re-claimed once per death, with a greater token, and rerun by
    ``on_owner_loss: rerun``. (Slow: its own 3-node cluster.)"""
    ledger = tmp_path / "ledger.txt"
    prefix = f"/peerd-e2e-{time.time_ns()}"
    cluster = _start_cluster(tmp_path, 3, ["--etcd", etcd.url, "--etcd-prefix", prefix,
                                                "--fencing-session-ttl-s", "3"], profile=PROFILE)
    procs = {p.name: p for p in cluster.procs}
    try:
        owner, others, slot = _start_long_run(cluster, ledger, "fence-long", 6, all_replicas=False)
        procs[owner].popen.send_signal(signal.SIGKILL)
        procs[owner].popen.wait(timeout=10)

        def rerun():
            return [ln for ln in _ledger(ledger) if ln.slot == slot and ln.node != owner]

        wait_for(rerun, timeout=30, what="the new owner reclaims and reruns the slot", cluster=cluster)
        first = [ln for ln in _ledger(ledger) if ln.slot == slot and ln.node == owner]
        again = rerun()
        assert len(first) == 1 and len(again) == 1, _fmt(_ledger(ledger))  # once per death
        assert int(again[0].token) > int(first[0].token), _fmt(_ledger(ledger))
    finally:
        cluster.stop()


def _claims_counter(addr: str, result: str) -> float:
    import urllib.request
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'peerd_fencing_claims_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_false_death_is_not_reclaimed_while_the_owner_lives(etcd, tmp_path):
    """Rule 8 of node/fencing/rules.py: the owner is stopped (SIGSTOP) until its
    peers declare it dead, then resumed. Its etcd session outlives the stop,
    so the peers' re-claim of its running slot is refused ("claimer alive")
    and the slot runs once; before sessions it ran twice."""
    ledger = tmp_path / "ledger.txt"
    prefix = f"/peerd-e2e-{time.time_ns()}"
    # local timers: the stopped owner is declared dead within ~1-2 s, far
    # inside its session (TTL 20 s, refreshed every ~6.7 s)
    cluster = _start_cluster(tmp_path, 3, ["--etcd", etcd.url, "--etcd-prefix", prefix,
                                           "--fencing-session-ttl-s", "20"], profile="local")
    procs = {p.name: p for p in cluster.procs}
    try:
        owner, others, slot = _start_long_run(cluster, ledger, "fence-false-death", 4, all_replicas=True)
        procs[owner].popen.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: all(owner not in _alive(p.api_addr) for p in others), timeout=30,
                     what=f"the peers declare the stopped {owner} dead", cluster=cluster)
            wait_for(lambda: any("session still holds" in p.log_text() for p in others), timeout=30,
                     what="a peer tries to re-claim the slot and is told the claimer lives",
                     cluster=cluster)
        finally:
            procs[owner].popen.send_signal(signal.SIGCONT)
        # the re-claim keeps being refused while the owner's session holds; it
        # gives up after its deadline (1.5 * TTL + 2 s): wait for that verdict
        wait_for(lambda: sum(_claims_counter(p.api_addr, "lost") for p in others) >= 1, timeout=90,
                 what="the re-claim is refused (claimer alive)", cluster=cluster)
        lines = [ln for ln in _ledger(ledger) if ln.slot == slot]
        assert len(lines) == 1 and lines[0].node == owner, _fmt(_ledger(ledger))
        assert any("claimer alive" in p.log_text() for p in others), "the refusal is logged with its reason"
    finally:
        cluster.stop()
