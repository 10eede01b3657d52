"""End to end: three real ``peerd`` processes on loopback, driven by ``peerctl``.

Covers: apply a task file, members, tasks, owners, run now and
its record, a wrong token refused, a malformed task file refused with the
validation error and nothing changed, /metrics parses and has the main
series, SIGTERM leaves gracefully and the others see ``left``.
"""
from __future__ import annotations

import json
import signal
import textwrap
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_util import TOKEN, alive_names as _alive_names, api, peerctl, running_cluster, wait_for


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path, 3) as c:
        yield c


def test_three_node_cluster_with_peerctl(cluster, tmp_path):
    a, b, c = cluster.procs
    names = {"n1", "n2", "n3"}
    for p in cluster.procs:
        wait_for(lambda p=p: _alive_names(p.api_addr) == names, timeout=60, what=f"{p.name} sees 3 alive", cluster=cluster)

    r = peerctl("members", node=a.api_addr)
    assert r.returncode == 0, r.stderr
    assert "n1" in r.stdout and "alive" in r.stdout
    r = peerctl("--json", "members", node=b.api_addr)
    ms = json.loads(r.stdout)
    assert {m["name"] for m in ms} == names
    for m in ms:
        assert set(m) >= {"name", "addr", "state", "incarnation", "tags"}

    marker = tmp_path / "ran.txt"
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(textwrap.dedent(f"""
        - id: e2e-hello
          schedule: "@every 3600s"
          command: {{type: shell, run: "echo $PEERD_TASK_ID $PEERD_RUN_ID >> {marker}"}}
          timeout: 10s
        - id: e2e-other
          schedule: "0 3 * * *"
          command: {{type: exec, argv: ["true"]}}
    """))
    r = peerctl("tasks", "apply", "-f", str(tasks), node=a.api_addr)
    assert r.returncode == 0, r.stderr + cluster.logs()
    # every node learns the catalogue
    for p in cluster.procs:
        wait_for(
            lambda p=p: {t["id"] for t in api(p.api_addr, "GET", "/v1/tasks")[1]} == {"e2e-hello", "e2e-other"},
            timeout=30, what=f"{p.name} has both tasks", cluster=cluster,
        )
    r = peerctl("tasks", "ls", node=c.api_addr)
    assert r.returncode == 0 and "e2e-hello" in r.stdout

    owners = [json.loads(peerctl("--json", "owner", "e2e-hello", node=p.api_addr).stdout) for p in cluster.procs]
    assert len({o["owner"] for o in owners}) == 1, owners
    assert owners[0]["owner"] in names
    assert len(set(owners[0]["replicas"])) == 3

    # run now, through a node that may not be the owner
    r = peerctl("tasks", "run", "e2e-hello", node=c.api_addr)
    assert r.returncode == 0, r.stderr + cluster.logs()
    wait_for(lambda: marker.exists() and "e2e-hello" in marker.read_text(), timeout=30, what="the task ran", cluster=cluster)

    def done_record():
        r = peerctl("--json", "runs", "e2e-hello", node=a.api_addr)
        runs = json.loads(r.stdout) if r.returncode == 0 else []
        return [x for x in runs if x["status"] == "succeeded"]

    recs = wait_for(done_record, timeout=30, what="a succeeded run record replicated", cluster=cluster)
    rec = recs[0]
    for key in ("task_id", "slot", "run_id", "node", "attempt", "status", "exit_code", "started", "finished", "fencing_token"):
        assert key in rec
    assert rec["exit_code"] == 0 and rec["node"] == owners[0]["owner"]
    assert rec["run_id"] in marker.read_text()

    # wrong token refused, nothing applied
    r = peerctl("tasks", "rm", "e2e-hello", node=a.api_addr, token="wrong")
    assert r.returncode != 0 and "401" in r.stderr
    status, _ = api(a.api_addr, "DELETE", "/v1/tasks/e2e-hello", token=None)
    assert status == 401

    # malformed file refused with the validation error, nothing changes
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        - id: fine-one
          schedule: "@hourly"
          command: {type: shell, run: "true"}
        - id: backup
          schedule: "61 * * * *"
          command: {type: shell, run: "true"}
    """))
    r = peerctl("tasks", "apply", "-f", str(bad), node=a.api_addr)
    assert r.returncode != 0
    assert "bad.yaml" in r.stderr and "backup" in r.stderr and "schedule" in r.stderr
    status, body = api(a.api_addr, "PUT", "/v1/tasks", [{"id": "x", "schedule": "61 * * * *", "command": {"type": "shell", "run": "true"}}])
    assert status == 400 and "schedule" in body["error"]
    ids = {t["id"] for t in api(a.api_addr, "GET", "/v1/tasks")[1]}
    assert ids == {"e2e-hello", "e2e-other"}

    # metrics
    status, text = api(a.api_addr, "GET", "/metrics", token=None)
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("peerd_members", "peerd_gossip_probes", "peerd_gossip_packets", "peerd_slots",
                 "peerd_gossip_stale_corrections",
                 "peerd_runs", "peerd_fire_lateness_seconds", "peerd_gossip_packets_rejected", "peerd_tasks"):
        assert name in fams, sorted(fams)
    alive = [s.value for s in fams["peerd_members"].samples if s.labels.get("state") == "alive"]
    assert alive == [3.0]

    # backfill: dry run lists the slots of a past window, the real one runs each once
    now = int(time.time())
    start, end = now - 3 * 3600 - 1800, now - 1800
    r = peerctl("--json", "tasks", "backfill", "e2e-hello", "--from", str(start), "--to", str(end), "--dry-run", node=b.api_addr)
    assert r.returncode == 0, r.stderr
    slots = json.loads(r.stdout)["slots"]
    assert slots == [s for s in range(start, end + 1) if s % 3600 == 0] and len(slots) == 3
    before = marker.read_text().count("e2e-hello")
    r = peerctl("tasks", "backfill", "e2e-hello", "--from", str(start), "--to", str(end), node=b.api_addr)
    assert r.returncode == 0, r.stderr

    def backfilled():
        runs = json.loads(peerctl("--json", "runs", "e2e-hello", node=a.api_addr).stdout)
        return sorted(x["slot"] for x in runs if x["status"] == "succeeded" and x["slot"] in slots) == slots

    wait_for(backfilled, timeout=30, what="the 3 backfilled slots ran", cluster=cluster)
    assert marker.read_text().count("e2e-hello") == before + 3

    # key rotation across the running cluster through peerctl: install, use, remove
    from gossip.seal import Keyring
    from gossip.seal_shell import generate_key

    old_key = cluster.key_file.read_text().split()[0]
    new_key = generate_key()
    for step, key in (("install", new_key), ("use", new_key), ("remove", old_key)):
        r = peerctl("keys", step, key, node=a.api_addr)
        assert r.returncode == 0, f"keys {step}: {r.stderr}"
    r = peerctl("--json", "keys", "list", node=c.api_addr)
    keys = json.loads(r.stdout)["keys"]
    assert [k["primary"] for k in keys] == [True]
    assert keys[0]["fingerprint"] == Keyring.fingerprint(Keyring.decode_key(new_key))
    assert cluster.key_file.read_text().split() == [new_key]  # persisted for a restart
    # the cluster keeps talking under the new key: a fresh probe round trips
    for p in cluster.procs:
        st, text = api(p.api_addr, "GET", "/metrics", token=None)
        rejected = {s.labels.get("reason"): s.value for f in text_string_to_metric_families(text)
                    if f.name == "peerd_gossip_packets_rejected" for s in f.samples}
        assert rejected.get("wrong_key", 0) == 0, (p.name, rejected)
    for p in cluster.procs:
        wait_for(lambda p=p: _alive_names(p.api_addr) == names, timeout=30, what=f"{p.name} sees 3 alive after rotation", cluster=cluster)

    # SIGTERM: c leaves gracefully, the others see it as left
    c.popen.send_signal(signal.SIGTERM)
    assert c.popen.wait(timeout=30) == 0, c.log_text()

    def sees_left(p):
        st, ms = api(p.api_addr, "GET", "/v1/members")
        return st == 200 and any(m["name"] == c.name and m["state"] == "left" for m in ms)

    for p in (a, b):
        wait_for(lambda p=p: sees_left(p), timeout=30, what=f"{p.name} sees {c.name} left", cluster=cluster)
