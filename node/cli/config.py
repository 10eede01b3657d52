"""Node configuration: flags, config file and ``PEERD_*`` environment.

Precedence (highest first): command-line flag, ``PEERD_<NAME>`` environment
variable, config file (``--config``, TOML / YAML / JSON by extension),
built-in default. Every knob below is listed with its default; its config
file key is the flag name with dashes turned into underscores.

A config error raises :class:`ConfigError` naming the source (file, flag or
environment variable), the key and the reason. Nothing here does network I/O.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import ssl


from gossip.transport import parse_addr as _parse_addr
from node.tasks.decoding import DecodeError, check_tree, loads_json, loads_yaml
from node.state.store import DEFAULT_RUN_RECORDS_MAX_BYTES

Addr = tuple[str, int]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names where and why."""


def parse_addr(text: str, *, what: str = "address") -> Addr:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with
    ``gossip.transport.parse_addr``.

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
        return Path(self.data_dir or os.path.join("peerd-data", self.name))


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


#: A config file is a page of settings; anything larger is not one.
MAX_CONFIG_FILE_BYTES = 1 << 20


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML / YAML / JSON config file into a flat dict.

    Raises:
        ConfigError: unreadable file, bad syntax, not a mapping.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_FILE_BYTES >> 10} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .yaml or .json)")
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
            check_tree(data)
        elif suffix in (".yaml", ".yml"):
            data = loads_yaml(text)
        else:
            data = loads_json(text)
    except DecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # tomllib's errors, or its recursion on deep nesting
        raise ConfigError(f"{path}: syntax error: {' '.join(str(e).split())[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping of settings")
    # accept dashes as in the flags
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(
    *,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> NodeConfig:
    """Merge the three sources over the defaults.

    Args:
        flags: values given on the command line (``None`` = not given).
        environ: environment (``os.environ`` by default).
        config_file: path of a config file, or None.

    Secrets named by ``api_token_file`` / ``etcd_password_file`` are read
    here into ``api_token`` / ``etcd_password`` (the ``*_file`` fields keep
    the paths).

    Raises:
        ConfigError: names the source, the key and the reason.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if config_file:
        data = load_config_file(config_file)
        for key, value in data.items():
            if key not in PARSERS:
                raise ConfigError(f"{config_file}: unknown key {key!r}")
            values[key] = PARSERS[key](value, f"{config_file}: {key}")
    for key, parser in PARSERS.items():
        env_name = "PEERD_" + key.upper()
        if env_name in environ:
            values[key] = parser(environ[env_name], f"environment {env_name}")
    for key, value in flags.items():
        if value is None:
            continue
        if key not in PARSERS:
            raise ConfigError(f"--{key.replace('_', '-')}: unknown option")
        values[key] = parser_value = PARSERS[key](value, f"--{key.replace('_', '-')}")
        del parser_value
    cfg = replace(NodeConfig(), **values)
    if not cfg.name:
        import socket

        cfg = replace(cfg, name=socket.gethostname().split(".")[0] or "peerd")
    return validate(_resolve_secret_files(cfg))


#: A secret file is small; anything longer is not a token.
MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file, stripped.

    Raises:
        ConfigError: unreadable, empty, too long or not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what}: {path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{what}: {path}: longer than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path}: not UTF-8 text") from None
    value = lines[0].strip() if lines else ""
    if not value:
        raise ConfigError(f"{what}: {path}: empty (the secret is the file's first line)")
    return value


def loose_permissions(path: str) -> int | None:
    """The mode bits of ``path`` if group or others may read it, else None
    (also None when the file cannot be stat'ed: the reader reports that)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return None
    return mode if mode & 0o044 else None


def load_token_file(path: str):
    """The named tokens of ``api_tokens_file`` (a ``node.api.tokens.TokenSet``).

    Raises:
        ConfigError: unreadable, not YAML/JSON, or an entry wrong (named).
    """
    from node.tasks.decoding import DecodeError, loads_yaml
    from node.api.tokens import TokenFileError, TokenSet, parse_token_file

    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20 + 1)
    except OSError as e:
        raise ConfigError(f"api_tokens_file: {path}: cannot read: {e.strerror or e}") from None
    if len(raw) > 1 << 20:
        raise ConfigError(f"api_tokens_file: {path}: larger than 1 MiB")
    try:
        data = loads_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"api_tokens_file: {path}: not UTF-8 text") from None
    except (DecodeError, ValueError) as e:
        raise ConfigError(f"api_tokens_file: {path}: {e}") from None
    try:
        return TokenSet(parse_token_file(data, path))
    except TokenFileError as e:
        raise ConfigError(f"api_tokens_file: {e}") from None


def _resolve_secret_files(cfg: NodeConfig) -> NodeConfig:
    if cfg.api_token_file:
        if cfg.api_token:
            raise ConfigError("api_token_file: give either api_token or api_token_file, not both")
        cfg = replace(cfg, api_token=read_secret_file(cfg.api_token_file, "api_token_file"))
    if cfg.etcd_password_file:
        if cfg.etcd_password:
            raise ConfigError("etcd_password_file: give either etcd_password or etcd_password_file, not both")
        cfg = replace(cfg, etcd_password=read_secret_file(cfg.etcd_password_file, "etcd_password_file"))
    return cfg


def validate(cfg: NodeConfig) -> NodeConfig:
    """Cross-field checks."""
    if not cfg.insecure and not cfg.key_file:
        raise ConfigError(
            "key_file: no gossip key configured; refusing to start "
            "(create one with `peerd keygen > key` and pass --key-file, "
            "or set insecure = true for a throwaway test cluster)"
        )
    for url in cfg.etcd:
        if not (url.startswith("http://") or url.startswith("https://")):
            raise ConfigError(f"etcd: {url!r}: endpoints are http:// or https:// URLs")
    api_tls_context(cfg)  # both or neither, readable, a key that fits the certificate
    _check_pair(cfg.etcd_cert_file, "etcd_cert_file", cfg.etcd_key_file, "etcd_key_file")
    if cfg.etcd_cert_file:
        import ssl

        _load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cfg.etcd_cert_file, "etcd_cert_file",
                   cfg.etcd_key_file, "etcd_key_file")
    if cfg.etcd_ca_file:
        _check_readable(cfg.etcd_ca_file, "etcd_ca_file")
    return cfg


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{what}: {path}: cannot read: {e.strerror or e}") from None


def _check_pair(cert: str, cert_what: str, key: str, key_what: str) -> None:
    if bool(cert) != bool(key):
        given, missing = (cert_what, key_what) if cert else (key_what, cert_what)
        raise ConfigError(f"{missing}: {given} is set but {missing} is not; give both "
                          "(the same file if it holds the certificate and the key)")


def _load_pair(ctx: "ssl.SSLContext", cert: str, cert_what: str, key: str, key_what: str) -> None:
    import ssl

    _check_readable(cert, cert_what)
    _check_readable(key, key_what)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ConfigError(f"{cert_what}/{key_what}: {cert}, {key}: not a PEM certificate chain "
                          f"and its private key, or the key does not fit the certificate ({e.reason or e})") from None
    except OSError as e:  # e.g. a passphrase-protected key (no prompt in a daemon)
        raise ConfigError(f"{key_what}: {key}: cannot load: {e.strerror or e}") from None


def api_tls_context(cfg: NodeConfig) -> "ssl.SSLContext | None":
    """The server-side TLS context of the HTTP API (TLS 1.2 or later), or
    None when ``api_tls_cert`` / ``api_tls_key`` are not set.

    Raises:
        ConfigError: only one of the two set, a file unreadable, not PEM, or
            a key that does not fit the certificate (naming the field).
    """
    _check_pair(cfg.api_tls_cert, "api_tls_cert", cfg.api_tls_key, "api_tls_key")
    if not cfg.api_tls_cert:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(ctx, cfg.api_tls_cert, "api_tls_cert", cfg.api_tls_key, "api_tls_key")
    return ctx
