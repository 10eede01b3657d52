"""Network namespaces and nftables faults for the real-process chaos harness.

Each ``peerd`` node runs in its own network namespace (``ip netns``) with one
veth pair to a bridge in the root namespace::

    root namespace: bridge <prefix>br 10.213.X.1/24 (etcd listens here)
       |-- veth <prefix>h1 <-> eth0 10.213.X.2 in namespace <prefix>-n1
       |-- veth <prefix>h2 <-> eth0 10.213.X.3 in namespace <prefix>-n2
       ...

``prefix`` is ``pdc<pid>`` of the harness process and ``X`` the first
``10.213.X.0/24`` no address or route of the root namespace uses, so two runs
at once do not collide. Every name this module creates starts with ``pdc``;
:func:`remove_stale` deletes the leftovers of harness processes that no
longer exist.

Faults are nftables rules in a table ``inet peerd_chaos`` inside each
namespace, on the input hook of ``eth0`` only (so a node's own loopback is
never touched, and the harness and etcd, on the bridge address, stay
reachable through partitions):

- drop everything from a set of peer addresses (partitions: halves, one node
  isolated, one way: ``dst`` drops what ``src`` sends);
- ``numgen random mod 100 < P drop``: P % random loss on input.

Heal is ``nft flush table inet peerd_chaos``. The kernel this harness was
written on has no netem (no ``tc qdisc``), so slow links and delay are not
modelled; loss is the only degradation short of a cut.

The rule texts are built by pure functions (:func:`ruleset`,
:func:`fault_rules`), tested without any namespace.
"""
from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TABLE", "NetLayout", "NodeRules", "ruleset", "heal_ruleset", "fault_rules", "Netns",
           "netns_available", "remove_stale", "NetnsProc", "NetnsCluster", "BridgeEtcd"]

TABLE = "peerd_chaos"
NAME_PREFIX = "pdc"
SUBNET_BASE = "10.213"


@dataclass(frozen=True)
class NodeRules:
    """What one namespace drops on input: every datagram and segment from
    ``drop_from`` (peer addresses), and ``loss_pct`` % of the rest."""

    drop_from: frozenset[str] = frozenset()
    loss_pct: int = 0

    @property
    def empty(self) -> bool:
        return not self.drop_from and not self.loss_pct


def ruleset(rules: NodeRules, iface: str = "eth0") -> str:
    """The nft script that replaces this namespace's fault table with
    ``rules`` in one transaction (``nft -f -``). Pure."""
    if not 0 <= rules.loss_pct <= 100:
        raise ValueError(f"loss_pct must be within 0..100, got {rules.loss_pct}")
    lines = [f"table inet {TABLE} {{}}", f"flush table inet {TABLE}", f"table inet {TABLE} {{",
             "\tchain input {", "\t\ttype filter hook input priority filter; policy accept;"]
    if rules.drop_from:
        addrs = ", ".join(sorted(rules.drop_from, key=ipaddress.ip_address))
        lines.append(f'\t\tiifname "{iface}" ip saddr {{ {addrs} }} drop')
    if rules.loss_pct:
        lines.append(f'\t\tiifname "{iface}" numgen random mod 100 < {rules.loss_pct} drop')
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def heal_ruleset() -> str:
    """Heal: flush the fault table (its chain stays, empty)."""
    return f"table inet {TABLE} {{}}\nflush table inet {TABLE}\n"


def fault_rules(kind: str, names: list[str], addr: Mapping[str, str], *, node: str | None = None,
                peer: str | None = None, groups: tuple[tuple[str, ...], ...] = (),
                loss_pct: int = 0) -> dict[str, NodeRules]:
    """The rules of each namespace for one network fault (pure).

    Kinds: ``partition`` (``groups``; nodes in no group form one more
    group; nothing passes between groups), ``isolate`` (``node`` cut from
    every peer, both ways), ``oneway`` (``peer`` drops everything from
    ``node``; ``node`` still hears ``peer``), ``loss`` (``loss_pct`` % on
    ``node``'s input, or on every node's when ``node`` is None).
    Namespaces without rules are left out.
    """
    out: dict[str, NodeRules] = {}
    if kind in ("partition", "isolate"):
        gs = [tuple(g) for g in groups] if kind == "partition" else [(node,)]
        listed = {n for g in gs for n in g}
        unknown = listed - set(names)
        if unknown:
            raise ValueError(f"unknown nodes {sorted(unknown)}")
        rest = tuple(n for n in names if n not in listed)
        if rest:
            gs.append(rest)
        group_of = {n: i for i, g in enumerate(gs) for n in g}
        for n in names:
            drop = frozenset(addr[m] for m in names if group_of[m] != group_of[n])
            if drop:
                out[n] = NodeRules(drop_from=drop)
    elif kind == "oneway":
        if node not in addr or peer not in addr or node == peer:
            raise ValueError(f"oneway needs two distinct nodes, got {node!r} -> {peer!r}")
        out[peer] = NodeRules(drop_from=frozenset({addr[node]}))
    elif kind == "loss":
        if not 0 < loss_pct <= 100:
            raise ValueError(f"loss_pct must be within 1..100, got {loss_pct}")
        for n in ([node] if node is not None else names):
            out[n] = NodeRules(loss_pct=loss_pct)
    else:
        raise ValueError(f"not a network fault: {kind!r}")
    return out


@dataclass(frozen=True)
class NetLayout:
    """Names and addresses of one run's namespaces (pure)."""

    prefix: str
    octet: int
    names: tuple[str, ...]

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def bridge_addr(self) -> str:
        return f"{SUBNET_BASE}.{self.octet}.1"

    @property
    def subnet(self) -> str:
        return f"{SUBNET_BASE}.{self.octet}.0/24"

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def host_veth(self, name: str) -> str:
        return f"{self.prefix}h{self.names.index(name) + 1}"

    def addr(self, name: str) -> str:
        return f"{SUBNET_BASE}.{self.octet}.{self.names.index(name) + 2}"

    def addrs(self) -> dict[str, str]:
        return {n: self.addr(n) for n in self.names}

    def __post_init__(self) -> None:
        if not 0 <= self.octet <= 255:
            raise ValueError("octet must be within 0..255")
        if len(self.names) > 250:
            raise ValueError("at most 250 nodes on one /24")
        if len(self.host_veth(self.names[-1])) > 15 or len(self.bridge) > 15:
            raise ValueError(f"interface names from prefix {self.prefix!r} exceed 15 characters")


def _run(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def netns_available() -> tuple[bool, str]:
    """Whether this process may create a network namespace, a veth pair and
    an nftables table in it: tries once, with a throwaway namespace, and
    says why not."""
    ns = f"{NAME_PREFIX}{os.getpid()}-probe"
    try:
        for tool in ("ip", "nft"):
            if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
                return False, f"no '{tool}' command"
        _run("ip", "netns", "add", ns)
        try:
            _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset(NodeRules(loss_pct=1)))
            _run("ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        finally:
            _run("ip", "netns", "del", ns, check=False)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return True, "ok"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces and links this module made for harness processes
    that no longer run (a run killed with SIGKILL cannot clean up)."""
    removed = []
    pat = re.compile(rf"^{NAME_PREFIX}(\d+)(?:-|h\d+$|br$)")
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    out = _run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_octet(start: int) -> int:
    used = _run("ip", "-4", "addr", "show", check=False).stdout + _run("ip", "-4", "route", "show", check=False).stdout
    for k in range(256):
        o = (start + k) % 256
        if f"{SUBNET_BASE}.{o}." not in used:
            return o
    raise RuntimeError(f"no free {SUBNET_BASE}.X.0/24 in the root namespace")


class Netns:
    """The namespaces, veths and bridge of one run: ``setup()`` makes them,
    ``apply()``/``heal()`` change the fault tables, ``close()`` removes
    everything (idempotent; also removes what a half-done setup made)."""

    def __init__(self, names: list[str]):
        pid = os.getpid()
        self.layout = NetLayout(f"{NAME_PREFIX}{pid}", _free_octet(pid % 256), tuple(names))
        self.created_ns: list[str] = []
        self.created_links: list[str] = []
        self.active: dict[str, NodeRules] = {}

    def setup(self) -> None:
        lay = self.layout
        _run("ip", "link", "add", lay.bridge, "type", "bridge")
        self.created_links.append(lay.bridge)
        _run("ip", "addr", "add", f"{lay.bridge_addr}/24", "dev", lay.bridge)
        _run("ip", "link", "set", lay.bridge, "up")
        for n in lay.names:
            ns, host = lay.ns(n), lay.host_veth(n)
            _run("ip", "netns", "add", ns)
            self.created_ns.append(ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", f"{host}p")
            self.created_links.append(host)
            _run("ip", "link", "set", f"{host}p", "netns", ns)
            _run("ip", "link", "set", host, "master", lay.bridge, "up")
            _run("ip", "-n", ns, "link", "set", f"{host}p", "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{lay.addr(n)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.nft(n, ruleset(NodeRules()))

    def nft(self, name: str, script: str) -> None:
        _run("ip", "netns", "exec", self.layout.ns(name), "nft", "-f", "-", input=script)

    def apply(self, rules: dict[str, NodeRules]) -> None:
        """Install ``rules`` (a namespace left out keeps no rule)."""
        for n in self.layout.names:
            r = rules.get(n)
            if r is not None and not r.empty:
                self.nft(n, ruleset(r))
                self.active[n] = r
            elif n in self.active:
                self.nft(n, heal_ruleset())
                del self.active[n]

    def heal(self) -> None:
        for n in list(self.active):
            self.nft(n, heal_ruleset())
        self.active.clear()

    def close(self) -> list[str]:
        """Remove namespaces (their fault tables go with them), veths and the
        bridge; returns what could not be removed."""
        left = []
        for ns in self.created_ns:
            if _run("ip", "netns", "del", ns, check=False).returncode != 0:
                left.append(ns)
        for link in reversed(self.created_links):
            p = _run("ip", "link", "del", link, check=False)
            if p.returncode != 0 and "Cannot find device" not in p.stderr:
                left.append(link)
        self.created_ns.clear()
        self.created_links.clear()
        self.active.clear()
        return left


# -- peerd processes inside namespaces --------------------------------------------------

def _proc_classes():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.cluster_util import Cluster, Proc

    return Cluster, Proc


def _make_classes():
    Cluster, Proc = _proc_classes()

    @dataclass
    class NetnsProc(Proc):
        """A ``peerd`` process run as ``ip netns exec NS python -m
        node.cli.daemon ...``. ``ip netns exec`` execs (no fork), so
        ``popen.pid`` is the daemon's own pid: SIGKILL, SIGSTOP and SIGTERM
        reach the daemon itself."""

        ns: str = ""
        ip: str = ""
        env_extra: dict = field(default_factory=dict)

        @property
        def api_addr(self) -> str:
            return f"{self.ip}:{self.api}"

        def start(self, env=None) -> None:
            e = dict(os.environ)
            root = str(Path(__file__).resolve().parent.parent)
            e["PYTHONPATH"] = root + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
            if env:
                e.update(env)
            log = open(self.log_path, "ab")
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "node.cli.daemon", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=e, cwd=root)
            log.close()

    class NetnsCluster(Cluster):
        """``tests.cluster_util.Cluster`` with each node in its namespace,
        listening on its own address (gossip 7946, API 8080 everywhere)."""

        GOSSIP_PORT = 7946
        API_PORT = 8080

        def __init__(self, tmp: Path, net: Netns, *, profile: str = "local",
                     extra_args: list[str] | None = None):
            from gossip.seal_shell import generate_key
            from tests.cluster_util import TOKEN

            self.tmp = tmp
            self.key_file = tmp / "gossip.key"
            self.key_file.write_text(generate_key() + "\n")
            lay = net.layout
            seeds = ",".join(f"{lay.addr(n)}:{self.GOSSIP_PORT}" for n in lay.names[:2])
            self.procs = []
            for name in lay.names:
                ip = lay.addr(name)
                args = [
                    "--name", name, "--bind", f"{ip}:{self.GOSSIP_PORT}", "--api", f"{ip}:{self.API_PORT}",
                    "--seeds", seeds, "--data-dir", str(tmp / name), "--key-file", str(self.key_file),
                    "--api-token", TOKEN, "--profile", profile, "--shutdown-grace-s", "3",
                    "--log-level", "info",
                ] + (extra_args or [])
                self.procs.append(NetnsProc(name, self.GOSSIP_PORT, self.API_PORT, tmp / name,
                                            tmp / f"{name}.log", args, ns=lay.ns(name), ip=ip))

    return NetnsProc, NetnsCluster


def _make_etcd():
    from tests.etcd_server import EtcdServer

    class BridgeEtcd(EtcdServer):
        """etcd serving clients on the bridge address (every namespace
        reaches it; partitions and loss rules never match it... except
        loss on input, which drops its replies like any other packet)."""

        def __init__(self, binary: str, workdir: str, host: str):
            super().__init__(binary, workdir)
            self.host = host

        @property
        def url(self) -> str:
            return f"http://{self.host}:{self.client_port}"

    return BridgeEtcd


def __getattr__(name: str):
    # The process classes subclass tests/'s; built on first use so the pure
    # functions above import nothing from tests/.
    if name in ("NetnsProc", "NetnsCluster"):
        procs, cluster = _make_classes()
        globals().update(NetnsProc=procs, NetnsCluster=cluster)
        return globals()[name]
    if name == "BridgeEtcd":
        globals()["BridgeEtcd"] = _make_etcd()
        return globals()["BridgeEtcd"]
    raise AttributeError(name)
