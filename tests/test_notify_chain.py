"""Notifications and chained tasks on three real ``peerd`` processes, with a
local HTTP receiver for the webhooks: failure then recovery, a Slack-style
template, the chained task once per upstream run with the upstream in its
environment, a cycle refused at apply, a deleted upstream explained, and a
run lost to a SIGKILLed owner notified by the new owner.

Waits are conditions with deadlines (tests/cluster_util.py).
"""
from __future__ import annotations

import signal
import textwrap
import time

import pytest

from tests.cluster_util import WebhookReceiver, api, peerctl, running_cluster, wait_for

FAR = "once:2099-01-01T00:00:00Z"


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


def _owner(c, tid):
    return wait_for(lambda: api(c.procs[0].api_addr, "GET", f"/v1/owner/{tid}")[1].get("owner"),
                    timeout=30, what=f"an owner for {tid}", cluster=c)


def test_notifications_and_chains(tmp_path, receiver):
    flag = tmp_path / "flag"
    down_out = tmp_path / "down.out"
    f = tmp_path / "tasks.yaml"
    f.write_text(textwrap.dedent(f"""
        - id: nf-up
          schedule: "{FAR}"
          command: {{type: shell, run: "echo checking; test -e {flag}"}}
          overlap: allow
          notify:
            - on: [failure, recovery]
              url: {receiver.url}/plain
              headers: {{X-Team: ops}}
              retries: 0
            - on: [failure]
              url: {receiver.url}/slack
              template: {{text: "peerd: $task_id $event ($status, exit $exit_code) on $node"}}
        - id: nf-down
          after: {{task: nf-up, on: success}}
          command: {{type: shell, run: 'echo "$PEERD_UPSTREAM_TASK_ID $PEERD_UPSTREAM_RUN_ID $PEERD_UPSTREAM_STATUS" >> {down_out}'}}
          overlap: buffer_all
        - id: nf-lost
          schedule: "{FAR}"
          command: {{type: shell, run: "sleep 120"}}
          on_owner_loss: skip
          notify: [{{on: [lost], url: {receiver.url}/lost}}]
    """))
    (tmp_path / "c").mkdir()
    with running_cluster(tmp_path / "c", 3, wait_converged_s=60) as c:
        a, b, _ = c.procs
        r = peerctl("tasks", "apply", "-f", str(f), node=a.api_addr)
        assert r.returncode == 0, r.stderr
        for p in c.procs:
            wait_for(lambda p=p: api(p.api_addr, "GET", "/v1/tasks/nf-lost")[0] == 200, timeout=30,
                     what=f"{p.name} has the tasks", cluster=c)
        ex = api(b.api_addr, "GET", "/v1/tasks/nf-down/explain")[1]
        assert ex["after"] == {"task": "nf-up", "on": "success"}
        assert any("fires once per run of 'nf-up'" in w for w in ex["why"])

        # 1. a failure: one notification per target, the run record says sent
        assert peerctl("tasks", "run", "nf-up", node=b.api_addr).returncode == 0
        wait_for(lambda: receiver.bodies("/plain") and receiver.bodies("/slack"), timeout=30,
                 what="the failure notifications", cluster=c)
        plain = receiver.bodies("/plain")[0]
        assert plain["event"] == "failure" and plain["task_id"] == "nf-up" and plain["status"] == "failed"
        assert plain["exit_code"] == 1 and "checking" in plain["output_tail"]
        assert plain["link"].endswith("/#task/nf-up") and plain["run_id"].endswith(".1")
        assert receiver.headers("/plain")[0].get("x-team") == "ops"
        slack = receiver.bodies("/slack")[0]
        assert slack == {"text": f"peerd: nf-up failure (failed, exit 1) on {plain['node']}"}
        owner = _owner(c, "nf-up")
        op = next(p for p in c.procs if p.name == owner)
        wait_for(lambda: api(op.api_addr, "GET", "/v1/tasks/nf-up/runs")[1][-1].get("notify")
                 == {"0:failure": "sent", "1:failure": "sent"}, timeout=30, what="notify recorded sent", cluster=c)
        assert not down_out.exists()                      # on: success only

        # 2. recovery: the first success after a failure; the chain fires
        flag.write_text("ok")
        assert peerctl("tasks", "run", "nf-up", node=a.api_addr).returncode == 0
        wait_for(lambda: len(receiver.bodies("/plain")) == 2, timeout=30, what="the recovery notification", cluster=c)
        rec = receiver.bodies("/plain")[1]
        assert rec["event"] == "recovery" and rec["status"] == "succeeded"
        wait_for(lambda: down_out.exists() and down_out.read_text().count("\n") == 1, timeout=30,
                 what="the chained run", cluster=c)
        assert down_out.read_text().split() == ["nf-up", rec["run_id"], "succeeded"]

        # 3. another success: no notification (not subscribed), one more chained run
        # (a run asked for in the same second is the same slot: wait for the next)
        wait_for(lambda: time.time() >= rec["slot"] + 1.05, timeout=5, what="the next second")
        ups_before = len(api(op.api_addr, "GET", "/v1/tasks/nf-up/runs")[1])
        assert peerctl("tasks", "run", "nf-up", node=a.api_addr).returncode == 0
        wait_for(lambda: down_out.read_text().count("\n") == 2, timeout=30, what="a second chained run", cluster=c)
        assert len(api(op.api_addr, "GET", "/v1/tasks/nf-up/runs")[1]) == ups_before + 1
        assert len(receiver.bodies("/plain")) == 2 and len(receiver.bodies("/slack")) == 1
        down_runs = api(next(p for p in c.procs if p.name == _owner(c, "nf-down")).api_addr,
                        "GET", "/v1/tasks/nf-down/runs")[1]
        assert sorted(x["status"] for x in down_runs) == ["succeeded", "succeeded"]
        assert all(x["upstream"]["task_id"] == "nf-up" for x in down_runs)

        # 4. a cycle is refused at apply with its path; nothing is written
        cyc = tmp_path / "cycle.yaml"
        cyc.write_text(textwrap.dedent("""
            - {id: cy-a, after: cy-b, command: {type: exec, argv: ["true"]}}
            - {id: cy-b, after: nf-down, command: {type: exec, argv: ["true"]}}
            - id: nf-up
              schedule: "@every 1h"
              after: cy-a
              command: {type: exec, argv: ["true"]}
        """))
        r = peerctl("tasks", "apply", "-f", str(cyc), node=b.api_addr)
        assert r.returncode == 1 and "cycle" in r.stderr and "cy-a -> cy-b -> nf-down -> nf-up -> cy-a" in r.stderr
        assert api(b.api_addr, "GET", "/v1/tasks/cy-a")[0] == 404

        # 5. upstream deleted: the downstream stays, idle, and says why
        assert peerctl("tasks", "rm", "nf-up", node=b.api_addr).returncode == 0
        wait_for(lambda: any("does not exist" in w for w in
                             api(a.api_addr, "GET", "/v1/tasks/nf-down/explain")[1]["why"]),
                 timeout=30, what="explain names the missing upstream", cluster=c)

        # 6. the owner dies mid-run: the new owner marks the run lost and notifies
        assert peerctl("tasks", "run", "nf-lost", node=a.api_addr).returncode == 0
        lo = next(p for p in c.procs if p.name == _owner(c, "nf-lost"))
        others = [p for p in c.procs if p is not lo]
        # a replica knows it runs (a run its owner started and told no one
        # about cannot be found lost)
        wait_for(lambda: any(x["status"] == "running" for p in others
                             for x in api(p.api_addr, "GET", "/v1/tasks/nf-lost/runs")[1]),
                 timeout=30, what="a replica has nf-lost running", cluster=c)
        lo.popen.send_signal(signal.SIGKILL)
        lo.popen.wait()
        wait_for(lambda: receiver.bodies("/lost"), timeout=60, what="the lost notification from the new owner", cluster=c)
        lost = receiver.bodies("/lost")[0]
        assert lost["event"] == "lost" and lost["status"] == "lost" and lost["node"] == lo.name
        assert lost["link"].split("/")[2] != lo.api_addr          # sent by another node
