"""Packet sealing: versioned envelope, AES-GCM under a keyring, replay window.

Pure code: no sockets, no clock, no files, no logging. The only randomness is
the nonce source handed in (``Sealer(nonce=...)``); key files, key generation
and the ``os.urandom`` nonce source are in the shell :mod:`gossip.seal_shell`.

Envelope (one UDP datagram, or one stream frame)::

    version (1 byte)  1 = AES-GCM, 0 = insecure plaintext
    v1:  nonce (12) | AES-GCM(key, nonce, plaintext, aad=version byte)  (+16 tag)
    v0:  plaintext

    plaintext = name_len (1) | sender name (utf-8, 1..48 bytes)
                | epoch (uint64 BE) | seq (uint64 BE) | body

Rules:

1. The primary key seals; every key in the ring opens (primary tried first),
   so keys rotate with no rejection when done in this order across the
   cluster: ``install`` everywhere, then ``use`` everywhere, then ``remove``.
2. A secure sealer accepts only version 1; an insecure one only version 0.
   The other version is counted as ``wrong_key`` (a cluster that mixes the
   two is misconfigured, not under attack). Any other version byte is
   ``unknown_version``.
3. Replay protection (memberlist has none): per sender name we remember the
   highest boot epoch seen and, for that epoch, an IPsec-style sliding window
   of ``REPLAY_WINDOW`` sequence numbers (RFC 4303 section 3.4.3). A lower
   epoch, a duplicate seq, or a seq older than the window is ``replay``.
   A higher epoch (the sender restarted) resets the window. The epoch is
   wall-clock milliseconds at start, so it grows across restarts.
   At most ``MAX_TRACKED_SENDERS`` senders are tracked; when a new sender
   would pass that, the least recently heard eighth of the table is
   forgotten at once (LRU by a per-packet stamp, amortized O(1)). A sender
   evicted from the table could have one old in-window packet replayed once,
   which the membership layer's incarnation rules make harmless.
4. The replay window is only updated after a packet authenticated, so forged
   packets cannot poison it.
5. ``open`` raises ``PacketRejected`` and nothing else, whatever the bytes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "Keyring",
    "KeyringError",
    "PacketRejected",
    "Sealer",
    "REJECT_REASONS",
    "VERSION_INSECURE",
    "VERSION_AESGCM",
    "MAX_SENDER_NAME_BYTES",
    "REPLAY_WINDOW",
    "STREAM_CONTEXT",
    "MAX_TRACKED_SENDERS",
    "EVICT_BATCH",
]

VERSION_INSECURE: Final = 0
VERSION_AESGCM: Final = 1

KEY_SIZES = (16, 24, 32)
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAX_SENDER_NAME_BYTES: Final = 48
"""Names up to 48 bytes keep the overhead at 46 + 48 = 94 <= 96 bytes
(``Config.seal_overhead_bytes``)."""

STREAM_CONTEXT: Final = b"stream"
"""Context of the sealer of stream frames (``Sealer(context=...)``)."""

REPLAY_WINDOW: Final = 1024
"""Sequence numbers remembered per sender (IPsec uses 32..1024; a node's
datagram seq is shared by every datagram it sends, to all peers, so a wider
window tolerates more reordering between destinations; stream frames count
apart, see ``STREAM_CONTEXT``)."""

MAX_TRACKED_SENDERS: Final = 4096
"""Upper bound on the replay table (LRU eviction, ``EVICT_BATCH`` at a time)."""

EVICT_BATCH: Final = MAX_TRACKED_SENDERS // 8
"""Senders forgotten at once when the replay table overflows."""

MAX_KEYS = 16
"""A keyring holds at most this many keys (every one is tried on open)."""

REJECT_REASONS = (
    "wrong_key",
    "truncated",
    "oversized",
    "unknown_version",
    "malformed",
    "replay",
)

_HEADER = struct.Struct(">QQ")  # epoch, seq
_HEADER_PACK: Final = _HEADER.pack
_HEADER_UNPACK_FROM: Final = _HEADER.unpack_from
_WINDOW_MASK: Final = (1 << REPLAY_WINDOW) - 1
_HEADER_SIZE: Final = _HEADER.size
_V_INSECURE: Final = bytes((VERSION_INSECURE,))
_V_AESGCM: Final = bytes((VERSION_AESGCM,))
_UINT64_MAX: Final = 2**64 - 1


class KeyringError(ValueError):
    """Bad key material or an impossible keyring operation."""


class PacketRejected(Exception):
    """A datagram or frame was dropped; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise KeyringError(f"key must be bytes, not {type(key).__name__}")
    if len(key) not in KEY_SIZES:
        raise KeyringError(
            f"key must be 16, 24 or 32 bytes (AES-128/192/256), got {len(key)}"
        )
    return bytes(key)


class Keyring:
    """An ordered set of AES keys: the primary seals, all of them open.

    Args:
        keys: at least one key; the first becomes the primary. Duplicates
            are ignored.

    Raises:
        KeyringError: empty ring, a key of the wrong size, too many keys.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        checked: list[bytes] = []
        for key in keys:
            k = _check_key(key)
            if k not in checked:
                checked.append(k)
        if not checked:
            raise KeyringError("keyring needs at least one key")
        if len(checked) > MAX_KEYS:
            raise KeyringError(f"keyring holds at most {MAX_KEYS} keys")
        self._keys = checked
        self._aead = {k: AESGCM(k) for k in checked}
        self._refresh()

    def _refresh(self) -> None:
        # cached per change (not per packet): primary cipher, all ciphers in order
        self._cipher_list = tuple(self._aead[k] for k in self._keys)
        self._primary_aead = self._cipher_list[0]

    # -- queries -----------------------------------------------------------
    @property
    def primary(self) -> bytes:
        """The key that seals."""
        return self._keys[0]

    def keys(self) -> list[bytes]:
        """All keys, primary first."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def _ciphers(self) -> list[AESGCM]:
        return list(self._cipher_list)

    # -- changes -----------------------------------------------------------
    def install(self, key: bytes) -> None:
        """Add ``key`` as a secondary key (opens, does not seal). Idempotent."""
        k = _check_key(key)
        if k in self._keys:
            return
        if len(self._keys) >= MAX_KEYS:
            raise KeyringError(f"keyring holds at most {MAX_KEYS} keys")
        self._keys.append(k)
        self._aead[k] = AESGCM(k)
        self._refresh()

    def use(self, key: bytes) -> None:
        """Make an installed ``key`` the primary.

        Raises:
            KeyringError: the key is not installed.
        """
        k = _check_key(key)
        if k not in self._keys:
            raise KeyringError(
                f"key {self.fingerprint(k)} is not installed; install it first"
            )
        self._keys.remove(k)
        self._keys.insert(0, k)
        self._refresh()

    def remove(self, key: bytes) -> None:
        """Remove a secondary key.

        Raises:
            KeyringError: the key is the primary, or not installed.
        """
        k = _check_key(key)
        if k not in self._keys:
            raise KeyringError(f"key {self.fingerprint(k)} is not installed")
        if k == self._keys[0]:
            raise KeyringError(
                f"key {self.fingerprint(k)} is the primary; use another key first"
            )
        self._keys.remove(k)
        del self._aead[k]
        self._refresh()

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def fingerprint(key: bytes) -> str:
        """Short, non-secret name for a key (first 8 hex of SHA-256)."""
        return hashlib.sha256(bytes(key)).hexdigest()[:8]

    @staticmethod
    def decode_key(text: str) -> bytes:
        """Decode one base64 key and check its size.

        Raises:
            KeyringError: not base64, or not 16/24/32 bytes.
        """
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyringError(f"key is not valid base64: {exc}") from None
        return _check_key(raw)

    @staticmethod
    def encode_key(key: bytes) -> str:
        return base64.b64encode(_check_key(key)).decode("ascii")

    @classmethod
    def from_key_file_text(cls, content: str, origin: str) -> "Keyring":
        """Parse a key file: one base64 key per line; blank lines and ``#``
        comments skipped. The shell reads the file
        (``gossip.seal_shell.read_keyring``); ``origin`` is its path.

        Raises:
            KeyringError: a line is not a valid key (the message names
                ``origin`` and the line), or no key is found.
        """
        keys: list[bytes] = []
        for lineno, line in enumerate(content.splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                keys.append(cls.decode_key(text))
            except KeyringError as exc:
                raise KeyringError(f"{origin}:{lineno}: {exc}") from None
        if not keys:
            raise KeyringError(f"{origin}: no key found (one base64 key per line)")
        try:
            return cls(keys)
        except KeyringError as exc:
            raise KeyringError(f"{origin}: {exc}") from None


class _ReplayState:
    # A plain class, not a dataclass: compiled by mypyc (sim/accel.py) a
    # dataclass constructor runs the interpreted generated __init__ (~1 us,
    # measured); a 1000-node simulation makes ~10^6 of these.
    __slots__ = ("epoch", "top_seq", "bitmap", "used")

    def __init__(self, epoch: int, top_seq: int, bitmap: int, used: int) -> None:
        self.epoch = epoch
        self.top_seq = top_seq  # highest seq accepted in this epoch
        self.bitmap = bitmap  # bit i set: seq (top_seq - i) was seen
        self.used = used  # the sealer's packet count when last heard (LRU)


class Sealer:
    """Seals outgoing bodies and opens incoming ones for one local node.

    Args:
        keyring: the shared, mutable keyring (changes take effect at once).
            ``None`` only with ``insecure=True``.
        sender: this node's name (1..48 utf-8 bytes), carried in every packet.
        epoch: this node's boot epoch (wall-clock ms at start), strictly
            greater after a restart.
        nonce: source of 12-byte nonces: ``os.urandom`` in the shells
            (``gossip.seal_shell.new_sealer``), a deterministic one in tests
            and the simulator.
        max_packet_bytes: bigger envelopes are rejected as ``oversized``
            (callers may pass a larger ``max_bytes`` for stream frames).
        insecure: send and accept plaintext (version 0) only.
        context: bound into every envelope as AES-GCM associated data; a
            sealer opens only what a sealer of the same context sealed.
            Datagrams use ``b""``; stream frames ``STREAM_CONTEXT``, with
            their own sequence numbers and replay table, so a burst of
            datagrams cannot push a stream frame waiting in the accept
            queue out of the replay window.

    Raises:
        KeyringError: no keyring and not insecure.
        ValueError: bad sender name or epoch.
    """

    def __init__(
        self,
        keyring: Keyring | None,
        sender: str,
        epoch: int,
        *,
        nonce: Callable[[int], bytes],
        max_packet_bytes: int = 65507,
        insecure: bool = False,
        context: bytes = b"",
    ) -> None:
        if keyring is None and not insecure:
            raise KeyringError(
                "no key configured; refusing to start (set insecure = true to run unsealed)"
            )
        name = sender.encode("utf-8") if isinstance(sender, str) else b""
        if not 1 <= len(name) <= MAX_SENDER_NAME_BYTES:
            raise ValueError(
                f"node name must be 1..{MAX_SENDER_NAME_BYTES} utf-8 bytes, got {sender!r}"
            )
        if not isinstance(epoch, int) or not 0 <= epoch <= _UINT64_MAX:
            raise ValueError(f"epoch must be a uint64, got {epoch!r}")
        self.keyring = keyring
        self.sender = sender
        self.epoch = epoch
        self.insecure = insecure
        self.max_packet_bytes = max_packet_bytes
        self._name = name
        self._prefix = bytes((len(name),)) + name
        self._nonce = nonce
        self._seq = 0
        self._aad = _V_AESGCM + bytes(context)
        # A plain dict and a use stamp, not an OrderedDict.move_to_end per
        # packet: in a 1000-node simulation (10^6 table entries) the linked
        # list's neighbours cost ~0.5-1.5 us of cache misses per packet (measured).
        self._replay: dict[str, _ReplayState] = {}
        self._heard = 0  # packets that reached the replay check

    # -- sizes -------------------------------------------------------------
    def overhead(self, sender_len: int | None = None) -> int:
        """Bytes added to a body by ``seal`` for a sender name of that length."""
        n = len(self._name) if sender_len is None else sender_len
        header = 1 + n + _HEADER.size
        if self.insecure:
            return 1 + header
        return 1 + NONCE_BYTES + TAG_BYTES + header

    # -- sealing -----------------------------------------------------------
    def seal(self, body: bytes) -> bytes:
        """Wrap ``body`` in an envelope under the primary key.

        Raises:
            OverflowError: the sequence space is exhausted (2**64 packets).
        """
        if self._seq >= _UINT64_MAX:
            raise OverflowError("sequence numbers exhausted; restart with a new epoch")
        self._seq += 1
        plain = self._prefix + _HEADER_PACK(self.epoch, self._seq) + body
        if self.insecure:
            return _V_INSECURE + plain
        nonce = self._nonce(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce source must return 12 bytes")
        return _V_AESGCM + nonce + self.keyring._primary_aead.encrypt(nonce, plain, self._aad)  # type: ignore[union-attr]

    # -- opening -----------------------------------------------------------
    def open(self, data: bytes, *, max_bytes: int | None = None) -> tuple[str, bytes]:
        """Check and unwrap one envelope.

        Args:
            data: the datagram or frame as received.
            max_bytes: size limit for this envelope (default
                ``max_packet_bytes``).

        Returns:
            ``(sender name, body)``.

        Raises:
            PacketRejected: for any bad input, with the reason.
        """
        try:
            return self._open(data, self.max_packet_bytes if max_bytes is None else max_bytes)
        except PacketRejected:
            raise
        except Exception as exc:  # defensive: nothing else may escape
            raise PacketRejected("malformed", f"{type(exc).__name__}") from None

    def _open(self, data: bytes, limit: int) -> tuple[str, bytes]:
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise PacketRejected("malformed", "not bytes")
            data = bytes(data)
        if not data:
            raise PacketRejected("truncated", "empty")
        if len(data) > limit:
            raise PacketRejected("oversized", f"{len(data)} > {limit} bytes")
        version = data[0]
        if version == VERSION_AESGCM:
            if self.insecure:
                raise PacketRejected("wrong_key", "sealed packet, insecure node")
            if len(data) < 1 + NONCE_BYTES + TAG_BYTES:
                raise PacketRejected("truncated", f"{len(data)} bytes")
            nonce = data[1 : 1 + NONCE_BYTES]
            ct = data[1 + NONCE_BYTES :]
            assert self.keyring is not None
            plain = None
            for aead in self.keyring._cipher_list:
                try:
                    plain = aead.decrypt(nonce, ct, self._aad)  # aad: the version byte + context
                    break
                except InvalidTag:
                    continue
            if plain is None:
                raise PacketRejected("wrong_key", "no key in the ring opens it")
            authenticated = True
        elif version == VERSION_INSECURE:
            if not self.insecure:
                raise PacketRejected("wrong_key", "plaintext packet, secure node")
            plain = data[1:]
            authenticated = False
        else:
            raise PacketRejected("unknown_version", f"version byte {version}")
        short = "malformed" if authenticated else "truncated"
        if len(plain) < 1:
            raise PacketRejected(short, "no header")
        name_len = plain[0]
        if not 1 <= name_len <= MAX_SENDER_NAME_BYTES:
            raise PacketRejected("malformed", f"sender name length {name_len}")
        end = 1 + name_len + _HEADER_SIZE
        if len(plain) < end:
            raise PacketRejected(short, "header cut short")
        try:
            sender = plain[1 : 1 + name_len].decode("utf-8")
        except UnicodeDecodeError:
            raise PacketRejected("malformed", "sender name not utf-8") from None
        epoch, seq = _HEADER_UNPACK_FROM(plain, 1 + name_len)
        if seq == 0:
            raise PacketRejected("malformed", "seq 0")
        self._check_replay(sender, epoch, seq)
        return sender, plain[end:]

    def _check_replay(self, sender: str, epoch: int, seq: int) -> None:
        replay = self._replay
        heard = self._heard = self._heard + 1
        state = replay.get(sender)
        if state is None or epoch > state.epoch:
            replay[sender] = _ReplayState(epoch, seq, 1, heard)
            if len(replay) > MAX_TRACKED_SENDERS:
                self._evict()
            return
        if epoch < state.epoch:
            raise PacketRejected("replay", f"{sender}: epoch {epoch} < {state.epoch}")
        state.used = heard
        top = state.top_seq
        if seq > top:
            shift = seq - top
            state.bitmap = ((state.bitmap << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            state.top_seq = seq
            return
        offset = top - seq
        if offset >= REPLAY_WINDOW:
            raise PacketRejected("replay", f"{sender}: seq {seq} older than window")
        bit = 1 << offset
        if state.bitmap & bit:
            raise PacketRejected("replay", f"{sender}: duplicate seq {seq}")
        state.bitmap |= bit

    def _evict(self) -> None:
        """Forget the least recently heard senders down to
        ``MAX_TRACKED_SENDERS - EVICT_BATCH`` (the newest entry stays)."""
        replay = self._replay
        by_use = sorted(replay, key=lambda name: replay[name].used)
        for name in by_use[:len(replay) - (MAX_TRACKED_SENDERS - EVICT_BATCH)]:
            del replay[name]

    def tracked_senders(self) -> int:
        """Number of senders in the replay table (bounded)."""
        return len(self._replay)
