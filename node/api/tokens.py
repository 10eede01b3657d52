"""API tokens with names and roles (sans-IO: parsing and checking only).

A token file (``--api-tokens FILE``, YAML or JSON) lists named tokens::

    tokens:
      - {name: grafana, role: read, token: "..."}
      - {name: ci, role: operate, token: "..."}
      - {name: ops-alice, role: admin, token: "..."}

Roles, each including the ones before it:

========  ==============================================================
read      every GET route (status, members, ring, tasks, runs, logs, audit)
operate   + pause, resume, run now, cancel a run, backfill
admin     + apply and delete tasks, the gossip keyring
========  ==============================================================

The single ``--api-token`` (or ``--api-token-file``) is an ``admin`` token
named ``api-token``. The daemon reads the file at start and again on
SIGHUP; a file that does not parse leaves the tokens in force unchanged.

Rule: a presented token is compared with every configured token in
constant time (``hmac.compare_digest``, no early exit), so the time a
refusal takes does not depend on which token or how much of one matched.
"""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLES", "ApiToken", "TokenSet", "TokenFileError", "parse_token_file", "role_allows"]

ROLES = ("read", "operate", "admin")
MIN_TOKEN_LEN = 16
MAX_TOKENS = 256
_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class TokenFileError(ValueError):
    """The token file is wrong; the message names the file, entry and field."""


@dataclass(frozen=True)
class ApiToken:
    name: str
    role: str
    secret: bytes

    def __repr__(self) -> str:            # never print the secret
        return f"ApiToken({self.name!r}, {self.role!r})"


def role_allows(role: str, needed: str) -> bool:
    """Does ``role`` include ``needed``?"""
    return ROLES.index(role) >= ROLES.index(needed)


class TokenSet:
    """The tokens a node accepts."""

    def __init__(self, tokens: list[ApiToken] | tuple[ApiToken, ...] = ()) -> None:
        self.tokens = tuple(tokens)

    @classmethod
    def single(cls, token: str) -> "TokenSet":
        """``--api-token``: one admin token named ``api-token`` (none if empty)."""
        return cls([ApiToken("api-token", "admin", token.encode())] if token else [])

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, given: str) -> ApiToken | None:
        """The token ``given`` is, or None (constant time over all tokens)."""
        g = given.encode("utf-8", "replace")
        found = None
        for t in self.tokens:
            if hmac.compare_digest(g, t.secret) and found is None:
                found = t
        return found

    def merged(self, other: "TokenSet") -> "TokenSet":
        return TokenSet(self.tokens + other.tokens)


def parse_token_file(data: Any, source: str) -> list[ApiToken]:
    """Validate a decoded token file (``{tokens: [...]}`` or a list).

    Raises:
        TokenFileError: naming ``source``, the entry and the field.
    """
    if isinstance(data, dict) and list(data) == ["tokens"]:
        data = data["tokens"]
    if not isinstance(data, list):
        raise TokenFileError(f"{source}: expected a list of tokens or a mapping with only 'tokens'")
    if len(data) > MAX_TOKENS:
        raise TokenFileError(f"{source}: more than {MAX_TOKENS} tokens")
    out: list[ApiToken] = []
    names: set[str] = set()
    secrets: set[str] = set()
    for i, e in enumerate(data):
        where = f"{source}: token #{i + 1}"
        if not isinstance(e, dict):
            raise TokenFileError(f"{where}: expected a mapping {{name, role, token}}")
        extra = sorted(set(e) - {"name", "role", "token"}, key=str)
        if extra:
            raise TokenFileError(f"{where}: unknown field {extra[0]!r}")
        name = e.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise TokenFileError(f"{where}: name: 1-64 characters of A-Z a-z 0-9 . _ @ -")
        where = f"{source}: token {name!r}"
        if name in names:
            raise TokenFileError(f"{where}: name used twice")
        role = e.get("role")
        if role not in ROLES:
            raise TokenFileError(f"{where}: role: must be one of {', '.join(ROLES)}")
        secret = e.get("token")
        if not isinstance(secret, str) or len(secret) < MIN_TOKEN_LEN or len(secret) > 4096 \
                or not secret.isprintable() or secret != secret.strip():
            raise TokenFileError(f"{where}: token: at least {MIN_TOKEN_LEN} printable characters, "
                                 "no surrounding spaces (see `peerd keygen`)")
        if secret in secrets:
            raise TokenFileError(f"{where}: token: the same secret as another entry")
        names.add(name)
        secrets.add(secret)
        out.append(ApiToken(name, role, secret.encode()))
    return out
