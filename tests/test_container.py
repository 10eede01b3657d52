"""The container image (Dockerfile, deploy/container/).

Fast (default run): the Dockerfile has what the image promises (base image
as a build argument, a non-root user, ``peerd`` as the entrypoint, the data
dir a volume, a health check), and ``peerd-healthcheck`` judges a real node
both ways (200 -> exit 0; a wrong token, a wrong CA or no node -> exit 1),
over http and https.

Slow (``-m slow``): builds the image with podman (a local base image is made
with deploy/container/make-base-image.sh if none is present; Python packages
come from a wheelhouse made on the host), runs three containers on a podman
network with a shared gossip key and token with deploy/container/cluster.sh,
and checks that all three are alive (``peerctl`` inside the containers),
that the health check passes, that a task applied with ``peerctl`` on the
host (through the API published on loopback) is seen on another member and
runs there, that ``podman stop`` makes a node leave gracefully (state
``left``, exit 0) and that, started again, it has its state from its volume.
It runs twice on one image build: with plain http, and with the APIs over
https (a CA and per-member certificates made here, cluster.sh's TLS_DIR;
peerctl on the host and in the containers trusts the CA; plain http to the
published port is refused). Containers, network, volumes and the image are
removed afterwards. Skips
with the reason where podman is missing or cannot run containers here.

Environment: ``PEERD_TEST_PODMAN_OPTS`` (global podman options, default
``--storage-driver vfs``), ``PEERD_TEST_BASE_IMAGE`` (default
``localhost/peerd-base:bookworm``).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster_util import ROOT, TOKEN, Cluster, wait_for

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck.py"
MAKE_BASE = ROOT / "deploy" / "container" / "make-base-image.sh"
CLUSTER_SH = ROOT / "deploy" / "container" / "cluster.sh"


# ------------------------------------------------------------------ Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined,
    comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile_has_what_the_image_promises():
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    names = [i for i, _ in ins]
    first_from = names.index("FROM")
    pre = ins[:first_from]
    assert any(i == "ARG" and a.split("=", 1)[0] == "BASE_IMAGE" for i, a in pre), \
        "ARG BASE_IMAGE must come before the first FROM"
    base_default = next(a.split("=", 1)[1] for i, a in pre if i == "ARG" and a.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"python:3\.1[1-9]+-slim", base_default), base_default
    froms = [a for i, a in ins if i == "FROM"]
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms), froms
    # the last stage is the image
    final = ins[max(k for k, (i, _) in enumerate(ins) if i == "FROM"):]
    users = [a for i, a in final if i == "USER"]
    assert users, "the image must name a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    entry = [a for i, a in final if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["peerd"], entry
    volumes = [json.loads(a) if a.startswith("[") else a.split() for i, a in final if i == "VOLUME"]
    assert ["/var/lib/peerd"] in volumes, volumes
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PEERD_DATA_DIR=/var/lib/peerd" in env, "the node's data dir must be the volume"
    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert health and "CMD" in health[-1] and "peerd-healthcheck" in health[-1], health
    assert re.search(r"--interval=\d+s", health[-1]) and re.search(r"--timeout=\d+s", health[-1])
    assert ("STOPSIGNAL", "SIGTERM") in final
    expose = " ".join(a for i, a in final if i == "EXPOSE").split()
    assert {"7946/udp", "7946/tcp", "7701/tcp"} <= set(expose), expose
    # the healthcheck the image installs is the script tested below
    assert "deploy/container/healthcheck.py /opt/peerd/bin/peerd-healthcheck" in DOCKERFILE.read_text()


def test_dockerignore_keeps_the_context_small_but_complete():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv"} <= lines
    for needed in ("pyproject.toml", "README.md", "node", "gossip", "sim", "deploy", "wheelhouse"):
        assert needed not in lines and f"/{needed}" not in lines, needed


# ------------------------------------------------------------- the health check
def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PEERD_")}
    e.update(env)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=e,
                          timeout=30)


def _healthy(port: int, **env: str) -> bool:
    return healthcheck({"PEERD_API": f"0.0.0.0:{port}", "PEERD_API_TOKEN": TOKEN, **env}).returncode == 0


def test_healthcheck_judges_a_real_node_both_ways(tmp_path):
    c = Cluster(tmp_path, 1)
    c.start()
    p = c.procs[0]
    try:
        wait_for(lambda: _healthy(p.api), timeout=60, what="healthcheck passes", cluster=c, interval=0.2)
        r = healthcheck({"PEERD_API": f"0.0.0.0:{p.api}", "PEERD_API_TOKEN": "wrong"})
        assert r.returncode == 1 and "HTTP 401" in r.stderr, r
        r = healthcheck({"PEERD_API": f"127.0.0.1:{p.api}"})  # no token at all
        assert r.returncode == 1 and "HTTP 401" in r.stderr, r
        tok = tmp_path / "token"
        tok.write_text(TOKEN + "\n")
        assert healthcheck({"PEERD_API": f"127.0.0.1:{p.api}", "PEERD_API_TOKEN_FILE": str(tok)}).returncode == 0
    finally:
        c.stop()
    r = healthcheck({"PEERD_API": f"127.0.0.1:{p.api}", "PEERD_API_TOKEN": TOKEN})
    assert r.returncode == 1 and "peerd-healthcheck" in r.stderr, r


def test_healthcheck_over_tls(tmp_path):
    from tests.test_api_tls import make_pki

    pki = make_pki(tmp_path)
    c = Cluster(tmp_path, 1, extra_args=["--api-tls-cert", str(pki.cert), "--api-tls-key", str(pki.key)])
    c.start()
    p = c.procs[0]
    try:
        # trusts exactly the node's certificate, as inside the container
        wait_for(lambda: _healthy(p.api, PEERD_API_TLS_CERT=str(pki.cert)), timeout=60,
                 what="healthcheck over https passes", cluster=c, interval=0.2)
        assert _healthy(p.api, PEERD_API_TLS_CERT=str(pki.cert), PEERD_HEALTHCHECK_CA_CERT=str(pki.ca))
        r = healthcheck({"PEERD_API": f"127.0.0.1:{p.api}", "PEERD_API_TOKEN": "wrong",
                         "PEERD_API_TLS_CERT": str(pki.cert)})
        assert r.returncode == 1 and "HTTP 401" in r.stderr, r
        r = healthcheck({"PEERD_API": f"127.0.0.1:{p.api}", "PEERD_API_TOKEN": TOKEN,
                         "PEERD_API_TLS_CERT": str(pki.cert), "PEERD_HEALTHCHECK_CA_CERT": str(pki.other_ca)})
        assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r
        # http against the https port fails (the node answers 400)
        r = healthcheck({"PEERD_API": f"127.0.0.1:{p.api}", "PEERD_API_TOKEN": TOKEN})
        assert r.returncode == 1 and "HTTP 400" in r.stderr, r
    finally:
        c.stop()


# ------------------------------------------------------ podman: build and run
BASE_IMAGE = os.environ.get("PEERD_TEST_BASE_IMAGE", "localhost/peerd-base:bookworm")
GOSSIP_PORT, API_PORT = 7946, 7701


class Podman:
    """``podman`` with this machine's working options: global options from
    ``PEERD_TEST_PODMAN_OPTS`` and, found by :meth:`probe`, the runtime and
    ulimits a container needs here."""

    def __init__(self) -> None:
        self.global_opts = shlex.split(os.environ.get("PEERD_TEST_PODMAN_OPTS", "--storage-driver vfs"))
        self.run_opts: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 input: str | None = None) -> subprocess.CompletedProcess:
        cmd = ["podman", *self.global_opts, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def probe(self, image: str) -> str | None:
        """Find options with which ``podman run`` works; None, or why not.

        Tried in order: none; ulimits within this process's own (a
        container cannot raise them without CAP_SYS_RESOURCE); those with
        the runc runtime (crun refuses hybrid cgroup v1/v2 hosts)."""
        import resource

        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
        ulimits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]
        candidates: list[tuple[list[str], list[str]]] = [([], []), ([], ulimits)]
        if shutil.which("runc"):
            candidates.append((["--runtime", "runc"], ulimits))
        base_global = list(self.global_opts)
        errors = []
        for glob, run in candidates:
            self.global_opts = base_global + glob
            r = self("run", "--rm", *run, image, "python3", "-c", "print('ok')", check=False, timeout=120)
            if r.returncode == 0 and "ok" in r.stdout:
                self.run_opts = run
                return None
            errors.append(f"{shlex.join(glob + run) or '(no options)'}: {r.stderr.strip().splitlines()[-1:]}")
        self.global_opts = base_global
        return "podman cannot run a container here: " + "; ".join(errors)


def _timed(label: str, timings: dict[str, float], fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    timings[label] = time.monotonic() - t0
    return out


def _ensure_base_image(pm: Podman, timings: dict[str, float]) -> None:
    if pm("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        pytest.skip(f"no base image {BASE_IMAGE} and no debootstrap to make one "
                    "(apt-get install debootstrap, or set PEERD_TEST_BASE_IMAGE)")
    env = dict(os.environ, PODMAN_OPTS=shlex.join(pm.global_opts))
    t0 = time.monotonic()
    r = subprocess.run(["sh", str(MAKE_BASE), BASE_IMAGE], capture_output=True, text=True, env=env, timeout=1500)
    timings["base image (debootstrap + import)"] = time.monotonic() - t0
    if r.returncode != 0:
        pytest.skip(f"could not make the base image {BASE_IMAGE}: {r.stderr.strip()[-500:]}")


def _consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback TCP ports that are free now."""
    import socket

    from node.cli.demo import free_port

    for _ in range(200):
        first = free_port()
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def _exec_env(tls: bool) -> list[str]:
    """``podman exec`` options for ``peerctl`` inside a member: the token
    (over https, cluster.sh has set PEERCTL_NODE and PEERCTL_CA_CERT in the
    container)."""
    return ["-e", f"PEERCTL_TOKEN={TOKEN}"]


def _members(pm: Podman, container: str, tls: bool) -> dict[str, str]:
    r = pm("exec", *_exec_env(tls), container, "peerctl", "--json", "members", check=False, timeout=30)
    if r.returncode != 0:
        return {}
    return {m["name"]: m["state"] for m in json.loads(r.stdout)}


def _peerctl_json(pm: Podman, container: str, tls: bool, *args: str):
    r = pm("exec", *_exec_env(tls), container, "peerctl", "--json", *args, check=False, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _host_peerctl(*args: str, node: str, ca: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PEERCTL_NODE=node, PEERCTL_TOKEN=TOKEN)
    if ca is not None:
        env["PEERCTL_CA_CERT"] = str(ca)
    return subprocess.run([sys.executable, "-m", "node.cli.peerctl", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=str(ROOT))


def _poll(cond, *, timeout: float, what: str, diag=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diag()}")


@pytest.fixture(scope="module")
def built_image(tmp_path_factory):
    """(podman, image): the image built once for the module from a local
    base and a host wheelhouse; removed at the end."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman)")
    pm = Podman()
    info = pm("info", "--format", "json", check=False, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    timings: dict[str, float] = {}
    _ensure_base_image(pm, timings)
    why = pm.probe(BASE_IMAGE)
    if why:
        pytest.skip(why)
    image = f"localhost/peerd:t{os.getpid()}"
    try:
        # Python packages from a wheelhouse made on the host: no index inside the build
        wheelhouse = tmp_path_factory.mktemp("wheelhouse")
        r = _timed("wheelhouse (pip wheel on the host)", timings, subprocess.run,
                   [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", str(ROOT),
                    "setuptools", "wheel", "-w", str(wheelhouse)],
                   capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"cannot make a wheelhouse (no package index?): {r.stderr.strip()[-400:]}")
        _timed("image build", timings, pm, "build", "--format", "docker", "--layers=false", "-t", image,
               "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "-v", f"{wheelhouse}:/wheelhouse:ro",
               "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links=/wheelhouse",
               str(ROOT), timeout=1500)
        inspected = json.loads(pm("image", "inspect", image).stdout)[0]
        cfg = inspected["Config"]
        assert cfg["User"] == "peerd:peerd" and cfg["Entrypoint"] == ["peerd"], cfg
        assert "/var/lib/peerd" in cfg["Volumes"], cfg
        # kept only in the docker format (--format docker)
        assert (inspected.get("Healthcheck") or {}).get("Test") == ["CMD", "peerd-healthcheck"], inspected
        print("\ncontainer image timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        yield pm, image
    finally:
        pm("rmi", "-f", image, check=False, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("api", ["http", "https"])
def test_three_containers_on_a_podman_network(built_image, api, tmp_path):
    pm, image = built_image
    tls = api == "https"
    timings: dict[str, float] = {}
    tag = f"peerd-t{os.getpid()}{api[4:]}"
    net = f"{tag}-net"
    names = [f"{tag}-{i}" for i in (1, 2, 3)]  # cluster.sh's names: PREFIX-i, PREFIX-i-data, PREFIX-net
    volumes = [f"{n}-data" for n in names]
    subnet = f"10.89.{200 + (os.getpid() % 25) * 2 + tls}.0/24"
    ips = [f"{subnet.rsplit('.', 1)[0]}.{10 + i}" for i in (1, 2, 3)]  # cluster.sh: member i is .(10+i)

    def logs() -> str:
        out = []
        for n in names:
            r = pm("logs", "--tail", "40", n, check=False)
            out.append(f"===== {n} =====\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
        return "\n".join(out)

    try:
        # the cluster, as deploy/container/cluster.sh runs it for operators
        publish = _consecutive_free_ports(3)
        env = dict(os.environ, ENGINE=shlex.join(["podman", *pm.global_opts]), RUN_OPTS=shlex.join(pm.run_opts),
                   IMAGE=image, PREFIX=tag, SUBNET=subnet, TOKEN=TOKEN,
                   KEY_FILE=str(tmp_path / "gossip.key"), PUBLISH=str(publish), STOP_TIMEOUT="30")
        ca = None
        if tls:
            from tests.test_api_tls import make_member_certs

            tls_dir = tmp_path / "tls"
            tls_dir.mkdir()
            make_member_certs(tls_dir, ips)
            tls_dir.chmod(0o755)  # the image's user enters it; cluster.sh gives it the keys
            for f in tls_dir.glob("*.pem"):
                f.chmod(0o644)
            env["TLS_DIR"] = str(tls_dir)
            ca = tls_dir / "ca.pem"
        t0 = time.monotonic()
        r = subprocess.run(["sh", str(CLUSTER_SH), "up", "--profile", "local", "--shutdown-grace-s", "5"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, f"cluster.sh up exited {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}\n{logs()}"
        assert [ln.split(" at ")[1].split()[0] for ln in r.stdout.splitlines()] == ips, r.stdout
        assert oct(os.stat(tmp_path / "gossip.key").st_mode & 0o777) == "0o600"
        for n in names:
            _poll(lambda n=n: set(_members(pm, n, tls).items()) >= {("n1", "alive"), ("n2", "alive"),
                                                                    ("n3", "alive")},
                  timeout=180, what=f"{n} lists n1, n2, n3 alive", diag=logs)
        timings["cluster up (3 containers started, all alive everywhere)"] = time.monotonic() - t0

        for n in names:
            r = pm("healthcheck", "run", n, check=False, timeout=60)
            assert r.returncode == 0, (n, r.stdout, r.stderr)

        # a task applied with peerctl on the host (n1's API published on
        # loopback) is seen on n2 and runs
        tasks = tmp_path / "tasks.yaml"
        tasks.write_text('tasks:\n  - id: ctr-hello\n    schedule: "@every 2s"\n'
                         '    command: {type: shell, run: "echo hello from $PEERD_NODE"}\n')
        r = _host_peerctl("tasks", "apply", "-f", str(tasks), node=f"{api}://127.0.0.1:{publish}", ca=ca)
        assert r.returncode == 0 and "ctr-hello" in r.stdout + r.stderr, (r.stdout, r.stderr)
        if tls:  # the published https port refuses plain http
            r = _host_peerctl("members", node=f"http://127.0.0.1:{publish}", ca=None)
            assert r.returncode != 0 and "400" in r.stdout + r.stderr, (r.stdout, r.stderr)
        got = _poll(lambda: _peerctl_json(pm, names[1], tls, "tasks", "get", "ctr-hello"), timeout=60,
                    what="n2 knows ctr-hello", diag=logs)
        assert got["task"]["id"] == "ctr-hello", got
        runs = _poll(lambda: [x for x in (_peerctl_json(pm, names[1], tls, "runs", "ctr-hello") or [])
                              if x.get("status") == "succeeded"],
                     timeout=90, what="a succeeded run of ctr-hello listed on n2", diag=logs)
        assert runs[0]["node"] in ("n1", "n2", "n3"), runs

        # podman stop: SIGTERM, the node leaves gracefully and exits 0
        t0 = time.monotonic()
        pm("stop", "-t", "30", names[2], timeout=90)
        timings["podman stop (graceful leave)"] = time.monotonic() - t0
        state = json.loads(pm("inspect", names[2]).stdout)[0]["State"]
        assert state["ExitCode"] == 0, (state, logs())
        assert timings["podman stop (graceful leave)"] < 25, "stopped by the kill after the timeout, not by leaving"
        _poll(lambda: _members(pm, names[0], tls).get("n3") == "left", timeout=60,
              what="n1 lists n3 as left", diag=logs)
        out = pm("logs", names[2])
        assert "node n3 stopped" in out.stdout + out.stderr

        # its state is in the volume: started again it has the task at once
        pm("start", names[2])
        _poll(lambda: (_peerctl_json(pm, names[2], tls, "tasks", "get", "ctr-hello") or {}).get("task"),
              timeout=60, what="n3 back with ctr-hello", diag=logs)
        _poll(lambda: _members(pm, names[0], tls).get("n3") == "alive", timeout=120,
              what="n1 lists n3 alive again", diag=logs)
        r = subprocess.run(["sh", str(CLUSTER_SH), "purge"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, (r.stdout, r.stderr)
        for n in names:
            assert pm("container", "exists", n, check=False).returncode != 0, n
        for v in volumes:
            assert pm("volume", "exists", v, check=False).returncode != 0, v
    finally:
        for n in names:
            pm("rm", "-f", "-t", "0", n, check=False, timeout=120)
        pm("network", "rm", "-f", net, check=False)
        for v in volumes:
            pm("volume", "rm", "-f", v, check=False)
        if timings:
            print(f"\ncontainer cluster timings ({api}): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
