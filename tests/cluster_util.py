"""Start real ``peerd`` processes on loopback for end-to-end tests.

Each node is a real OS process (``python -m node.cli.daemon``) with its own free
UDP+TCP gossip port and API port, a real SQLite data dir and a real key file.
Waiting is always on a condition with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from node.cli.demo import free_ports

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-123"


@dataclass
class Proc:
    name: str
    gossip: int
    api: int
    data_dir: Path
    log_path: Path
    args: list[str]
    popen: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    @property
    def api_addr(self) -> str:
        return f"127.0.0.1:{self.api}"

    def start(self, env=None) -> None:
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        if env:
            e.update(env)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "node.cli.daemon", *self.args], stdout=log, stderr=subprocess.STDOUT, env=e, cwd=str(ROOT)
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Cluster:
    def __init__(self, tmp: Path, n: int, *, profile: str = "local", extra_args: list[str] | None = None):
        from gossip.seal_shell import generate_key

        self.tmp = tmp
        self.key_file = tmp / "gossip.key"
        self.key_file.write_text(generate_key() + "\n")
        self.procs: list[Proc] = []
        flat = free_ports(2 * n)
        ports = list(zip(flat[::2], flat[1::2]))
        seeds = ",".join(f"127.0.0.1:{g}" for g, _ in ports[:2])
        for i, (g, a) in enumerate(ports):
            name = f"n{i + 1}"
            args = [
                "--name", name, "--bind", f"127.0.0.1:{g}", "--api", f"127.0.0.1:{a}",
                "--seeds", seeds, "--data-dir", str(tmp / name), "--key-file", str(self.key_file),
                "--api-token", TOKEN, "--profile", profile, "--shutdown-grace-s", "3",
                "--log-level", "info",
            ] + (extra_args or [])
            self.procs.append(Proc(name, g, a, tmp / name, tmp / f"{name}.log", args))

    def start(self) -> None:
        for p in self.procs:
            p.start()

    def stop(self) -> None:
        for p in self.procs:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            if p.popen is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log_text()[-6000:]}" for p in self.procs)


def api(addr: str, method: str, path: str, body=None, token: str | None = TOKEN, timeout: float = 10.0):
    """Returns (status, decoded JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw.decode(errors="replace")


def wait_for(cond, *, timeout: float, what: str, cluster: Cluster | None = None, interval: float = 0.1):
    """Poll ``cond()`` until truthy or the deadline; the failure says what."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except (OSError, urllib.error.URLError, KeyError, ValueError, TypeError) as e:
            last_exc = e
        time.sleep(interval)
    msg = f"timed out after {timeout}s waiting for {what}"
    if last_exc:
        msg += f" (last error: {last_exc!r})"
    if cluster is not None:
        msg += "\n" + cluster.logs()
    raise AssertionError(msg)


def alive_names(addr: str) -> set[str]:
    """Members ``addr`` lists as alive (empty if it does not answer 200)."""
    st, ms = api(addr, "GET", "/v1/members")
    return {m["name"] for m in ms if m["state"] == "alive"} if st == 200 else set()


@contextlib.contextmanager
def running_cluster(tmp: Path, n: int, *, profile: str = "local", extra_args: list[str] | None = None,
                    wait_converged_s: float | None = None):
    """A started ``Cluster``, stopped on exit. With ``wait_converged_s`` it
    first waits until every node sees all ``n`` alive."""
    c = Cluster(tmp, n, profile=profile, extra_args=extra_args)
    c.start()
    try:
        if wait_converged_s is not None:
            wait_converged(c, wait_converged_s)
        yield c
    finally:
        c.stop()


def wait_converged(c: Cluster, timeout_s: float) -> None:
    """Wait until every node of ``c`` lists all of them alive."""
    names = {p.name for p in c.procs}
    for p in c.procs:
        wait_for(lambda p=p: alive_names(p.api_addr) == names, timeout=timeout_s,
                 what=f"{p.name} sees {len(names)} alive", cluster=c)


def peerctl(*args: str, node: str, token: str = TOKEN, timeout: float = 30):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PEERCTL_NODE"] = node
    e["PEERCTL_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "node.cli.peerctl", *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=str(ROOT)
    )


async def start_solo_node(tmp_path: Path, nursery, *, token: str, **flags: str):
    """One in-process ``Node`` named ``solo`` (real sockets on free loopback
    ports, real SQLite under ``tmp_path``, insecure gossip, local profile),
    started in ``nursery``. ``flags`` add or override config flags."""
    from node.cli.config import build_config
    from node.shell import Node

    gossip_port, api_port = free_ports(2)
    cfg = build_config(flags={
        "name": "solo", "bind": f"127.0.0.1:{gossip_port}", "api": f"127.0.0.1:{api_port}",
        "data_dir": str(tmp_path / "solo"), "insecure": True, "api_token": token,
        "profile": "local", **flags,
    }, environ={})
    n = await Node.create(cfg)
    await nursery.start(n.run)
    return n


class WebhookReceiver:
    """A local HTTP server that answers every POST 204 and keeps (path,
    headers with lower-case names, body bytes) (a test fixture, not peerd)."""

    def __init__(self):
        import http.server
        import threading

        self.posts: list[tuple[str, dict, bytes]] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def headers(self, path: str) -> list[dict]:
        return [h for p, h, _ in list(self.posts) if p == path]

    def bodies(self, path: str) -> list:
        """The JSON bodies posted to ``path``, oldest first."""
        return [json.loads(b or b"null") for p, _, b in list(self.posts) if p == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
