"""The HTTP API of one real node (in-process, real sockets, real SQLite):
auth on every state-changing route, 4xx JSON errors for bad requests, and no
request (including garbage bytes) can take the node down."""
from __future__ import annotations

import json
import random

import pytest
import trio

from node.run.http_client_shell import request
from tests.cluster_util import start_solo_node

TOKEN = "api-test-token"


@pytest.fixture
async def node(tmp_path, nursery):
    n = await start_solo_node(tmp_path, nursery, token=TOKEN)
    yield n
    await n.shutdown()
    nursery.cancel_scope.cancel()


async def call(node, method, path, body=None, token=TOKEN, raw: bytes | None = None):
    host, port = node.api_addr
    headers = [("Authorization", f"Bearer {token}")] if token else []
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        headers.append(("Content-Type", "application/json"))
    r = await request(method, f"http://{host}:{port}{path}", headers=headers, body=data, timeout_s=10)
    try:
        return r.status, json.loads(r.body_tail) if r.body_tail else None
    except json.JSONDecodeError:
        return r.status, r.body_tail.decode(errors="replace")


TASK = {"id": "t1", "schedule": "@hourly", "command": {"type": "shell", "run": "true"}}

WRITE_ROUTES = [
    ("PUT", "/v1/tasks", [TASK]),
    ("DELETE", "/v1/tasks/t1", None),
    ("POST", "/v1/tasks/t1/pause", None),
    ("POST", "/v1/tasks/t1/resume", None),
    ("POST", "/v1/tasks/t1/run", None),
    ("POST", "/v1/tasks/t1/backfill", {"from": 0, "to": 10, "dry_run": True}),
    ("POST", "/v1/keys", {"op": "install", "key": "x"}),
]


async def test_every_write_route_needs_the_token(node):
    st_, _ = await call(node, "PUT", "/v1/tasks", [TASK])
    assert st_ == 200
    for method, path, body in WRITE_ROUTES:
        for token in (None, "wrong", TOKEN + "x"):
            status, reply = await call(node, method, path, body, token=token)
            assert status == 401, (method, path, token, status, reply)
            assert "token" in reply["error"]
    # nothing changed
    status, t = await call(node, "GET", "/v1/tasks/t1")
    assert status == 200 and t["paused"] is False
    # reads need the token too by default; /metrics is open
    assert (await call(node, "GET", "/v1/tasks", token=None))[0] == 401
    assert (await call(node, "GET", "/metrics", token=None))[0] == 200


@pytest.mark.parametrize(
    "method,path,body,status,needle",
    [
        ("PUT", "/v1/tasks", {"not": "a list"}, 400, "list"),
        ("PUT", "/v1/tasks", [{"id": "bad id!", "schedule": "@hourly", "command": {"type": "shell", "run": "x"}}], 400, "id"),
        ("PUT", "/v1/tasks", [{"id": "a", "schedule": "61 * * * *", "command": {"type": "shell", "run": "x"}}], 400, "minute must be 0-59"),
        ("PUT", "/v1/tasks", [{"id": "a", "schedule": "@hourly", "command": {"type": "rm -rf"}}], 400, "command"),
        ("GET", "/v1/tasks/nope", None, 404, "unknown task"),
        ("POST", "/v1/tasks/nope/run", None, 404, "unknown task"),
        ("GET", "/v1/tasks/t1/explain?n=0", None, 400, "n:"),
        ("POST", "/v1/tasks/t1/backfill", {"from": "yesterday", "to": 5}, 400, "ISO 8601"),
        ("POST", "/v1/tasks/t1/backfill", {"from": 10, "to": 5}, 400, "before"),
        ("POST", "/v1/keys", {"op": "explode", "key": "x"}, 400, "op"),
        ("POST", "/v1/keys", {"op": "install", "key": "x"}, 409, "insecure"),
        ("GET", "/v2/whatever", None, 404, "no route"),
        ("PATCH", "/v1/tasks", None, 405, "not allowed"),
    ],
)
async def test_bad_requests_get_4xx_json_errors(node, method, path, body, status, needle):
    assert (await call(node, "PUT", "/v1/tasks", [TASK]))[0] == 200
    got, reply = await call(node, method, path, body)
    assert got == status, reply
    assert needle in reply["error"]


async def test_invalid_json_and_oversized_bodies(node):
    got, reply = await call(node, "PUT", "/v1/tasks", raw=b"{not json")
    assert got == 400 and "JSON" in reply["error"]
    got, reply = await call(node, "PUT", "/v1/tasks", raw=b"[" + b"1," * (1 << 20) + b"1]")
    assert got == 413
    assert (await call(node, "GET", "/v1/status"))[0] == 200


async def _raw_exchange(addr, data: bytes) -> bytes:
    s = await trio.open_tcp_stream(*addr)
    out = b""
    with trio.move_on_after(5):
        try:
            await s.send_all(data)
            while True:
                chunk = await s.receive_some(65536)
                if not chunk:
                    break
                out += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await s.aclose()
    return out


async def test_garbage_on_the_socket_never_kills_the_node(node):
    rng = random.Random(1234)  # printed by pytest on failure via the seed in the name
    payloads = [
        b"\x00\xff" * 100 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /v1/status HTTP/9.9\r\n\r\n",
        b"POST /v1/tasks HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] + [rng.randbytes(rng.randrange(1, 400)) + b"\r\n\r\n" for _ in range(20)]
    for p in payloads:
        reply = await _raw_exchange(node.api_addr, p)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert (await call(node, "GET", "/v1/status"))[0] == 200


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1 << 70, 3.5, rng.randrange(-10**6, 10**6)])
    if kind == 3:
        return rng.choice(["", "now", "@hourly", "61 * * * *", "shell", "x" * 200, "id-1", "\u0000"])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["id", "schedule", "command", "type", "run", "argv", "timeout", "retries", "tags", "env",
            "overlap", "misfire", "history", "paused", "bogus"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


@pytest.mark.parametrize("seed", [11, 12])
async def test_random_json_task_bodies_get_200_or_400(node, seed):
    """Any JSON body to PUT /v1/tasks: applied or refused with a reason; the
    node keeps answering. (Seeded: the failing seed is in the test id.)"""
    rng = random.Random(seed)
    for i in range(150):
        body = _random_json(rng)
        if rng.random() < 0.5:  # mostly task-shaped lists
            body = [dict(TASK, **(b if isinstance(b, dict) else {})) for b in (body if isinstance(body, list) else [body])]
        status, reply = await call(node, "PUT", "/v1/tasks", body)
        assert status in (200, 400), (seed, i, body, status, reply)
        if status == 400:
            assert isinstance(reply["error"], str) and reply["error"]
    assert (await call(node, "GET", "/v1/status"))[0] == 200
