"""Node configuration (shell): flags, config file and ``PEERD_*`` environment merged into a :class:`NodeConfig`.

Precedence (highest first): command-line flag, ``PEERD_<NAME>`` environment
variable, config file (``--config``, TOML / YAML / JSON by extension),
built-in default. The knobs, their defaults and the checks of their values
are node/cli/settings.py; this module reads the config file and the files the
settings name (secrets, API tokens, TLS certificates and keys).

A config error raises :class:`ConfigError` naming the source (file, flag or
environment variable), the key and the reason. Nothing here does network I/O.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import ssl


from node.cli.settings import PARSERS, ConfigError, NodeConfig
from node.tasks.decoding import DecodeError, check_tree, loads_json, loads_yaml


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
