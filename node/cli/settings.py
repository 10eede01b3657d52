"""Node settings (core): :class:`NodeConfig`, each knob's meaning and default, and the parser of its values.

Every knob is a field of :class:`NodeConfig`, listed with its default; its
config file key is the flag name with dashes turned into underscores, and
:data:`PARSERS` maps each key to the function that checks a value given for
it (from a flag, a ``PEERD_<NAME>`` variable or a config file; where values
come from and in which order is node/cli/config.py). A wrong value raises
:class:`ConfigError` naming the source, the key and the reason.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from gossip.addr import parse_addr as _parse_addr
from node.state.store import DEFAULT_RUN_RECORDS_MAX_BYTES

Addr = tuple[str, int]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names where and why."""


def parse_addr(text: str, *, what: str = "address") -> Addr:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with
    ``gossip.addr.parse_addr``.

    Raises:
        ConfigError: with ``what`` and the reason.
    """
    try:
        return _parse_addr(str(text))
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _parse_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(f"{what}: expected strings, got {type(v).__name__}")
            out.append(v.strip())
        return out
    raise ConfigError(f"{what}: expected a comma-separated string or a list")


def parse_tags(value: Any, what: str = "tags") -> dict[str, str]:
    """``k=v,k2=v2`` or a mapping."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"{what}: keys and values must be strings")
            out[k] = str(v)
        return out
    out = {}
    for item in _parse_list(value, what):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"{what}: {item!r}: expected key=value")
        out[k.strip()] = v.strip()
    return out


def _parse_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what}: {value!r} is not a boolean (true/false)")


def _parse_int(value: Any, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not an integer")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not an integer") from None
    if n < minimum:
        raise ConfigError(f"{what}: must be >= {minimum}")
    return n


def _parse_float(value: Any, what: str, *, minimum: float = 0.0) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a number") from None
    if f < minimum:
        raise ConfigError(f"{what}: must be >= {minimum}")
    return f


@dataclass(frozen=True)
class NodeConfig:
    """Everything a ``peerd`` node is started with.

    Attributes:
        name: member name, unique in the cluster (default: host name).
        bind: gossip bind address, UDP and TCP on the same port (default
            ``0.0.0.0:7946``, memberlist's port).
        advertise: address other members use to reach us (default: bind, or
            127.0.0.1 when bound to a wildcard).
        seeds: addresses to join through; any member can be a seed; seeds that
            are down are retried with backoff. A seed may be a DNS name
            (``peerd.ns.svc.cluster.local:7946``): it is resolved again at
            every join attempt, to all its addresses.
        api: HTTP API and ``/metrics`` address (default ``127.0.0.1:7701``).
        data_dir: directory for the SQLite state (default ``./peerd-data/<name>``).
        key_file: gossip keyring file (one base64 AES key per line; the first
            seals). Required unless ``insecure`` is true.
        insecure: run gossip unsealed (tests and demos only).
        api_token: bearer token for every API route that changes state or
            runs code. Without one those routes refuse everything. A flag
            shows in the process list (``ps``) to every local user: prefer
            ``api_token_file``.
        api_token_file: file holding the API token (first line; the file
            should be mode 0600). Exclusive with ``api_token``.
        api_tokens_file: YAML or JSON file of named tokens with roles
            (read, operate, admin; node/api/tokens.py), read at start and on
            SIGHUP; with or without ``api_token``.
        open_reads: let read-only routes answer without the token (default
            false: reads need the token too; ``/metrics`` is always open).
        tags: member tags ``k=v,...`` used by task placement.
        etcd: etcd endpoints (``http://host:2379,...``); empty = no fencing.
        etcd_prefix, etcd_user, etcd_password, etcd_ca_file: etcd options.
        etcd_password_file: file holding the etcd password (first line),
            exclusive with ``etcd_password``.
        etcd_cert_file, etcd_key_file: client certificate and its key (PEM)
            for ``https://`` etcd endpoints that require one; both or
            neither (the same file if it holds both).
        api_tls_cert, api_tls_key: serve the HTTP API over TLS with this
            certificate chain and private key (PEM); both or neither. Every
            route, ``/metrics`` included, is then https only.
        fencing_on_unavailable: ``skip`` (default, never risk a duplicate) or
            ``fire`` (fire without a token while etcd is down).
        fencing_retention_s: lease TTL of slot claims (default 1 day).
        fencing_session_ttl_s: TTL of the etcd session that proves this
            node's process alive to reclaimers (default 10 s; see
            ``node/fencing/rules.py`` Rule 8).
        tasks: task file applied at start.
        log_format: ``text`` or ``json``.
        log_level: ``debug``, ``info`` (default), ``warning``.
        profile: membership timing profile, ``lan`` (memberlist defaults) or
            ``local`` (fast, for tests and the demo).
        reap_interval_s: how long dead and left members stay listed (1 hour,
            like serf's reconnect/tombstone timeouts).
        shutdown_grace_s: on SIGTERM, how long running runs may finish
            before they are handed back (default 30 s).
        start_empty: if the state database is corrupt, move it aside and
            start empty (refilled from peers) instead of refusing to start.
        max_skew_s: members whose clocks are off by more than this are not
            given ownership (default 2 s).
        run_records_max_bytes: budget of run-record bytes on this node:
            encoded records (in memory) plus output texts (in SQLite, read
            on demand). Default 256 MiB. Over it the oldest outputs are
            dropped down to 80 % of it (records stay, bounded per task by
            ``history``); each pass is logged and counted in
            ``peerd_run_records_trimmed_total``. To keep every output, set
            it to ``T * R / N * H * (O + 1 KiB)`` (T tasks, R replicas, N
            nodes, H ``history``, O output bytes per run, up to 64 KiB);
            the trade-off is disk and page cache against old outputs.
        write_ack: when a write through the API is answered: ``local``
            (committed to this node's SQLite file) or ``replica`` (also
            acknowledged by at least one other replica, within 5 s).
        notify: the cluster's default notification targets, for every task
            without its own ``notify`` (same fields; a list in a config file,
            JSON in ``PEERD_NOTIFY``); each node applies its own, so give
            every node the same.
        otlp_endpoint: OTLP/HTTP traces endpoint (``http://collector:4318``;
            ``/v1/traces`` is added when the path is empty); empty = no
            traces. Needs the ``otel`` extra (node/run/tracing_shell.py).
    """

    name: str = ""
    bind: Addr = ("0.0.0.0", 7946)
    advertise: Addr | None = None
    seeds: tuple[Addr, ...] = ()
    api: Addr = ("127.0.0.1", 7701)
    data_dir: str = ""
    key_file: str = ""
    insecure: bool = False
    api_token: str = ""
    api_token_file: str = ""
    api_tokens_file: str = ""
    open_reads: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)
    etcd: tuple[str, ...] = ()
    etcd_prefix: str = "/peerd"
    etcd_user: str = ""
    etcd_password: str = ""
    etcd_password_file: str = ""
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""
    api_tls_cert: str = ""
    api_tls_key: str = ""
    fencing_on_unavailable: str = "skip"
    fencing_retention_s: float = 86400.0
    fencing_session_ttl_s: float = 10.0
    tasks: str = ""
    log_format: str = "text"
    log_level: str = "info"
    profile: str = "lan"
    reap_interval_s: float = 3600.0
    shutdown_grace_s: float = 30.0
    start_empty: bool = False
    max_skew_s: float = 2.0
    otlp_endpoint: str = ""
    notify: tuple = ()
    write_ack: str = "local"
    run_records_max_bytes: int = DEFAULT_RUN_RECORDS_MAX_BYTES

    def advertise_addr(self) -> Addr:
        if self.advertise is not None:
            return self.advertise
        host, port = self.bind
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        return (host, port)

    def data_path(self) -> Path:
        return Path(self.data_dir or Path("peerd-data", self.name))


# key -> (parser, description). Parsers take (value, what) and return the
# typed value.
def _addr_parser(value: Any, what: str) -> Addr:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = f"{value[0]}:{value[1]}"
    return parse_addr(str(value), what=what)


# RFC 1123 host name (underscores tolerated), optional trailing dot
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def _seeds_parser(value: Any, what: str) -> tuple[Addr, ...]:
    """Seeds are ``HOST:PORT`` where HOST is an IP address or a DNS name.
    A name is resolved by the gossip shell at every join attempt, to all
    its addresses (a Kubernetes headless Service lists every pod), so it
    is only checked for shape here."""
    out = []
    for s in _parse_list(value, what):
        host, port = parse_addr(s, what=what)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            if not _HOST_NAME.fullmatch(host):
                raise ConfigError(
                    f"{what}: seed {s!r}: {host!r} is neither an IP address nor a DNS name "
                    "(labels of letters, digits and '-', separated by dots)"
                ) from None
        if port == 0:
            raise ConfigError(f"{what}: seed {s!r}: port 0 cannot be dialled")
        out.append((host, port))
    return tuple(out)


def _choice(*choices: str):
    def parse(value: Any, what: str) -> str:
        if value not in choices:
            raise ConfigError(f"{what}: {value!r}: must be one of {', '.join(choices)}")
        return value

    return parse


def _str(value: Any, what: str) -> str:
    if not isinstance(value, (str, int)):
        raise ConfigError(f"{what}: expected a string")
    return str(value)


def _name(value: Any, what: str) -> str:
    v = _str(value, what)
    if not v or len(v.encode()) > 48 or any(c.isspace() for c in v):
        raise ConfigError(f"{what}: {v!r}: a name is 1-48 bytes without spaces")
    return v


def _notify_targets(value: Any, what: str) -> tuple:
    """Default notify targets: a list of targets (or JSON text of one)."""
    from node.tasks.model import check_notify_target

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{what}: expected a list of notify targets (JSON in a flag or variable)") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) > 8:
        raise ConfigError(f"{what}: expected a list of at most 8 notify targets")
    out = []
    for i, t in enumerate(value):
        err, target = check_notify_target(t)
        if err:
            raise ConfigError(f"{what}[{i}].{err[0]}: {err[1]}" if err[0] else f"{what}[{i}]: {err[1]}")
        out.append(target)
    return tuple(out)


PARSERS: dict[str, Any] = {
    "name": _name,
    "bind": _addr_parser,
    "advertise": _addr_parser,
    "seeds": _seeds_parser,
    "api": _addr_parser,
    "data_dir": _str,
    "key_file": _str,
    "insecure": _parse_bool,
    "api_token": _str,
    "api_token_file": _str,
    "api_tokens_file": _str,
    "open_reads": _parse_bool,
    "tags": parse_tags,
    "etcd": lambda v, w: tuple(_parse_list(v, w)),
    "etcd_prefix": _str,
    "etcd_user": _str,
    "etcd_password": _str,
    "etcd_password_file": _str,
    "etcd_ca_file": _str,
    "etcd_cert_file": _str,
    "etcd_key_file": _str,
    "api_tls_cert": _str,
    "api_tls_key": _str,
    "fencing_on_unavailable": _choice("skip", "fire"),
    "fencing_retention_s": lambda v, w: _parse_float(v, w, minimum=1.0),
    "fencing_session_ttl_s": lambda v, w: _parse_float(v, w, minimum=2.0),
    "tasks": _str,
    "log_format": _choice("text", "json"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "profile": _choice("lan", "local"),
    "reap_interval_s": lambda v, w: _parse_float(v, w, minimum=0.0),
    "shutdown_grace_s": lambda v, w: _parse_float(v, w, minimum=0.0),
    "start_empty": _parse_bool,
    "max_skew_s": lambda v, w: _parse_float(v, w, minimum=0.0),
    "otlp_endpoint": _str,
    "notify": lambda v, w: _notify_targets(v, w),
    "write_ack": _choice("local", "replica"),
    "run_records_max_bytes": lambda v, w: _parse_int(v, w, minimum=64 * 1024),
}
assert set(PARSERS) == {f.name for f in fields(NodeConfig)}
