"""A node rejoining a cluster that holds thousands of tasks takes its share
over in batched handoffs, without storms: no handoff times out, and an
every-second task on the busy node misses no slot. Three real peerd
processes; conditions waited on with deadlines."""
from __future__ import annotations

import signal
import time
from datetime import datetime

from tests.cluster_util import api, running_cluster, wait_for

N_TASKS = 2000


def _metric(addr: str, name: str) -> float:
    text = api(addr, "GET", "/metrics", token=None)[1]
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name) and not ln.startswith("#"))


def test_rejoin_with_thousands_of_tasks_misses_nothing(tmp_path):
    ledger = tmp_path / "ledger"
    tasks = [{"id": f"bulk-{i:05d}", "schedule": "once:2099-01-01T00:00:00Z",
              "command": {"type": "exec", "argv": ["true"]}} for i in range(N_TASKS)]
    tasks.append({"id": "tick", "schedule": "@every 1s", "misfire": "run_all", "catchup_window": "120s",
                  "overlap": "allow", "command": {"type": "shell", "run": f"echo $PEERD_SLOT >> {ledger}"}})
    (tmp_path / "c").mkdir()
    with running_cluster(tmp_path / "c", 3, wait_converged_s=60) as c:
        a, b, x = c.procs
        st, body = api(a.api_addr, "PUT", "/v1/tasks", tasks, timeout=60)
        assert st == 200, body
        for p in c.procs:
            wait_for(lambda p=p: len(api(p.api_addr, "GET", "/v1/tasks")[1]) == N_TASKS + 1, timeout=120,
                     what=f"{p.name} has every task", cluster=c)
        wait_for(lambda: ledger.exists() and ledger.read_text().count("\n") >= 3, timeout=60,
                 what="the every-second task firing", cluster=c)
        # x leaves; the others own everything; x comes back and takes its share
        x.popen.send_signal(signal.SIGTERM)
        x.popen.wait(timeout=60)
        wait_for(lambda: api(a.api_addr, "GET", "/v1/ring")[0] == 200 and
                 sum(m.get("owned", 0) for m in api(a.api_addr, "GET", "/v1/ring")[1]["members"]
                     if m["name"] != x.name) == N_TASKS + 1, timeout=60, what="two nodes own everything", cluster=c)
        t0 = time.time()
        x.start()

        def x_owns_its_share():
            st, r = api(x.api_addr, "GET", "/v1/status")
            return st == 200 and r["tasks_owned"] >= N_TASKS // 6
        wait_for(x_owns_its_share, timeout=120, what="the rejoined node owns its share", cluster=c)
        took = time.time() - t0
        # every slot of the every-second task from before the rejoin to 10 s after it, once
        end = time.time() + 10
        wait_for(lambda: time.time() > end + 3, timeout=30, what="the window to pass")
        slots = [int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()) for s in ledger.read_text().split()]
        window = range(max(min(slots), int(t0) - 5), int(end))
        missing = [s for s in window if s not in slots]
        assert not missing, f"missed {missing} (rejoin took {took:.1f} s)\n" + c.logs()
        assert _metric(x.api_addr, "peerd_handoff_timeouts_total") == 0
        print(f"rejoin of 1 of 3 nodes with {N_TASKS} tasks: owns its share after {took:.1f} s; "
              f"anti-entropy bytes on it {_metric(x.api_addr, 'peerd_antientropy_bytes_total'):.0f}")
