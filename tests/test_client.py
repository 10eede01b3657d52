"""node/client.py against a real peerd process (tests/cluster_util.py).

One real node on free loopback ports, real SQLite, real key; the client
speaks real HTTP to it. Waiting is on conditions with deadlines.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from cluster_util import TOKEN, running_cluster, wait_for
from node.client import (
    ApiError,
    AuthError,
    BadResponseError,
    Client,
    NotFoundError,
    PeerdError,
    UnreachableError,
)
from node.cli.demo import free_ports
from node.tasks.files_shell import load_task_file



@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    with running_cluster(tmp, 1, wait_converged_s=60) as c:
        yield c.procs[0]


def test_task_lifecycle_through_the_client(node, tmp_path: Path):
    c = Client(node.api_addr, token=TOKEN, timeout_s=20)
    out = tmp_path / "ran"
    applied = c.tasks.apply([{
        "id": "client-demo",
        "schedule": "@every 1h",
        "command": {"type": "shell", "run": f"echo \"$PEERD_TASK_ID\" >> {out}"},
    }], source="test_client")
    assert applied["applied"] == ["client-demo"]
    assert [t["id"] for t in c.tasks.list()] == ["client-demo"]
    got = c.tasks.get("client-demo")
    assert got["task"]["id"] == "client-demo" and got["paused"] is False

    o = c.owner("client-demo")
    assert (o["task_id"], o["owner"], o["replicas"]) == ("client-demo", "n1", ["n1"])
    assert c.tasks.pause("client-demo") is not None
    assert c.tasks.get("client-demo")["paused"] is True
    c.tasks.resume("client-demo")
    assert c.tasks.get("client-demo")["paused"] is False

    started = c.tasks.run("client-demo")
    assert started["node"] == "n1"
    runs = wait_for(lambda: [r for r in c.runs.list("client-demo") if r["status"] == "succeeded"],
                    timeout=60, what="the run to succeed")
    r = runs[0]
    for key in ("task_id", "slot", "run_id", "node", "attempt", "status", "exit_code",
                "started", "finished", "fencing_token"):
        assert key in r, key
    assert r["exit_code"] == 0 and out.read_text().strip() == "client-demo"

    explained = c.tasks.explain("client-demo", n=3)
    assert len(explained["next"]) == 3
    c.tasks.delete("client-demo")
    with pytest.raises(NotFoundError) as ei:
        c.tasks.get("client-demo")
    assert ei.value.status == 404 and "client-demo" in ei.value.error


def test_cluster_reads(node):
    c = Client(f"http://{node.api_addr}/", token=TOKEN)
    st = c.status()
    assert st["name"] == "n1"
    members = c.members()
    assert [(m["name"], m["state"]) for m in members] == [("n1", "alive")]
    assert {"name", "addr", "state", "incarnation", "tags"} <= set(members[0])
    assert "members" in c.ring()
    assert "peerd_" in c.metrics()
    assert "keys" in c.keys.list()


def test_apply_file_and_errors_carry_the_nodes_message(node, tmp_path: Path):
    c = Client(node.api_addr, token=TOKEN)
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n  - id: from-file\n    schedule: '@every 1h'\n"
                 "    command: {type: exec, argv: ['true']}\n")
    assert c.tasks.apply_file(str(f))["applied"] == ["from-file"]
    # a Task object from node.tasks.model is accepted as it is
    assert c.tasks.apply(load_task_file(str(f)))["applied"] == ["from-file"]
    c.tasks.delete("from-file")

    with pytest.raises(ApiError) as ei:
        c.tasks.apply([{"id": "bad one!", "schedule": "@every 1h", "command": {"type": "exec", "argv": ["true"]}}])
    assert 400 <= ei.value.status < 500 and ei.value.error and "bad one!" in str(ei.value) + ei.value.error
    assert not isinstance(ei.value, (AuthError, NotFoundError))

    with pytest.raises(AuthError) as ei:
        Client(node.api_addr, token="wrong").tasks.delete("x")
    assert ei.value.status == 401 and "token" in ei.value.error

    with pytest.raises(NotFoundError):
        c.runs.list("no-such-task")


def test_unreachable_and_timeouts_are_errors_not_hangs():
    (port,) = free_ports(1)
    with pytest.raises(UnreachableError) as ei:
        Client(f"127.0.0.1:{port}", timeout_s=5).status()
    assert f"127.0.0.1:{port}" in str(ei.value)

    # a server that accepts and never answers: the call ends near timeout_s
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = Client(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(UnreachableError):
            c.status()
        assert time.monotonic() - t0 < 10


def test_not_json_is_a_bad_response():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        import threading

        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(BadResponseError):
            Client(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=10).status()
        t.join(10)


def test_construction_and_environment():
    with pytest.raises(ValueError):
        Client("ftp://x:1")
    with pytest.raises(ValueError):
        Client("x:1", timeout_s=0)
    c = Client.from_env({"PEERCTL_NODE": "10.0.0.5:7701", "PEERCTL_TOKEN": "t", "PEERCTL_TIMEOUT": "3"})
    assert (c.base, c.token, c.timeout_s) == ("http://10.0.0.5:7701", "t", 3.0)
    with pytest.raises(ValueError, match="PEERCTL_TIMEOUT"):
        Client.from_env({"PEERCTL_TIMEOUT": "soon"})
    assert issubclass(UnreachableError, PeerdError) and issubclass(NotFoundError, ApiError)
