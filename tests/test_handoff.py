"""Handoff on one real in-process node (real sockets, real SQLite): the shell
logs and counts what the core decided (the rules themselves are tested in
tests/test_node_core.py)."""
from __future__ import annotations

import json
import logging
import time

import pytest
import trio

from node.run.http_client_shell import request
from node.core_effects import Note
from node.schedule.explain import explain
from tests.cluster_util import start_solo_node

TOKEN = "handoff-test-token"
TASK = {"id": "t1", "schedule": "@yearly", "command": {"type": "shell", "run": "true"}}


@pytest.fixture
async def node(tmp_path, nursery):
    n = await start_solo_node(tmp_path, nursery, token=TOKEN)
    host, port = n.api_addr
    r = await request("PUT", f"http://{host}:{port}/v1/tasks", body=json.dumps([TASK]).encode(),
                      headers=[("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")],
                      timeout_s=10)
    assert r.status == 200, r.body_tail
    yield n
    await n.shutdown()
    nursery.cancel_scope.cancel()


def _taken_over(n) -> float:
    return n.metrics.handoff_timeouts._value.get()


async def test_handoff_note_is_logged_and_counted(node, caplog):
    """The core decides why a handoff ended (tests/test_node_core.py); the
    shell logs the reason with the replicas asked and counts it."""
    caplog.set_level(logging.INFO, logger="peerd.node")
    before = _taken_over(node)
    node._do([Note("handoff_timeout", {"task_id": "t1", "why": "failed: no replica answered",
                                       "asked": ["ghost-a", "ghost-b"]})])
    assert _taken_over(node) == before + 1
    lines = [r.getMessage() for r in caplog.records if "handoff for t1" in r.getMessage()]
    assert lines == ["handoff for t1 failed: no replica answered (asked ghost-a, ghost-b); "
                     "taking over with the state we have"], lines


async def test_solo_node_owns_its_task_without_a_handoff(node):
    """Alone, a node owns the task at once: nothing to hand off from."""
    assert node.core.ring.owner("t1") == node.name
    assert "t1" not in node.core.handoff_pending
    assert explain(node.core.scheduler, "t1", time.time())["handoff_ready"]
