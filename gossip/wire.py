"""Wire format of the membership protocol (plaintext, before sealing).

Theory of operation
-------------------
* A datagram body is a *compound*: a msgpack array whose items are messages.
  Each message is a msgpack array ``[type, field, ...]``. Because a msgpack
  array is just a header followed by its items, a compound is built by
  concatenating pre-encoded messages behind an array header
  (:func:`join_compound`), which lets the packer measure every message once.
* ``MsgType`` is APPEND ONLY (as memberlist's ``messageType``): values are
  never reused or renumbered. A compound item with an unknown type decodes to
  :class:`UnknownMsg` so an older member skips what a newer one adds.
* A push-pull stream body is ``[PUSH_PULL, version, join, sender, [state...]]``
  with one state per member ``[name, host, port, incarnation, tags, meta,
  state]``.

Rules
-----
1. ``decode_*`` never raises anything but :class:`RemoteProtocolError`,
   whatever the bytes (msgpack runs with strict size limits, then every field
   is checked for type and range). ``reason`` is a short counter label
   ("malformed", "oversized", "unknown_version").
2. Building a message with bad fields locally raises
   :class:`LocalProtocolError` (our bug, not the peer's).
3. Bounds: names <= 128 bytes UTF-8 (non-empty), host <= 255 bytes, port
   0..65535, incarnation and sequence numbers uint64, tags <= 64 entries
   (key <= 64 bytes, value <= 256 bytes), meta <= 512 bytes, user payload
   <= 64 KiB (in practice bounded by the packet budget).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import msgpack

__all__ = [
    "MsgType", "WireState", "ProtocolError", "RemoteProtocolError", "LocalProtocolError",
    "Ping", "IndirectPing", "Ack", "Nack", "Suspect", "Alive", "Dead", "User", "UnknownMsg",
    "Msg", "MemberRecord", "PushPull",
    "encode_msg", "encoded_size", "encode_compound", "join_compound", "decode_compound",
    "decode_compound_raw", "decode_push_pull_raw", "unpack_compound", "check_item",
    "check_row", "encode_push_pull_packed", "encode_push_pull_rows",
    "encode_push_pull", "decode_push_pull", "COMPOUND_HEADER_MAX_BYTES",
    "NAME_MAX_BYTES", "HOST_MAX_BYTES", "META_MAX_BYTES", "TAGS_MAX", "TAG_KEY_MAX_BYTES",
    "TAG_VALUE_MAX_BYTES", "USER_MAX_BYTES", "UINT64_MAX", "PUSH_PULL_VERSION",
]

NAME_MAX_BYTES: Final = 128
HOST_MAX_BYTES: Final = 255
META_MAX_BYTES: Final = 512
TAGS_MAX: Final = 64
TAG_KEY_MAX_BYTES = 64
TAG_VALUE_MAX_BYTES = 256
USER_KEY_MAX_BYTES = 128
USER_MAX_BYTES = 64 * 1024
UINT64_MAX: Final = 2**64 - 1
COMPOUND_HEADER_MAX_BYTES = 3          # 0xdc + uint16 count
COMPOUND_MAX_ITEMS: Final = 65535
PACKET_MAX_BYTES: Final = 64 * 1024           # any compound bigger is rejected outright
PUSH_PULL_VERSION = 1
PUSH_PULL_MAX_BYTES = 64 * 1024 * 1024
PUSH_PULL_MAX_MEMBERS = 100_000


class ProtocolError(Exception):
    """Base of wire errors. ``reason`` is a short label for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RemoteProtocolError(ProtocolError):
    """A peer sent something wrong. Drop it and count ``reason``."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something invalid (a bug on our side)."""


class MsgType(enum.IntEnum):
    """Message type codes. ONLY APPEND."""

    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    NACK = 3
    SUSPECT = 4
    ALIVE = 5
    DEAD = 6
    USER = 7
    PUSH_PULL = 8


class WireState(enum.IntEnum):
    """Member state codes in push-pull records. ONLY APPEND."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# -- field checks (raise the given error class) -------------------------------

def _chk_uint(v: Any, what: str, err: type[ProtocolError], hi: int = UINT64_MAX) -> None:
    if type(v) is not int or v < 0 or v > hi:
        raise err("malformed", f"{what} must be an integer in 0..{hi}, got {v!r:.40}")


def _chk_str(v: Any, what: str, err: type[ProtocolError], max_bytes: int,
             allow_empty: bool = False) -> None:
    if type(v) is not str:
        raise err("malformed", f"{what} must be a string")
    if not v and not allow_empty:
        raise err("malformed", f"{what} must not be empty")
    # len(str) <= len(utf8) <= 4*len(str): skip the encode in the common case.
    if len(v) > max_bytes or (len(v) * 4 > max_bytes and len(v.encode("utf-8", "surrogatepass")) > max_bytes):
        raise err("malformed", f"{what} longer than {max_bytes} bytes")
    if not v.isprintable() and not allow_empty:
        # names and hosts: no control characters (they end up in logs/JSON keys)
        raise err("malformed", f"{what} contains control characters")


def _chk_bytes(v: Any, what: str, err: type[ProtocolError], max_bytes: int) -> None:
    if type(v) is not bytes:
        raise err("malformed", f"{what} must be bytes")
    if len(v) > max_bytes:
        raise err("malformed", f"{what} longer than {max_bytes} bytes")


def _chk_bool(v: Any, what: str, err: type[ProtocolError]) -> None:
    if type(v) is not bool:
        raise err("malformed", f"{what} must be a bool")


def _chk_tags(v: Any, err: type[ProtocolError]) -> None:
    if not isinstance(v, Mapping):
        raise err("malformed", "tags must be a map")
    if len(v) > TAGS_MAX:
        raise err("malformed", f"more than {TAGS_MAX} tags")
    for k, val in v.items():
        _chk_str(k, "tag key", err, TAG_KEY_MAX_BYTES)
        if type(val) is not str or len(val.encode("utf-8", "surrogatepass")) > TAG_VALUE_MAX_BYTES:
            raise err("malformed", f"tag {k!r:.40} value must be a string <= {TAG_VALUE_MAX_BYTES} bytes")


def _freeze_tags(tags: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(tags, MappingProxyType):
        return tags
    return MappingProxyType(dict(tags))


# -- messages -------------------------------------------------------------------
# Each class validates in __post_init__ with LocalProtocolError; the decoder
# validates first with RemoteProtocolError and builds through _trusted() to
# avoid checking twice.

_LOCAL = LocalProtocolError


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target`` is the name the sender believes lives at the
    destination address (a mismatch is dropped: address reused)."""

    seq: int
    target: str
    sender: str

    def __post_init__(self) -> None:
        _chk_uint(self.seq, "ping.seq", _LOCAL)
        _chk_str(self.target, "ping.target", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.sender, "ping.sender", _LOCAL, NAME_MAX_BYTES)

    def fields(self) -> list:
        return [MsgType.PING, self.seq, self.target, self.sender]


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ping-req: please ping ``target`` at ``(host, port)`` and relay the ack
    (or a NACK if ``nack`` and it stays silent) with our ``seq``."""

    seq: int
    target: str
    host: str
    port: int
    nack: bool
    sender: str

    def __post_init__(self) -> None:
        _chk_uint(self.seq, "indirect_ping.seq", _LOCAL)
        _chk_str(self.target, "indirect_ping.target", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.host, "indirect_ping.host", _LOCAL, HOST_MAX_BYTES)
        _chk_uint(self.port, "indirect_ping.port", _LOCAL, 65535)
        _chk_bool(self.nack, "indirect_ping.nack", _LOCAL)
        _chk_str(self.sender, "indirect_ping.sender", _LOCAL, NAME_MAX_BYTES)

    def fields(self) -> list:
        return [MsgType.INDIRECT_PING, self.seq, self.target, self.host, self.port,
                self.nack, self.sender]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int

    def __post_init__(self) -> None:
        _chk_uint(self.seq, "ack.seq", _LOCAL)

    def fields(self) -> list:
        return [MsgType.ACK, self.seq]


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int

    def __post_init__(self) -> None:
        _chk_uint(self.seq, "nack.seq", _LOCAL)

    def fields(self) -> list:
        return [MsgType.NACK, self.seq]


@dataclass(frozen=True, slots=True)
class Suspect:
    """``sender`` suspects ``node`` at ``incarnation``."""

    incarnation: int
    node: str
    sender: str

    def __post_init__(self) -> None:
        _chk_uint(self.incarnation, "suspect.incarnation", _LOCAL)
        _chk_str(self.node, "suspect.node", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.sender, "suspect.sender", _LOCAL, NAME_MAX_BYTES)

    def fields(self) -> list:
        return [MsgType.SUSPECT, self.incarnation, self.node, self.sender]


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation`` with this address, tags, meta."""

    incarnation: int
    node: str
    host: str
    port: int
    tags: Mapping[str, str]
    meta: bytes

    def __post_init__(self) -> None:
        _chk_uint(self.incarnation, "alive.incarnation", _LOCAL)
        _chk_str(self.node, "alive.node", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.host, "alive.host", _LOCAL, HOST_MAX_BYTES)
        _chk_uint(self.port, "alive.port", _LOCAL, 65535)
        _chk_tags(self.tags, _LOCAL)
        _chk_bytes(self.meta, "alive.meta", _LOCAL, META_MAX_BYTES)
        object.__setattr__(self, "tags", _freeze_tags(self.tags))

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def fields(self) -> list:
        return [MsgType.ALIVE, self.incarnation, self.node, self.host, self.port,
                dict(self.tags), self.meta]


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender`` declares ``node`` dead at ``incarnation``. When
    ``sender == node`` this is a graceful leave (``left``), as in memberlist."""

    incarnation: int
    node: str
    sender: str

    def __post_init__(self) -> None:
        _chk_uint(self.incarnation, "dead.incarnation", _LOCAL)
        _chk_str(self.node, "dead.node", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.sender, "dead.sender", _LOCAL, NAME_MAX_BYTES)

    @property
    def left(self) -> bool:
        return self.node == self.sender

    def fields(self) -> list:
        return [MsgType.DEAD, self.incarnation, self.node, self.sender]


@dataclass(frozen=True, slots=True)
class User:
    """Opaque node-layer payload from ``sender``. ``key`` names a broadcast
    (a newer one with the same key supersedes it in the queue); "" for a
    direct message."""

    sender: str
    key: str
    data: bytes

    def __post_init__(self) -> None:
        _chk_str(self.sender, "user.sender", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.key, "user.key", _LOCAL, USER_KEY_MAX_BYTES, allow_empty=True)
        _chk_bytes(self.data, "user.data", _LOCAL, USER_MAX_BYTES)

    def fields(self) -> list:
        return [MsgType.USER, self.sender, self.key, self.data]


@dataclass(frozen=True, slots=True)
class UnknownMsg:
    """An item with a type code this version does not know (skipped)."""

    type_code: int

    def fields(self) -> list:  # pragma: no cover - never sent
        raise LocalProtocolError("unknown_type", "cannot encode an UnknownMsg")


Msg = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | User


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member's state in a push-pull exchange."""

    name: str
    host: str
    port: int
    incarnation: int
    tags: Mapping[str, str]
    meta: bytes
    state: WireState

    def __post_init__(self) -> None:
        _chk_str(self.name, "record.name", _LOCAL, NAME_MAX_BYTES)
        _chk_str(self.host, "record.host", _LOCAL, HOST_MAX_BYTES)
        _chk_uint(self.port, "record.port", _LOCAL, 65535)
        _chk_uint(self.incarnation, "record.incarnation", _LOCAL)
        _chk_tags(self.tags, _LOCAL)
        _chk_bytes(self.meta, "record.meta", _LOCAL, META_MAX_BYTES)
        if not isinstance(self.state, WireState):
            raise LocalProtocolError("malformed", "record.state must be a WireState")
        object.__setattr__(self, "tags", _freeze_tags(self.tags))

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    def fields(self) -> list:
        return [self.name, self.host, self.port, self.incarnation, dict(self.tags),
                self.meta, int(self.state)]


@dataclass(frozen=True, slots=True)
class PushPull:
    """A decoded push-pull body."""

    join: bool
    sender: str
    members: tuple[MemberRecord, ...]


def _trusted(cls, *args):
    """Build a message whose fields were already validated (decoder path)."""
    obj = object.__new__(cls)
    for name, value in zip(cls.__slots__, args):
        object.__setattr__(obj, name, value)
    return obj


# -- encoding -------------------------------------------------------------------

def encode_msg(msg: Msg) -> bytes:
    """Encode one message (a msgpack array)."""
    return msgpack.packb(msg.fields(), use_bin_type=True)


def encoded_size(msg: Msg) -> int:
    """Bytes ``msg`` takes inside a compound."""
    return len(encode_msg(msg))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    raise LocalProtocolError("oversized", f"{n} messages in one compound")


def join_compound(encoded: list[bytes]) -> bytes:
    """Concatenate pre-encoded messages into one compound body."""
    return _array_header(len(encoded)) + b"".join(encoded)


def encode_compound(msgs: list[Msg]) -> bytes:
    """Encode messages as one compound body."""
    return join_compound([encode_msg(m) for m in msgs])


# -- decoding -------------------------------------------------------------------

_R: Final = RemoteProtocolError
_SHORT_NAME = NAME_MAX_BYTES // 4   # chars; such a str is <= NAME_MAX_BYTES in UTF-8


def _unpack(data: bytes, max_len: int, max_array: int, max_map: int) -> Any:
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > max_len:
        raise _R("oversized", f"{len(data)} bytes")
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_str_len=max_len, max_bin_len=max_len, max_array_len=max_array,
            max_map_len=max_map, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many kinds; all mean "bad bytes"
        raise _R("malformed", f"msgpack: {type(exc).__name__}") from None


def _check_item(item: Any) -> int:
    """Validate one compound item in place; return its type code.

    Unknown (newer) type codes are returned as is, unchecked.
    """
    if type(item) is not list or not item:
        raise _R("malformed", "message must be a non-empty array")
    t = item[0]
    if type(t) is not int:
        raise _R("malformed", "message type must be an integer")
    n = len(item)
    if t == 5:  # ALIVE (the most common item)
        if n != 7:
            raise _R("malformed", "alive arity")
        _, inc, node, host, port, tags, meta = item
        _chk_uint(inc, "alive.incarnation", _R)
        _chk_str(node, "alive.node", _R, NAME_MAX_BYTES)
        _chk_str(host, "alive.host", _R, HOST_MAX_BYTES)
        _chk_uint(port, "alive.port", _R, 65535)
        if type(tags) is not dict:
            raise _R("malformed", "tags must be a map")
        if tags:
            _chk_tags(tags, _R)
        _chk_bytes(meta, "alive.meta", _R, META_MAX_BYTES)
    elif t == 0:  # PING
        if n != 4:
            raise _R("malformed", "ping arity")
        # inline fast paths: a value they accept, _chk_* accepts too
        # (a str of <= 32 chars is <= 128 bytes of UTF-8: no encode needed)
        v = item[1]
        if not (type(v) is int and 0 <= v <= UINT64_MAX):
            _chk_uint(v, "ping.seq", _R)
        v = item[2]
        if not (type(v) is str and 0 < len(v) <= _SHORT_NAME and v.isprintable()):
            _chk_str(v, "ping.target", _R, NAME_MAX_BYTES)
        v = item[3]
        if not (type(v) is str and 0 < len(v) <= _SHORT_NAME and v.isprintable()):
            _chk_str(v, "ping.sender", _R, NAME_MAX_BYTES)
    elif t == 2 or t == 3:  # ACK / NACK
        if n != 2:
            raise _R("malformed", "ack arity")
        v = item[1]
        if not (type(v) is int and 0 <= v <= UINT64_MAX):
            _chk_uint(v, "ack.seq", _R)
    elif t == 4 or t == 6:  # SUSPECT / DEAD
        if n != 4:
            raise _R("malformed", "suspect/dead arity")
        v = item[1]
        if not (type(v) is int and 0 <= v <= UINT64_MAX):
            _chk_uint(v, "incarnation", _R)
        v = item[2]
        if not (type(v) is str and 0 < len(v) <= _SHORT_NAME and v.isprintable()):
            _chk_str(v, "node", _R, NAME_MAX_BYTES)
        v = item[3]
        if not (type(v) is str and 0 < len(v) <= _SHORT_NAME and v.isprintable()):
            _chk_str(v, "sender", _R, NAME_MAX_BYTES)
    elif t == 1:  # INDIRECT_PING
        if n != 7:
            raise _R("malformed", "indirect_ping arity")
        _, seq, target, host, port, nack, sender = item
        _chk_uint(seq, "indirect_ping.seq", _R)
        _chk_str(target, "indirect_ping.target", _R, NAME_MAX_BYTES)
        _chk_str(host, "indirect_ping.host", _R, HOST_MAX_BYTES)
        _chk_uint(port, "indirect_ping.port", _R, 65535)
        _chk_bool(nack, "indirect_ping.nack", _R)
        _chk_str(sender, "indirect_ping.sender", _R, NAME_MAX_BYTES)
    elif t == 7:  # USER
        if n != 4:
            raise _R("malformed", "user arity")
        _chk_str(item[1], "user.sender", _R, NAME_MAX_BYTES)
        _chk_str(item[2], "user.key", _R, USER_KEY_MAX_BYTES, allow_empty=True)
        _chk_bytes(item[3], "user.data", _R, USER_MAX_BYTES)
    elif t < 0:
        raise _R("malformed", "negative message type")
    elif t == 8:
        raise _R("malformed", "push-pull inside a datagram")
    return t


_CLASSES = {0: Ping, 1: IndirectPing, 2: Ack, 3: Nack, 4: Suspect, 5: Alive, 6: Dead, 7: User}


def _to_msg(item: list) -> Msg | UnknownMsg:
    cls = _CLASSES.get(item[0])
    if cls is None:
        return UnknownMsg(item[0])
    if cls is Alive:
        item = list(item)
        item[5] = MappingProxyType(item[5])
    return _trusted(cls, *item[1:])


def unpack_compound(data: bytes) -> list:
    """Unpack a compound body with msgpack limits but without checking the
    items (call :func:`check_item` on each one you use).

    Raises:
        RemoteProtocolError: not msgpack, too big, or not an array.
    """
    obj = _unpack(data, PACKET_MAX_BYTES, COMPOUND_MAX_ITEMS, TAGS_MAX)
    if type(obj) is not list:
        raise _R("malformed", "compound must be an array")
    return obj


def check_item(item: Any) -> int:
    """Validate one unpacked compound item in place; return its type code.

    Raises:
        RemoteProtocolError: and nothing else.
    """
    try:
        return _check_item(item)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # defensive
        raise _R("malformed", f"{type(exc).__name__}") from None


def decode_compound_raw(data: bytes) -> list[list]:
    """Decode and validate a compound into ``[type, field, ...]`` lists
    (the core's fast path: no objects built). Field order is that of the
    message classes; ALIVE tags are a plain (validated) dict.

    Raises:
        RemoteProtocolError: as :func:`decode_compound`.
    """
    obj = _unpack(data, PACKET_MAX_BYTES, COMPOUND_MAX_ITEMS, TAGS_MAX)
    if type(obj) is not list:
        raise _R("malformed", "compound must be an array")
    try:
        for it in obj:
            _check_item(it)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # defensive: a validation path we did not foresee
        raise _R("malformed", f"{type(exc).__name__}") from None
    return obj


def decode_compound(data: bytes) -> list[Msg | UnknownMsg]:
    """Decode a compound datagram body.

    Returns:
        The messages in order; items of an unknown (newer) type come back as
        :class:`UnknownMsg`.
    Raises:
        RemoteProtocolError: for any other problem with ``data`` (and never
        anything else).
    """
    return [_to_msg(it) for it in decode_compound_raw(data)]


def encode_push_pull(states: list[MemberRecord], join: bool, sender: str = "") -> bytes:
    """Encode a full-state push-pull body (``sender`` = our name, may be "")."""
    _chk_str(sender, "push_pull.sender", _LOCAL, NAME_MAX_BYTES, allow_empty=True)
    return msgpack.packb(
        [int(MsgType.PUSH_PULL), PUSH_PULL_VERSION, bool(join), sender,
         [s.fields() for s in states]],
        use_bin_type=True,
    )


def check_row(s: Any) -> None:
    """Validate one push-pull member row in place.

    Raises:
        RemoteProtocolError: and nothing else.
    """
    try:
        if type(s) is not list or len(s) != 7:
            raise _R("malformed", "member record must be a 7-array")
        name, host, port, inc, tags, meta, st = s
        _chk_str(name, "record.name", _R, NAME_MAX_BYTES)
        _chk_str(host, "record.host", _R, HOST_MAX_BYTES)
        _chk_uint(port, "record.port", _R, 65535)
        _chk_uint(inc, "record.incarnation", _R)
        if type(tags) is not dict:
            raise _R("malformed", "tags must be a map")
        if tags:
            _chk_tags(tags, _R)
        _chk_bytes(meta, "record.meta", _R, META_MAX_BYTES)
        if type(st) is not int or not 0 <= st <= 3:
            raise _R("malformed", f"record.state {st!r:.20}")
    except RemoteProtocolError:
        raise
    except Exception as exc:  # defensive
        raise _R("malformed", f"{type(exc).__name__}") from None


def decode_push_pull_raw(data: bytes, check_rows: bool = True) -> tuple[bool, str, list]:
    """Decode a push-pull body into ``(join, sender, rows)``; each row is
    ``[name, host, port, incarnation, tags(dict), meta, state(int)]``.
    With ``check_rows=False`` the rows are NOT validated: the caller must
    run :func:`check_row` on every row it uses (the core's fast path).

    Raises:
        RemoteProtocolError: "malformed", "oversized" or "unknown_version".
    """
    obj = _unpack(data, PUSH_PULL_MAX_BYTES, PUSH_PULL_MAX_MEMBERS, TAGS_MAX)
    if type(obj) is not list or len(obj) != 5:
        raise _R("malformed", "push-pull must be a 5-array")
    t, version, join, sender, states = obj
    if type(t) is not int or t != MsgType.PUSH_PULL:
        raise _R("malformed", "not a push-pull body")
    if type(version) is not int or version != PUSH_PULL_VERSION:
        raise _R("unknown_version", f"push-pull version {version!r:.20}")
    _chk_bool(join, "push_pull.join", _R)
    _chk_str(sender, "push_pull.sender", _R, NAME_MAX_BYTES, allow_empty=True)
    if type(states) is not list:
        raise _R("malformed", "push-pull states must be an array")
    if check_rows:
        for s in states:
            check_row(s)
    return join, sender, states


def decode_push_pull(data: bytes) -> PushPull:
    """Decode a push-pull body.

    Raises:
        RemoteProtocolError: "malformed", "oversized" or "unknown_version".
    """
    join, sender, rows = decode_push_pull_raw(data)
    return PushPull(join=join, sender=sender, members=tuple(
        _trusted(MemberRecord, r[0], r[1], r[2], r[3], MappingProxyType(r[4]), r[5],
                 WireState(r[6])) for r in rows))


def encode_push_pull_packed(packed_rows: list[bytes], join: bool, sender: str = "") -> bytes:
    """Like :func:`encode_push_pull` from rows each already packed with
    msgpack (``packb(MemberRecord.fields())``; the core caches them)."""
    head = msgpack.packb([int(MsgType.PUSH_PULL), PUSH_PULL_VERSION, bool(join), sender],
                         use_bin_type=True)
    # turn the 4-array header into a 5-array and append the rows array
    return b"\x95" + head[1:] + _array32_header(len(packed_rows)) + b"".join(packed_rows)


def _array32_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_push_pull_rows(rows: list[list], join: bool, sender: str = "") -> bytes:
    """Fast path of :func:`encode_push_pull` for rows already shaped as
    ``MemberRecord.fields()`` and built from validated state (core use)."""
    return msgpack.packb([int(MsgType.PUSH_PULL), PUSH_PULL_VERSION, bool(join), sender, rows],
                         use_bin_type=True)
