"""The sealer's I/O (shell): key files and the OS randomness that the sealer
core (:mod:`gossip.seal`) takes as arguments.

- ``read_keyring(path)`` reads a key file (one base64 key per line, ``#``
  comments) and parses it with ``Keyring.from_key_file_text``.
- ``generate_key()`` makes a new AES-256 key from ``os.urandom`` (``peerd
  keygen``, demos, tests).
- ``new_sealer(...)`` builds a ``Sealer`` whose nonces come from
  ``os.urandom``, the source every real node uses; the simulator and tests
  that need replayable bytes pass their own ``nonce`` to ``Sealer``.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from gossip.seal import Keyring, KeyringError, Sealer

__all__ = ["read_keyring", "generate_key", "new_sealer", "urandom_nonce"]

urandom_nonce: Callable[[int], bytes] = os.urandom
"""The nonce source of real nodes (``Sealer(nonce=...)``)."""


def read_keyring(path: str | os.PathLike[str]) -> Keyring:
    """Read one base64 key per line; blank lines and ``#`` comments skipped.

    Raises:
        KeyringError: the file cannot be read, a line is not a valid key
            (the message names the file and line), or no key is found.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            content = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"{path}: cannot read key file: {exc}") from None
    return Keyring.from_key_file_text(content, str(path))


def generate_key() -> str:
    """A new AES-256 key, base64 (for ``peerd keygen``)."""
    return Keyring.encode_key(os.urandom(32))


def new_sealer(keyring: Keyring | None, sender: str, epoch: int, *,
               nonce: Callable[[int], bytes] = urandom_nonce, **kwargs) -> Sealer:
    """``Sealer(keyring, sender, epoch, nonce=os.urandom, **kwargs)``: see
    :class:`gossip.seal.Sealer` for the arguments and what it raises."""
    return Sealer(keyring, sender, epoch, nonce=nonce, **kwargs)
