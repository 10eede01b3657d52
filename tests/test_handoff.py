"""Handoff on one real in-process node (real sockets, real SQLite): when no
replica answers, the new owner takes the task over with the state it has,
logs why and counts it; a node that is shutting down takes nothing over."""
from __future__ import annotations

import json
import logging
import time

import pytest
import trio

from node.http_client import request
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


async def _handoff(n, others: list[str]) -> None:
    n._handoff_pending["t1"] = time.time() + n.handoff_timeout_s
    with trio.fail_after(30):
        await n._handoff("t1", others)


async def test_no_replica_answers_takes_over_and_says_why(node, caplog):
    caplog.set_level(logging.INFO, logger="peerd.node")
    before = _taken_over(node)
    await _handoff(node, ["ghost-a", "ghost-b"])
    assert _taken_over(node) == before + 1
    assert "t1" not in node._handoff_pending
    lines = [r.getMessage() for r in caplog.records if "handoff for t1" in r.getMessage()]
    # not "timed out": every replica failed, well before handoff_timeout_s
    assert lines == ["handoff for t1 failed: no replica answered (asked ghost-a, ghost-b); "
                     "taking over with the state we have"], lines


async def test_a_node_shutting_down_takes_nothing_over(node, caplog):
    caplog.set_level(logging.INFO, logger="peerd.node")
    before = _taken_over(node)
    node._stopping = True
    try:
        await _handoff(node, ["ghost-a"])
    finally:
        node._stopping = False
    assert _taken_over(node) == before
    assert "t1" not in node._handoff_pending
    assert not [r for r in caplog.records if "handoff for t1" in r.getMessage()]
