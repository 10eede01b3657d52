"""Operator features on three real ``peerd`` processes, driven by ``peerctl``:
``apply --dry-run`` / ``--prune``, ``runs cancel`` (forwarded to the node
that runs the run, which ends its process group) and manual runs with
parameters checked against the task's ``params``.

Waits are conditions with deadlines (tests/cluster_util.py).
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.cluster_util import api, peerctl, running_cluster, wait_for

FAR = "once:2099-01-01T00:00:00Z"   # a task that only runs when asked


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("ops"), 3, wait_converged_s=60) as c:
        yield c


def _owner(c, tid):
    return wait_for(lambda: api(c.procs[0].api_addr, "GET", f"/v1/owner/{tid}")[1].get("owner"),
                    timeout=30, what=f"an owner for {tid}", cluster=c)


def _proc(c, name):
    return next(p for p in c.procs if p.name == name)


def _run_with_status(c, proc, tid, status, what):
    """The first run of ``tid`` with ``status`` on ``proc``, waited for."""
    return wait_for(lambda: [x for x in api(proc.api_addr, "GET", f"/v1/tasks/{tid}/runs")[1]
                             if x["status"] == status], timeout=30, what=what, cluster=c)[0]


def _everywhere(c, tid):
    for p in c.procs:
        wait_for(lambda p=p: api(p.api_addr, "GET", f"/v1/tasks/{tid}")[0] == 200, timeout=30,
                 what=f"{p.name} has {tid}", cluster=c)


def test_apply_dry_run_and_prune(cluster, tmp_path):
    a, b, _ = cluster.procs
    f = tmp_path / "tasks.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: dr-keep
          schedule: "{FAR}"
          command: {{type: exec, argv: ["true"]}}
          timeout: 10s
        - id: dr-gone
          schedule: "{FAR}"
          command: {{type: exec, argv: ["true"]}}
    """))
    r = peerctl("tasks", "apply", "-f", str(f), node=a.api_addr)
    assert r.returncode == 0, r.stderr
    _everywhere(cluster, "dr-gone")
    f2 = tmp_path / "tasks2.yaml"
    f2.write_text(textwrap.dedent(f"""
        - id: dr-keep
          schedule: "{FAR}"
          command: {{type: exec, argv: ["true", "x"]}}
          timeout: 20s
        - id: dr-new
          schedule: "{FAR}"
          command: {{type: exec, argv: ["true"]}}
    """))
    r = peerctl("tasks", "apply", "-f", str(f2), "--dry-run", node=b.api_addr)
    assert r.returncode == 0, r.stderr
    assert "+ dr-new" in r.stdout and "~ dr-keep" in r.stdout
    assert "timeout: 10.0 -> 20.0" in r.stdout and "command.argv" in r.stdout
    assert "dr-gone" not in r.stdout                      # no --prune: left alone
    # nothing applied
    assert api(b.api_addr, "GET", "/v1/tasks/dr-new")[0] == 404
    assert api(b.api_addr, "GET", "/v1/tasks/dr-keep")[1]["task"]["timeout"] == 10.0

    r = peerctl("--json", "tasks", "apply", "-f", str(f2), "--dry-run", "--prune", node=b.api_addr)
    d = json.loads(r.stdout)
    assert d["dry_run"] is True and d["added"] == ["dr-new"] and "dr-gone" in d["removed"]
    assert [c["id"] for c in d["changed"]] == ["dr-keep"]
    assert {x["field"] for x in d["changed"][0]["fields"]} == {"timeout", "command.argv"}
    assert api(b.api_addr, "GET", "/v1/tasks/dr-gone")[0] == 200

    r = peerctl("tasks", "apply", "-f", str(f2), "--prune", node=b.api_addr)
    assert r.returncode == 0, r.stderr
    assert "deleted" in r.stdout and "dr-gone" in r.stdout
    for p in cluster.procs:
        wait_for(lambda p=p: api(p.api_addr, "GET", "/v1/tasks/dr-gone")[0] == 404, timeout=30,
                 what=f"dr-gone deleted on {p.name}", cluster=cluster)
    assert api(a.api_addr, "GET", "/v1/tasks/dr-keep")[1]["task"]["timeout"] == 20.0


def test_cancel_a_running_run_from_another_node(cluster, tmp_path):
    pidfile = tmp_path / "pid"
    f = tmp_path / "long.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: cx-long
          schedule: "{FAR}"
          command: {{type: shell, run: "echo $$ > {pidfile}; sleep 300 & wait"}}
          timeout: 10m
          retries: 2
    """))
    a = cluster.procs[0]
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "cx-long")
    owner = _owner(cluster, "cx-long")
    other = next(p for p in cluster.procs if p.name != owner)
    r = peerctl("tasks", "run", "cx-long", node=other.api_addr)
    assert r.returncode == 0, r.stderr + cluster.logs()
    op = _proc(cluster, owner)

    def running():
        rs = api(op.api_addr, "GET", "/v1/tasks/cx-long/runs")[1]
        live = [x for x in rs if x["status"] == "running"]
        return live[0] if live and pidfile.exists() and pidfile.read_text().strip() else None

    run = wait_for(running, timeout=30, what="cx-long running", cluster=cluster)
    pid = int(pidfile.read_text())
    # cancel through a node that does not run it: forwarded to the owner
    r = peerctl("runs", "cancel", run["run_id"], node=other.api_addr)
    assert r.returncode == 0, r.stderr
    assert "cancelling" in r.stdout and owner in r.stdout

    def cancelled():
        rs = api(op.api_addr, "GET", "/v1/tasks/cx-long/runs")[1]
        done = [x for x in rs if x["status"] == "cancelled"]
        return done[0] if done else None

    rec = wait_for(cancelled, timeout=30, what="the run recorded cancelled", cluster=cluster)
    assert rec["cancelled_by"] == "token api-token from 127.0.0.1"
    assert "cancelled by" in rec["error"]
    # the process group is gone, and no retry started (retries: 2)
    wait_for(lambda: not _alive(pid), timeout=30, what=f"pid {pid} gone")
    rs = api(op.api_addr, "GET", "/v1/tasks/cx-long/runs")[1]
    assert [x["status"] for x in rs] == ["cancelled"]
    # a finished run cannot be cancelled; a malformed id is a 400
    r = peerctl("runs", "cancel", run["run_id"], node=other.api_addr)
    assert r.returncode == 1 and "not running" in r.stderr
    st, body = api(other.api_addr, "POST", "/v1/runs/nonsense/cancel")
    assert st == 400 and "run id" in body["error"]
    st, _ = api(other.api_addr, "POST", f"/v1/runs/{run['run_id']}/cancel", token="wrong")
    assert st == 401


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_with_parameters(cluster, tmp_path):
    out = tmp_path / "params.out"
    f = tmp_path / "p.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: px
          schedule: "{FAR}"
          command: {{type: shell, run: 'echo "$DAY|$LEVEL|$*" >> {out}'}}
          params:
            DAY: {{required: true, description: day to process}}
            LEVEL: {{default: info}}
    """))
    a, b, c = cluster.procs
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "px")
    # refused before anything runs: a required parameter missing, an unknown one
    r = peerctl("tasks", "run", "px", node=b.api_addr)
    assert r.returncode == 1 and "DAY: required parameter not given (day to process)" in r.stderr
    r = peerctl("tasks", "run", "px", "--env", "DAY=1", "--env", "OTHER=2", node=b.api_addr)
    assert r.returncode == 1 and "OTHER: not a parameter of this task" in r.stderr
    r = peerctl("tasks", "run", "px", "--env", "nope", node=b.api_addr)
    assert r.returncode == 2 and "NAME=VALUE" in r.stderr
    r = peerctl("tasks", "run", "px", "--env", "DAY=2026-12-01", "--arg", "a b", "--arg", "$(c)",
                node=c.api_addr)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: out.exists() and out.read_text().strip(), timeout=30, what="px ran", cluster=cluster)
    assert out.read_text().strip() == "2026-12-01|info|a b $(c)"
    owner = _owner(cluster, "px")
    rs = api(_proc(cluster, owner).api_addr, "GET", "/v1/tasks/px/runs")[1]
    assert rs[-1]["params"] == {"env": {"DAY": "2026-12-01", "LEVEL": "info"}, "args": ["a b", "$(c)"]}


def test_secret_references_resolved_on_the_running_node_only(cluster, tmp_path):
    secret = tmp_path / "db-password"
    secret.write_text("s3cr3t-value\n")
    out = tmp_path / "secret.out"
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: sx
          schedule: "{FAR}"
          command: {{type: shell, run: 'echo "$DB_PASSWORD|$HOME_DIR|$PLAIN" > {out}'}}
          env:
            DB_PASSWORD: {{file: {secret}}}
            HOME_DIR: {{env: HOME}}
            PLAIN: visible
        - id: sx-missing
          schedule: "{FAR}"
          command: {{type: shell, run: "echo never"}}
          env: {{TOKEN: {{file: {tmp_path}/nope}}}}
    """))
    a, b, c = cluster.procs
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "sx-missing")
    t = api(b.api_addr, "GET", "/v1/tasks/sx")[1]["task"]
    assert t["env"] == {"DB_PASSWORD": f"<secret:file:{secret}>", "HOME_DIR": "<secret:env:HOME>",
                        "PLAIN": "visible"}
    assert peerctl("tasks", "run", "sx", node=c.api_addr).returncode == 0
    wait_for(lambda: out.exists() and out.read_text().strip(), timeout=30, what="sx ran", cluster=cluster)
    pw, home, plain = out.read_text().strip().split("|")
    assert pw == "s3cr3t-value" and home and plain == "visible"
    owner = _proc(cluster, _owner(cluster, "sx"))
    wait_for(lambda: [x["status"] for x in api(owner.api_addr, "GET", "/v1/tasks/sx/runs")[1]] == ["succeeded"],
             timeout=30, what="sx recorded", cluster=cluster)
    for p in cluster.procs:
        for path in ("/v1/tasks/sx", "/v1/tasks/sx/runs", "/v1/tasks", "/v1/tasks/sx/explain"):
            assert "s3cr3t" not in json.dumps(api(p.api_addr, "GET", path)[1])
    # a missing secret fails the run with a clear error, not the node
    assert peerctl("tasks", "run", "sx-missing", node=c.api_addr).returncode == 0
    mo = _proc(cluster, _owner(cluster, "sx-missing"))
    rec = _run_with_status(cluster, mo, "sx-missing", "error", "sx-missing failed")
    assert rec["error"].startswith("secret env.TOKEN: cannot read") and "nope" in rec["error"]


def test_peerctl_conventions(cluster, tmp_path):
    import subprocess

    import yaml

    a = cluster.procs[0]
    r = peerctl("members", "-o", "yaml", "--timeout", "20", node=a.api_addr)      # global flags after
    assert r.returncode == 0, r.stderr
    ms = yaml.safe_load(r.stdout)
    assert {m["name"] for m in ms} == {p.name for p in cluster.procs}
    r = peerctl("members", "-o", "wide", node=a.api_addr)
    assert r.returncode == 0 and "INCARNATION" in r.stdout.splitlines()[0]
    r = peerctl("-o", "json", "tasks", "ls", node=a.api_addr)
    assert isinstance(json.loads(r.stdout), list)
    r = peerctl("--version", node=a.api_addr)
    assert r.returncode == 0 and r.stdout.startswith("peerctl (peerd) ")
    r = peerctl("status", "--timeout", "0", node=a.api_addr)
    assert r.returncode == 2 and "--timeout" in r.stderr
    for shell in ("bash", "zsh", "fish"):
        r = peerctl("completion", shell, node=a.api_addr)
        assert r.returncode == 0 and "peerctl" in r.stdout and "tasks" in r.stdout
    script = tmp_path / "c.bash"
    script.write_text(peerctl("completion", "bash", node=a.api_addr).stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    check = subprocess.run(["bash", "-c", f"source {script}; COMP_WORDS=(peerctl tasks ap); COMP_CWORD=2; "
                            "_peerctl; echo ${COMPREPLY[@]}"], capture_output=True, text=True)
    assert check.stdout.split() == ["apply"]
    # an unreachable node is exit 3 with one line
    r = peerctl("status", node="127.0.0.1:1")
    assert r.returncode == 3 and r.stderr.count("\n") == 1


def test_live_output_and_output_files(cluster, tmp_path):
    import subprocess
    import sys

    gate = tmp_path / "gate"
    f = tmp_path / "live.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: lv
          schedule: "{FAR}"
          command: {{type: shell, run: 'echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second'}}
        - id: lv-file
          schedule: "{FAR}"
          command: {{type: python, target: "builtins:print", args: ["{'x' * 70}"]}}
          output: {{keep: file, max_bytes: 4096}}
    """))
    a, b, c = cluster.procs
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "lv-file")
    owner = _proc(cluster, _owner(cluster, "lv"))
    other = next(p for p in cluster.procs if p is not owner)
    assert peerctl("tasks", "run", "lv", node=other.api_addr).returncode == 0
    run = _run_with_status(cluster, owner, "lv", "running", "lv running")
    # the output so far, from a node that does not run it (forwarded)
    wait_for(lambda: "first" in peerctl("runs", "logs", run["run_id"], node=other.api_addr).stdout,
             timeout=30, what="live output", cluster=cluster)
    st, body = api(other.api_addr, "GET", f"/v1/runs/{run['run_id']}/logs?format=json&offset=2")
    assert st == 200 and body["running"] is True and body["node"] == owner.name and body["data"] == "rst\n"
    from tests.cluster_util import ROOT, TOKEN

    e = dict(os.environ, PEERCTL_NODE=other.api_addr, PEERCTL_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    follow = subprocess.Popen([sys.executable, "-m", "node.cli.peerctl", "runs", "logs", "-f", run["run_id"]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=str(ROOT))
    try:
        gate.write_text("go")
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err
    assert out == "first\nsecond\n"
    # finished: from the record
    st, body = api(owner.api_addr, "GET", f"/v1/runs/{run['run_id']}/logs?format=json")
    assert body["running"] is False and body["data"] == "first\nsecond\n"
    st, text = api(owner.api_addr, "GET", "/v1/runs/nope-x/logs")
    assert st == 404

    # output: {keep: file}: the whole output, capped, in a file on the runner
    fo = _proc(cluster, _owner(cluster, "lv-file"))
    assert peerctl("tasks", "run", "lv-file", node=a.api_addr).returncode == 0
    rec = _run_with_status(cluster, fo, "lv-file", "succeeded", "lv-file ran")
    files = list((fo.data_dir / "output" / "lv-file").glob("*.log"))
    assert [p.name for p in files] == [rec["run_id"] + ".log"]
    assert files[0].read_text() == "x" * 70 + "\n" and oct(files[0].stat().st_mode & 0o777) == "0o600"
    st, body = api(b.api_addr, "GET", f"/v1/runs/{rec['run_id']}/logs?format=json")
    assert body["data"] == "x" * 70 + "\n" and body.get("source") in ("file", "record")


def test_broadcast_and_sharding(cluster, tmp_path):
    out = tmp_path / "shards.out"
    f = tmp_path / "bc.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: bc-all
          schedule: "{FAR}"
          target: {{mode: all}}
          command: {{type: shell, run: 'echo "all $PEERD_SHARD_INDEX $PEERD_SHARD_COUNT $PEERD_NODE" >> {out}'}}
        - id: bc-two
          schedule: "@every 2s"
          misfire: skip
          target: {{mode: count, count: 2}}
          command: {{type: shell, run: 'echo "two $PEERD_SLOT $PEERD_SHARD_INDEX $PEERD_SHARD_COUNT $PEERD_NODE" >> {out}'}}
    """))
    a, b, _ = cluster.procs
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "bc-two")
    r = peerctl("--json", "tasks", "run", "bc-all", node=b.api_addr)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["shards"]) == 3

    def lines(kind):
        return [ln.split() for ln in (out.read_text().splitlines() if out.exists() else []) if ln.startswith(kind)]

    wait_for(lambda: len(lines("all")) == 3, timeout=30, what="every member ran bc-all", cluster=cluster)
    got = sorted((int(x[1]), int(x[2]), x[3]) for x in lines("all"))
    assert [g[:2] for g in got] == [(0, 3), (1, 3), (2, 3)]
    assert {g[2] for g in got} == {p.name for p in cluster.procs}

    # count 2: each slot on two members, shard 0 and 1, once each
    def slots():
        by: dict[str, list] = {}
        for x in lines("two"):
            by.setdefault(x[1], []).append((int(x[2]), int(x[3]), x[4]))
        return by

    wait_for(lambda: sum(1 for v in slots().values() if len(v) == 2) >= 2, timeout=60,
             what="two slots of bc-two on two members each", cluster=cluster)
    for slot, runs in slots().items():
        assert len(runs) <= 2, (slot, runs)
        assert sorted(r[0] for r in runs) == sorted(set(r[0] for r in runs)) and all(r[1] == 2 for r in runs)
    done = [v for v in slots().values() if len(v) == 2]
    assert all(len({r[2] for r in v}) == 2 for v in done)
    st, recs = api(a.api_addr, "GET", "/v1/tasks/bc-all/runs")
    assert st == 200
    assert all("shard" in rec for rec in recs), recs


def test_followed_output_is_streamed_chunked(cluster, tmp_path):
    import http.client

    gate = tmp_path / "gate2"
    f = tmp_path / "st.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: st
          schedule: "{FAR}"
          command: {{type: shell, run: 'echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two'}}
    """))
    a = cluster.procs[0]
    assert peerctl("tasks", "apply", "-f", str(f), node=a.api_addr).returncode == 0
    _everywhere(cluster, "st")
    owner = _proc(cluster, _owner(cluster, "st"))
    other = next(p for p in cluster.procs if p is not owner)
    assert peerctl("tasks", "run", "st", node=a.api_addr).returncode == 0
    run = _run_with_status(cluster, owner, "st", "running", "st running")
    from tests.cluster_util import TOKEN

    conn = http.client.HTTPConnection(*other.api_addr.split(":"), timeout=30)
    conn.request("GET", f"/v1/runs/{run['run_id']}/logs?follow=1", headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
    got = b""
    while b"one" not in got:                    # the first chunk arrives while the run goes on
        got += resp.read1(1024)
    assert b"two" not in got
    gate.write_text("go")
    got += resp.read()                          # the stream ends with the run
    assert got.decode() == "one\ntwo\n"
    conn.close()
