"""An acknowledged write survives a crash; a full disk degrades the node.

Real peerd processes (tests/cluster_util.py), real SQLite files; the full
disk is a small tmpfs mounted for the test (skipped, with the reason, where
mounting is not permitted). Waits are conditions with deadlines; the random
kill points come from a seed the failure prints.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from tests.cluster_util import TOKEN, api, running_cluster, wait_for

SEED = int(os.environ.get("PEERD_TEST_SEED", "20261204"))


def _task(tid: str) -> dict:
    return {"id": tid, "schedule": "once:2099-01-01T00:00:00Z", "command": {"type": "exec", "argv": ["true"]}}


def test_every_acknowledged_write_survives_sigkill(tmp_path):
    """Writes in a loop against one node, SIGKILLed at random points around
    the answers, restarted each time: every write answered 200 is on every
    node afterwards."""
    rng = random.Random(SEED)
    (tmp_path / "c").mkdir()
    acked: list[str] = []
    with running_cluster(tmp_path / "c", 3, wait_converged_s=60) as c:
        victim = c.procs[0]
        n = 0
        for rnd in range(6):
            stop = threading.Event()

            def writer(rnd=rnd):
                nonlocal n
                while not stop.is_set():
                    n += 1
                    tid = f"d{rnd}-{n}"
                    try:
                        st, _ = api(victim.api_addr, "PUT", "/v1/tasks", [_task(tid)], timeout=5)
                    except OSError:
                        return
                    if st == 200:
                        acked.append(tid)

            wait_for(lambda: api(victim.api_addr, "GET", "/v1/status")[0] == 200, timeout=60,
                     what=f"{victim.name} up (round {rnd}, seed {SEED})", cluster=c)
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            before = len(acked)
            # kill at a random point once some writes were answered
            wait_for(lambda: len(acked) >= before + 5, timeout=60, what=f"writes answered (seed {SEED})", cluster=c)
            deadline = time.monotonic() + rng.uniform(0.0, 0.5)
            while time.monotonic() < deadline:
                pass
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait()
            stop.set()
            t.join(timeout=10)
            victim.start()
        assert len(acked) >= 30
        names = {p.name for p in c.procs}
        for p in c.procs:
            wait_for(lambda p=p: {m["name"] for m in api(p.api_addr, "GET", "/v1/members")[1]
                                  if m["state"] == "alive"} == names, timeout=60, what="converged", cluster=c)
        for p in c.procs:
            def have(p=p):
                st, ts = api(p.api_addr, "GET", "/v1/tasks")
                return st == 200 and not (set(acked) - {x["id"] for x in ts})
            wait_for(have, timeout=120, what=f"every acknowledged task on {p.name} (seed {SEED}, "
                                             f"{len(acked)} acknowledged)", cluster=c)


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def test_full_disk_refuses_writes_with_507_and_recovers(tmp_path):
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "4m"):
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        (tmp_path / "c").mkdir()
        with running_cluster(tmp_path / "c", 1, extra_args=["--data-dir", str(mnt / "n1")],
                             wait_converged_s=60) as c:
            n = c.procs[0]
            a = n.api_addr
            assert api(a, "PUT", "/v1/tasks", [_task("before-full")])[0] == 200
            filler = mnt / "filler"
            with open(filler, "wb") as fh:          # fill the filesystem
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            big = [dict(_task(f"f{i}"), env={"PAD": "x" * 3000}) for i in range(60)]
            st, body = api(a, "PUT", "/v1/tasks", big)
            assert st == 507, body
            assert "cannot write its data dir" in body["error"]
            # degraded, not dead: reads, metrics, membership answer; writes refused
            assert n.alive()
            assert api(a, "GET", "/v1/tasks/before-full")[0] == 200
            st, body = api(a, "POST", "/v1/tasks/before-full/pause")
            assert st == 507
            m = api(a, "GET", "/metrics", token=None)[1]
            assert "peerd_store_write_failing 1.0" in m
            assert "cannot write the data dir" in n.log_text()
            # space returns: the node writes again by itself
            filler.unlink()
            wait_for(lambda: "peerd_store_write_failing 0.0" in api(a, "GET", "/metrics", token=None)[1],
                     timeout=30, what="writes resume", cluster=c)
            st, body = api(a, "PUT", "/v1/tasks", [_task("after-full")])
            assert st == 200 and body["durable"] == "local"
            n.popen.send_signal(signal.SIGKILL)
            n.popen.wait()
            n.start()
            wait_for(lambda: api(a, "GET", "/v1/tasks/after-full")[0] == 200, timeout=60,
                     what="after a crash, every acknowledged task is there", cluster=c)
            assert api(a, "GET", "/v1/tasks/before-full")[0] == 200
            assert "Traceback" not in n.log_text()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_write_ack_replica(tmp_path):
    (tmp_path / "c").mkdir()
    with running_cluster(tmp_path / "c", 2, extra_args=["--write-ack", "replica"], wait_converged_s=60) as c:
        a, b = c.procs
        st, body = api(a.api_addr, "PUT", "/v1/tasks", [_task("rep")])
        assert st == 200 and body["durable"] == "replica"
        # the replica has it when the answer comes
        assert api(b.api_addr, "GET", "/v1/tasks/rep")[0] == 200
        b.popen.send_signal(signal.SIGSTOP)
        try:
            st, body = api(a.api_addr, "PUT", "/v1/tasks", [_task("rep2")], timeout=30)
            assert st == 504 and "no replica acknowledged" in body["error"]
        finally:
            b.popen.send_signal(signal.SIGCONT)
        assert api(a.api_addr, "GET", "/v1/tasks/rep2")[0] == 200      # written here all the same
